"""Export a compiled model to ONNX so that onnxruntime runs integer kernels.

The compiled FX graph is re-exported with ``torch.export`` (dynamic batch and sequence axes) and handed to
``torch.onnx.export(dynamo=True)`` with a translation for every ``zq::`` op; aten ops use torchlib's.

How the zq ops become ONNX (CPU onnxruntime, measured in ``benchmarks/onnx_ort.py``):

- Per-token activation quantization: ``s = max(ReduceMax(x), -ReduceMin(x)) / 127`` (1 where the row is
  all zero), then one per-axis ``QuantizeLinear`` over the ``[tokens, K]`` view with zero point 128
  (``round_half_even(x / s) + 128``). The int8 values of the zq graph are carried as
  ``uint8 = int8 + 128`` everywhere in the ONNX graph: ORT's s8 x s8 ``MatMulInteger`` runs at 0.2-0.3x
  FP32.
- ``int8_linear``: ``com.microsoft::MatMulIntegerToFloat(q_u8, W^T u8, a_scale=1, b_scale=per-column,
  a_zero_point=128, b_zero_point=128)``, the int8 weight shifted to uint8 in the graph (folded when the
  session loads; the file keeps int8). u8 x u8 rather than u8 x s8: ORT's u8 x s8 kernel on x86 CPUs without
  AVX-VNNI (VPMADDUBSW) saturates pairs of products at int16, so its results differ from the zq op's exact
  int32 sums; u8 x u8 is exact on every CPU (``int8="u8s8"`` keeps the int8 weight: about 2x faster there,
  see BENCHMARKS.md). Then ``Mul`` by the per-token scale and ``Add`` the bias. The per-token scale is
  applied outside: MatMulIntegerToFloat's ``a_scale`` is per tensor or per column of A (along K), so a
  per-row scale given there silently computes something else.
- ``int4_linear`` with input-dim groups whose size is a power of two >= 16 (the ``w4a8`` preset):
  ``com.microsoft::MatMulNBits(bits=4, accuracy_level=4)`` on the dequantized activations. This is *not*
  the zq op's arithmetic: ORT re-quantizes the activations to int8 per block of ``block_size`` values
  (finer than per token) and accumulates per block, so outputs differ slightly from zqcompile's
  (``int4="exact"`` runs the zq arithmetic instead: the INT4 values unpacked to int8 through the INT8 path
  when there are no input-dim groups, otherwise in floating point).
- Asymmetric INT4 (``w_min``): MatMulNBits with float zero points ``-min / scale`` (ORT dequantizes
  ``(q - zp) * s``, equal to ``s * q + min`` up to float rounding); in ``"exact"`` mode the dequantized
  activations times the dequantized weight in floating point.
- ``weight_only_linear`` and linears with INT8 input-dim groups: the weight dequantized in the graph
  (int8 initializer x scale) and a float ``MatMul``; onnxruntime folds the dequantization at load time.
- Fused ops: LayerNormalization / RMSNorm / GELU / SiLU*mul written out, followed by the same
  per-token quantization; the online Hadamard (alone or fused with the quantization) as a MatMul by the
  block's Hadamard matrix.

Weights are stored as int8 (INT8) or uint8 (packed INT4) initializers with float32 scales; the file holds
no floating-point copy of a quantized weight.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.fx import GraphModule

from zqcompile.errors import ZQError
from zqcompile.ops import WEIGHT_ARGS, hadamard_matrix
from zqcompile.passes.infra import attr_tensor, set_attr_tensor
from zqcompile.quant import ACT_QMAX, int4_group_width, unpack_int4

MS_DOMAIN = "com.microsoft"
ACT_ZERO_POINT = 128  # int8 activation values travel as uint8 = int8 + 128
INT4_MODES = ("matmulnbits", "exact")
INT8_MODES = ("exact", "u8s8")
MATMULNBITS_ACCURACY_LEVEL = 4  # int8 compute; accuracy_level 0 (fp32 compute) is ~20x slower than FP32 on CPU


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    file_bytes: int
    op_counts: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        integer_ops = ", ".join(f"{k}={self.op_counts[k]}" for k in ("MatMulIntegerToFloat", "MatMulNBits",
                                                                       "QuantizeLinear") if self.op_counts[k])
        return (f"{self.path} ({self.file_bytes / 2 ** 20:.2f} MB, {sum(self.op_counts.values())} nodes); "
                f"quantized ops: {integer_ops or 'none'}")


# ----------------------------------------------------------------------------------------------------
# com.microsoft schemas: onnx does not ship them, and onnxscript / onnx.checker need them
# ----------------------------------------------------------------------------------------------------

def register_ms_schemas() -> None:
    """Register the com.microsoft contrib ops the export uses with ``onnx.defs`` (idempotent)."""
    import onnx
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schemas = [
        OpSchema("MatMulIntegerToFloat", MS_DOMAIN, 1, inputs=[
            param("A", "T1"), param("B", "T2"), param("a_scale", "T3"), param("b_scale", "T3"),
            param("a_zero_point", "T1", param_option=optional), param("b_zero_point", "T2", param_option=optional),
            param("bias", "T3", param_option=optional)],
            outputs=[param("Y", "T3")],
            type_constraints=[("T1", ["tensor(int8)", "tensor(uint8)"], ""),
                              ("T2", ["tensor(int8)", "tensor(uint8)"], ""),
                              ("T3", ["tensor(float)", "tensor(float16)"], "")]),
        OpSchema("MatMulNBits", MS_DOMAIN, 1, inputs=[
            param("A", "T1"), param("B", "T2"), param("scales", "T1"),
            param("zero_points", "T3", param_option=optional), param("g_idx", "T4", param_option=optional),
            param("bias", "T1", param_option=optional)],
            outputs=[param("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                              ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                              ("T4", ["tensor(int32)"], "")],
            attributes=[OpSchema.Attribute("K", OpSchema.AttrType.INT), OpSchema.Attribute("N", OpSchema.AttrType.INT),
                        OpSchema.Attribute("bits", OpSchema.AttrType.INT),
                        OpSchema.Attribute("block_size", OpSchema.AttrType.INT),
                        OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, required=False)]),
    ]
    for schema in schemas:
        if not onnx.defs.has(schema.name, MS_DOMAIN):
            onnx.defs.register_schema(schema)


# ----------------------------------------------------------------------------------------------------
# Translations of the zq ops (onnxscript, traced by the dynamo exporter)
# ----------------------------------------------------------------------------------------------------

def _translation_table(int8_mode: str) -> dict[Any, Any]:
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript import values

    ms = values.Opset(MS_DOMAIN, 1)
    uint8, int16, float32 = ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.FLOAT

    def const(value: float):
        return op.Constant(value_float=float(value))

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    def quantize_rows(y):
        """zq.quant.quantize_rows, with the int8 result shifted to uint8 (zero point 128).

        One per-axis QuantizeLinear over the [tokens, K] view (round half to even, like torch) instead of
        Div/Round/Add/Cast: on ORT's CPU provider the elementwise passes cost more than the INT8 GEMMs.
        """
        # max |y| from two reductions: cheaper on ORT than Abs (a full elementwise pass) + ReduceMax
        absmax = op.Max(op.ReduceMax(y, ints(-1), keepdims=1), op.Neg(op.ReduceMin(y, ints(-1), keepdims=1)))
        # absmax / 127, and 1 for an all-zero row (any positive scale quantizes that row to zeros)
        scale = op.Div(absmax, const(ACT_QMAX))
        scale = op.Where(op.Greater(scale, const(0.0)), scale, const(1.0))
        row_scale = op.Reshape(scale, ints(-1))
        zero_point = op.Expand(op.Constant(value=ir.tensor(ACT_ZERO_POINT, dtype=uint8)), op.Shape(row_scale))
        rows = op.Reshape(y, op.Concat(ints(-1), op.Shape(y, start=-1), axis=0))
        q = op.Reshape(op.QuantizeLinear(rows, row_scale, zero_point, axis=0), op.Shape(y))
        q.dtype = uint8  # the FX graph says int8; declare what the ONNX value really is
        return q, scale

    def dequantize_rows(q, scale):
        return op.Mul(op.Sub(op.Cast(q, to=float32), const(ACT_ZERO_POINT)), scale)

    def static_shape(value) -> tuple[int, ...]:
        return tuple(int(d) for d in value.shape)

    def column_scale(w_scale, n: int):
        """[G_out, G_in] -> [N, G_in]: each output row's scales (small, may be folded)."""
        g_out, g_in = static_shape(w_scale)
        rows = op.Expand(op.Reshape(w_scale, ints(g_out, 1, g_in)), ints(g_out, n // g_out, g_in))
        return op.Reshape(rows, ints(n, g_in))

    def dequantize_weight_values(w, w_scale, w_min=None):
        """int8 [N, K] x [G_out, G_in] scales (+ mins) by broadcasting over a [G_out, N/G_out, G_in, K/G_in] view;
        no Expand, so no N x K float tensor is ever a constant the optimizer could write to the file."""
        n, k = static_shape(w)
        g_out, g_in = static_shape(w_scale)
        blocks = op.Reshape(op.Cast(w, to=float32), ints(g_out, n // g_out, g_in, k // g_in))
        values = op.Mul(blocks, op.Reshape(w_scale, ints(g_out, 1, g_in, 1)))
        if w_min is not None:
            values = op.Add(values, op.Reshape(w_min, ints(g_out, 1, g_in, 1)))
        return op.Reshape(values, ints(n, k))

    def add_bias(y, bias):
        return y if bias is None else op.Add(y, bias)

    def float_linear(x, w, w_scale, bias, w_min=None):
        weight = dequantize_weight_values(w, w_scale, w_min)
        return add_bias(op.MatMul(x, op.Transpose(weight, perm=[1, 0])), bias)

    def quantize_per_token(x):
        return quantize_rows(x)

    def dequantize_per_token(q, scale, out_dtype):
        return dequantize_rows(q, scale)

    def dequantize_weight(w, w_scale, out_dtype, w_min=None):
        return dequantize_weight_values(w, w_scale, w_min)

    def int8_linear(q, scale, w, w_scale, bias, out_dtype):
        n = static_shape(w)[0]
        if static_shape(w_scale)[1] != 1:  # input-dim groups: one float GEMM on the simulated values
            return float_linear(dequantize_rows(q, scale), w, w_scale, bias)
        zero_point = op.Constant(value=ir.tensor(ACT_ZERO_POINT, dtype=uint8))
        weight, weight_zero_point = w, ()
        if int8_mode == "exact":  # the weight as uint8 = int8 + 128 too (u8 x u8, see the module docstring)
            shifted = op.Add(op.Cast(w, to=int16), op.Constant(value=ir.tensor(ACT_ZERO_POINT, dtype=int16)))
            weight, weight_zero_point = op.Cast(shifted, to=uint8), (zero_point,)  # folded when ORT loads it
        y = ms.MatMulIntegerToFloat(q, op.Transpose(weight, perm=[1, 0]), const(1.0),
                                    op.Reshape(column_scale(w_scale, n), ints(n)), zero_point, *weight_zero_point)
        return add_bias(op.Mul(y, scale), bias)

    def int4_linear(q, scale, w_packed, w_scale, bias, out_dtype, w_min=None):
        # only reached in "matmulnbits" mode for a layer that fits it (see _prepare_graph)
        n, half_k = static_shape(w_packed)
        k = 2 * half_k
        g_in = static_shape(w_scale)[1]
        block = k // g_in
        scales = op.Reshape(column_scale(w_scale, n), ints(n * g_in))
        zero_points = ()  # symmetric: nibbles q + 8 with MatMulNBits' default zero point 8
        if w_min is not None:  # nibbles q: (q - zp) * s = s * q + min with the float zero point zp = -min / s
            zero_points = (op.Neg(op.Div(op.Reshape(column_scale(w_min, n), ints(n * g_in)), scales)),)
        y = ms.MatMulNBits(dequantize_rows(q, scale), op.Reshape(w_packed, ints(n, g_in, block // 2)), scales,
                           *zero_points, K=k, N=n, bits=4, block_size=block, accuracy_level=MATMULNBITS_ACCURACY_LEVEL)
        return add_bias(y, bias)

    def weight_only_linear(x, w, w_scale, bias, w_min=None):
        return float_linear(x, w, w_scale, bias, w_min)

    def layer_norm(x, weight, bias, eps):
        if weight is None:
            weight = op.Expand(const(1.0), ints(static_shape(x)[-1]))
        args = (x, weight) if bias is None else (x, weight, bias)
        return op.LayerNormalization(*args, axis=-1, epsilon=eps)[0]

    def layernorm_quant(x, weight, bias, eps):
        y = layer_norm(x, weight, bias, eps)
        return (y, *quantize_rows(y))

    def add_layernorm_quant(x, residual, weight, bias, eps):
        y = layer_norm(op.Add(x, residual), weight, bias, eps)
        return (y, *quantize_rows(y))

    def rmsnorm_quant(x, weight, eps, weight_first=False):  # float32 only: both orders round the same
        mean_square = op.ReduceMean(op.Mul(x, x), ints(-1), keepdims=1)
        y = op.Mul(weight, op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, const(eps))))))
        return (y, *quantize_rows(y))

    def gelu(x, approximate):
        half_x = op.Mul(x, const(0.5))
        if approximate == "tanh":
            inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), const(0.044715))), const(math.sqrt(2 / math.pi)))
            return op.Mul(half_x, op.Add(const(1.0), op.Tanh(inner)))
        return op.Mul(half_x, op.Add(const(1.0), op.Erf(op.Div(x, const(math.sqrt(2))))))

    def gelu_quant(x, bias, approximate):
        return quantize_rows(gelu(add_bias(x, bias), approximate))

    def relu_quant(x):
        return quantize_rows(op.Relu(x))

    def swiglu(gate, up):
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)

    def geglu(gate, up, approximate):
        return op.Mul(gelu(gate, approximate), up)

    def silu_mul_quant(gate, up):
        return quantize_rows(swiglu(gate, up))

    def hadamard(x, block):
        """One MatMul by the block x block Hadamard matrix over the [.., K / block, block] view."""
        matrix = hadamard_matrix(block, torch.float32).numpy()
        blocks = op.Reshape(x, op.Concat(op.Shape(x, end=-1), ints(-1, block), axis=0))
        return op.Reshape(op.MatMul(blocks, op.Constant(value=ir.tensor(matrix))), op.Shape(x))

    def gelu_mul_quant(gate, up, approximate):
        return quantize_rows(geglu(gate, up, approximate))

    def hadamard_quant(x, block):
        return quantize_rows(hadamard(x, block))

    def silu_mul_hadamard_quant(gate, up, block):
        return quantize_rows(hadamard(swiglu(gate, up), block))

    def gelu_mul_hadamard_quant(gate, up, approximate, block):
        return quantize_rows(hadamard(geglu(gate, up, approximate), block))

    def low_rank_correction(y, x, a, b):
        factor = lambda f: op.Transpose(op.Cast(f, to=float32), perm=[1, 0])  # noqa: E731  (FP16 stored)
        return op.Add(y, op.MatMul(op.MatMul(x, factor(b)), factor(a)))

    zq = torch.ops.zq
    return {
        zq.low_rank_correction.default: low_rank_correction,
        zq.quantize_per_token.default: quantize_per_token, zq.dequantize_per_token.default: dequantize_per_token,
        zq.dequantize_weight.default: dequantize_weight, zq.int8_linear.default: int8_linear,
        zq.int4_linear.default: int4_linear, zq.weight_only_linear.default: weight_only_linear,
        zq.layernorm_quant.default: layernorm_quant, zq.add_layernorm_quant.default: add_layernorm_quant,
        zq.rmsnorm_quant.default: rmsnorm_quant, zq.gelu_quant.default: gelu_quant,
        zq.silu_mul_quant.default: silu_mul_quant, zq.hadamard.default: hadamard, zq.relu_quant.default: relu_quant,
        zq.gelu_mul_quant.default: gelu_mul_quant, zq.hadamard_quant.default: hadamard_quant,
        zq.silu_mul_hadamard_quant.default: silu_mul_hadamard_quant,
        zq.gelu_mul_hadamard_quant.default: gelu_mul_hadamard_quant,
    }


