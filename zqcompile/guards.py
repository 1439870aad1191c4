"""The shape conditions a captured graph holds under, as data: recorded at capture, checked on every call.

``torch.export`` turns the conditions it found while tracing (a static width, ``seq <= max_positions``,
``batch % 2 == 0`` after a reshape, equal dims of two inputs) into Python code that it ``exec``s into a
``_guards_fn`` submodule, which raises a bare ``AssertionError``. zqcompile keeps the expressions instead
(``args[0].size()[1] <= 32``), removes that submodule, and checks them itself before running the graph, so a
violation is a ZQError naming the condition. The expressions are evaluated by a small interpreter over their
syntax tree (integers, ``+ - * / // % **``, comparisons, ``and / or / not``, ``min`` / ``max`` / ``abs`` /
``int`` / ``math.floor`` / ``math.ceil`` and ``args[i].size()[d]``), never by ``eval``: a saved model's guards are data, whoever wrote the file.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import math
import operator
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.fx import GraphModule

from zqcompile.errors import ZQError

GUARDS_META = "zq_input_guards"  # GraphModule.meta key: the guard expressions of its inputs

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod, ast.Div: operator.truediv, ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_CALLS: dict[str, Callable[..., Any]] = {  # the calls torch's Python printer of sympy writes into guards
    "Max": max, "Min": min, "max": max, "min": min, "abs": abs, "int": int, "math.floor": math.floor,
    "math.ceil": math.ceil, "math.trunc": math.trunc,
}


def _size_ref(node: ast.AST) -> tuple[int, int] | None:
    """(input index, dim) of an ``args[i].size()[d]`` expression, else None."""
    if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and isinstance(node.value, ast.Call) and not node.value.args and not node.value.keywords):
        return None
    size = node.value.func
    if not (isinstance(size, ast.Attribute) and size.attr == "size" and isinstance(size.value, ast.Subscript)):
        return None
    args = size.value
    if not (isinstance(args.value, ast.Name) and args.value.id == "args" and isinstance(args.slice, ast.Constant)):
        return None
    index, dim = args.slice.value, node.slice.value
    if type(index) is not int or type(dim) is not int:
        return None
    return index, dim


def _evaluate(node: ast.AST, sizes: Sequence[Sequence[int]] | None) -> Any:
    """The value of a guard expression; with ``sizes=None`` it only checks the grammar (sizes read as 1)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, sizes)
    if isinstance(node, ast.Constant) and type(node.value) in (int, bool):
        return node.value
    if (ref := _size_ref(node)) is not None:
        if sizes is None:
            return 1
        index, dim = ref
        if index >= len(sizes) or not -len(sizes[index]) <= dim < len(sizes[index]):
            raise _Violation
        return sizes[index][dim]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, sizes), _evaluate(node.right, sizes)
        if sizes is None or (isinstance(node.op, (ast.FloorDiv, ast.Mod, ast.Div)) and right == 0):
            return 1
        if isinstance(node.op, ast.Pow) and not (isinstance(right, int) and 0 <= right <= 64):
            raise ValueError(f"exponent {right!r}")  # a hostile exponent must not run for ever
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        value = _evaluate(node.operand, sizes)
        return -value if isinstance(node.op, ast.USub) else not value
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, sizes) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left, result = _evaluate(node.left, sizes), True
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, sizes)
            result = result and _COMPARE[type(op)](left, right)
            left = right
        return result
    if isinstance(node, ast.Call) and _call_name(node.func) in _CALLS and not node.keywords and node.args:
        return _CALLS[_call_name(node.func)](*(_evaluate(a, sizes) for a in node.args))
    raise ValueError(ast.dump(node)[:120])


def _call_name(func: ast.AST) -> str | None:
    """``min`` or ``math.floor`` for a called name or module attribute, else None."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return None


class _Violation(Exception):
    """An ``args[i].size()[d]`` that the given inputs do not have (a wrong number of inputs or dims)."""


def parse_guard(text: Any) -> ast.Expression:
    """The syntax tree of a guard expression; ZQError if it is not one (bad syntax, names, calls)."""
    try:
        if not isinstance(text, str) or len(text) > 2000:
            raise ValueError("not a short string")
        tree = ast.parse(text, mode="eval")
        _evaluate(tree, None)
    except (SyntaxError, ValueError, RecursionError) as err:
        raise ZQError(f"shape guard {text!r} is not an expression zqcompile can check ({err})") from None
    return tree


def check_guards(guards: Sequence[str], inputs: Sequence[Any], model_class: str) -> None:
    """Raise ZQError naming the first guard that ``inputs`` violate."""
    sizes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else () for x in inputs)
    key = (tuple(guards), sizes)
    if key in _PASSED:  # the guards read only the shapes: a call of shapes that passed before passes
        return
    for text in guards:
        try:
            holds = bool(_evaluate(_parsed(text), sizes))
        except _Violation:
            holds = False
        except (ValueError, ArithmeticError) as err:
            raise ZQError(f"shape guard {text!r} of {model_class} cannot be evaluated ({err}); compile the model "
                          f"again") from None
        if not holds:
            shapes = ", ".join(str(list(s)) for s in sizes)
            raise ZQError(f"inputs of shapes {shapes} violate {text!r}, a condition torch.export found when it "
                          f"captured {model_class} (args[i].size()[d] is dim d of input i); compile it with "
                          f"example_inputs of the shapes you need")
    if len(_PASSED) < _PASSED_LIMIT:
        _PASSED.add(key)


# Parsing and evaluating BERT's 8 guards on every call cost ~0.2 ms of host time per forward: each text is parsed
# once, and each (guards, input shapes) pair that passed is remembered (bounded, for streams of unbucketed shapes)
_PASSED: set[tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]] = set()
_PASSED_LIMIT = 4096


@functools.lru_cache(maxsize=1024)
def _parsed(text: str) -> ast.Expression:
    return parse_guard(text)


@contextlib.contextmanager
def recording_guards() -> Iterator[list[str]]:
    """Inside the block, ``ExportedProgram.module()`` reports its guard expressions into the yielded list,
    written over the flat inputs as ``args[i]`` (as torch writes them into its ``_guards_fn``)."""
    from torch.export import _unlift
    from torch.utils import _pytree as pytree

    recorded: list[str] = []
    convert = _unlift._convert_guards_code_to_fn

    def record(guards_code: list[str], paths: list[Any]):
        for code in guards_code:
            for index, path in enumerate(paths):
                code = code.replace("L" + pytree.keystr(path), f"args[{index}]")
            if code not in recorded:
                recorded.append(code)
        return convert(guards_code, paths)

    _unlift._convert_guards_code_to_fn = record
    try:
        yield recorded
    finally:
        _unlift._convert_guards_code_to_fn = convert


def unlift_with_guards(program: torch.export.ExportedProgram) -> GraphModule:
    """``program.module()`` without its exec'd ``_guards_fn``: the guards go into ``gm.meta[GUARDS_META]``."""
    with recording_guards() as guards:
        gm = program.module()
    for text in guards:
        parse_guard(text)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.validate_inputs = False  # export's pre-hook would check its own ranges instead (seq >= 2, bare asserts)
    gm.recompile()
    gm.meta[GUARDS_META] = list(guards)
    return gm
