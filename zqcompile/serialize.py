"""Saving and loading compiled models: ``qmodel.save(dir)`` / ``zqcompile.load(dir)``.

A saved model is a directory of data files, none of which can run code when loaded:

- ``weights.safetensors``: every tensor the model's graphs read (INT8 / packed INT4 weights, their float32
  scales, the floating-point tensors the recipe keeps), each stored once however many graphs or names read it,
  and each graph's example inputs;
- ``graph.<name>.json`` for each named graph (``forward``; a decoder adds more, e.g. ``prefill`` / ``decode``,
  over the same weights): the graph as data (:func:`graph_to_json`): its nodes, each op named and resolved on
  load through an allowlist (``torch.ops.aten.*``, ``torch.ops.zq.*``, ``operator.getitem`` and the scalar ops
  export emits for dynamic shapes), arguments as typed JSON values, the tensors it reads by name, dtype and
  shape, the export guards on its inputs as expressions (zqcompile.guards) and zqcompile's per-node metadata;
- ``manifest.json``: the format version, the files with their SHA-256, the model's call signature and output
  type (a ``transformers.modeling_outputs`` class, looked up by name, never imported from the file), the
  recipe, the compiler's counters / plans, optionally the FP model it was compiled from, and the SHA-256 of
  its own content.

Loading unpickles nothing (safetensors and JSON only) and checks the manifest field by field, the files against
their hashes, the tensors against what the graphs declare, the graphs' inputs and outputs against the
manifest's names, and finally that each graph type-checks on its example inputs (fake tensors). Anything
wrong is a ZQError: a wrong model is never returned. The hashes detect corruption, not tampering (whoever
writes the files writes the hashes too); what makes a foreign directory safe to load is that it holds data
only. Version 1 directories (a ``torch.export`` archive, which loading would unpickle) are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.utils._pytree as pytree
from torch.fx import Graph, GraphModule, Node

from zqcompile.capture import HF_TEXT_INPUTS, SUPPORTED_DTYPES, Captured
from zqcompile.errors import ZQError
from zqcompile.guards import GUARDS_META, parse_guard
from zqcompile.passes.infra import CompileContext, embedding_rows
from zqcompile.recipe import LinearPlan, Override, Recipe

FORMAT = "zqcompile-quantized-model"
FORMAT_VERSION = 3  # 3: plans record weight_symmetric (asymmetric INT4 + mins); INT4 packed half-split, unsigned
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORWARD = "forward"
GENERATION = "generation"  # a decoder's prefill / decode step over its KV cache (zqcompile.generation)
EXAMPLE_PREFIX = "__example_input__."
OUTPUT_TYPES_MODULE = "transformers.modeling_outputs"


def graph_file(name: str) -> str:
    return f"graph.{name}.json"


# ---- what a graph may name: the allowlists -----------------------------------------------------------------

OP_NAMESPACES = ("aten", "zq")
REFUSED_ATEN_OPS = frozenset({"from_file"})  # reads a file named by a string argument
PYTHON_OPS: dict[str, Callable[..., Any]] = {
    # getitem of multi-output ops, and the scalar arithmetic export emits on dynamic sizes
    **{f"operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_")},
    **{f"torch.{name}": getattr(torch, name) for name in (
        "sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite", "_sym_sqrt")},
    "math.ceil": math.ceil, "math.floor": math.floor, "math.sqrt": math.sqrt,
}
_PYTHON_OP_NAMES = {fn: name for name, fn in PYTHON_OPS.items()}
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64)}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last)}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")  # module paths: model.layers.0.weight
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def resolve_op(name: Any) -> Callable[..., Any]:
    """The callable a saved node names: an aten / zq op overload or an allowlisted Python op; else ZQError."""
    if not isinstance(name, str):
        raise ZQError(f"a graph node names {name!r} as its op; ops are named by strings")
    if name in PYTHON_OPS:
        return PYTHON_OPS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES or not all(_IDENTIFIER.match(p) for p in parts):
        raise ZQError(f"op {name!r} is not one a saved graph may call (aten.<op>.<overload>, zq.<op>.<overload> or "
                      f"one of {sorted(PYTHON_OPS)})")
    namespace, op, overload = parts
    if namespace == "aten" and op in REFUSED_ATEN_OPS:
        raise ZQError(f"op {name!r} reads files; a saved graph may not call it")
    try:
        overload_fn = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        raise ZQError(f"op {name!r} does not exist in torch {torch.__version__}; the model was saved by another "
                      f"version: compile and save it again with this one") from None
    if not isinstance(overload_fn, torch._ops.OpOverload):
        raise ZQError(f"{name!r} is not an op overload")
    return overload_fn


def op_name(target: Any) -> str:
    """The saved name of a call_function target; ZQError for a target outside the allowlist."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace in OP_NAMESPACES:
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    try:
        return _PYTHON_OP_NAMES[target]
    except (KeyError, TypeError):
        raise ZQError(f"the compiled graph calls {target!r}, which a saved graph may not name; it cannot be "
                      f"saved") from None


