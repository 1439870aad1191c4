"""Numba-CUDA device code for the fused "elementwise + per-token INT8 quantization" ops, and its launch layer.

Every kernel runs one thread block per token row (``[rows, K]`` row-major arrays). Each thread owns the
columns ``tid, tid + BLOCK, ...`` (at most ``MAX_PER_THREAD``), loads them all up front and keeps their
float32 values in registers (a local array indexed only in loops of compile-time length, which unroll), so
the inputs are read from device memory once; the block reduces what the op needs (sum for the LayerNorm
mean and variance, sum of squares for RMSNorm, absmax for the scale). Outputs are written once.

The arithmetic follows zqcompile/ops.py exactly: statistics in float32; every intermediate that the
reference materialises in the tensor's dtype (``x + residual``, the norm output, ``gelu(x + bias)``,
``silu(gate)``, ``silu(gate) * up``) is rounded to that dtype here too before it is used; the scale is
``absmax / 127`` (1.0 for an all-zero row) and ``q = clamp(rint(v / scale), -127, 127)`` (Numba's
``round`` is ``llrint``: round half to even).

Vectorised loads (``vectorize=True``): a row of 16-bit elements with an even length and 4-byte aligned rows
is read as int32 words (``vec=2``), two elements per load, each decoded from its bits in-kernel (float16
exactly, subnormals, infinities and NaN included). It is off by default: on an H100 the one-element loads
were 5-30% faster at BERT shapes (the kernels are bound by instructions per element, not by load width).

Element storage ("codecs"): float32 and float16 arrays are used as they are; **bfloat16 is passed as its
int16 bit pattern** (``tensor.view(torch.int16)``; NumPy has no bfloat16) and converted in-kernel: a load
shifts the 16 bits into the top of a float32, a store rounds the float32 to nearest-even on its bits. So a
launch infers each array's element type from its dtype, and int16 always means bfloat16.

Block reductions come in two variants chosen when a kernel is built: ``"tree"``, a shared-memory tree
(the only one the CUDA simulator runs, since it has no warp shuffles), and ``"shuffle"``, warp shuffles
then one shared-memory step (the default on a GPU). The launch functions take any array that Numba can
view: NumPy arrays under the simulator (``NUMBA_ENABLE_CUDASIM=1``), ``cuda.as_cuda_array`` views of torch
CUDA tensors on a GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from zqcompile.backends.numba_cuda import _numpy_compat  # noqa: F401  (must precede the numba.cuda import)
from zqcompile.errors import ZQError

import numba  # noqa: E402
from numba import cuda, float32, int32, int64  # noqa: E402
from numba.types import float16  # noqa: E402

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
REDUCTIONS = ("tree", "shuffle")
DEFAULT_REDUCTION = "tree" if SIMULATOR else "shuffle"
MAX_PER_THREAD = 32
"""Most row elements one thread holds in registers."""
MAX_K = 1024 * MAX_PER_THREAD
"""Longest row the kernels take (1024 threads per block)."""

_WARP = 32
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_QMAX = np.float32(127.0)
_SQRT1_2 = np.float32(math.sqrt(0.5))  # erf GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
_TANH_BETA = np.float32(math.sqrt(2.0 / math.pi))  # tanh GELU: 0.5 x (1 + tanh(beta (x + kappa x^3)))
_TANH_KAPPA = np.float32(0.044715)
_TWO_POW_M24 = np.float32(2.0 ** -24)

# ----------------------------------------------------------------------------------------------------
# float32 <-> bit pattern (for bfloat16): libdevice on a GPU, NumPy views in the simulator
# ----------------------------------------------------------------------------------------------------

if SIMULATOR:
    @cuda.jit(device=True)
    def _float_bits(v):
        return np.float32(v).view(np.int32)

    @cuda.jit(device=True)
    def _bits_float(b):
        return np.int32(b).view(np.float32)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _float_bits(v):
        return libdevice.float_as_int(v)

    @cuda.jit(device=True)
    def _bits_float(b):
        return libdevice.int_as_float(b)


# ----------------------------------------------------------------------------------------------------
# Codecs: load an element as float32, round a float32 to the storage type, store a rounded value
# ----------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _load_float(a, i, j):
    return float32(a[i, j])


@cuda.jit(device=True)
def _store_float(a, i, j, v):
    a[i, j] = v


@cuda.jit(device=True)
def _round_f32(v):
    return v


@cuda.jit(device=True)
def _round_f16(v):
    return float32(float16(v))


@cuda.jit(device=True)
def _load_bf16(a, i, j):
    return _bits_float(int32(int64(a[i, j]) << 16))


@cuda.jit(device=True)
def _as_int32(bits):
    """An unsigned 32-bit pattern (held in a wider int) as the int32 with the same bits."""
    if bits >= 0x80000000:
        bits -= 0x100000000
    return int32(bits)


@cuda.jit(device=True)
def _round_bf16(v):
    if v != v:  # NaN stays NaN (the bit trick below would round it to infinity)
        return v
    bits = int64(_float_bits(v)) & 0xFFFFFFFF
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round to nearest even on the top 16 bits
    return _bits_float(_as_int32(bits & 0xFFFFFFFF))


@cuda.jit(device=True)
def _store_bf16(a, i, j, v):
    a[i, j] = int32(_float_bits(v)) >> 16


@cuda.jit(device=True)
def _f16_bits_float(h):
    """float32 value of the float16 with bits ``h`` (0 <= h < 2**16), exact for every class of value."""
    sign = (h & 0x8000) << 16
    magnitude = h & 0x7FFF
    if magnitude >= 0x7C00:  # infinity or NaN: all-ones exponent, the mantissa moves up
        return _bits_float(_as_int32(sign | 0x7F800000 | ((magnitude & 0x3FF) << 13)))
    if magnitude >= 0x0400:  # normal: rebias the exponent by 127 - 15 = 112
        return _bits_float(_as_int32(sign | ((magnitude << 13) + 0x38000000)))
    v = float32(magnitude) * _TWO_POW_M24  # zero or subnormal: mantissa * 2**-24, exact in float32
    return -v if sign else v


@cuda.jit(device=True)
def _load_pair_f16(a, i, p, out, base):
    word = int64(a[i, p]) & 0xFFFFFFFF  # little endian: the low half is the even column
    out[base] = _f16_bits_float(word & 0xFFFF)
    out[base + 1] = _f16_bits_float(word >> 16)


@cuda.jit(device=True)
def _load_pair_bf16(a, i, p, out, base):
    word = int64(a[i, p]) & 0xFFFFFFFF
    out[base] = _bits_float(_as_int32((word & 0xFFFF) << 16))
    out[base + 1] = _bits_float(_as_int32(word & 0xFFFF0000))


_PAIR_LOADS = {"f16": _load_pair_f16, "bf16": _load_pair_bf16}

_CODECS: dict[str, tuple[Callable, Callable, Callable]] = {
    # name: (load, round to storage type, store)
    "f32": (_load_float, _round_f32, _store_float),
    "f16": (_load_float, _round_f16, _store_float),
    "bf16": (_load_bf16, _round_bf16, _store_bf16),
}
_CODEC_OF_DTYPE = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.int16): "bf16"}


def codec_of(array: Any, what: str) -> str:
    """The element codec of an array: float32, float16, or bfloat16 passed as int16 bits."""
    codec = _CODEC_OF_DTYPE.get(np.dtype(array.dtype))
    if codec is None:
        raise ZQError(f"the Numba kernels take float32, float16 or bfloat16 (as int16 bits) for {what}, got "
                      f"{array.dtype}; use the CPU reference backend for other dtypes")
    return codec


# ----------------------------------------------------------------------------------------------------
# Block reductions
# ----------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _add(a, b):
    return a + b


@cuda.jit(device=True)
def _max(a, b):
    return max(a, b)


def _make_block_reduce(combine: Callable, block: int, reduction: str) -> Callable:
    """A device function ``reduce(scratch, value) -> total`` over the block, returned to every thread.

    ``scratch`` is a float32 shared array of ``_scratch_len(block, reduction)`` elements; it is free again on
    return. The identity element of both combines used here (sum, max of absolute values) is 0.
    """
    if reduction == "tree":
        @cuda.jit(device=True)
        def reduce(scratch, value):
            tid = cuda.threadIdx.x
            scratch[tid] = value
            cuda.syncthreads()
            stride = block // 2
            while stride > 0:
                if tid < stride:
                    scratch[tid] = combine(scratch[tid], scratch[tid + stride])
                cuda.syncthreads()
                stride //= 2
            total = scratch[0]
            cuda.syncthreads()
            return total
        return reduce

    warps = block // _WARP

    @cuda.jit(device=True)
    def reduce(scratch, value):
        tid = cuda.threadIdx.x
        lane = tid % _WARP
        warp = tid // _WARP
        offset = _WARP // 2
        while offset > 0:
            value = combine(value, cuda.shfl_down_sync(0xFFFFFFFF, value, offset))
            offset //= 2
        if lane == 0:
            scratch[warp] = value
        cuda.syncthreads()
        if warp == 0:
            value = scratch[lane] if lane < warps else _ZERO
            offset = _WARP // 2
            while offset > 0:
                value = combine(value, cuda.shfl_down_sync(0xFFFFFFFF, value, offset))
                offset //= 2
            if lane == 0:
                scratch[_WARP] = value
        cuda.syncthreads()
        total = scratch[_WARP]
        cuda.syncthreads()
        return total
    return reduce


# ----------------------------------------------------------------------------------------------------
# Kernels (built per element codecs, flags, block size, loads per thread, vector width and reduction)
#
# Thread ``tid`` of a row's block loads the ``vec``-element chunks ``tid + u * block`` for
# ``u < per_thread`` (coalesced across the block), all up front so the unrolled loads are in flight
# together, into a local array that the unrolled loops keep in registers. Slot ``e`` of that array is
# column ``_column(tid, e)``; every output is written once.
# ----------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _row_scale(absmax):
    s = absmax / _QMAX
    return s if s > _ZERO else _ONE  # an all-zero row quantizes to zeros with scale 1


@cuda.jit(device=True)
def _quantize_value(v, s):
    return min(max(round(v / s), -127), 127)  # round() is llrint on the GPU: half to even


def _scratch_len(block: int, reduction: str) -> int:
    return block if reduction == "tree" else _WARP + 1


BUILT_KERNELS: dict[tuple, Any] = {}
"""Every kernel built so far, by (builder name, build parameters): benchmarks read their resource usage."""


def _built(builder: Callable) -> Callable:
    """Cache a kernel builder on its (hashable) parameters and record what it built."""
    cached = lru_cache(maxsize=None)(builder)

    def build(*params: Any) -> Any:
        kernel = cached(*params)
        BUILT_KERNELS[(builder.__name__.strip("_"), *params)] = kernel
        return kernel
    return build


def _make_row_helpers(codec: str, block: int, per_thread: int, vec: int) -> tuple[Callable, Callable]:
    """``load_row(a, i, tid, out)`` fills ``out[per_thread * vec]`` (zeros past the row's end) and
    ``column(tid, e)`` is the column of slot ``e``."""
    @cuda.jit(device=True)
    def column(tid, e):
        return vec * (tid + (e // vec) * block) + e % vec

    if vec == 2:
        load_pair = _PAIR_LOADS[codec]

        @cuda.jit(device=True)
        def load_row(a, i, tid, out):
            for u in range(per_thread):
                p = tid + u * block
                if p < a.shape[1]:
                    load_pair(a, i, p, out, 2 * u)
                else:
                    out[2 * u] = _ZERO
                    out[2 * u + 1] = _ZERO
    else:
        load = _CODECS[codec][0]

        @cuda.jit(device=True)
        def load_row(a, i, tid, out):
            for u in range(per_thread):
                p = tid + u * block
                out[u] = load(a, i, p) if p < a.shape[1] else _ZERO
    return load_row, column


def _make_row_quantizer(column: Callable, block_max: Callable, slots: int) -> Callable:
    """``quantize_row(scratch, absmax, vals, q, scale, i, tid)``: every kernel's epilogue, the row's INT8
    values and scale from the values in ``vals`` and this thread's partial absmax."""
    @cuda.jit(device=True)
    def quantize_row(scratch, absmax, vals, q, scale, i, tid):
        s = _row_scale(block_max(scratch, absmax))
        for e in range(slots):
            j = column(tid, e)
            if j < q.shape[1]:
                q[i, j] = _quantize_value(vals[e], s)
        if tid == 0:
            scale[i] = s
    return quantize_row


@_built
def _quantize_kernel(x_codec: str, block: int, per_thread: int, vec: int, reduction: str):
    load_row, column = _make_row_helpers(x_codec, block, per_thread, vec)
    scratch_len, slots = _scratch_len(block, reduction), per_thread * vec
    quantize_row = _make_row_quantizer(column, _make_block_reduce(_max, block, reduction), slots)

    @cuda.jit
    def kernel(x, q, scale):
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_row(x, i, tid, vals)
        absmax = _ZERO
        for e in range(slots):
            absmax = max(absmax, abs(vals[e]))  # slots past the row hold 0
        quantize_row(scratch, absmax, vals, q, scale, i, tid)
    return kernel


@_built
def _layernorm_kernel(x_codec: str, w_codec: str, b_codec: str, add_residual: bool, has_weight: bool,
                      has_bias: bool, block: int, per_thread: int, vec: int, reduction: str):
    load_row, column = _make_row_helpers(x_codec, block, per_thread, vec)
    _, round_x, store_y = _CODECS[x_codec]
    load_w = _CODECS[w_codec][0]
    load_b = _CODECS[b_codec][0]
    block_sum = _make_block_reduce(_add, block, reduction)
    scratch_len, slots = _scratch_len(block, reduction), per_thread * vec
    quantize_row = _make_row_quantizer(column, _make_block_reduce(_max, block, reduction), slots)

    @cuda.jit
    def kernel(x, residual, weight, bias, eps, y, q, scale):
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        k = q.shape[1]
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_row(x, i, tid, vals)
        if add_residual:
            res = cuda.local.array(slots, float32)
            load_row(residual, i, tid, res)
            for e in range(slots):
                vals[e] = round_x(vals[e] + res[e])  # x + residual is a tensor of x's dtype
        total = _ZERO
        for e in range(slots):
            total += vals[e]  # slots past the row hold 0
        mean = block_sum(scratch, total) / float32(k)
        squares = _ZERO
        for e in range(slots):
            if column(tid, e) < k:
                d = vals[e] - mean
                squares += d * d
        rstd = _ONE / math.sqrt(block_sum(scratch, squares) / float32(k) + eps)
        absmax = _ZERO
        for e in range(slots):
            j = column(tid, e)
            if j < k:
                v = (vals[e] - mean) * rstd
                if has_weight:
                    v = v * load_w(weight, 0, j)
                if has_bias:
                    v = v + load_b(bias, 0, j)
                v = round_x(v)
                store_y(y, i, j, v)
                vals[e] = v
                absmax = max(absmax, abs(v))
        quantize_row(scratch, absmax, vals, q, scale, i, tid)
    return kernel


@_built
def _rmsnorm_kernel(x_codec: str, w_codec: str, y_codec: str, block: int, per_thread: int, vec: int,
                    reduction: str):
    load_row, column = _make_row_helpers(x_codec, block, per_thread, vec)
    round_x = _CODECS[x_codec][1]
    load_w = _CODECS[w_codec][0]
    _, round_y, store_y = _CODECS[y_codec]
    block_sum = _make_block_reduce(_add, block, reduction)
    scratch_len, slots = _scratch_len(block, reduction), per_thread * vec
    quantize_row = _make_row_quantizer(column, _make_block_reduce(_max, block, reduction), slots)

    @cuda.jit
    def kernel(x, weight, eps, y, q, scale):
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        k = q.shape[1]
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_row(x, i, tid, vals)
        squares = _ZERO
        for e in range(slots):
            squares += vals[e] * vals[e]
        rstd = _ONE / math.sqrt(block_sum(scratch, squares) / float32(k) + eps)
        absmax = _ZERO
        for e in range(slots):
            j = column(tid, e)
            if j < k:
                normed = round_x(vals[e] * rstd)  # the reference casts back to x's dtype before the weight
                v = round_y(load_w(weight, 0, j) * normed)
                store_y(y, i, j, v)
                vals[e] = v
                absmax = max(absmax, abs(v))
        quantize_row(scratch, absmax, vals, q, scale, i, tid)
    return kernel


@_built
def _gelu_kernel(x_codec: str, has_bias: bool, tanh: bool, block: int, per_thread: int, vec: int,
                 reduction: str):
    load_row, column = _make_row_helpers(x_codec, block, per_thread, vec)
    load_x, round_x, _ = _CODECS[x_codec]
    scratch_len, slots = _scratch_len(block, reduction), per_thread * vec
    quantize_row = _make_row_quantizer(column, _make_block_reduce(_max, block, reduction), slots)

    @cuda.jit
    def kernel(x, bias, q, scale):
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        k = q.shape[1]
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_row(x, i, tid, vals)
        absmax = _ZERO
        for e in range(slots):
            j = column(tid, e)
            if j < k:
                v = vals[e]
                if has_bias:
                    v = round_x(v + load_x(bias, 0, j))
                if tanh:
                    inner = _TANH_BETA * (v + _TANH_KAPPA * (v * v * v))
                    g = _HALF * v * (_ONE + float32(math.tanh(inner)))
                else:
                    g = v * _HALF * (_ONE + float32(math.erf(v * _SQRT1_2)))
                g = round_x(g)
                vals[e] = g
                absmax = max(absmax, abs(g))
        quantize_row(scratch, absmax, vals, q, scale, i, tid)
    return kernel


@_built
def _silu_mul_kernel(x_codec: str, block: int, per_thread: int, vec: int, reduction: str):
    load_row, column = _make_row_helpers(x_codec, block, per_thread, vec)
    round_x = _CODECS[x_codec][1]
    scratch_len, slots = _scratch_len(block, reduction), per_thread * vec
    quantize_row = _make_row_quantizer(column, _make_block_reduce(_max, block, reduction), slots)

    @cuda.jit
    def kernel(gate, up, q, scale):
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        k = q.shape[1]
        scratch = cuda.shared.array(scratch_len, float32)
        gates = cuda.local.array(slots, float32)
        ups = cuda.local.array(slots, float32)
        load_row(gate, i, tid, gates)
        load_row(up, i, tid, ups)
        absmax = _ZERO
        for e in range(slots):
            if column(tid, e) < k:
                g = gates[e]
                silu = round_x(g / (_ONE + float32(math.exp(-g))))
                v = round_x(silu * ups[e])
                gates[e] = v
                absmax = max(absmax, abs(v))
        quantize_row(scratch, absmax, gates, q, scale, i, tid)
    return kernel


# ----------------------------------------------------------------------------------------------------
# Launch layer
# ----------------------------------------------------------------------------------------------------

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_size(k: int) -> int:
    """Threads per row: about 8 columns per thread, at most 256 threads unless the row needs more.

    Measured on an H100 at 4096 rows (benchmarks/gpu_latency.py sweep): K=768 is fastest with 128 threads
    (6 columns each), K=3072 with 256 (12 each); 512 threads were 5-40% slower at both.
    """
    return min(1024, max(_WARP, min(256, _pow2_at_least(-(-k // 8))), _pow2_at_least(-(-k // MAX_PER_THREAD))))


def _launch_config(x: Any, q: Any, scale: Any, block: int | None, reduction: str | None
                   ) -> tuple[int, int, str]:
    """(rows, threads per row, reduction) after checking the outputs and the row length."""
    rows, k = x.shape
    if tuple(q.shape) != (rows, k) or np.dtype(q.dtype) != np.int8:
        raise ZQError(f"q must be int8 of shape {(rows, k)}, got {q.dtype} {tuple(q.shape)}")
    if tuple(scale.shape) != (rows,) or np.dtype(scale.dtype) != np.float32:
        raise ZQError(f"scale must be float32 of shape ({rows},), got {scale.dtype} {tuple(scale.shape)}")
    if k > MAX_K:
        raise ZQError(f"rows of {k} elements exceed the Numba kernels' limit of {MAX_K} (1024 threads holding "
                      f"{MAX_PER_THREAD} values each); use the reference kernels for this op")
    block = block or block_size(k)
    if block & (block - 1) or not _WARP <= block <= 1024:
        raise ZQError(f"block size must be a power of two in [32, 1024], got {block}")
    if -(-k // block) > MAX_PER_THREAD:
        raise ZQError(f"{block} threads per row would hold {-(-k // block)} values each (at most "
                      f"{MAX_PER_THREAD}); use a larger block")
    reduction = reduction or DEFAULT_REDUCTION
    if reduction not in REDUCTIONS:
        raise ZQError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    if reduction == "shuffle" and SIMULATOR:
        raise ZQError("the CUDA simulator has no warp shuffles; use reduction='tree' under NUMBA_ENABLE_CUDASIM")
    return rows, block, reduction


def _address(a: Any) -> int:
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return interface["data"][0]


def _rows_as_words(rows: list[Any], vectorize: bool) -> tuple[list[Any], int]:
    """The [rows, K] inputs as int32 words of two elements (vec=2) when they are 16-bit, of even K,
    C-contiguous and 4-byte aligned; else unchanged (vec=1)."""
    k = rows[0].shape[1]
    if vectorize and k % 2 == 0 and all(np.dtype(a.dtype).itemsize == 2 and a.flags["C_CONTIGUOUS"]
                                        and _address(a) % 4 == 0 for a in rows):
        return [a.view(np.int32) for a in rows], 2
    return rows, 1


def _run(kernel, rows: int, block: int, stream: Any, *args: Any) -> None:
    if rows:
        kernel[rows, block, stream](*args)


def _vector(v: Any, k: int, what: str) -> Any:
    """A 1-D per-column parameter as a [1, K] view, so the codecs index every array the same way."""
    if tuple(v.shape) != (k,):
        raise ZQError(f"{what} must have shape ({k},), got {tuple(v.shape)}")
    return v.reshape(1, k)


def _same_type(a: Any, b: Any, what: str, shape: bool = True) -> None:
    if shape and tuple(a.shape) != tuple(b.shape):
        raise ZQError(f"{what} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    if codec_of(b, what) != codec_of(a, "x"):
        raise ZQError(f"{what} must have the input's dtype {a.dtype}, got {b.dtype}")


def _per_thread(k: int, block: int, vec: int) -> int:
    return max(1, -(-k // (block * vec)))


# Every launch takes [rows, K] arrays (q int8, scale float32 [rows]) and these keywords: stream (a Numba
# stream), block (threads per row; default block_size(K)), reduction ("tree" | "shuffle"; default
# DEFAULT_REDUCTION) and vectorize (allow the two-element loads; off by default, see the module docstring).

def quantize_per_token(x, q, scale, *, stream: Any = 0, block: int | None = None, reduction: str | None = None,
                       vectorize: bool = False) -> None:
    """q, scale = per-token INT8 of x [rows, K]."""
    rows, block, reduction = _launch_config(x, q, scale, block, reduction)
    codec = codec_of(x, "x")
    (xw,), vec = _rows_as_words([x], vectorize)
    kernel = _quantize_kernel(codec, block, _per_thread(x.shape[1], block, vec), vec, reduction)
    _run(kernel, rows, block, stream, xw, q, scale)


def layernorm_quant(x, weight, bias, eps: float, y, q, scale, *, residual=None, stream: Any = 0,
                    block: int | None = None, reduction: str | None = None, vectorize: bool = False) -> None:
    """y = LayerNorm(x [+ residual]) in x's dtype; q, scale = its per-token INT8. weight/bias may be None."""
    rows, block, reduction = _launch_config(x, q, scale, block, reduction)
    k = x.shape[1]
    _same_type(x, y, "y")
    if residual is not None:
        _same_type(x, residual, "residual")
    has_weight, has_bias = weight is not None, bias is not None
    weight = _vector(weight, k, "weight") if has_weight else x  # an unused placeholder array otherwise
    bias = _vector(bias, k, "bias") if has_bias else x
    inputs, vec = _rows_as_words([x] if residual is None else [x, residual], vectorize)
    kernel = _layernorm_kernel(codec_of(x, "x"), codec_of(weight, "weight"), codec_of(bias, "bias"),
                               residual is not None, has_weight, has_bias, block, _per_thread(k, block, vec), vec,
                               reduction)
    _run(kernel, rows, block, stream, inputs[0], inputs[-1], weight, bias, np.float32(eps), y, q, scale)


def rmsnorm_quant(x, weight, eps: float, y, q, scale, *, stream: Any = 0, block: int | None = None,
                  reduction: str | None = None, vectorize: bool = False) -> None:
    """y = weight * RMSNorm(x) (normalised value cast to x's dtype first; y in y's dtype); q, scale of y."""
    rows, block, reduction = _launch_config(x, q, scale, block, reduction)
    k = x.shape[1]
    if tuple(y.shape) != tuple(x.shape):
        raise ZQError(f"y has shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    weight = _vector(weight, k, "weight")
    (xw,), vec = _rows_as_words([x], vectorize)
    kernel = _rmsnorm_kernel(codec_of(x, "x"), codec_of(weight, "weight"), codec_of(y, "y"), block,
                             _per_thread(k, block, vec), vec, reduction)
    _run(kernel, rows, block, stream, xw, weight, np.float32(eps), y, q, scale)


def gelu_quant(x, bias, approximate: str, q, scale, *, stream: Any = 0, block: int | None = None,
               reduction: str | None = None, vectorize: bool = False) -> None:
    """q, scale = per-token INT8 of GELU(x [+ bias]); approximate is 'none' (erf) or 'tanh'."""
    if approximate not in ("none", "tanh"):
        raise ZQError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
    rows, block, reduction = _launch_config(x, q, scale, block, reduction)
    k = x.shape[1]
    if bias is not None:
        bias = _vector(bias, k, "bias")
        _same_type(x, bias, "bias", shape=False)
    (xw,), vec = _rows_as_words([x], vectorize)
    kernel = _gelu_kernel(codec_of(x, "x"), bias is not None, approximate == "tanh", block,
                          _per_thread(k, block, vec), vec, reduction)
    _run(kernel, rows, block, stream, xw, x if bias is None else bias, q, scale)


def silu_mul_quant(gate, up, q, scale, *, stream: Any = 0, block: int | None = None,
                   reduction: str | None = None, vectorize: bool = False) -> None:
    """q, scale = per-token INT8 of silu(gate) * up (gate and up of one dtype)."""
    rows, block, reduction = _launch_config(gate, q, scale, block, reduction)
    _same_type(gate, up, "up")
    (gw, uw), vec = _rows_as_words([gate, up], vectorize)
    kernel = _silu_mul_kernel(codec_of(gate, "gate"), block, _per_thread(gate.shape[1], block, vec), vec, reduction)
    _run(kernel, rows, block, stream, gw, uw, q, scale)
