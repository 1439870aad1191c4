"""Saving and loading compiled models: ``qmodel.save(dir)`` / ``zqcompile.load(dir)``.

A saved model is a directory of three files:

- ``weights.safetensors``: every tensor of the compiled graph (INT8 / packed INT4 weights, their float32
  scales, the floating-point tensors the recipe keeps) and the example inputs;
- ``graph.pt2``: the compiled graph as a ``torch.export`` program (dynamic batch / seq axes), saved with
  its tensors replaced by one-element stand-ins so the weights live in one place only;
- ``manifest.json``: the format version, the SHA-256 of both files, the model's call signature and output
  type, the recipe, the compiler's counters / plans / per-node metadata (what ``inspect`` shows) and,
  optionally, the path of the FP model it was compiled from (the CLI's ``bench`` / ``eval`` use it).

Loading needs neither the FP model nor the original Python classes beyond ``transformers``' output type.
A directory of another format version, or whose files do not match their recorded hashes, raises
ZQError: a wrong model is never returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from zqcompile.capture import Captured
from zqcompile.errors import ZQError
from zqcompile.passes.infra import CompileContext, replace_attr_tensor
from zqcompile.recipe import LinearPlan, Override, Recipe

FORMAT = "zqcompile-quantized-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
GRAPH = "graph.pt2"
EXAMPLE_PREFIX = "__example_input__."


# ---- helpers ----------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tracked_nodes(gm: GraphModule) -> list[Node]:
    """The nodes whose compiler metadata is saved: zq ops and aten.linear, in graph order (torch.export keeps
    the order of these calls, so the i-th one of the saved graph is the i-th one of the loaded graph)."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and (str(n.target).startswith("zq.") or n.target is torch.ops.aten.linear.default)]


