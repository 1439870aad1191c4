"""Graph passes, one per file; each is ``fn(gm, ctx) -> PassResult`` (see infra.py). The rule layer and the
patterns that several passes match are in patterns.py."""

from zqcompile.passes.additive_attention_mask import additive_attention_mask
from zqcompile.passes.annotate_roles import annotate_roles
from zqcompile.passes.awq_scale_weights import awq_scale_weights
from zqcompile.passes.broadcast_padding_mask import broadcast_padding_mask
from zqcompile.passes.calibrate_activations import calibrate_activations
from zqcompile.passes.canonicalize_conv1d import canonicalize_conv1d
from zqcompile.passes.cleanup import cleanup
from zqcompile.passes.decompose_outliers import decompose_outliers
from zqcompile.passes.distill_blocks import distill_blocks
from zqcompile.passes.fuse_kv_cache_write import fuse_kv_cache_write
from zqcompile.passes.fuse_quant_into_elementwise import fuse_quant_into_elementwise
from zqcompile.passes.fuse_residual_rmsnorm import fuse_residual_rmsnorm
from zqcompile.passes.fuse_rotary_embedding import fuse_rotary_embedding
from zqcompile.passes.fuse_sibling_linears import fuse_sibling_linears
from zqcompile.passes.gptq_round_weights import gptq_round_weights
from zqcompile.passes.grouped_query_attention import grouped_query_attention
from zqcompile.passes.infra import CompileContext, PassResult, run_passes
from zqcompile.passes.insert_activation_quant import insert_activation_quant
from zqcompile.passes.low_rank_correction import low_rank_correction
from zqcompile.passes.lower_linear_to_int8_gemm import lower_linear_to_int8_gemm
from zqcompile.passes.plan_linears import plan_linears
from zqcompile.passes.quantize_weights import quantize_weights
from zqcompile.passes.remove_dropout import remove_dropout
from zqcompile.passes.remove_tensor_asserts import remove_tensor_asserts
from zqcompile.passes.rotate_hadamard import rotate_hadamard
from zqcompile.passes.smooth_activations import smooth_activations

__all__ = [
    "CompileContext", "PassResult", "run_passes", "remove_dropout", "remove_tensor_asserts", "canonicalize_conv1d",
    "annotate_roles", "plan_linears", "distill_blocks", "rotate_hadamard", "calibrate_activations",
    "smooth_activations", "decompose_outliers", "awq_scale_weights", "gptq_round_weights", "low_rank_correction",
    "quantize_weights",
    "insert_activation_quant", "fuse_quant_into_elementwise", "lower_linear_to_int8_gemm", "cleanup",
    "fuse_sibling_linears", "additive_attention_mask", "grouped_query_attention", "fuse_rotary_embedding",
    "broadcast_padding_mask", "fuse_residual_rmsnorm", "fuse_kv_cache_write",
]
