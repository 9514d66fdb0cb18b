"""Explicit SIMD vectors for the CPU kernels: an LLVM vector type and a few intrinsics.

Numba keeps a plain local accumulator array on the heap, so register-blocked kernels
written as loops run from memory (0.25x OpenBLAS measured). A Numba type whose data
model *is* an LLVM vector (``<16 x float>`` on AVX-512) keeps every accumulator in a
register, and ``llvm.fma`` lowers to ``vfmadd231ps``; see shared/research.

Width. The vector width follows the compile target's features, as Numba sees them
(``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when set, else the host): 64 bytes with
AVX-512F, 32 with AVX, 16 otherwise (SSE2, NEON, anything LLVM lowers the same IR to).
Because Numba's on-disk cache is keyed by the same CPU name and features, a cached
kernel always matches the width it was built for. :data:`ISA` names the choice.

Storage dtypes. Loads take the storage array and return compute vectors:
float32 -> float32, float64 -> float64, and two bit views (Numba's CPU target has no
float16 type): **uint16 = IEEE float16 bits** -> float32 (``bitcast`` to ``<N x half>``,
``fpext``: ``vcvtph2ps`` with F16C) and **int16 = bfloat16 bits** -> float32 (zero-extend,
shift left 16, bitcast: bfloat16 is the top half of a float32), and **int8** -> float32
(sign-extend, ``sitofp``: the values of an int8 KV cache, whose scales the caller applies)
and **uint8 = float8_e4m3fn bits** -> float32 (sign to bit 31, the other 7 bits to bits
20..26, times 2**120: exact for normal and subnormal values; the NaN pattern is never
stored by numba_attn.quant), and **boolean = float8_e5m2 bits** (the one other 1-byte
Numba array type; e5m2 is the top byte of an IEEE float16: shift left 8, then as
float16). Nothing reads these bytes as booleans.
:func:`kernel_storage` makes the half views. Stores take float32 or float64 arrays.

Indices are flat element offsets into a C-contiguous array's data (any rank).
Nothing here checks bounds: callers keep ``i + lanes <= size`` or use the ``_tail``
forms, which touch only the first ``n`` lanes (``llvm.masked.load/store``).
"""
from __future__ import annotations

import os

import llvmlite.binding as llb
from llvmlite import ir
from numba.core import cgutils, config, types
from numba.extending import intrinsic, models, register_model


def _target_features() -> str:
    feats = config.CPU_FEATURES or os.environ.get("NUMBA_CPU_FEATURES")
    if feats:
        return feats
    name = config.CPU_NAME or os.environ.get("NUMBA_CPU_NAME")
    if name and name != "host":
        return ""  # a named CPU without features: assume its baseline only
    try:
        return llb.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - exotic hosts
        return ""


def _vector_bytes(features: str) -> int:
    on = {f[1:] for f in features.split(",") if f.startswith("+")}
    if "avx512f" in on:
        return 64
    if "avx" in on:
        return 32
    return 16


VECTOR_BYTES = _vector_bytes(_target_features())
# F16C converts half to float in one instruction; without it LLVM would call compiler-rt's
# __extendhfsf2, which Numba's JIT does not link: convert with integer operations instead
HAS_F16C = "+f16c" in _target_features().split(",")
ISA = {64: "avx512", 32: "avx2", 16: "generic"}[VECTOR_BYTES]
LANES32 = VECTOR_BYTES // 4
LANES64 = VECTOR_BYTES // 8