def _encode_meta(value: Any) -> Any:
    if isinstance(value, LinearPlan):
        return {"__linear_plan__": dataclasses.asdict(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None  # not JSON: not saved


def _decode_meta(value: Any) -> Any:
    if isinstance(value, dict) and "__linear_plan__" in value:
        return LinearPlan(**value["__linear_plan__"])
    return value


def _recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    data = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name not in ("overrides", "lkd")}
    data["overrides"] = [{**({"module": o.module} if o.module is not None else {"role": o.role}), **o.settings}
                         for o in recipe.overrides]
    # LKD has already been applied to the saved weights; its settings are kept for the record only
    data["lkd"] = None if recipe.lkd is None else {
        k: v for k, v in dataclasses.asdict(recipe.lkd).items() if v is None or isinstance(v, (str, int, float, bool))}
    return data


def _recipe_from_dict(data: dict[str, Any]) -> Recipe:
    data = dict(data)
    data.pop("lkd", None)
    overrides = []
    for entry in data.pop("overrides"):
        entry = dict(entry)
        selector = {k: entry.pop(k) for k in ("module", "role") if k in entry}
        overrides.append(Override(settings=entry, **selector))
    known = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(overrides=overrides, **{k: v for k, v in data.items() if k in known})


def _import_path(cls: type | None) -> str | None:
    return None if cls is None else f"{cls.__module__}:{cls.__qualname__}"


def _resolve(path: str | None) -> type | None:
    if path is None:
        return None
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ZQError(f"the saved model returns {path}, which this environment cannot import ({err}); install "
                      f"the transformers version it was saved with") from err
    return obj


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the same shape and dtype backed by one element (what the .pt2 stores instead of weights)."""
    stub = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
    return torch.nn.Parameter(stub, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else stub


# ---- save -------------------------------------------------------------------------------------------

def save(qmodel, directory: str | os.PathLike, *, source_model: str | None = None) -> Path:
    """Write ``qmodel`` to ``directory`` (created; existing files of a saved model are replaced)."""
    from safetensors.torch import save_file

    from zqcompile.onnx_export import export_program

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    args = tuple(qmodel.example_inputs)
    program = export_program(qmodel, qmodel.graph_module, args)
    tensors = {**program.state_dict, **program.constants}
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ZQError("the compiled graph holds a non-tensor constant (a script object); it cannot be saved")
    weights = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}  # clone: no shared storage
    weights.update({f"{EXAMPLE_PREFIX}{i}": a.detach().cpu().contiguous() for i, a in enumerate(args)})
    for name, tensor in program.state_dict.items():
        program.state_dict[name] = _stand_in(tensor)
    for name, tensor in program.constants.items():
        program.constants[name] = _stand_in(tensor)

    original = _tracked_nodes(qmodel.graph_module)
    saved = _tracked_nodes(program.module())
    if [n.target for n in original] != [n.target for n in saved]:
        raise ZQError("re-exporting the compiled graph changed its quantized ops; this model cannot be saved")
    index_of = {n.name: i for i, n in enumerate(original)}
    ctx = qmodel.context

    def by_index(reasons: dict[str, str]) -> dict[str, str]:
        return {str(index_of[name]): why for name, why in reasons.items() if name in index_of}

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "zqcompile_version": _zqcompile_version(), "torch_version": torch.__version__,
        "model_class": qmodel.model_class, "input_names": qmodel.input_names,
        "output_type": _import_path(qmodel.output_type), "output_keys": list(qmodel.output_keys),
        "max_seq_len": qmodel.max_seq_len, "dtype": _dtype_name(qmodel.dtype), "device": str(qmodel.device),
        "backend": qmodel.backend, "source_model": source_model,
        "recipe": _recipe_to_dict(qmodel.recipe),
        # the distilled weights are the saved ones; its per-block log is kept for the record
        "lkd_log": str(qmodel.lkd_result) if getattr(qmodel, "lkd_result", None) is not None else None,
        "context": {
            "plans": {name: dataclasses.asdict(plan) for name, plan in ctx.plans.items()},
            "counters": dict(ctx.counters), "passes_run": list(ctx.passes_run),
            "unfused_reasons": by_index(ctx.unfused_reasons),
        },
        "nodes": [{"target": str(n.target),
                   "meta": {k: _encode_meta(v) for k, v in n.meta.items()
                            if k.startswith("zq_") and _encode_meta(v) is not None}} for n in original],
    }
    weights_path, graph_path = directory / WEIGHTS, directory / GRAPH
    save_file(weights, str(weights_path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    torch.export.save(program, str(graph_path))
    manifest["files"] = {WEIGHTS: sha256_of(weights_path), GRAPH: sha256_of(graph_path)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


def _zqcompile_version() -> str:
    from zqcompile.version import __version__
    return __version__


# ---- load -------------------------------------------------------------------------------------------

def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved model, after checking that it is one this version can read."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ZQError(f"{str(directory)!r} is not a directory; pass the directory written by qmodel.save() "
                      f"or `zqcompile compile --out`")
    if not path.is_file():
        raise ZQError(f"{str(directory)!r} has no {MANIFEST}: it is not a saved zqcompile model (save one with "
                      f"qmodel.save(dir) or `zqcompile compile MODEL --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ZQError(f"{path} is corrupted (not valid JSON: {err}); save the model again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZQError(f"{path} is not a zqcompile model manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ZQError(f"{directory} was saved in zqcompile format version {manifest.get('format_version')!r} "
                      f"(zqcompile {manifest.get('zqcompile_version')}); this zqcompile reads version "
                      f"{FORMAT_VERSION}: compile and save the model again with this version")
    return manifest


def _verified(directory: Path, manifest: dict[str, Any], name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise ZQError(f"{directory} is incomplete: {name} is missing; save the model again")
    expected = manifest.get("files", {}).get(name)
    if sha256_of(path) != expected:
        raise ZQError(f"{path} is corrupted: its SHA-256 does not match the one recorded in {MANIFEST} when the "
                      f"model was saved; save the model again")
    return path


def load(directory: str | os.PathLike, *, device: str | torch.device | None = None):
    """Load a model written by ``qmodel.save(directory)``; it runs without the original FP model.

    ``device`` defaults to the device it was compiled on (a CUDA model needs a GPU to load).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from zqcompile.backends import build_runner, resolve_backend
    from zqcompile.model import QuantizedModel
    from zqcompile.pipeline import run_target_phases

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights_path = _verified(directory, manifest, WEIGHTS)
    graph_path = _verified(directory, manifest, GRAPH)
    device = torch.device(device or manifest["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZQError(f"{directory} holds a model compiled for {manifest['device']}, and torch sees no GPU here; "
                      f"pass device='cpu' to load it on the CPU (with backend 'cpu')")
    try:
        weights = load_file(str(weights_path), device=str(device))
    except SafetensorError as err:
        raise ZQError(f"{weights_path} cannot be read ({err}); save the model again") from err
    try:
        program = torch.export.load(str(graph_path))
    except Exception as err:  # deserialization raises many types
        raise ZQError(f"{graph_path} could not be loaded by torch {torch.__version__} (saved with torch "
                      f"{manifest.get('torch_version')}): {str(err).strip().splitlines()[0]}") from err
    gm = program.module()
    expected_names = set(program.state_dict) | set(program.constants)
    graph_weights = {k: v for k, v in weights.items() if not k.startswith(EXAMPLE_PREFIX)}
    if set(graph_weights) != expected_names:
        raise ZQError(f"{weights_path} does not hold the tensors {GRAPH} needs; the directory mixes files of "
                      f"different models: save the model again")
    for name, tensor in graph_weights.items():
        replace_attr_tensor(gm, name, tensor)

    nodes = _tracked_nodes(gm)
    saved_nodes = manifest["nodes"]
    if [str(n.target) for n in nodes] != [entry["target"] for entry in saved_nodes]:
        raise ZQError(f"{graph_path} does not match the node list of {MANIFEST}; save the model again")
    for node, entry in zip(nodes, saved_nodes):
        node.meta.update({k: _decode_meta(v) for k, v in entry["meta"].items()})
    gm.recompile()

    recipe = _recipe_from_dict(manifest["recipe"])
    saved_ctx = manifest["context"]
    ctx = CompileContext(recipe)
    ctx.plans = {name: LinearPlan(**plan) for name, plan in saved_ctx["plans"].items()}
    ctx.counters.update(saved_ctx["counters"])
    ctx.passes_run = list(saved_ctx["passes_run"])
    ctx.unfused_reasons = {nodes[int(i)].name: why for i, why in saved_ctx["unfused_reasons"].items()}

    examples = tuple(weights[f"{EXAMPLE_PREFIX}{i}"] for i in range(sum(k.startswith(EXAMPLE_PREFIX) for k in weights)))
    input_names = manifest["input_names"]
    captured = Captured(gm, manifest["model_class"], tuple(input_names) if input_names is not None else None,
                        _resolve(manifest["output_type"]), tuple(manifest["output_keys"]), manifest["max_seq_len"],
                        examples, getattr(torch, manifest["dtype"]), device)
    backend = resolve_backend("auto" if device.type != torch.device(manifest["device"]).type else manifest["backend"],
                              device)
    qmodel = QuantizedModel(gm, captured, recipe, ctx, backend,
                            runner=build_runner(run_target_phases(gm, ctx, backend), backend, None))
    qmodel.source_model = manifest.get("source_model")
    return qmodel
