"""zqcompile: ZeroQuant post-training quantization as a compiler over torch.fx graphs."""

from zqcompile import ops  # noqa: F401  (registers the torch.ops.zq custom ops)
from zqcompile.api import compile, load
from zqcompile.errors import ZQError
from zqcompile.inspection import format_error_report, inspect, report_error, to_networkx
from zqcompile.lkd import LKDResult
from zqcompile.model import QuantizedModel, WeightMemory
from zqcompile.onnx_export import export_onnx
from zqcompile.recipe import PRESETS, LinearPlan, LKDConfig, Recipe, load_recipe
from zqcompile.version import __version__

__all__ = [
    "compile", "inspect", "to_networkx", "report_error", "format_error_report", "ZQError", "Recipe", "LinearPlan",
    "load_recipe", "PRESETS", "LKDConfig", "LKDResult", "QuantizedModel", "WeightMemory", "export_onnx", "load", "__version__",
]