class Vec(types.Type):
    """A SIMD vector of ``lanes`` float32 or float64 values (an LLVM vector in a register)."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"vec({dtype}x{lanes})")


VF32 = Vec(types.float32, LANES32)
VF64 = Vec(types.float64, LANES64)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        scalar = ir.FloatType() if fe_type.dtype == types.float32 else ir.DoubleType()
        super().__init__(dmm, fe_type, ir.VectorType(scalar, fe_type.lanes))


_I1, _I16, _I32 = ir.IntType(1), ir.IntType(16), ir.IntType(32)


def _vec_of(dtype):
    """Compute vector type for a storage/scalar dtype, or None."""
    if dtype == types.float64:
        return VF64
    if dtype in (types.float32, types.uint16, types.int16, types.int8, types.uint8,
                 types.boolean):
        return VF32
    return None


def _llty(vt):
    return ir.VectorType(ir.FloatType() if vt.dtype == types.float32 else ir.DoubleType(),
                         vt.lanes)


def _is_c_array(a):
    return isinstance(a, types.Array) and a.layout == "C" and _vec_of(a.dtype) is not None


def _ptr(context, builder, aty, arr, idx):
    data = context.make_array(aty)(context, builder, arr).data
    return builder.gep(data, [idx])


def _raw_type(dtype, lanes):
    """LLVM vector type of the *storage* elements."""
    if dtype in (types.uint16, types.int16):
        return ir.VectorType(_I16, lanes)
    if dtype in (types.int8, types.uint8, types.boolean):
        return ir.VectorType(ir.IntType(8), lanes)
    if dtype == types.float32:
        return ir.VectorType(ir.FloatType(), lanes)
    return ir.VectorType(ir.DoubleType(), lanes)


def _half_bits_ir(builder, h, fty):
    """IEEE binary16 bits (i16 or <N x i16>) -> float32 with integer operations: normal
    numbers rebias the exponent, 31 (inf / NaN) maps to 255, subnormals are mant * 2**-24."""
    vec = isinstance(h.type, ir.VectorType)
    n = h.type.count if vec else 1
    ity = ir.VectorType(_I32, n) if vec else _I32

    def k(x):
        return ir.Constant(ity, [x] * n) if vec else ir.Constant(_I32, x)

    def kf(x):
        return ir.Constant(fty, [x] * n) if vec else ir.Constant(fty, x)

    x = builder.zext(h, ity)
    sign = builder.shl(builder.and_(x, k(0x8000)), k(16))
    ex = builder.and_(builder.lshr(x, k(10)), k(0x1F))
    mant = builder.and_(x, k(0x3FF))
    m13 = builder.shl(mant, k(13))
    normal = builder.or_(sign, builder.or_(builder.shl(builder.add(ex, k(112)), k(23)), m13))
    special = builder.or_(sign, builder.or_(k(0x7F800000), m13))
    sub = builder.fmul(builder.sitofp(mant, fty), kf(5.960464477539063e-08))  # mant * 2**-24
    sub = builder.or_(builder.bitcast(sub, ity), sign)
    bits = builder.select(builder.icmp_unsigned("==", ex, k(31)), special, normal)
    bits = builder.select(builder.icmp_unsigned("==", ex, k(0)), sub, bits)
    return builder.bitcast(bits, fty)


def _to_compute(builder, raw, dtype, vt):
    """Storage vector -> compute vector (half: fpext; bfloat16 bits: shift into a float)."""
    if dtype == types.uint16:
        if not HAS_F16C:
            return _half_bits_ir(builder, raw, _llty(vt))
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), vt.lanes)),
                             _llty(vt))
    if dtype == types.int16:
        wide = builder.zext(raw, ir.VectorType(_I32, vt.lanes))
        wide = builder.shl(wide, ir.Constant(ir.VectorType(_I32, vt.lanes), [16] * vt.lanes))
        return builder.bitcast(wide, _llty(vt))
    if dtype == types.int8:
        return builder.sitofp(raw, _llty(vt))
    if dtype == types.uint8:
        return _e4m3_ir(builder, raw, _llty(vt))
    if dtype == types.boolean:  # float8_e5m2 bits: the top byte of a float16
        h = builder.shl(builder.zext(raw, ir.VectorType(_I16, vt.lanes)),
                        ir.Constant(ir.VectorType(_I16, vt.lanes), [8] * vt.lanes))
        return _to_compute(builder, h, types.uint16, vt)
    return raw


def _e4m3_ir(builder, b, fty):
    """float8_e4m3fn bits (i8 or <N x i8>) -> float32 (see the module docstring)."""
    vec = isinstance(b.type, ir.VectorType)
    n = b.type.count if vec else 1
    ity = ir.VectorType(_I32, n) if vec else _I32

    def k(x):
        return ir.Constant(ity, [x] * n) if vec else ir.Constant(_I32, x)

    x = builder.zext(b, ity)
    bits = builder.or_(builder.shl(builder.and_(x, k(0x80)), k(24)),
                       builder.shl(builder.and_(x, k(0x7F)), k(20)))
    two120 = ir.Constant(fty, [2.0 ** 120] * n) if vec else ir.Constant(fty, 2.0 ** 120)
    return builder.fmul(builder.bitcast(bits, fty), two120)


def _scalar_to_compute(builder, raw, dtype):
    if dtype == types.uint16:
        if not HAS_F16C:
            return _half_bits_ir(builder, raw, ir.FloatType())
        return builder.fpext(builder.bitcast(raw, ir.HalfType()), ir.FloatType())
    if dtype == types.int16:
        wide = builder.shl(builder.zext(raw, _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, ir.FloatType())
    if dtype == types.int8:
        return builder.sitofp(raw, ir.FloatType())
    if dtype == types.uint8:
        return _e4m3_ir(builder, raw, ir.FloatType())
    if dtype == types.boolean:
        h = builder.shl(builder.zext(raw, _I16), ir.Constant(_I16, 8))
        return _scalar_to_compute(builder, h, types.uint16)
    return raw


def _lane_mask(builder, n, lanes):
    """<lanes x i1>: lane < n."""
    n32 = builder.trunc(n, _I32) if n.type.width > 32 else (
        builder.sext(n, _I32) if n.type.width < 32 else n)
    splat = builder.insert_element(ir.Constant(ir.VectorType(_I32, lanes), ir.Undefined), n32,
                                   ir.Constant(_I32, 0))
    splat = builder.shuffle_vector(splat, ir.Constant(ir.VectorType(_I32, lanes), ir.Undefined),
                                   ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
    idx = ir.Constant(ir.VectorType(_I32, lanes), list(range(lanes)))
    return builder.icmp_signed("<", idx, splat)


def _splat(builder, x, lanes):
    vty = ir.VectorType(x.type, lanes)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))


def _intrinsic_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _suffix(llvec):
    el = llvec.element
    tag = {ir.FloatType: "f32", ir.DoubleType: "f64", ir.HalfType: "f16"}.get(type(el))
    if tag is None:
        tag = f"i{el.width}"
    return f"v{llvec.count}{tag}"


# ------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------
@intrinsic
def vload(typingctx, arr, i):
    """A full vector from ``arr.flat[i : i + lanes]`` (LLVM ``load <N x T>``, unaligned),
    converted to the compute type (see the module docstring)."""
    if not (_is_c_array(arr) and isinstance(i, types.Integer)):
        return None
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        raw_t = _raw_type(arr.dtype, vt.lanes)
        raw = builder.load(builder.bitcast(p, raw_t.as_pointer()), align=1)
        return _to_compute(builder, raw, arr.dtype, vt)
    return vt(arr, i), codegen


@intrinsic
def vload_tail(typingctx, arr, i, n):
    """The first ``n`` lanes (``0 <= n <= lanes``) of ``arr.flat[i:]``, the rest 0.0;
    elements past ``i + n`` are never read (``llvm.masked.load``)."""
    if not (_is_c_array(arr) and isinstance(i, types.Integer) and isinstance(n, types.Integer)):
        return None
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        raw_t = _raw_type(arr.dtype, vt.lanes)
        mask = _lane_mask(builder, args[2], vt.lanes)
        fn = _intrinsic_fn(builder, f"llvm.masked.load.{_suffix(raw_t)}.p0",
                           raw_t, [raw_t.as_pointer(), _I32, mask.type, raw_t])
        raw = builder.call(fn, [builder.bitcast(p, raw_t.as_pointer()), ir.Constant(_I32, 1),
                                mask, ir.Constant(raw_t, None)])
        return _to_compute(builder, raw, arr.dtype, vt)
    return vt(arr, i, n), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    """``arr.flat[i : i + lanes] = v`` (float32/float64 arrays of v's dtype)."""
    if not (_is_c_array(arr) and isinstance(v, Vec) and arr.dtype == v.dtype):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def vstore_tail(typingctx, arr, i, v, n):
    """Store the first ``n`` lanes of ``v`` at ``arr.flat[i:]`` (``llvm.masked.store``)."""
    if not (_is_c_array(arr) and isinstance(v, Vec) and arr.dtype == v.dtype
            and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        vty = args[2].type
        mask = _lane_mask(builder, args[3], v.lanes)
        fn = _intrinsic_fn(builder, f"llvm.masked.store.{_suffix(vty)}.p0", ir.VoidType(),
                           [vty, vty.as_pointer(), _I32, mask.type])
        builder.call(fn, [args[2], builder.bitcast(p, vty.as_pointer()), ir.Constant(_I32, 1),
                          mask])
        return context.get_dummy_value()
    return types.none(arr, i, v, n), codegen


@intrinsic
def vbcast(typingctx, arr, i):
    """``arr.flat[i]`` (converted) in every lane: a scalar load and a splat
    (``vbroadcastss m32``)."""
    if not (_is_c_array(arr) and isinstance(i, types.Integer)):
        return None
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        x = _scalar_to_compute(builder, builder.load(p), arr.dtype)
        return _splat(builder, x, vt.lanes)
    return vt(arr, i), codegen


@intrinsic
def load_scalar(typingctx, arr, i):
    """``arr.flat[i]`` as a compute scalar (float16 / bfloat16 bit views -> float32)."""
    if not (_is_c_array(arr) and isinstance(i, types.Integer)):
        return None
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return _scalar_to_compute(builder, builder.load(p), arr.dtype)
    return vt.dtype(arr, i), codegen


# ------------------------------------------------------------------------------------
# constructors and lane counts
# ------------------------------------------------------------------------------------
@intrinsic
def vsplat(typingctx, x):
    """A float32 or float64 scalar in every lane (``insertelement`` + ``shufflevector``)."""
    if x not in (types.float32, types.float64):
        return None
    vt = _vec_of(x)

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], vt.lanes)
    return vt(x), codegen