# ----------------------------------------------------------------------------------------------------
# Graph preparation: the graph that gets exported
# ----------------------------------------------------------------------------------------------------

def fits_matmulnbits(w_packed: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """MatMulNBits needs input-dim blocks of a power-of-two size >= 16."""
    k = w_packed.shape[1] * 2
    block = k // w_scale.shape[1]
    return w_scale.shape[1] > 1 and block >= 16 and block & (block - 1) == 0


def _prepare_graph(gm: GraphModule, int4_mode: str) -> GraphModule:
    """A copy of the compiled graph where every packed INT4 weight MatMulNBits takes is repacked to its layout,
    and every other one is unpacked to int8 (int4_linear then becomes int8_linear, which computes the same on
    unpacked values; an asymmetric one, which int8_linear cannot take, ``weight_only_linear`` of its dequantized
    activations: the same products in floating point)."""
    gm = copy.deepcopy(gm)
    zq = torch.ops.zq
    as_nbits: dict[str, bool] = {}  # packed weight -> whether it went to MatMulNBits' layout (else unpacked)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (
                zq.int4_linear.default, zq.weight_only_linear.default, zq.dequantize_weight.default):
            continue
        positions = WEIGHT_ARGS[node.target]
        weight, w_scale = node.args[positions.weight], node.args[positions.scale]
        w_min = positions.min_arg(node.args)
        w, scale = attr_tensor(gm, weight.target), attr_tensor(gm, w_scale.target)
        if weight.target not in as_nbits:
            if w.dtype != torch.uint8:
                continue
            q = unpack_int4(w, int4_group_width(w, scale), symmetric=w_min is None)
            nbits = node.target is zq.int4_linear.default and int4_mode == "matmulnbits" and fits_matmulnbits(w, scale)
            if nbits:  # MatMulNBits' layout: unsigned nibbles (q + 8, or asymmetric q), value 2j low, 2j + 1 high
                codes = (q.to(torch.int16) + (8 if w_min is None else 0)).to(torch.uint8)
                q = codes[:, 0::2] | (codes[:, 1::2] << 4)
            set_attr_tensor(gm, weight.target, q)
            as_nbits[weight.target] = nbits
        if as_nbits[weight.target] or node.target is not zq.int4_linear.default:
            continue
        if w_min is None:
            node.target = zq.int8_linear.default
        else:
            x_q, x_scale, _, _, bias, out_dtype, _ = node.args
            with gm.graph.inserting_before(node):
                x = gm.graph.call_function(zq.dequantize_per_token.default, (x_q, x_scale, out_dtype))
            node.target, node.args = zq.weight_only_linear.default, (x, weight, w_scale, bias, w_min)
    gm.recompile()
    return gm


