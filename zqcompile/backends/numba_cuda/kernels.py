"""Numba-CUDA device code for the fused "elementwise + per-token INT8 quantization" ops, and its launch layer.

Layout. A thread block of ``(T, R)`` threads handles ``R`` token rows of a row-major ``[rows, K]`` array,
``T`` threads (a power of two, at least one warp) per row. Rows are read as **words** of ``vec`` elements
(``vec`` in 1, 2, 4: 16-, 32- or 64-bit words for 16-bit elements), so one load moves up to 8 bytes and one
store writes ``vec`` int8 values; thread ``t`` owns the words ``t + u * T`` for ``u < per_thread``
(coalesced across the row's threads). It loads them all up front into a local array that the unrolled
loops keep in registers, so each input is read from device memory once; the row's threads then reduce
what the op needs (sum for the LayerNorm mean and variance, sum of squares for RMSNorm, absmax for the
scale) and every output is written once. ``K`` is a compile-time constant of each built kernel, so the
loops have fixed trip counts and the row-end checks vanish where ``K`` is a multiple of ``vec * T``.

Per element the kernels do little besides the op itself (the cost that decides their speed, since a row
is only 1.5-6 KB): a 16-bit element is decoded from its word with a shift and one conversion, ``min``,
``max`` and ``abs`` are single instructions (libdevice), the quantization multiplies by the reciprocal of
the scale and converts with ``float2int_rn`` (round half to even into int32), and indices stay 64-bit but
are formed once per word.

Arithmetic follows zqcompile/ops.py: statistics in float32; every intermediate that the reference
materialises in the tensor's dtype (``x + residual``, the norm output, ``gelu(x + bias)``, ``silu(gate)``,
``silu(gate) * up``) is rounded to that dtype here too before it is used; the scale is ``absmax / 127``
(1.0 for an all-zero row, NaN for a row holding a NaN or an Inf, whose int8 values are then meaningless),
exactly as the reference. The reference quantizes with ``rint(v / scale)``; the kernels use
``rint(v * (1 / scale))``, which differs in the last ulp before rounding and so can move a value that lies
within an ulp of a .5 tie by one (tests allow +-1 on at most 1% of the values; measured far fewer).

Element storage ("codecs"): float32, float16 and **bfloat16 passed as its int16 bit pattern**
(``tensor.view(torch.int16)``; NumPy has no bfloat16), all read and written through unsigned word views.
Decoding and packing are LLVM intrinsics on a GPU (bit shifts, ``fpext``/``fptrunc`` of ``half``) and
NumPy bit views under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``); bfloat16 rounds to nearest even on
the float32 bits in both.

Row reductions come in two variants chosen when a kernel is built: ``"tree"``, a shared-memory tree (the
only one the CUDA simulator runs, since it has no warp shuffles), and ``"shuffle"``, a butterfly of warp
shuffles plus, for rows wider than a warp, one shared-memory step (the default on a GPU). The launch
functions take any arrays that Numba can view: NumPy arrays under the simulator, ``cuda.as_cuda_array``
views of torch CUDA tensors on a GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import numpy as np

from zqcompile.backends.numba_cuda import _numpy_compat  # noqa: F401  (must precede the numba.cuda import)
from zqcompile.errors import ZQError

import numba  # noqa: E402
from numba import cuda, float32, int32, int64, uint64  # noqa: E402

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not SIMULATOR:
    from zqcompile.backends.numba_cuda import kernel_cache  # noqa: E402
REDUCTIONS = ("tree", "shuffle")
DEFAULT_REDUCTION = "tree" if SIMULATOR else "shuffle"
MAX_PER_THREAD = 32
"""Most row elements one thread holds in registers."""
MAX_K = 1024 * MAX_PER_THREAD
"""Longest row the kernels take (1024 threads per row)."""
VECS = (1, 2, 4)
MAX_WORD_BYTES = 8

_WARP = 32
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_LOG2E = np.float32(1.0 / math.log(2.0))
_QMAX = np.float32(127.0)
_SQRT1_2 = np.float32(math.sqrt(0.5))  # erf GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
_TANH_BETA = np.float32(math.sqrt(2.0 / math.pi))  # tanh GELU: 0.5 x (1 + tanh(beta (x + kappa x^3)))
_TANH_KAPPA = np.float32(0.044715)

_WORD_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1}

# ----------------------------------------------------------------------------------------------------
# Bit-level primitives: LLVM intrinsics on a GPU, NumPy in the simulator (same results bit for bit)
#
#   decode_<codec>(word, h) -> float32 value of element h of a word
#   insert_<codec>(word, v, h) -> the word with element h set to v (v representable in the codec;
#                                 i8 takes an int in [-128, 127]; the word's other bits must be zero)
#   rint_i32(v) -> int32 nearest to v, ties to even;  fmax / fmin / fabs on float32
# ----------------------------------------------------------------------------------------------------

if SIMULATOR:
    _NP_ELEMENT = {"f32": np.uint32, "f16": np.uint16, "bf16": np.uint16, "i8": np.uint8}

    def zero_word(a):
        return a.dtype.type(0)

    def _piece(word: Any, h: int, codec: str) -> int:
        bits = 8 * _ELEMENT_BYTES[codec]
        return (int(word) >> (bits * int(h))) & ((1 << bits) - 1)

    def _decode(codec: str) -> Callable:
        def decode(word, h):
            bits = np.array(_piece(word, h, codec), dtype=_NP_ELEMENT[codec])
            if codec == "f16":
                return np.float32(bits.view(np.float16))
            if codec == "bf16":
                return np.array(int(bits) << 16, dtype=np.uint32).view(np.float32)[()]
            return bits.view(np.float32)[()]
        return decode

    def _insert(codec: str) -> Callable:
        def insert(word, v, h):
            if codec == "i8":
                bits = int(v) & 0xFF
            elif codec == "f16":
                bits = int(np.array(v, dtype=np.float16).view(np.uint16))
            elif codec == "bf16":
                bits = int(np.array(v, dtype=np.float32).view(np.uint32)) >> 16
            else:
                bits = int(np.array(v, dtype=np.float32).view(np.uint32))
            return type(word)(int(word) | (bits << (8 * _ELEMENT_BYTES[codec] * int(h))))
        return insert

    def _float_bits(v):
        return int(np.array(v, dtype=np.float32).view(np.int32))

    def _bits_float(b):
        return np.array(b, dtype=np.int32).view(np.float32)[()]

    def rint_i32(v):
        return 0 if v != v else int(np.rint(np.float32(v)))  # float2int_rn turns NaN into 0

    def fmax(a, b):
        return np.float32(np.fmax(a, b))  # like libdevice: a NaN operand gives the other one

    def fmin(a, b):
        return np.float32(np.fmin(a, b))

    def fabs(a):
        return np.float32(abs(a))

    def fast_exp(v):
        with np.errstate(over="ignore"):
            return np.float32(np.exp(np.float32(v)))

    def fast_div(a, b):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return np.float32(np.float32(a) / np.float32(b))

    def _to_f16(v):
        return np.float32(np.float16(v))
else:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic
    from numba.cuda import libdevice
    from numba.types import float16

    _LLVM_FLOAT = {"f32": ir.FloatType(), "f16": ir.HalfType()}

    @intrinsic
    def zero_word(typingctx, a):
        """A zero of the array's element type (the word accumulator a store starts from)."""
        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(sig.return_type), 0)
        return a.dtype(a), codegen

    def _narrow(builder, v, bits: int):
        return builder.trunc(v, ir.IntType(bits)) if v.type.width > bits else v

    def _shift_of(builder, h, word_type, bits: int):
        """h * bits as an integer of the word's width (h is an i64 loop index, constant after unrolling)."""
        width = word_type.width
        h = builder.trunc(h, word_type) if width < 64 else h
        return builder.mul(h, ir.Constant(word_type, bits))

    def _decode(codec: str) -> Callable:
        bits = 8 * _ELEMENT_BYTES[codec]

        @intrinsic
        def decode(typingctx, word, h):
            def codegen(context, builder, sig, args):
                w, hv = args
                piece = _narrow(builder, builder.lshr(w, _shift_of(builder, hv, w.type, bits)), bits)
                if codec == "bf16":  # the top half of a float32
                    return builder.bitcast(builder.shl(builder.zext(piece, ir.IntType(32)),
                                                       ir.Constant(ir.IntType(32), 16)), ir.FloatType())
                value = builder.bitcast(piece, _LLVM_FLOAT[codec])
                return builder.fpext(value, ir.FloatType()) if codec == "f16" else value
            return types.float32(word, types.intp), codegen
        return decode

    def _insert(codec: str) -> Callable:
        bits = 8 * _ELEMENT_BYTES[codec]

        @intrinsic
        def insert(typingctx, word, v, h):
            def codegen(context, builder, sig, args):
                w, value, hv = args
                if codec == "i8":
                    piece = _narrow(builder, value, 8)
                elif codec == "f16":
                    piece = builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))
                elif codec == "bf16":
                    piece = _narrow(builder, builder.lshr(builder.bitcast(value, ir.IntType(32)),
                                                          ir.Constant(ir.IntType(32), 16)), 16)
                else:
                    piece = builder.bitcast(value, ir.IntType(32))
                if w.type.width > bits:
                    piece = builder.zext(piece, w.type)
                return builder.or_(w, builder.shl(piece, _shift_of(builder, hv, w.type, bits)))
            value_type = types.int32 if codec == "i8" else types.float32
            return word(word, value_type, types.intp), codegen
        return insert

    @cuda.jit(device=True)
    def _float_bits(v):
        return libdevice.float_as_int(v)

    @cuda.jit(device=True)
    def _bits_float(b):
        return libdevice.int_as_float(b)

    @cuda.jit(device=True)
    def rint_i32(v):
        return libdevice.float2int_rn(v)

    @cuda.jit(device=True)
    def fmax(a, b):
        return libdevice.fmaxf(a, b)

    @cuda.jit(device=True)
    def fmin(a, b):
        return libdevice.fminf(a, b)

    @cuda.jit(device=True)
    def fabs(a):
        return libdevice.fabsf(a)

    @intrinsic
    def _ex2_approx_ftz(typingctx, v):
        """PTX ex2.approx.ftz.f32, one MUFU instruction (libdevice's exp2f / fast_expf add a denormal-result path)."""
        def codegen(context, builder, sig, args):
            fn = builder.module.declare_intrinsic("llvm.nvvm.ex2.approx.ftz.f", fnty=ir.FunctionType(
                ir.FloatType(), [ir.FloatType()]))
            return builder.call(fn, args)
        return types.float32(types.float32), codegen

    @cuda.jit(device=True)
    def fast_exp(v):  # 2 ulp; results below 2^-126 flush to 0
        return _ex2_approx_ftz(v * _LOG2E)

    @cuda.jit(device=True)
    def fast_div(a, b):  # a * rcp(b), 2 ulp; 0 for |b| > 2^126 (so v / inf = 0)
        return libdevice.fast_fdividef(a, b)

    @cuda.jit(device=True)
    def _to_f16(v):
        return float32(float16(v))