@intrinsic
def vzero(typingctx, arr):
    """A vector of zeros of the compute type an array's elements load into."""
    if not (isinstance(arr, types.Array) and _vec_of(arr.dtype) is not None):
        return None
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(_llty(vt), None)
    return vt(arr), codegen


@intrinsic
def vnotneginf(typingctx, a):
    """Lane-wise ``a if a > -inf else 0`` (the exponent shift of a row that saw no key)."""
    if not isinstance(a, Vec):
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        ninf = ir.Constant(x.type, [float("-inf")] * x.type.count)
        return builder.select(builder.fcmp_ordered(">", x, ninf), x, ir.Constant(x.type, None))
    return a(a), codegen


@intrinsic
def block_rows(typingctx, arr):
    """MR of the micro-kernels for this target: 8 with 32 vector registers (AVX-512),
    6 with 16 (AVX2, SSE, ...), so that MR x 2 accumulators stay in registers."""
    if not isinstance(arr, types.Array):
        return None
    n = 8 if VECTOR_BYTES == 64 else 6

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), n)
    return types.int64(arr), codegen


@intrinsic
def lanes(typingctx, arr):
    """Lanes of the compute vector an array's elements load into (a compile-time int)."""
    if not (isinstance(arr, types.Array) and _vec_of(arr.dtype) is not None):
        return None
    n = _vec_of(arr.dtype).lanes

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), n)
    return types.int64(arr), codegen