# ---- values: typed JSON ------------------------------------------------------------------------------------

def _encode(value: Any) -> Any:
    """A node argument as JSON: node references, scalars (non-finite floats spelled out), str, None, lists,
    tuples, dtypes, devices, layouts and memory formats."""
    if isinstance(value, Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ZQError(f"the compiled graph has an argument of type {type(value).__name__} ({value!r:.80}), which the "
                  f"saved format does not hold; it cannot be saved")


def _lookup(table: Mapping[str, Any], key: Any, what: str) -> Any:
    if not isinstance(key, str) or key not in table:
        raise ZQError(f"unknown {what} {key!r} in a saved graph")
    return table[key]


def _decode(value: Any, nodes: Mapping[str, Node], devices: Mapping[str, torch.device]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes, devices) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise ZQError(f"malformed value {value!r:.80} in a saved graph")
    (kind, data), = value.items()
    if kind == "node":
        return _lookup(nodes, data, "node reference (or one to a later node)")
    if kind == "tuple" and isinstance(data, list):
        return tuple(_decode(v, nodes, devices) for v in data)
    if kind == "float":
        return float(_lookup({"nan": "nan", "inf": "inf", "-inf": "-inf"}, data, "float"))
    if kind == "dtype":
        return _lookup(DTYPES, data, "dtype")
    if kind == "layout":
        return _lookup(LAYOUTS, data, "layout")
    if kind == "memory_format":
        return _lookup(MEMORY_FORMATS, data, "memory format")
    if kind == "device":
        try:
            device = torch.device(data)
        except (RuntimeError, TypeError):
            raise ZQError(f"malformed device {data!r:.40} in a saved graph") from None
        return devices.get(str(device), device)
    raise ZQError(f"malformed value {value!r:.80} in a saved graph")


def _encode_meta(value: Any) -> Any:
    if isinstance(value, LinearPlan):
        return {"linear_plan": dataclasses.asdict(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None  # not JSON: not saved


def _decode_meta(value: Any) -> Any:
    if isinstance(value, dict):
        return _linear_plan(value.get("linear_plan"))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ZQError(f"malformed node metadata {value!r:.80} in a saved graph")


def _linear_plan(data: Any) -> LinearPlan:
    fields = {f.name for f in dataclasses.fields(LinearPlan)}
    if not isinstance(data, dict) or set(data) != fields:
        raise ZQError(f"malformed linear plan {data!r:.120}")
    plan = LinearPlan(**data)
    if plan.weight_bits not in (None, 4, 8) or plan.act_bits not in (None, 8) or not isinstance(plan.reason, str):
        raise ZQError(f"malformed linear plan {data!r:.120}")
    return plan


# ---- pytree specs (the graph's calling convention): tuples, lists and dicts of leaves only ----------------------

def _spec_to_json(spec: pytree.TreeSpec) -> Any:
    def encode(obj: Any) -> Any:
        if isinstance(obj, int) and not isinstance(obj, bool):
            return "leaf"
        if type(obj) in (tuple, list):
            return {type(obj).__name__: [encode(v) for v in obj]}
        if type(obj) is dict and all(isinstance(k, str) for k in obj):
            return {"dict": [[k, encode(v)] for k, v in obj.items()]}
        raise ZQError(f"the compiled graph takes or returns a {type(obj).__name__}; the saved format holds tuples, "
                      f"lists and dicts of tensors only, so it cannot be saved")
    return encode(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))


def _spec_from_json(data: Any) -> pytree.TreeSpec:
    def decode(item: Any, depth: int) -> Any:
        if depth > 32:
            raise ZQError("malformed calling convention in a saved graph (nested too deeply)")
        if item == "leaf":
            return 0
        if isinstance(item, dict) and len(item) == 1:
            (kind, children), = item.items()
            if kind in ("tuple", "list") and isinstance(children, list):
                values = [decode(c, depth + 1) for c in children]
                return tuple(values) if kind == "tuple" else values
            if kind == "dict" and isinstance(children, list) and all(
                    isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children):
                return {k: decode(v, depth + 1) for k, v in children}
        raise ZQError(f"malformed calling convention {item!r:.80} in a saved graph")
    return pytree.tree_structure(decode(data, 0))


# ---- one graph <-> JSON ----------------------------------------------------------------------------------------

def _tensor_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def graph_to_json(gm: GraphModule, example_inputs: tuple, weights: dict[str, torch.Tensor],
                  input_names: tuple[str, ...] | None = None, output_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """``gm`` as a JSON-able dict; the tensors it reads go into ``weights`` (shared by every graph of a model:
    a tensor already there, by identity, is referred to, not stored again). ``input_names`` / ``output_names``
    name the placeholders and outputs (HF models), so a loader can check them against the manifest."""
    from zqcompile.passes.infra import attr_tensor

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise ZQError(f"the graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs")
    known = {_tensor_key(t): key for key, t in weights.items()}
    persistent = set(gm.state_dict(keep_vars=True))
    attrs: dict[str, dict[str, Any]] = {}
    nodes = []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = op_name(node.target)
        elif node.op in ("get_attr", "placeholder"):
            entry["target"] = node.target
        elif node.op != "output":
            raise ZQError(f"the compiled graph has a {node.op} node ({node.name}); a saved graph holds only "
                          f"function calls, so it cannot be saved")
        if node.op == "get_attr" and node.target not in attrs:
            tensor = attr_tensor(gm, node.target)
            if not isinstance(tensor, torch.Tensor):
                raise ZQError(f"{node.target} is a {type(tensor).__name__}, not a tensor; it cannot be saved")
            key = known.get(_tensor_key(tensor))
            if key is None:
                key = node.target if node.target not in weights else f"{node.target}.{len(weights)}"
                weights[key] = tensor
                known[_tensor_key(tensor)] = key
            kind = ("parameter" if isinstance(tensor, torch.nn.Parameter)
                    else "buffer" if node.target in persistent else "constant")
            attrs[node.target] = {"key": key, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                  "kind": kind}
        entry["args"] = _encode(list(node.args))
        entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
        meta = {k: _encode_meta(v) for k, v in node.meta.items() if k.startswith("zq_")}
        entry["meta"] = {k: v for k, v in meta.items() if v is not None}
        nodes.append(entry)
    codegen = gm.graph._codegen
    if not isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
        raise ZQError("the compiled graph lacks export's calling convention; it cannot be saved")
    info = codegen.pytree_info
    guards = list(gm.meta.get(GUARDS_META, ()))
    for text in guards:
        parse_guard(text)
    return {
        "nodes": nodes, "attrs": attrs, "guards": guards, "outputs": list(output_names),
        "inputs": [{"name": name, "dtype": DTYPE_NAMES[x.dtype], "shape": list(x.shape)}
                   for name, x in zip(input_names or [n.name for n in placeholders], example_inputs)],
        "orig_args": list(info.orig_args), "in_spec": _spec_to_json(info.in_spec),
        "out_spec": _spec_to_json(info.out_spec),
    }


DTYPE_NAMES = {d: name for name, d in DTYPES.items()}
ATTR_KINDS = ("parameter", "buffer", "constant")  # a constant is a buffer outside the state dict


def graph_from_json(data: Any, tensors: Mapping[str, torch.Tensor],
                    devices: Mapping[str, torch.device] | None = None) -> GraphModule:
    """The GraphModule ``data`` (from :func:`graph_to_json`) describes, reading ``tensors`` by key. Every name
    and value is checked; device arguments found in ``devices`` (saved -> wanted) are replaced. ZQError for
    anything malformed."""
    from zqcompile.passes.infra import attr_owner

    devices = devices or {}
    data = _dict(data, "graph", ("nodes", "attrs", "guards", "inputs", "outputs", "orig_args", "in_spec",
                                 "out_spec"))
    attrs = _dict(data["attrs"], "graph attrs")
    root: dict[str, torch.Tensor] = {}
    for target, spec in attrs.items():
        spec = _dict(spec, f"attr {target!r}", ("key", "dtype", "shape", "kind"))
        # dotted identifiers that shadow nothing of the GraphModule they are set on (graph, forward, _buffers, ...)
        if not _DOTTED.match(target) or any(p.startswith("_") or hasattr(GraphModule, p) for p in target.split(".")):
            raise ZQError(f"malformed attr name {target!r:.80} in a saved graph")
        tensor = tensors.get(spec["key"]) if isinstance(spec["key"], str) else None
        if tensor is None:
            raise ZQError(f"the graph reads tensor {spec['key']!r:.80}, which the weights file does not hold")
        if DTYPE_NAMES.get(tensor.dtype) != spec["dtype"] or list(tensor.shape) != spec["shape"]:
            raise ZQError(f"tensor {spec['key']!r} is {tensor.dtype} {tuple(tensor.shape)} in the weights file, but "
                          f"the graph declares {spec['dtype']} {spec['shape']}")
        if spec["kind"] not in ATTR_KINDS:
            raise ZQError(f"malformed kind {spec['kind']!r:.40} of tensor {target!r}")
        root[target] = torch.nn.Parameter(tensor, requires_grad=False) if spec["kind"] == "parameter" else tensor
    graph = Graph()
    nodes: dict[str, Node] = {}
    if not isinstance(data["nodes"], list) or not data["nodes"]:
        raise ZQError("a saved graph has no nodes")
    for entry in data["nodes"]:
        entry = _dict(entry, "graph node", ("name", "op", "args", "kwargs", "meta"), optional=("target",))
        name, op = entry["name"], entry["op"]
        if not isinstance(name, str) or not _IDENTIFIER.match(name) or name in nodes:
            raise ZQError(f"malformed or repeated node name {name!r:.80} in a saved graph")
        args = _decode(entry["args"], nodes, devices)
        kwargs = {k: _decode(v, nodes, devices) for k, v in _dict(entry["kwargs"], "kwargs").items()}
        if not isinstance(args, list):
            raise ZQError(f"malformed args of node {name}")
        if op == "call_function":
            node = graph.create_node(op, resolve_op(entry.get("target")), tuple(args), kwargs, name=name)
        elif op == "get_attr" and entry.get("target") in root and not args and not kwargs:
            node = graph.get_attr(entry["target"])
        elif op == "placeholder" and isinstance(entry.get("target"), str) and _IDENTIFIER.match(entry["target"]):
            node = graph.placeholder(entry["target"])
        elif op == "output" and len(args) == 1 and not kwargs:
            node = graph.output(args[0])
        else:
            raise ZQError(f"malformed {op!r:.40} node {name} in a saved graph")
        if node.name != name:
            raise ZQError(f"node name {name!r} of a saved graph is not usable (it would become {node.name!r})")
        node.meta.update({k: _decode_meta(v) for k, v in _dict(entry["meta"], "node metadata").items()
                          if isinstance(k, str) and k.startswith("zq_")})
        nodes[name] = node
    if graph.find_nodes(op="output") == [] or list(graph.nodes)[-1].op != "output":
        raise ZQError("a saved graph does not end with its output")
    if not isinstance(data["orig_args"], list) or not all(isinstance(a, str) for a in data["orig_args"]):
        raise ZQError("malformed argument names in a saved graph")
    graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(
        data["orig_args"], _spec_from_json(data["in_spec"]), _spec_from_json(data["out_spec"])))
    try:
        graph.lint()
        gm = GraphModule(root, graph)
    except ZQError:
        raise
    except Exception as err:  # lint and code generation raise many types; all mean "malformed graph"
        raise ZQError(f"a saved graph is malformed: {type(err).__name__}: {err}") from err
    for target, spec in attrs.items():  # export's constants are buffers left out of the state dict
        if spec["kind"] == "constant":
            owner, leaf = attr_owner(gm, target)
            owner._non_persistent_buffers_set.add(leaf)
    guards = data["guards"]
    if not isinstance(guards, list):
        raise ZQError("malformed guards in a saved graph")
    for text in guards:
        parse_guard(text)
    gm.meta[GUARDS_META] = list(guards)
    return gm


def _dict(value: Any, what: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
    """``value`` as a dict with string keys, exactly the ``required`` (and ``optional``) ones if given."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ZQError(f"malformed {what}: expected a mapping, got {type(value).__name__}")
    if required or optional:
        missing, unknown = set(required) - set(value), set(value) - set(required) - set(optional)
        if missing or unknown:
            raise ZQError(f"malformed {what}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return value


def _type_check(gm: GraphModule, example_inputs: tuple, name: str) -> None:
    """Run the graph on fake example inputs: it must type-check with its tensors. Restores export's
    ``meta['val']`` (dtype, shape) on every node, which the cuda backend's rewrites read."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    except Exception as err:  # an op's shape or dtype check; all mean "the graph does not fit its tensors"
        raise ZQError(f"saved graph {name!r} does not run on its example inputs with its tensors "
                      f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                      f"the directory is corrupted or mixes files of different models: save the model again") from err


# ---- save ------------------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    data = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name not in ("overrides", "lkd")}
    data["overrides"] = [{**({"module": o.module} if o.module is not None else {"role": o.role}), **o.settings}
                         for o in recipe.overrides]
    # LKD has already been applied to the saved weights; its settings are kept for the record only
    data["lkd"] = None if recipe.lkd is None else {
        k: v for k, v in dataclasses.asdict(recipe.lkd).items() if v is None or isinstance(v, (str, int, float, bool))}
    return data


def _recipe_from_dict(data: Any) -> Recipe:
    data = dict(_dict(data, "recipe"))
    data.pop("lkd", None)
    overrides = data.pop("overrides", [])
    if not isinstance(overrides, list):
        raise ZQError("malformed recipe overrides")
    known = {f.name for f in dataclasses.fields(Recipe)}
    if set(data) - known:
        raise ZQError(f"malformed recipe: unknown keys {sorted(set(data) - known)}")
    parsed = []
    for entry in overrides:
        entry = dict(_dict(entry, "recipe override"))
        selector = {k: entry.pop(k) for k in ("module", "role") if k in entry}
        parsed.append(Override(settings=entry, **selector))
    try:
        return Recipe(overrides=parsed, **data)
    except (TypeError, ValueError, AttributeError) as err:  # values of the wrong type that Recipe's checks assume
        raise ZQError(f"malformed recipe in the manifest ({err}); save the model again") from None


def output_type_name(cls: type | None) -> str | None:
    """How the manifest names an output type: a class of transformers.modeling_outputs, or None."""
    if cls is None:
        return None
    if cls.__module__ != OUTPUT_TYPES_MODULE:
        raise ZQError(f"{cls.__module__}.{cls.__qualname__} is not an output class of {OUTPUT_TYPES_MODULE}, "
                      f"the only output types a saved model may name; this model cannot be saved")
    return f"{OUTPUT_TYPES_MODULE}:{cls.__qualname__}"


def resolve_output_type(name: Any) -> type | None:
    """The output class a manifest names, looked up in transformers.modeling_outputs (nothing is imported by
    name): a ModelOutput subclass, or ZQError."""
    if name is None:
        return None
    from transformers import modeling_outputs
    from transformers.utils import ModelOutput

    module, _, qualname = name.partition(":") if isinstance(name, str) else ("", "", "")
    cls = getattr(modeling_outputs, qualname, None) if module == OUTPUT_TYPES_MODULE and _IDENTIFIER.match(
        qualname) else None
    if not (isinstance(cls, type) and issubclass(cls, ModelOutput)):
        raise ZQError(f"output type {name!r:.120} is not a ModelOutput class of {OUTPUT_TYPES_MODULE} in this "
                      f"transformers; save the model again with the transformers version installed here")
    return cls


def named_graphs(qmodel) -> dict[str, tuple[GraphModule, tuple]]:
    """The graphs a model saves, by name, with their example inputs: ``forward`` (the compiled graph), the
    generation step if the model has one, and any in ``qmodel.extra_graphs`` (name -> (graph, example inputs));
    all of them share the forward graph's tensors."""
    graphs = {FORWARD: (qmodel.graph_module, tuple(qmodel.example_inputs))}
    if getattr(qmodel, "generation", None) is not None:
        graphs[GENERATION] = (qmodel.generation.graph_module, qmodel.generation.example_inputs())
    return {**graphs, **getattr(qmodel, "extra_graphs", {})}


def save(qmodel, directory: str | os.PathLike, *, source_model: str | None = None) -> Path:
    """Write ``qmodel`` to ``directory`` (created; existing files of a saved model are replaced)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ZQError(f"{str(directory)!r} is a file; pass a directory to save the model into")
    weights: dict[str, torch.Tensor] = {}
    graphs, examples = {}, {}
    for name, (gm, example_inputs) in named_graphs(qmodel).items():
        if not _IDENTIFIER.match(name):
            raise ZQError(f"graph name {name!r} must be an identifier")
        names = (qmodel.input_names, qmodel.output_keys) if name == FORWARD else (None, ())
        graphs[name] = graph_to_json(gm, example_inputs, weights, *names)
        examples.update({f"{EXAMPLE_PREFIX}{name}.{i}": x for i, x in enumerate(example_inputs)})
    # one contiguous CPU copy per distinct tensor (safetensors stores no views or shared storage)
    stored = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in {**weights, **examples}.items()}
    ctx = qmodel.context
    node_names = {n.name for n in qmodel.graph_module.graph.nodes}
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "zqcompile_version": _zqcompile_version(), "torch_version": torch.__version__,
        "model_class": qmodel.model_class,
        "input_names": list(qmodel.input_names) if qmodel.input_names is not None else None,
        "output_type": output_type_name(qmodel.output_type), "output_keys": list(qmodel.output_keys),
        "max_seq_len": qmodel.max_seq_len, "dtype": DTYPE_NAMES[qmodel.dtype], "device": str(qmodel.device),
        "backend": qmodel.backend, "source_model": source_model,
        "recipe": _recipe_to_dict(qmodel.recipe),
        # what zqcompile.generation.restore needs besides the generation graph (cache layout, special tokens)
        "generation": qmodel.generation.manifest() if getattr(qmodel, "generation", None) is not None else None,
        # the distilled weights are the saved ones; its per-block log is kept for the record
        "lkd_log": str(qmodel.lkd_result) if getattr(qmodel, "lkd_result", None) is not None else None,
        "context": {
            "plans": {name: dataclasses.asdict(plan) for name, plan in ctx.plans.items()},
            "counters": dict(ctx.counters), "passes_run": list(ctx.passes_run),
            "unfused_reasons": {node: why for node, why in ctx.unfused_reasons.items() if node in node_names},
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS
    save_file(stored, str(weights_path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    manifest["files"] = {WEIGHTS: sha256_of(weights_path)}
    manifest["graphs"] = {}
    for name, data in graphs.items():
        path = directory / graph_file(name)
        path.write_text(json.dumps(data, allow_nan=False))
        manifest["graphs"][name] = graph_file(name)
        manifest["files"][graph_file(name)] = sha256_of(path)
    manifest["manifest_sha256"] = _content_hash(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return directory


def _zqcompile_version() -> str:
    from zqcompile.version import __version__
    return __version__


# ---- load ------------------------------------------------------------------------------------------------------

def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ZQError(f"{path} is corrupted (not valid JSON: {str(err)[:200]}); save the model again") from err


MANIFEST_FIELDS: dict[str, Callable[[Any], bool]] = {
    "format": lambda v: v == FORMAT,
    "format_version": lambda v: v == FORMAT_VERSION,
    "zqcompile_version": lambda v: isinstance(v, str),
    "torch_version": lambda v: isinstance(v, str),
    "model_class": lambda v: isinstance(v, str) and bool(_IDENTIFIER.match(v)),
    "input_names": lambda v: v is None or (isinstance(v, list) and 0 < len(v) == len(set(v)) and v[0] == "input_ids"
                                           and all(n in HF_TEXT_INPUTS for n in v)),
    "output_type": lambda v: v is None or isinstance(v, str),
    "output_keys": lambda v: isinstance(v, list) and len(v) == len(set(v)) and all(
        isinstance(k, str) and _IDENTIFIER.match(k) for k in v),
    "max_seq_len": lambda v: v is None or (type(v) is int and v > 0),
    "dtype": lambda v: v in {DTYPE_NAMES[d] for d in SUPPORTED_DTYPES},
    "device": lambda v: isinstance(v, str) and bool(re.fullmatch(r"(cpu|cuda)(:[0-9]+)?", v)),
    "backend": lambda v: v in ("cpu", "cuda"),
    "source_model": lambda v: v is None or isinstance(v, str),
    "recipe": lambda v: isinstance(v, dict),
    "lkd_log": lambda v: v is None or isinstance(v, str),
    "generation": lambda v: v is None or _valid_generation(v),
    "context": lambda v: isinstance(v, dict) and set(v) == {"plans", "counters", "passes_run", "unfused_reasons"},
    "files": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, str) and _SHA256.match(h)
                                                   for k, h in v.items()),
    "graphs": lambda v: isinstance(v, dict) and FORWARD in v and all(
        isinstance(k, str) and _IDENTIFIER.match(k) and f == graph_file(k) for k, f in v.items()),
    "manifest_sha256": lambda v: isinstance(v, str) and bool(_SHA256.match(v)),
}


def _valid_generation(v: Any) -> bool:
    def optional_ids(x: Any) -> bool:
        return x is None or type(x) is int or (isinstance(x, list) and all(type(i) is int for i in x))

    return (isinstance(v, dict) and set(v) == {"layers", "max_cache_len", "max_positions", "eos_token_id",
                                               "pad_token_id"}
            and isinstance(v["layers"], list) and all(isinstance(layer, list) and all(
                type(d) is int and d > 0 for d in layer) for layer in v["layers"])
            and type(v["max_cache_len"]) is int and v["max_cache_len"] > 0
            and (v["max_positions"] is None or type(v["max_positions"]) is int)
            and optional_ids(v["eos_token_id"]) and (v["pad_token_id"] is None or type(v["pad_token_id"]) is int))


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved model, checked field by field (and against its own hash)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ZQError(f"{str(directory)!r} is not a directory; pass the directory written by qmodel.save() "
                      f"or `zqcompile compile --out`")
    if not path.is_file():
        raise ZQError(f"{str(directory)!r} has no {MANIFEST}: it is not a saved zqcompile model (save one with "
                      f"qmodel.save(dir) or `zqcompile compile MODEL --out DIR`)")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZQError(f"{path} is not a zqcompile model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        old = {1: " (a torch.export archive, which loading would have to unpickle: zqcompile no longer reads it)",
               2: " (before asymmetric INT4 weights: its plans and INT4 weights are in an earlier layout)"}.get(
                   version, "")
        raise ZQError(f"{directory} was saved in zqcompile format version {version!r}{old} by zqcompile "
                      f"{manifest.get('zqcompile_version')}; this zqcompile reads version {FORMAT_VERSION}: compile "
                      f"the model again and save it with this version")
    if set(manifest) != set(MANIFEST_FIELDS):
        raise ZQError(f"{path} is corrupted: fields missing {sorted(set(MANIFEST_FIELDS) - set(manifest))}, unknown "
                      f"{sorted(set(manifest) - set(MANIFEST_FIELDS))}; save the model again")
    for field, valid in MANIFEST_FIELDS.items():
        if not valid(manifest[field]):
            raise ZQError(f"{path} is corrupted: field {field!r} has the invalid value {manifest[field]!r:.120}; "
                          f"save the model again")
    if manifest["manifest_sha256"] != _content_hash(manifest):
        raise ZQError(f"{path} is corrupted: its content does not match the hash recorded in it; save the model again")
    expected_files = {WEIGHTS, *manifest["graphs"].values()}
    if set(manifest["files"]) != expected_files:
        raise ZQError(f"{path} is corrupted: it lists files {sorted(manifest['files'])}, expected "
                      f"{sorted(expected_files)}; save the model again")
    return manifest


def _verified(directory: Path, manifest: dict[str, Any], name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise ZQError(f"{directory} is incomplete: {name} is missing; save the model again")
    if sha256_of(path) != manifest["files"][name]:
        raise ZQError(f"{path} is corrupted: its SHA-256 does not match the one recorded in {MANIFEST} when the "
                      f"model was saved; save the model again")
    return path


def _context_from(data: dict[str, Any], recipe: Recipe, nodes: set[str]) -> CompileContext:
    ctx = CompileContext(recipe)
    plans, counters = _dict(data["plans"], "plans"), _dict(data["counters"], "counters")
    ctx.plans = {name: _linear_plan(plan) for name, plan in plans.items()}
    if not all(type(v) is int for v in counters.values()):
        raise ZQError("malformed pass counters in the manifest")
    ctx.counters.update(counters)
    if not isinstance(data["passes_run"], list) or not all(isinstance(p, str) for p in data["passes_run"]):
        raise ZQError("malformed passes_run in the manifest")
    ctx.passes_run = list(data["passes_run"])
    reasons = _dict(data["unfused_reasons"], "unfused reasons")
    if not set(reasons) <= nodes or not all(isinstance(v, str) for v in reasons.values()):
        raise ZQError("the manifest's unfused reasons name nodes the graph does not have; save the model again")
    ctx.unfused_reasons = dict(reasons)
    return ctx


def _check_signature(manifest: dict[str, Any], data: dict[str, Any], examples: tuple, gm: GraphModule) -> None:
    """The forward graph's own inputs and outputs agree with the manifest's call signature."""
    inputs = data["inputs"]
    if not isinstance(inputs, list) or len(inputs) != len(examples):
        raise ZQError("the forward graph's inputs do not match its example inputs; save the model again")
    for spec, example in zip(inputs, examples):
        spec = _dict(spec, "graph input", ("name", "dtype", "shape"))
        if spec["dtype"] != DTYPE_NAMES.get(example.dtype) or spec["shape"] != list(example.shape):
            raise ZQError(f"graph input {spec['name']!r} is declared {spec['dtype']} {spec['shape']} but its example "
                          f"is {example.dtype} {tuple(example.shape)}; save the model again")
    names = manifest["input_names"]
    if names is not None and [spec["name"] for spec in inputs] != names:
        raise ZQError(f"the manifest's input_names {names} do not match the graph's inputs "
                      f"{[spec['name'] for spec in inputs]}; save the model again")
    if names is not None and any(example.is_floating_point() for example in examples):
        raise ZQError("an HF model's graph must take integer inputs; save the model again")
    if names is not None and 0 not in embedding_rows(gm):
        raise ZQError("the graph's input named input_ids indexes no embedding table; save the model again")
    outputs = list(gm.graph.nodes)[-1].args[0]
    count = len(pytree.tree_leaves(outputs, is_leaf=lambda x: isinstance(x, Node)))
    keys = manifest["output_keys"]
    if data["outputs"] != keys:
        raise ZQError(f"the manifest's output_keys {keys} do not match the graph's outputs {data['outputs']}; save "
                      f"the model again")
    if (manifest["output_type"] is None) != (names is None) or (names is not None and count != len(keys)):
        raise ZQError(f"the forward graph returns {count} outputs but the manifest names {keys} "
                      f"({manifest['output_type']}); save the model again")


@dataclasses.dataclass
class SavedModel:
    """What a saved directory holds, checked: the compiled forward graph with its call signature (``captured``), the
    recipe, the compiler's context, the backend it was saved for, and the other named graphs (generation's)."""

    captured: Captured
    recipe: Recipe
    context: CompileContext
    backend: str
    source_model: str | None
    extra_graphs: dict[str, tuple[GraphModule, tuple]]
    generation: dict[str, Any] | None  # the manifest's generation entry (zqcompile.generation.restore)


def read_saved(directory: str | os.PathLike, *, device: str | torch.device | None = None) -> SavedModel:
    """Read and check a directory written by ``qmodel.save(directory)`` without running any code from it
    (``zqcompile.load`` makes the model of it). ``device`` defaults to the device it was compiled on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from zqcompile.backends import resolve_backend

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights_path = _verified(directory, manifest, WEIGHTS)
    graph_data = {name: _read_json(_verified(directory, manifest, file)) for name, file in manifest["graphs"].items()}
    saved_device = torch.device(manifest["device"])
    try:
        device = torch.device(device) if device is not None else saved_device
    except (RuntimeError, TypeError) as err:
        raise ZQError(f"device={device!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZQError(f"{directory} holds a model compiled for {manifest['device']}, and torch sees no GPU here; "
                      f"pass device='cpu' to load it on the CPU (with backend 'cpu')")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the device its tensors will report
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ZQError(f"{weights_path} cannot be read ({err}); save the model again") from err
    output_type = resolve_output_type(manifest["output_type"])
    recipe = _recipe_from_dict(manifest["recipe"])

    # device arguments of the graph (arange(..., device=), to(device)) follow the model to the device it loads on
    saved_names = (str(saved_device), saved_device.type, f"{saved_device.type}:{saved_device.index or 0}")
    devices = {name: device for name in saved_names}
    graphs: dict[str, tuple[GraphModule, tuple]] = {}
    used = set()
    for name, data in graph_data.items():
        try:
            gm = graph_from_json(data, tensors, devices)
        except RecursionError:
            raise ZQError(f"saved graph {name!r} is nested too deeply to be one zqcompile wrote") from None
        prefix = f"{EXAMPLE_PREFIX}{name}."
        count = sum(key.startswith(prefix) for key in tensors)
        examples = tuple(tensors.get(f"{prefix}{i}") for i in range(count))
        if any(x is None for x in examples):
            raise ZQError(f"{weights_path} lacks example inputs of graph {name!r}; save the model again")
        _type_check(gm, examples, name)
        graphs[name] = (gm, examples)
        used |= {spec["key"] for spec in data["attrs"].values()} | {f"{prefix}{i}" for i in range(count)}
    if used != set(tensors):
        raise ZQError(f"{weights_path} holds tensors no graph reads ({sorted(set(tensors) - used)[:3]}); the "
                      f"directory mixes files of different models: save the model again")

    gm, examples = graphs.pop(FORWARD)
    _check_signature(manifest, graph_data[FORWARD], examples, gm)
    if output_type is not None:
        fields = {f.name for f in dataclasses.fields(output_type)}
        if not set(manifest["output_keys"]) <= fields:
            raise ZQError(f"output_keys {manifest['output_keys']} are not fields of {output_type.__name__}; save "
                          f"the model again")
    ctx = _context_from(manifest["context"], recipe, {n.name for n in gm.graph.nodes})
    input_names = manifest["input_names"]
    captured = Captured(gm, manifest["model_class"], tuple(input_names) if input_names is not None else None,
                        output_type, tuple(manifest["output_keys"]), manifest["max_seq_len"], examples,
                        DTYPES[manifest["dtype"]], device)
    backend = resolve_backend("auto" if device.type != saved_device.type else manifest["backend"], device)
    if (GENERATION in graphs) != (manifest["generation"] is not None):
        raise ZQError(f"{MANIFEST} and the saved graphs disagree on the generation graph; save the model again")
    return SavedModel(captured, recipe, ctx, backend, manifest["source_model"], graphs, manifest["generation"])