def _dynamic_shapes(qmodel, args: tuple) -> tuple:
    from torch.export import Dim

    if qmodel.input_names is not None:
        batch, seq = Dim("batch", min=1), Dim("seq", min=1, max=qmodel.max_seq_len)
        return tuple({0: batch, 1: seq} for _ in args)
    batch = Dim("batch", min=1)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def export_program(qmodel, gm: GraphModule, args: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` of a compiled graph with the model's dynamic axes (batch, and seq for HF models)."""
    try:
        with torch.no_grad():
            return torch.export.export(gm, args, dynamic_shapes=_dynamic_shapes(qmodel, args), strict=False)
    except Exception as err:  # export raises many types; all mean "this graph could not be re-exported"
        raise ZQError(f"torch.export could not re-export the compiled {qmodel.model_class} graph with dynamic "
                      f"axes: {str(err).strip().splitlines()[0]}") from err


def _as_graph_args(qmodel, example_inputs: Any) -> tuple:
    if example_inputs is None:
        return tuple(qmodel.example_inputs)
    if isinstance(example_inputs, Mapping):
        return qmodel.graph_inputs(**example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return qmodel.graph_inputs(*example_inputs)


WEIGHT_FOLD_LIMIT = 256  # elements: larger initializers are weights, whose derived copies must not be stored


def _fold_unless_weight(node) -> bool | None:
    """The onnxscript optimizer's folding policy: never fold a node that reads a weight (a transposed or
    dequantized copy of it would be written to the file); the default policy for everything else.
    onnxruntime folds those nodes when it loads the model."""
    for value in node.inputs:
        tensor = value.const_value if value is not None else None
        if tensor is not None and tensor.size > WEIGHT_FOLD_LIMIT:
            return False
    return None


def export_onnx(qmodel, example_inputs: Any = None, path: str | os.PathLike = "model.onnx", *,
                int4: str = "matmulnbits", int8: str = "exact", check: bool = True,
                progress: bool = True) -> OnnxExport:
    """Write ``qmodel`` (a float32 CPU :class:`QuantizedModel`) as an ONNX file with dynamic batch/seq axes.

    Args:
        qmodel: the compiled model.
        example_inputs: inputs to trace with (a tuple, a dict of HF inputs, or None for the model's own);
            any batch size and sequence length works at run time.
        path: where to write the ``.onnx`` file.
        int4: ``"matmulnbits"`` (fast; ORT's block-wise int8 activations, see the module docstring) or
            ``"exact"`` (the zq INT4 arithmetic, slower).
        int8: ``"exact"`` (u8 x u8 integer GEMMs: the zq op's integer sums on every CPU) or ``"u8s8"`` (ORT's
            u8 x s8 kernel: about 2x faster on x86 CPUs without AVX-VNNI, where it saturates pairs of products
            at int16 and so can differ from the zq op; exact on CPUs with VNNI / AMX).
        check: validate the file with ``onnx.checker``.

    Inputs are named like the model's (``input_ids``, ``attention_mask``, ...), outputs like its HF output
    fields (``last_hidden_state``, ``logits``, ...).
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's translations are onnxscript)
    except ImportError as err:
        raise ZQError(f"ONNX export needs onnx and onnxscript ({err}); pip install 'zqcompile[onnx]'") from err
    from tqdm.auto import tqdm

    if int4 not in INT4_MODES:
        raise ZQError(f"int4={int4!r}: choose one of {list(INT4_MODES)}")
    if int8 not in INT8_MODES:
        raise ZQError(f"int8={int8!r}: choose one of {list(INT8_MODES)}")
    if qmodel.dtype != torch.float32 or qmodel.device.type != "cpu":
        raise ZQError(f"ONNX export takes a float32 CPU model, this one is {qmodel.dtype} on {qmodel.device}; "
                      f"compile model.float().cpu() for export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    register_ms_schemas()
    if any(n.target is torch.ops.zq.outlier_int8_linear.default for n in qmodel.graph_module.graph.nodes):
        raise ZQError("ONNX export does not translate zq.outlier_int8_linear (the LLM.int8() decomposition of "
                      "recipe outlier_threshold); compile without outlier_threshold to export")
    args = _as_graph_args(qmodel, example_inputs)
    steps = tqdm(total=3, desc="export onnx", disable=not progress, leave=False)
    try:
        gm = _prepare_graph(qmodel.graph_module, int4)
        steps.set_postfix_str("torch.export")
        program = export_program(qmodel, gm, args)
        steps.update()
        steps.set_postfix_str("onnx translation")
        output_names = list(qmodel.output_keys) or None
        try:
            onnx_program = torch.onnx.export(
                program, dynamo=True, custom_translation_table=_translation_table(int8),
                input_names=list(qmodel.input_names) if qmodel.input_names else None, output_names=output_names,
                optimize=False, verbose=False)
        except Exception as err:
            raise ZQError(f"ONNX translation of the compiled {qmodel.model_class} failed: "
                          f"{str(err).strip().splitlines()[0]}") from err
        # optimize=False above: the exporter's optimizer would fold weight transposes / dequantizations into
        # float constants; this one folds everything but nodes that read weights
        from onnxscript.optimizer import optimize_ir
        optimize_ir(onnx_program.model, should_fold=_fold_unless_weight)
        steps.update()
        steps.set_postfix_str("save + check")
        onnx_program.save(str(path))
        if check:
            onnx.checker.check_model(str(path), full_check=False)
        steps.update()
    finally:
        steps.close()
    model = onnx.load(str(path), load_external_data=False)
    return OnnxExport(path, path.stat().st_size, Counter(n.op_type for n in model.graph.node))