# ------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------
def _same_vec(*args):
    return all(isinstance(a, Vec) for a in args) and len({(a.dtype, a.lanes) for a in args}) == 1


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``)."""
    if not _same_vec(a, b, c):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = _intrinsic_fn(builder, f"llvm.fma.{_suffix(t)}", t, [t, t, t])
        return builder.call(fn, list(args))
    return a(a, b, c), codegen


def _binop(op, doc):
    @intrinsic
    def fn(typingctx, a, b):
        if not _same_vec(a, b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])
        return a(a, b), codegen
    fn.__doc__ = doc
    return fn


vadd = _binop("fadd", "``a + b`` (LLVM ``fadd``).")
vsub = _binop("fsub", "``a - b`` (LLVM ``fsub``).")
vmul = _binop("fmul", "``a * b`` (LLVM ``fmul``).")


@intrinsic
def vmax(typingctx, a, b):
    """Lane-wise ``a if a > b else b`` (``fcmp ogt`` + ``select``: ``vmaxps``)."""
    if not _same_vec(a, b):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])
    return a(a, b), codegen


@intrinsic
def vhsum(typingctx, a):
    """Sum of the lanes (``llvm.vector.reduce.fadd``, reassociated into a tree)."""
    if not isinstance(a, Vec):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = _intrinsic_fn(builder, f"llvm.vector.reduce.fadd.{_suffix(t)}", t.element,
                           [t.element, t])
        return builder.call(fn, [ir.Constant(t.element, 0.0), args[0]], fastmath=("reassoc",))
    return a.dtype(a), codegen


def _combine(builder, a, b, h):
    """Lane-block interleaved pair sums: for blocks of 2h lanes, the first h lanes take the
    sums of a's h-lane halves, the next h those of b's (two shuffles and an add)."""
    n = a.type.count
    lo, hi = [], []
    for i in range(n):
        blk, pos = divmod(i, 2 * h)
        if pos < h:
            lo.append(blk * 2 * h + pos)
            hi.append(blk * 2 * h + h + pos)
        else:
            lo.append(n + blk * 2 * h + pos - h)
            hi.append(n + blk * 2 * h + pos)
    m = ir.VectorType(_I32, n)
    return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(m, lo)),
                        builder.shuffle_vector(a, b, ir.Constant(m, hi)))


def _transpose_sums(builder, vecs):
    """Lane t of the result = sum of the lanes of vecs[t] (len(vecs) = lanes, a power of
    two): a combine tree, ~3 operations per vector instead of a reduction each."""
    h = 1
    while len(vecs) > 1:
        vecs = [_combine(builder, vecs[i], vecs[i + 1], h) for i in range(0, len(vecs), 2)]
        h *= 2
    return vecs[0]


@intrinsic
def vsums_store(typingctx, arr, base, stride, vecs):
    """Store the lane sums of 4 * R vectors: vecs[u * R + r] (key u < 4, row r < R) goes to
    ``arr.flat[base + u * stride + r]``. Reduced together (transposed), not one by one."""
    if not (_is_c_array(arr) and isinstance(vecs, types.UniTuple)
            and isinstance(vecs.dtype, Vec) and vecs.dtype.dtype == arr.dtype
            and vecs.count % 4 == 0):
        return None
    count, nl = vecs.count, vecs.dtype.lanes

    def codegen(context, builder, sig, args):
        items = [builder.extract_value(args[3], i) for i in range(count)]
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        rows = count // 4
        sums = []  # (vector index, scalar)
        g = min(nl, count)
        for g0 in range(0, count, g):
            red = _transpose_sums(builder, items[g0:g0 + g])
            # lane (g * m + t) now holds part m of vector g0 + t: fold to width g
            width = nl
            while width > g:
                half = width // 2
                m = ir.VectorType(_I32, half)
                red = builder.fadd(
                    builder.shuffle_vector(red, red, ir.Constant(m, list(range(half)))),
                    builder.shuffle_vector(red, red, ir.Constant(m, list(range(half, width)))))
                width = half
            for t in range(g):
                sums.append((g0 + t, builder.extract_element(red, ir.Constant(_I32, t))))
        for t, x in sums:
            u, r = divmod(t, rows)
            off = builder.add(args[1], builder.add(
                builder.mul(args[2], ir.Constant(args[2].type, u)), ir.Constant(args[2].type, r)))
            builder.store(x, builder.gep(data, [off]))
        return context.get_dummy_value()
    return types.none(arr, base, stride, vecs), codegen


@intrinsic
def vhmax(typingctx, a):
    """Largest lane (``llvm.vector.reduce.fmax``)."""
    if not isinstance(a, Vec):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = _intrinsic_fn(builder, f"llvm.vector.reduce.fmax.{_suffix(t)}", t.element, [t])
        return builder.call(fn, [args[0]])
    return a.dtype(a), codegen


# exp(y) = 2**n * p(r), n = round(y / ln 2), r = y - n ln 2 (ln 2 in two parts), p a Taylor
# polynomial of degree 7 (float32) / 13 (float64): truncation below the working precision.
# Rounding by the "magic number" 1.5 * 2**m (+ the exponent bias): y / ln 2 + magic rounds
# to an integer whose low bits are n + bias, so 2**n is those bits shifted into the exponent
# field, without float <-> int conversions. Below the clamp n + bias = 0: exactly 0.
_EXP = {
    "f32": dict(lo=-88.0, magic=1.5 * 2**23 + 127, shift=23,
                ln2=(0.693145751953125, 1.4286068203094173e-06), deg=7),
    "f64": dict(lo=-709.0, magic=1.5 * 2**52 + 1023, shift=52,
                ln2=(0.6931471803691238, 1.9082149292705877e-10), deg=13),
}


def _exp_ir(builder, y):
    """exp(y) for y <= 0 (vector); y = -inf (and anything below the clamp) gives exactly 0."""
    vt = y.type
    f64 = isinstance(vt.element, ir.DoubleType)
    c = _EXP["f64" if f64 else "f32"]
    n = vt.count
    vi = ir.VectorType(ir.IntType(64 if f64 else 32), n)

    def k(x):
        return ir.Constant(vt, [float(x)] * n)

    fma = _intrinsic_fn(builder, f"llvm.fma.{_suffix(vt)}", vt, [vt, vt, vt])
    lo = k(c["lo"])
    y = builder.select(builder.fcmp_ordered("<", y, lo), lo, y)
    kf = builder.call(fma, [y, k(1.4426950408889634), k(c["magic"])])
    tf = builder.fsub(kf, k(c["magic"]))  # n, as a float
    r = builder.call(fma, [tf, k(-c["ln2"][0]), y])
    r = builder.call(fma, [tf, k(-c["ln2"][1]), r])
    coefs = [1.0]
    for j in range(1, c["deg"] + 1):
        coefs.append(coefs[-1] / j)
    p = k(coefs[-1])
    for coef in reversed(coefs[:-1]):
        p = builder.call(fma, [p, r, k(coef)])
    bits = builder.shl(builder.bitcast(kf, vi), ir.Constant(vi, [c["shift"]] * n))
    return builder.fmul(p, builder.bitcast(bits, vt))


@intrinsic
def vexp(typingctx, a):
    """Lane-wise ``exp(a)`` for ``a <= 0`` (not NaN): range reduction, a Taylor polynomial
    in FMAs and ``2**t`` from exponent bits; ``-inf`` gives exactly 0."""
    if not isinstance(a, Vec):
        return None

    def codegen(context, builder, sig, args):
        return _exp_ir(builder, args[0])
    return a(a), codegen


# tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1; below |x| < cut an odd Taylor
# series instead (1 - e loses relative precision there).
_TANH_TAYLOR = (1.0, -1.0 / 3, 2.0 / 15, -17.0 / 315, 62.0 / 2835, -1382.0 / 155925,
                21844.0 / 6081075)


@intrinsic
def vtanh(typingctx, a):
    """Lane-wise ``tanh(a)`` (for soft-capping), relative error near the working precision."""
    if not isinstance(a, Vec):
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        vt = x.type
        n = vt.count
        f64 = isinstance(vt.element, ir.DoubleType)

        def k(v):
            return ir.Constant(vt, [float(v)] * n)

        fabs = _intrinsic_fn(builder, f"llvm.fabs.{_suffix(vt)}", vt, [vt])
        copysign = _intrinsic_fn(builder, f"llvm.copysign.{_suffix(vt)}", vt, [vt, vt])
        fma = _intrinsic_fn(builder, f"llvm.fma.{_suffix(vt)}", vt, [vt, vt, vt])
        ax = builder.call(fabs, [x])
        e = _exp_ir(builder, builder.fmul(ax, k(-2.0)))
        big = builder.fdiv(builder.fsub(k(1.0), e), builder.fadd(k(1.0), e))
        terms = _TANH_TAYLOR if f64 else _TANH_TAYLOR[:5]
        x2 = builder.fmul(ax, ax)
        p = k(terms[-1])
        for coef in reversed(terms[:-1]):
            p = builder.call(fma, [p, x2, k(coef)])
        small = builder.fmul(p, ax)
        cut = k(0.125 if f64 else 0.25)
        t = builder.select(builder.fcmp_ordered("<", ax, cut), small, big)
        return builder.call(copysign, [t, x])
    return a(a), codegen


def kernel_storage(x):
    """The array the kernels read for float16 / bfloat16 / float8_e4m3fn / float8_e5m2
    storage: its uint16 / int16 / uint8 / bool bit view (no copy); float32 / float64 / int8 arrays are returned
    as they are."""
    import numpy as np

    if x.dtype == np.float16:
        return x.view(np.uint16)
    if str(x.dtype) == "float8_e4m3fn":
        return x.view(np.uint8)
    if str(x.dtype) == "float8_e5m2":
        return x.view(np.bool_)
    if str(x.dtype) == "bfloat16":
        return x.view(np.int16)
    return x