# ----------------------------------------------------------------------------------------------------
# Codecs: decode an element of a word, round a float32 to the storage type, insert into a word
# ----------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _round_f32(v):
    return v


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


_CODECS: dict[str, tuple[Callable, Callable, Callable]] = {
    # name: (decode(word, h), round to storage type, insert(word, v, h))
    "f32": (_decode("f32"), _round_f32, _insert("f32")),
    "f16": (_decode("f16"), _to_f16, _insert("f16")),
    "bf16": (_decode("bf16"), _round_bf16, _insert("bf16")),
}
_insert_i8 = _insert("i8")
_CODEC_OF_DTYPE = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.int16): "bf16"}


def codec_of(array: Any, what: str) -> str:
    """The element codec of an array: float32, float16, or bfloat16 passed as int16 bits."""
    codec = _CODEC_OF_DTYPE.get(np.dtype(array.dtype))
    if codec is None:
        raise ZQError(f"the Numba kernels take float32, float16 or bfloat16 (as int16 bits) for {what}, got "
                      f"{array.dtype}; use the CPU reference backend for other dtypes")
    return codec


def _word_vec(codec: str, vec: int) -> int:
    """Elements per word for an array of this codec when the row is read ``vec`` elements at a time
    (float32 per-column parameters of a 16-bit row are read in narrower words, at most 8 bytes)."""
    return min(vec, MAX_WORD_BYTES // _ELEMENT_BYTES[codec])


# ----------------------------------------------------------------------------------------------------
# Row reductions (each row's T threads; every thread gets the total)
# ----------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _add(a, b):
    return a + b


def _make_row_reduce(combine: Callable, threads: int, rows: int, reduction: str) -> Callable:
    """A device function ``reduce(scratch, value) -> total`` over each row's ``threads`` threads.

    ``scratch`` is a float32 shared array of ``_scratch_len(...)`` elements, free again on return. The
    identity element of both combines used here (sum, max of absolute values) is 0. Every thread of the
    block must call it (it synchronises the block unless a row is one warp wide).
    """
    if reduction == "tree":
        @cuda.jit(device=True)
        def reduce(scratch, value):
            t = cuda.threadIdx.x
            base = cuda.threadIdx.y * threads
            scratch[base + t] = value
            cuda.syncthreads()
            stride = threads // 2
            while stride > 0:
                if t < stride:
                    scratch[base + t] = combine(scratch[base + t], scratch[base + t + stride])
                cuda.syncthreads()
                stride //= 2
            total = scratch[base]
            cuda.syncthreads()
            return total
        return reduce

    warps = threads // _WARP

    @cuda.jit(device=True)
    def reduce(scratch, value):
        offset = _WARP // 2
        while offset > 0:  # butterfly: every lane ends with the warp's total
            value = combine(value, cuda.shfl_xor_sync(0xFFFFFFFF, value, offset))
            offset //= 2
        if warps == 1:
            return value
        t = cuda.threadIdx.x
        base = cuda.threadIdx.y * warps
        if t % _WARP == 0:
            scratch[base + t // _WARP] = value
        cuda.syncthreads()
        total = scratch[base]
        for w in range(1, warps):
            total = combine(total, scratch[base + w])
        cuda.syncthreads()
        return total
    return reduce


def _scratch_len(threads: int, rows: int, reduction: str) -> int:
    return max(1, rows * (threads if reduction == "tree" else threads // _WARP))


# ----------------------------------------------------------------------------------------------------
# Kernels, built per (element codecs, flags, K, vec, T, R, reduction)
#
# Slot e = u * vec + h of a thread's local array is element h of its word u, i.e. row word
# w = t + u * T and column vec * w + h. Out-of-range rows of the last block compute on a clamped row
# and store nothing (every thread must take part in the reductions).
# ----------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN: libdevice's fmaxf returns the other operand, which would lose a row's NaN."""
    return fmax(a, b) if a == a and b == b else a + b


@cuda.jit(device=True)
def _row_scale(absmax):
    s = absmax / _QMAX
    if s == _ZERO:
        return _ONE  # an all-zero row quantizes to zeros with scale 1
    return s + (s - s)  # + 0, or NaN for a row with a NaN or an Inf


@cuda.jit(device=True)
def _quantize_value(v, inverse_scale):
    return rint_i32(fmin(fmax(v * inverse_scale, -_QMAX), _QMAX))


BUILT_KERNELS: dict[tuple, Any] = {}
"""Every kernel built so far, by (builder name, build parameters): benchmarks read their resource usage."""


def _built(builder: Callable) -> Callable:
    """Cache a kernel builder on its (hashable) parameters and record what it built; on a GPU, the kernel's
    compiled code is also cached on disk under those parameters (kernel_cache.py)."""
    @lru_cache(maxsize=None)
    def cached(*params: Any) -> Any:
        kernel = builder(*params)
        if not SIMULATOR:
            kernel_cache.attach(kernel, f"{builder.__name__}{params!r}")
        return kernel

    def build(*params: Any) -> Any:
        kernel = cached(*params)
        BUILT_KERNELS[(builder.__name__.strip("_"), *params)] = kernel
        return kernel
    return build


class _RowKit(NamedTuple):
    """What every kernel of one geometry (K, vec, T, R, reduction) is built from.

    The ints are compile-time constants of the kernels (Numba folds closure ints; a kernel reads them from
    locals of its builder, since it cannot read attributes of Python objects): ``words`` per row,
    ``per_thread`` words per thread, the first ``full`` of which exist for every thread (no bounds check),
    ``slots`` values per thread and the reductions' ``scratch_len``. The device functions:
    ``make_load(decode)(a, base, t, out)`` fills ``out`` with the row's decoded values (0 past the end);
    ``make_param(decode, pvec)(p, w, h)`` is column ``vec * w + h`` of a per-column vector read in words of
    ``pvec``; ``position(n_rows)`` is (first word of this thread's row, whether the row exists);
    ``quantize_store(vals, absmax, q, scale, base, t, store)`` writes the row's int8 words and scale from its
    values and the row's absmax; ``row_sum`` / ``row_max`` reduce over the row's threads.
    """

    words: int
    per_thread: int
    full: int
    slots: int
    scratch_len: int
    make_load: Callable
    make_param: Callable
    position: Callable
    quantize_store: Callable
    row_sum: Callable
    row_max: Callable


def _row_kit(k: int, vec: int, threads: int, rows_per_block: int, reduction: str) -> _RowKit:
    words = k // vec
    per_thread = max(1, -(-words // threads))
    full = words // threads

    def make_load(decode: Callable) -> Callable:
        @cuda.jit(device=True)
        def load(a, base, t, out):
            for u in range(per_thread):
                w = t + u * threads
                if u < full or w < words:
                    word = a[uint64(base + w)]  # unsigned: no negative-index wraparound code
                    for h in range(vec):
                        out[u * vec + h] = decode(word, h)
                else:
                    for h in range(vec):
                        out[u * vec + h] = _ZERO
        return load

    def make_param(decode: Callable, pvec: int) -> Callable:
        ratio = vec // pvec

        @cuda.jit(device=True)
        def param(p, w, h):
            return decode(p[uint64(ratio * w + h // pvec)], h % pvec)
        return param

    @cuda.jit(device=True)
    def position(n_rows):
        row = cuda.blockIdx.x * rows_per_block + cuda.threadIdx.y
        store = row < n_rows
        return int64(min(row, n_rows - 1)) * words, store  # a missing row reads the last one

    @cuda.jit(device=True)
    def quantize_store(vals, absmax, q, scale, base, t, store):
        s = _row_scale(absmax)
        inverse = _ONE / s
        if store:
            for u in range(per_thread):
                w = t + u * threads
                if u < full or w < words:
                    word = zero_word(q)
                    for h in range(vec):
                        word = _insert_i8(word, _quantize_value(vals[u * vec + h], inverse), h)
                    q[uint64(base + w)] = word
            if t == 0:
                scale[uint64(cuda.blockIdx.x * rows_per_block + cuda.threadIdx.y)] = s

    return _RowKit(words, per_thread, full, per_thread * vec, _scratch_len(threads, rows_per_block, reduction),
                   make_load, make_param, position, quantize_store,
                   _make_row_reduce(_add, threads, rows_per_block, reduction),
                   _make_row_reduce(_max_nan, threads, rows_per_block, reduction))


# ----------------------------------------------------------------------------------------------------
# Online Hadamard (zq.hadamard, rotation): a fast Walsh-Hadamard transform of the row's values before the
# quantization. The kernels take ``block`` as a build flag (0: none); with one, each row is written to shared
# memory, log2(block) butterfly stages run over it in place (pairs (i, i + half) inside every run of 2 * half
# -> (a + b, a - b), a block-wide barrier after each stage; no warp shuffles, so the simulator runs it too),
# and the values are read back times 1 / sqrt(block), rounded to the row's dtype, as ``zq.hadamard``: the
# same float32 additions in the same order as the reference, so the transform itself is bit-exact.
# ----------------------------------------------------------------------------------------------------

MAX_HADAMARD_ROW = 12 * 1024
"""Most float32 values (rows per block x K) a Hadamard kernel holds in shared memory: 48 KiB, the static limit."""


def _hadamard_len(k: int, rows: int, block: int) -> int:
    """float32 elements of the shared row buffer (1 when the kernel has no Hadamard)."""
    return rows * k if block else 1


def _make_row_hadamard(kit: _RowKit, k: int, vec: int, threads: int, block: int, round_x: Callable) -> Callable:
    """A device function ``rotate(vals, row, t) -> absmax``: the row's values (a thread's slots, as ``load``
    fills them) replaced by their Hadamard transform over blocks of ``block`` (see above), and the absmax of
    the result. ``row`` is the block's float32 shared buffer of ``_hadamard_len`` elements. Every thread of the
    block must call it (it synchronises the block)."""
    stages = max(0, block.bit_length() - 1)
    pairs = k // 2
    pair_rounds, pair_full = max(1, -(-pairs // threads)), pairs // threads
    inverse_sqrt = np.float32(block ** -0.5) if block else _ONE  # the reference's ``* block ** -0.5`` in float32
    per_thread, full, words = kit.per_thread, kit.full, kit.words

    @cuda.jit(device=True)
    def rotate(vals, row, t):
        offset = cuda.threadIdx.y * k
        for u in range(per_thread):
            w = t + u * threads
            if u < full or w < words:
                for h in range(vec):
                    row[offset + w * vec + h] = vals[u * vec + h]
        cuda.syncthreads()
        for stage in range(stages):
            half = 1 << stage
            for m in range(pair_rounds):
                p = t + m * threads
                if m < pair_full or p < pairs:
                    i = offset + ((p >> stage) << (stage + 1)) + (p & (half - 1))
                    a, b = row[i], row[i + half]
                    row[i] = a + b
                    row[i + half] = a - b
            cuda.syncthreads()
        absmax = _ZERO
        for u in range(per_thread):
            w = t + u * threads
            if u < full or w < words:
                for h in range(vec):
                    v = round_x(row[offset + w * vec + h] * inverse_sqrt)
                    vals[u * vec + h] = v
                    absmax = _max_nan(absmax, fabs(v))
        return absmax
    return rotate


@_built
def _quantize_kernel(x_codec: str, block: int, k: int, vec: int, threads: int, rows: int, reduction: str):
    """Per-token INT8 of x, or of ``zq.hadamard(x, block)`` when ``block``."""
    kit = _row_kit(k, vec, threads, rows, reduction)
    decode_x, round_x, _ = _CODECS[x_codec]
    load_x = kit.make_load(decode_x)
    rotate = _make_row_hadamard(kit, k, vec, threads, block, round_x)
    position, quantize_store, block_max = kit.position, kit.quantize_store, kit.row_max
    slots, scratch_len, row_len = kit.slots, kit.scratch_len, _hadamard_len(k, rows, block)

    @cuda.jit
    def kernel(x, q, scale):
        t = cuda.threadIdx.x
        base, store = position(scale.shape[0])
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_x(x, base, t, vals)
        absmax = _ZERO
        if block:
            row = cuda.shared.array(row_len, float32)
            absmax = rotate(vals, row, t)
        else:
            for e in range(slots):
                absmax = _max_nan(absmax, fabs(vals[e]))  # slots past the row hold 0
        quantize_store(vals, block_max(scratch, absmax), q, scale, base, t, store)
    return kernel


@_built
def _layernorm_kernel(x_codec: str, w_codec: str, b_codec: str, add_residual: bool, has_weight: bool,
                      has_bias: bool, k: int, vec: int, threads: int, rows: int, reduction: str):
    kit = _row_kit(k, vec, threads, rows, reduction)
    decode_x, round_x, insert_x = _CODECS[x_codec]
    load_x = kit.make_load(decode_x)
    weight_at = kit.make_param(_CODECS[w_codec][0], _word_vec(w_codec, vec))
    bias_at = kit.make_param(_CODECS[b_codec][0], _word_vec(b_codec, vec))
    position, quantize_store, block_sum, block_max = kit.position, kit.quantize_store, kit.row_sum, kit.row_max
    slots, scratch_len, per_thread, full, words = kit.slots, kit.scratch_len, kit.per_thread, kit.full, kit.words

    @cuda.jit
    def kernel(x, residual, weight, bias, eps, y, q, scale):
        t = cuda.threadIdx.x
        base, store = position(scale.shape[0])
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_x(x, base, t, vals)
        if add_residual:
            res = cuda.local.array(slots, float32)
            load_x(residual, base, t, res)
            for e in range(slots):
                vals[e] = round_x(vals[e] + res[e])  # x + residual is a tensor of x's dtype
        total = _ZERO
        for e in range(slots):
            total += vals[e]  # slots past the row hold 0
        mean = block_sum(scratch, total) / float32(k)  # a division, as torch.mean: the same float32 value
        squares = _ZERO
        for u in range(per_thread):
            if u < full or t + u * threads < words:
                for h in range(vec):
                    d = vals[u * vec + h] - mean
                    squares += d * d
        rstd = _ONE / math.sqrt(block_sum(scratch, squares) / float32(k) + eps)
        absmax = _ZERO
        for u in range(per_thread):
            w = t + u * threads
            if u < full or w < words:
                word = zero_word(y)
                for h in range(vec):
                    v = (vals[u * vec + h] - mean) * rstd
                    if has_weight:
                        v = v * weight_at(weight, w, h)
                    if has_bias:
                        v = v + bias_at(bias, w, h)
                    v = round_x(v)
                    word = insert_x(word, v, h)
                    vals[u * vec + h] = v
                    absmax = _max_nan(absmax, fabs(v))
                if store:
                    y[uint64(base + w)] = word
        quantize_store(vals, block_max(scratch, absmax), q, scale, base, t, store)
    return kernel


@_built
def _rmsnorm_kernel(x_codec: str, w_codec: str, y_codec: str, weight_first: bool, add_residual: bool, write_y: bool,
                    quantize: bool, k: int, vec: int, threads: int, rows: int, reduction: str):
    """y = weight * RMSNorm(x) (y_codec: its dtype) and its INT8 (q, scale); with ``add_residual`` the norm is that
    of h = x + residual (x's dtype), which goes into h. ``write_y`` / ``quantize``: whether y / the INT8 are written
    (``rmsnorm_quant``: y and INT8; ``add_rmsnorm_quant``: h and INT8; ``add_rmsnorm``: h and y)."""
    kit = _row_kit(k, vec, threads, rows, reduction)
    load_x = kit.make_load(_CODECS[x_codec][0])
    _, round_x, insert_x = _CODECS[x_codec]
    weight_at = kit.make_param(_CODECS[w_codec][0], _word_vec(w_codec, vec))
    _, round_y, insert_y = _CODECS[y_codec]
    y_vec = _word_vec(y_codec, vec)
    y_ratio = vec // y_vec
    position, quantize_store, block_sum, block_max = kit.position, kit.quantize_store, kit.row_sum, kit.row_max
    slots, scratch_len, per_thread, full, words = kit.slots, kit.scratch_len, kit.per_thread, kit.full, kit.words

    @cuda.jit
    def kernel(x, residual, weight, eps, h, y, q, scale):
        t = cuda.threadIdx.x
        base, store = position(x.shape[0] // words)
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_x(x, base, t, vals)
        if add_residual:
            res = cuda.local.array(slots, float32)
            load_x(residual, base, t, res)
            for u in range(per_thread):
                w = t + u * threads
                if u < full or w < words:
                    word = zero_word(h)
                    for e in range(vec):
                        v = round_x(vals[u * vec + e] + res[u * vec + e])  # x + residual is a tensor of x's dtype
                        vals[u * vec + e] = v
                        word = insert_x(word, v, e)
                    if store:
                        h[uint64(base + w)] = word
        squares = _ZERO
        for e in range(slots):
            squares += vals[e] * vals[e]
        rstd = _ONE / math.sqrt(block_sum(scratch, squares) / float32(k) + eps)
        absmax = _ZERO
        for u in range(per_thread):
            w = t + u * threads
            if u < full or w < words:
                for part in range(y_ratio):  # y may be float32 in narrower words than x
                    word = zero_word(y)
                    for hh in range(y_vec):
                        e = part * y_vec + hh
                        normed = vals[u * vec + e] * rstd
                        if not weight_first:
                            normed = round_x(normed)  # Llama casts to x's dtype before the weight, Gemma after
                        v = round_y(weight_at(weight, w, e) * normed)
                        word = insert_y(word, v, hh)
                        vals[u * vec + e] = v
                        absmax = _max_nan(absmax, fabs(v))
                    if store and write_y:
                        y[uint64(base * y_ratio + w * y_ratio + part)] = word
        if quantize:
            quantize_store(vals, block_max(scratch, absmax), q, scale, base, t, store)
    return kernel


# GELU without libdevice's erff / tanhf: the GELU+quant kernel is bound by instruction issue, not memory, and
# those two were about half of its instructions per element. Both forms below stay within a few float32 ulp of
# 1 + erf / 1 + tanh (the reference's own rounding is 1 ulp of 1), far below the float16 rounding that follows.
_ERFC_FIT_END = np.float32(3.9)  # erfc(3.9) = 3.5e-8: beyond it 1 + erf(x) is 2 (x > 0) or 0 in float32
# ln(erfc(t)) / t on [0, 3.9] = C0 + C1 t + ... + C9 t^9: a degree-9 minimax fit weighted by erfc(t) * t (the
# absolute error it causes in erf); evaluated in float32 the resulting erf is within 6.4e-8 (1.1 ulp of 1) of the
# exact value, before the exponential's own error
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9 = (np.float32(c) for c in (
    -1.128379225730896, -0.6366199254989624, -0.10277029871940613, 0.019112834706902504, 0.0002649276575539261,
    -0.0018154019489884377, 0.0007532434538006783, -0.00017311336705461144, 2.2693080609315075e-05,
    -1.323436322309135e-06,
))
_TWO = np.float32(2.0)
_MINUS_TWO = np.float32(-2.0)


@cuda.jit(device=True)
def _gelu_erf(v):
    """v / 2 * (1 + erf(v / sqrt(2))) with 1 + erf(x) = 2 - erfc(|x|) for x >= 0 and erfc(|x|) below, erfc(t) =
    exp(t * P(t)): one polynomial and one exponential instead of erff's two polynomials merged by selects."""
    t = fabs(v) * _SQRT1_2
    fitted = fmin(t, _ERFC_FIT_END)  # keeps the polynomial finite for any input
    p = ((((((((_C9 * fitted + _C8) * fitted + _C7) * fitted + _C6) * fitted + _C5) * fitted + _C4) * fitted + _C3)
          * fitted + _C2) * fitted + _C1) * fitted + _C0  # Horner, written out: a loop over a tuple stays a loop
    erfc = fast_exp(p * fitted) if t < _ERFC_FIT_END else _ZERO
    return v * _HALF * (_TWO - erfc if v >= _ZERO else erfc)


@cuda.jit(device=True)
def _gelu_tanh(v):
    """v / 2 * (1 + tanh(u)) = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3): one exponential and one fast
    division instead of tanhf (for u -> -inf, exp -> inf and v / inf = 0)."""
    u = _TANH_BETA * (v + _TANH_KAPPA * (v * v * v))
    return fast_div(v, _ONE + fast_exp(u * _MINUS_TWO))


@cuda.jit(device=True)
def _relu(v):
    return fmax(v, _ZERO)


@cuda.jit(device=True)
def _silu(v):
    return v / (_ONE + math.exp(-v))


# the activations the elementwise kernels take as a build flag: GELU (erf), GELU (tanh), ReLU, SiLU
_ACTIVATION_FNS = {"erf": _gelu_erf, "tanh": _gelu_tanh, "relu": _relu, "silu": _silu}


@_built
def _activation_kernel(x_codec: str, has_bias: bool, activation: str, k: int, vec: int, threads: int, rows: int,
                       reduction: str):
    kit = _row_kit(k, vec, threads, rows, reduction)
    act = _ACTIVATION_FNS[activation]
    decode_x, round_x, _ = _CODECS[x_codec]
    load_x = kit.make_load(decode_x)
    bias_at = kit.make_param(decode_x, vec)
    position, quantize_store, block_max = kit.position, kit.quantize_store, kit.row_max
    slots, scratch_len, per_thread, full, words = kit.slots, kit.scratch_len, kit.per_thread, kit.full, kit.words

    @cuda.jit
    def kernel(x, bias, q, scale):
        t = cuda.threadIdx.x
        base, store = position(scale.shape[0])
        scratch = cuda.shared.array(scratch_len, float32)
        vals = cuda.local.array(slots, float32)
        load_x(x, base, t, vals)
        absmax = _ZERO
        for u in range(per_thread):
            w = t + u * threads
            if u < full or w < words:
                for h in range(vec):
                    v = vals[u * vec + h]
                    if has_bias:
                        v = round_x(v + bias_at(bias, w, h))
                    g = round_x(act(v))
                    vals[u * vec + h] = g
                    absmax = _max_nan(absmax, fabs(g))
        quantize_store(vals, block_max(scratch, absmax), q, scale, base, t, store)
    return kernel


@_built
def _gated_kernel(x_codec: str, activation: str, block: int, k: int, vec: int, threads: int, rows: int,
                  reduction: str):
    """act(gate) * up: SwiGLU (silu), GeGLU (erf / tanh); then ``zq.hadamard`` of it when ``block``."""
    kit = _row_kit(k, vec, threads, rows, reduction)
    act = _ACTIVATION_FNS[activation]
    load_x = kit.make_load(_CODECS[x_codec][0])
    round_x = _CODECS[x_codec][1]
    rotate = _make_row_hadamard(kit, k, vec, threads, block, round_x)
    position, quantize_store, block_max = kit.position, kit.quantize_store, kit.row_max
    slots, scratch_len, row_len = kit.slots, kit.scratch_len, _hadamard_len(k, rows, block)

    @cuda.jit
    def kernel(gate, up, q, scale):
        t = cuda.threadIdx.x
        base, store = position(scale.shape[0])
        scratch = cuda.shared.array(scratch_len, float32)
        gates = cuda.local.array(slots, float32)
        ups = cuda.local.array(slots, float32)
        load_x(gate, base, t, gates)
        load_x(up, base, t, ups)
        absmax = _ZERO
        for e in range(slots):  # slots past the row hold 0 and stay 0
            v = round_x(round_x(act(gates[e])) * ups[e])
            gates[e] = v
            absmax = _max_nan(absmax, fabs(v))
        if block:
            row = cuda.shared.array(row_len, float32)
            absmax = rotate(gates, row, t)
        quantize_store(gates, block_max(scratch, absmax), q, scale, base, t, store)
    return kernel


# ----------------------------------------------------------------------------------------------------
# Launch layer
# ----------------------------------------------------------------------------------------------------

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_shape(k: int, vec: int) -> tuple[int, int]:
    """Default (threads per row T, rows per block R) for rows of K elements read ``vec`` at a time.

    T: the narrowest power of two (>= one warp) that leaves each thread at most 6 words, so rows up to
    768 x 4 elements take one warp and need no block-wide synchronisation; R fills blocks to 128 threads.
    """
    words = -(-k // vec)
    threads = min(1024, max(_WARP, _pow2_at_least(-(-words // 6)), _pow2_at_least(-(-k // MAX_PER_THREAD))))
    return threads, max(1, 128 // threads)


def _address(a: Any) -> int:
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return interface["data"][0]


def _contiguous(a: Any) -> bool:
    """C-contiguity of a NumPy array or a Numba device array."""
    return a.is_c_contiguous() if hasattr(a, "is_c_contiguous") else bool(a.flags["C_CONTIGUOUS"])


def _pick_vec(arrays: list[Any], k: int, vec: int | None) -> int:
    """The widest word (``vec`` elements, at most 8 bytes per word of every array) that divides K and
    that every array's start is aligned to; ``vec`` forces one (ZQError if it does not apply)."""
    def fits(v: int) -> bool:
        return (k % v == 0 and v * arrays[0].dtype.itemsize <= MAX_WORD_BYTES
                and all(_address(a) % (_word_vec(_element_codec(a), v) * a.dtype.itemsize) == 0 for a in arrays))
    if vec is None:
        return next(v for v in reversed(VECS) if fits(v))
    if vec not in VECS:
        raise ZQError(f"vec must be one of {VECS}, got {vec}")
    if not fits(vec):
        raise ZQError(f"vec={vec} needs K ({k}) divisible by {vec} and rows aligned to whole words")
    return vec


def _element_codec(a: Any) -> str:
    """The codec of a row or parameter array, "i8" for the quantized output."""
    return "i8" if np.dtype(a.dtype).itemsize == 1 else codec_of(a, "array")


def _words(a: Any, vec: int) -> Any:
    """A C-contiguous array as a flat view of unsigned words of ``vec`` elements (narrower for 4-byte
    elements that would exceed 8 bytes)."""
    v = _word_vec(_element_codec(a), vec)
    return a.reshape(-1).view(_WORD_DTYPES[v * np.dtype(a.dtype).itemsize])


def _launch_config(x: Any, threads: int | None, rows_per_block: int | None, reduction: str | None,
                   vec: int) -> tuple[int, int, int, str]:
    """(rows, T, R, reduction) after checking the row length and the requested geometry."""
    rows, k = x.shape
    if k > MAX_K:
        raise ZQError(f"rows of {k} elements exceed the Numba kernels' limit of {MAX_K} (1024 threads holding "
                      f"{MAX_PER_THREAD} values each); use the reference kernels for this op")
    default_threads, default_rows = launch_shape(k, vec)
    threads = threads or default_threads
    rows_per_block = rows_per_block or (default_rows * default_threads // threads or 1)
    if threads & (threads - 1) or not _WARP <= threads <= 1024:
        raise ZQError(f"threads per row must be a power of two in [32, 1024], got {threads}")
    if rows_per_block < 1 or threads * rows_per_block > 1024:
        raise ZQError(f"{rows_per_block} rows of {threads} threads do not make a block of at most 1024 threads")
    if -(-k // threads) > MAX_PER_THREAD:
        raise ZQError(f"{threads} threads per row would hold {-(-k // threads)} values each (at most "
                      f"{MAX_PER_THREAD}); use more threads per row")
    reduction = reduction or DEFAULT_REDUCTION
    if reduction not in REDUCTIONS:
        raise ZQError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    if reduction == "shuffle" and SIMULATOR:
        raise ZQError("the CUDA simulator has no warp shuffles; use reduction='tree' under NUMBA_ENABLE_CUDASIM")
    return rows, threads, rows_per_block, reduction


def _check_outputs(x: Any, q: Any, scale: Any) -> None:
    rows, k = x.shape
    if tuple(q.shape) != (rows, k) or np.dtype(q.dtype) != np.int8:
        raise ZQError(f"q must be int8 of shape {(rows, k)}, got {q.dtype} {tuple(q.shape)}")
    if tuple(scale.shape) != (rows,) or np.dtype(scale.dtype) != np.float32:
        raise ZQError(f"scale must be float32 of shape ({rows},), got {scale.dtype} {tuple(scale.shape)}")
    if not all(_contiguous(a) for a in (x, q)):
        raise ZQError("the Numba kernels take C-contiguous [rows, K] arrays; call .contiguous() first")


def _vector(v: Any, k: int, what: str) -> Any:
    if tuple(v.shape) != (k,):
        raise ZQError(f"{what} must have shape ({k},), got {tuple(v.shape)}")
    return v


def _same_type(a: Any, b: Any, what: str, shape: bool = True) -> None:
    if shape and tuple(a.shape) != tuple(b.shape):
        raise ZQError(f"{what} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    if codec_of(b, what) != codec_of(a, "x"):
        raise ZQError(f"{what} must have the input's dtype {a.dtype}, got {b.dtype}")


class _Launch:
    """Checked launch geometry shared by every op: rows, vec, T, R, reduction, grid."""

    def __init__(self, x: Any, q: Any, scale: Any, arrays: list[Any], options: dict[str, Any], block: int = 0
                 ) -> None:
        if q is not None or scale is not None:  # None: a kernel that does not quantize
            _check_outputs(x, q, scale)
        elif not _contiguous(x):
            raise ZQError("the Numba kernels take C-contiguous [rows, K] arrays; call .contiguous() first")
        if not all(_contiguous(a) for a in arrays):  # a word view of a strided array would be a copy
            raise ZQError("the Numba kernels take C-contiguous arrays (y, residual, weight, bias, up); call "
                          ".contiguous() first")
        self.k = x.shape[1]
        self.vec = _pick_vec([x, *(a for a in (q, *arrays) if a is not None)], self.k, options.get("vec"))
        self.rows, self.threads, self.rows_per_block, self.reduction = _launch_config(
            x, options.get("threads"), options.get("rows_per_block"), options.get("reduction"), self.vec)
        if _hadamard_len(self.k, self.rows_per_block, block) > MAX_HADAMARD_ROW:
            raise ZQError(f"{self.rows_per_block} rows of {self.k} values exceed the Hadamard kernels' shared memory "
                          f"({MAX_HADAMARD_ROW} float32 values); use fewer rows per block, or the reference kernels "
                          f"for rows this long")
        self.stream = options.get("stream", 0)

    def geometry(self) -> tuple[int, int, int, int, str]:
        return self.k, self.vec, self.threads, self.rows_per_block, self.reduction

    def words(self, a: Any) -> Any:
        return _words(a, self.vec)

    def run(self, kernel: Any, *args: Any) -> None:
        if self.rows:
            grid = -(-self.rows // self.rows_per_block)
            kernel[grid, (self.threads, self.rows_per_block), self.stream](*args)


# Every launch takes C-contiguous [rows, K] arrays (q int8, scale float32 [rows]) and these keywords:
# stream (a Numba stream), threads (per row) and rows_per_block (default launch_shape(K, vec)), vec (elements
# per load/store word, 1/2/4; default the widest that K and the arrays' alignment allow) and reduction
# ("tree" | "shuffle"; default DEFAULT_REDUCTION).

def quantize_per_token(x, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of x [rows, K]."""
    _quantize(x, 0, q, scale, options)


def hadamard_quant(x, block: int, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of ``zq.hadamard(x, block)`` (x [rows, K])."""
    _quantize(x, _checked_block(x, block), q, scale, options)


def _quantize(x, block: int, q, scale, options: dict[str, Any]) -> None:
    launch = _Launch(x, q, scale, [], options, block)
    kernel = _quantize_kernel(codec_of(x, "x"), block, *launch.geometry())
    launch.run(kernel, launch.words(x), launch.words(q), scale)


def _checked_block(x, block: int) -> int:
    """The Hadamard block, checked: a power of two of at least 2 that divides K."""
    if block < 2 or block & (block - 1) or x.shape[1] % block:
        raise ZQError(f"the Hadamard block must be a power of two >= 2 dividing the row length {x.shape[1]}, "
                      f"got {block}")
    return block


def layernorm_quant(x, weight, bias, eps: float, y, q, scale, *, residual=None, **options: Any) -> None:
    """y = LayerNorm(x [+ residual]) in x's dtype; q, scale = its per-token INT8. weight/bias may be None."""
    k = x.shape[1]
    _same_type(x, y, "y")
    if residual is not None:
        _same_type(x, residual, "residual")
    has_weight, has_bias = weight is not None, bias is not None
    weight = _vector(weight, k, "weight") if has_weight else x  # an unused placeholder array otherwise
    bias = _vector(bias, k, "bias") if has_bias else x
    rows = [y] + ([residual] if residual is not None else [])
    launch = _Launch(x, q, scale, rows + [weight, bias], options)
    kernel = _layernorm_kernel(codec_of(x, "x"), codec_of(weight, "weight"), codec_of(bias, "bias"),
                               residual is not None, has_weight, has_bias, *launch.geometry())
    launch.run(kernel, launch.words(x), launch.words(x if residual is None else residual), launch.words(weight),
               launch.words(bias), np.float32(eps), launch.words(y), launch.words(q), scale)


def rmsnorm_quant(x, weight, eps: float, y, q, scale, *, weight_first: bool = False, **options: Any) -> None:
    """y = weight * RMSNorm(x) in y's dtype; q, scale of y. The normalised value is cast to x's dtype before the
    product (Llama), or with ``weight_first`` only the product is (Gemma's float32 ``1 + w``)."""
    if tuple(y.shape) != tuple(x.shape):
        raise ZQError(f"y has shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    _rmsnorm(x, None, weight, eps, None, y, codec_of(y, "y"), q, scale, weight_first, options)


def add_rmsnorm_quant(x, residual, weight, eps: float, h, q, scale, *, weight_first: bool = False,
                      **options: Any) -> None:
    """h = x + residual in x's dtype; q, scale = per-token INT8 of weight * RMSNorm(h), normalised as
    :func:`rmsnorm_quant` with its result rounded to x's dtype (the weight has x's dtype, or is Gemma's float32
    ``1 + w`` with ``weight_first``)."""
    _same_type(x, residual, "residual")
    _same_type(x, h, "h")
    _rmsnorm(x, residual, weight, eps, h, None, codec_of(x, "x"), q, scale, weight_first, options)


def add_rmsnorm(x, residual, weight, eps: float, h, y, **options: Any) -> None:
    """h = x + residual in x's dtype, y = weight * RMSNorm(h) (Llama's) in y's dtype; nothing quantized."""
    _same_type(x, residual, "residual")
    _same_type(x, h, "h")
    if tuple(y.shape) != tuple(x.shape):
        raise ZQError(f"y has shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    _rmsnorm(x, residual, weight, eps, h, y, codec_of(y, "y"), None, None, False, options)


def _rmsnorm(x, residual, weight, eps: float, h, y, y_codec: str, q, scale, weight_first: bool,
             options: dict[str, Any]) -> None:
    """The launch of every RMSNorm kernel: None for the outputs it does not write (h without a residual, y, or q and
    scale without the quantization)."""
    weight = _vector(weight, x.shape[1], "weight")
    written = [a for a in (h, y, residual) if a is not None]
    launch = _Launch(x, q, scale, [weight, *written], options)
    kernel = _rmsnorm_kernel(codec_of(x, "x"), codec_of(weight, "weight"), y_codec, weight_first,
                             residual is not None, y is not None, q is not None, *launch.geometry())
    # an output the kernel does not write is given a placeholder it only reads: x (never an alias of an output)
    launch.run(kernel, *(launch.words(x if a is None else a) for a in (x, residual, weight)), np.float32(eps),
               *(launch.words(x if a is None else a) for a in (h, y, q)), x if scale is None else scale)


def gelu_quant(x, bias, approximate: str, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of GELU(x [+ bias]); approximate is 'none' (erf) or 'tanh'."""
    _activation_quant(x, bias, _gelu_activation(approximate), q, scale, options)


def relu_quant(x, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of relu(x): the GELU kernel with the ReLU activation."""
    _activation_quant(x, None, "relu", q, scale, options)


def _gelu_activation(approximate: str) -> str:
    if approximate not in ("none", "tanh"):
        raise ZQError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
    return "erf" if approximate == "none" else "tanh"


def _activation_quant(x, bias, activation: str, q, scale, options: dict[str, Any]) -> None:
    k = x.shape[1]
    if bias is not None:
        _same_type(x, _vector(bias, k, "bias"), "bias", shape=False)
    launch = _Launch(x, q, scale, [] if bias is None else [bias], options)
    kernel = _activation_kernel(codec_of(x, "x"), bias is not None, activation, *launch.geometry())
    launch.run(kernel, launch.words(x), launch.words(x if bias is None else bias), launch.words(q), scale)


def silu_mul_quant(gate, up, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of silu(gate) * up (gate and up of one dtype)."""
    _gated_quant(gate, up, "silu", q, scale, options)


def gelu_mul_quant(gate, up, approximate: str, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of gelu(gate) * up (GeGLU): the SwiGLU kernel with the GELU activation."""
    _gated_quant(gate, up, _gelu_activation(approximate), q, scale, options)


def silu_mul_hadamard_quant(gate, up, block: int, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of ``zq.hadamard(silu(gate) * up, block)``."""
    _gated_quant(gate, up, "silu", q, scale, options, _checked_block(gate, block))


def gelu_mul_hadamard_quant(gate, up, approximate: str, block: int, q, scale, **options: Any) -> None:
    """q, scale = per-token INT8 of ``zq.hadamard(gelu(gate) * up, block)``."""
    _gated_quant(gate, up, _gelu_activation(approximate), q, scale, options, _checked_block(gate, block))


def _gated_quant(gate, up, activation: str, q, scale, options: dict[str, Any], block: int = 0) -> None:
    _same_type(gate, up, "up")
    launch = _Launch(gate, q, scale, [up], options, block)
    kernel = _gated_kernel(codec_of(gate, "gate"), activation, block, *launch.geometry())
    launch.run(kernel, launch.words(gate), launch.words(up), launch.words(q), scale)


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding (zq.rotary_embedding, zq.rotary_embedding_kv_cache): elementwise, one thread per pair
# (d, d + D/2) of a row of the queries, of the keys or (with the cache write) of the values, all in one launch.
# The inputs are read where they lie (the projections' strided views: no copy first); the rotated queries are
# written contiguous, the rotated keys contiguous or into the static KV cache at their slots, with the values.
# ----------------------------------------------------------------------------------------------------

ROTARY_THREADS = 128


class Heads(NamedTuple):
    """A ``[B, heads, S, D]`` tensor whose last dim is contiguous: element (b, h, s, d) is
    ``flat[b * strides[0] + h * strides[1] + s * strides[2] + d]`` (``flat``: a 1-D array of its elements)."""

    flat: Any
    heads: int
    strides: tuple[int, int, int]


@_built
def _rotary_kernel(codec: str, half: int, to_cache: bool):
    decode, round_x, insert = _CODECS[codec]
    dim = 2 * half

    @cuda.jit(device=True)
    def rotate(x, x_lo, cos, sin, c_lo, out, o_lo):
        """out = x * cos + rotate_half(x) * sin at columns d and d + half; each product and the sum rounded to
        the storage type, as eager torch computes the unfused expression."""
        x1, x2 = decode(x[x_lo], 0), decode(x[x_lo + uint64(half)], 0)
        c_hi = c_lo + uint64(half)
        y1 = round_x(round_x(x1 * decode(cos[c_lo], 0)) + round_x(-x2 * decode(sin[c_lo], 0)))
        y2 = round_x(round_x(x2 * decode(cos[c_hi], 0)) + round_x(x1 * decode(sin[c_hi], 0)))
        out[o_lo] = insert(zero_word(out), y1, 0)
        out[o_lo + uint64(half)] = insert(zero_word(out), y2, 0)

    @cuda.jit(device=True)
    def source(j, heads, seq, sb, sh, ss):
        """(offset of pair j's first element in a strided [B, heads, S, D] input, b, h, s)."""
        row = j // half
        b = row // (heads * seq)
        rest = row - b * heads * seq
        h = rest // seq
        s = rest - h * seq
        return uint64(b * sb + h * sh + s * ss + (j - row * half)), b, h, s

    @cuda.jit
    def kernel(q, k, v, cos, sin, q_out, k_out, v_out, slots, batch, seq, heads_q, heads_k, q_sb, q_sh, q_ss, k_sb,
               k_sh, k_ss, v_sb, v_sh, v_ss, out_len, cos_batch):
        i = int64(cuda.grid(1))
        q_pairs = int64(batch) * heads_q * seq * half
        k_pairs = int64(batch) * heads_k * seq * half
        if i < q_pairs:
            at, b, h, s = source(i, int64(heads_q), int64(seq), q_sb, q_sh, q_ss)
            d = i % half
            rotate(q, at, cos, sin, uint64(((b if cos_batch > 1 else 0) * seq + s) * dim + d), q_out,
                   uint64(i // half * dim + d))
            return
        j = i - q_pairs
        if j >= (2 * k_pairs if to_cache else k_pairs):
            return
        is_value = j >= k_pairs
        if is_value:
            j -= k_pairs
        d = j % half
        if is_value:
            at, b, h, s = source(j, int64(heads_k), int64(seq), v_sb, v_sh, v_ss)
        else:
            at, b, h, s = source(j, int64(heads_k), int64(seq), k_sb, k_sh, k_ss)
        slot = slots[s] if to_cache else s
        if slot < 0 or slot >= out_len:  # a slot outside the cache (index_copy_ raises): written nowhere, not past it
            return
        o_lo = uint64(((b * heads_k + h) * out_len + slot) * dim + d)
        if is_value:  # to the cache as it is
            v_out[o_lo] = v[at]
            v_out[o_lo + uint64(half)] = v[at + uint64(half)]
        else:
            rotate(k, at, cos, sin, uint64(((b if cos_batch > 1 else 0) * seq + s) * dim + d), k_out, o_lo)
    return kernel


def rotary_embedding(q: Heads, k: Heads, cos, sin, q_out, k_out, batch: int, seq: int, *, v: Heads | None = None,
                     v_out=None, slots=None, **options: Any) -> None:
    """``x * cos + rotate_half(x) * sin`` of the queries q and the keys k (:class:`Heads`, one dtype, head dim D);
    cos and sin are C-contiguous ``[Bc * seq, D]`` with Bc = batch or 1 (row ``b * seq + s`` rotates batch b,
    position s). q_out gets the rotated queries as a C-contiguous ``[batch, heads_q, seq, D]``. Without ``slots``
    k_out gets the rotated keys the same way; with ``slots`` (int64 ``[seq]``), k_out and v_out are the C-contiguous
    KV cache ``[batch, heads_k, L, D]`` and the rotated keys and the values ``v`` are written at slots ``slots[s]``.
    Keyword: stream."""
    dim = cos.shape[1] if len(cos.shape) == 2 else 0
    if dim % 2 or dim == 0 or tuple(cos.shape) != tuple(sin.shape):
        raise ZQError(f"rotary_embedding takes rows of one even length D: cos {tuple(cos.shape)}, sin "
                      f"{tuple(sin.shape)}")
    if cos.shape[0] not in (seq, batch * seq):
        raise ZQError(f"cos/sin have {cos.shape[0]} rows; expected seq ({seq}) or batch * seq ({batch * seq})")
    to_cache = slots is not None
    if to_cache != (v is not None) or to_cache != (v_out is not None):
        raise ZQError("rotary_embedding writes to the KV cache with the values v, v_out and slots, or none of them")
    heads_k = k.heads
    sizes = {"q_out": (q_out, batch * q.heads * seq * dim)}
    sizes.update({"v_out": (v_out, k_out.size)} if to_cache else {"k_out": (k_out, batch * heads_k * seq * dim)})
    for name, (a, size) in sizes.items():
        if a.size != size:
            raise ZQError(f"{name} must hold {size} elements, got {a.size}")
    out_len = k_out.size // (batch * heads_k * dim) if to_cache and batch * heads_k else seq
    if to_cache and (k_out.size != batch * heads_k * out_len * dim or tuple(slots.shape) != (seq,)):
        raise ZQError(f"the KV cache must be [{batch}, {heads_k}, L, {dim}] and slots [{seq}], got {k_out.size} "
                      f"elements and slots {tuple(slots.shape)}")
    arrays = [q.flat, k.flat, cos, sin, q_out, k_out, *((v.flat, v_out) if to_cache else ())]
    for name, a in zip(("q", "k", "cos", "sin", "q_out", "k_out", "v", "v_out"), arrays):
        _same_type(q.flat, a, name, shape=False)
    if not all(_contiguous(a) for a in arrays):
        raise ZQError("rotary_embedding takes C-contiguous arrays (strided heads as a flat array and strides)")
    total = batch * seq * (q.heads + heads_k * (2 if to_cache else 1)) * (dim // 2)
    if total:
        kernel = _rotary_kernel(codec_of(q.flat, "q"), dim // 2, to_cache)
        value = v if to_cache else q
        # without the cache write, v_out is a placeholder no thread writes: an input, never an alias of an output
        words = [_words(a, 1) for a in (q.flat, k.flat, value.flat, cos, sin, q_out, k_out,
                                        v_out if to_cache else cos)]
        kernel[-(-total // ROTARY_THREADS), ROTARY_THREADS, options.get("stream", 0)](
            *words, slots if to_cache else cos, batch, seq, q.heads, heads_k, *q.strides, *k.strides,
            *value.strides, out_len, cos.shape[0] // seq)
