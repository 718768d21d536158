"""The Numba CPU backend: every task of one dtype in one parallel region.

The wrapper (:func:`run`) does everything that depends only on shapes and the
plan in numpy: it concatenates the per-column vectors of all tasks, turns each
task's :func:`~fastsplit.plan.column_runs` into *segments* (a long run is
copied as a block, neighbouring short runs are merged and gathered through
``src``), cuts every task into *boxes* of at most ``_config.CPU_CHUNK_BYTES``
output bytes and groups the boxes into *parts* of about that size. The kernel
(:func:`_kernel`) is one ``prange`` over the parts; work smaller than
``_config.CPU_PARALLEL_MIN_BYTES`` runs the same loop on the calling thread
(:func:`_kernel_serial`).

A task split on two axes (``Task.rows``, a 5-D view ``(outer, nA, mid, n, inner)``)
is the same gather along its columns, over ``outer * mA * mid`` output rows that
each read a gathered row of x (:func:`_box2_plain`, :func:`_box2_general`): the
same segments and boxes, so block copies of whole runs stay block copies, and
it runs in the same parallel region as the one-axis tasks.

Arrays of many shapes reach the kernel as a table of data addresses, which the
kernel views with ``numba.carray``. A ``numba.typed.List`` of 1-D views was
measured as the alternative: ~1.3 us per array to build (0.3 ms for 120 tasks,
240 arrays, about the same as the address table) but ~0.3 s of compilation per
new element type in every fresh process (typed-list methods are not cached),
and a read-only input has a different Numba type than a writable one.
Addresses cost nothing to compile and make read-only inputs a non-issue.

Arithmetic follows :mod:`fastsplit._reference` exactly: float64 tensors are
computed in float64, the others in float32, and rounded back to nearest-even.
float16 and bfloat16 travel as 16-bit integers (int16 and uint16, so that the
two get different kernels). bfloat16 is converted bit by bit, the way ml_dtypes
converts it; float16 by the CPU's F16C instructions where the kernels are built
for a CPU that has them, else bit by bit the way numpy does (all 2**32 float32
inputs checked against numpy and ml_dtypes). F16C differs from numpy only in
quieting a signalling NaN on the way in, which the multiply that follows does
anyway. ``fastmath`` stays off: it would allow fused multiply-adds and
reassociation, which change the last bit. The float64 noise draws differ from
the reference's in the last bit for one or two in a thousand (glibc's ``log``
against numpy's SIMD one); rounded to float32 or narrower they agree
to within one unit in the last place, nearly always exactly.

Threads: importing this module loads Numba's threading layer (the default
order is ``tbb``, ``omp``, ``workqueue``). The first two may be entered from
several Python threads at once; ``workqueue`` aborts the process when that
happens, so with it the launches are serialised with a lock. GNU OpenMP's idle
workers spin for a while after each region by default; on a machine whose
cores are busy with other processes a region then often waits a scheduler time
slice (4-8 ms, measured) for a worker, so the layer is loaded with
``OMP_WAIT_POLICY=passive`` (``_config.CPU_OMP_WAIT_POLICY``; waking a
sleeping worker costs ~10 us) unless the user set the variable.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numba
import numpy as np
from llvmlite import binding, ir
from numba import prange, types
from numba.core import config as numba_config
from numba.extending import intrinsic, overload

from .. import _config, _noise
from ..plan import column_runs

__all__ = ["available", "run"]

#: The one Numba decorator of the package: cached on disk, no fastmath (it would change the last bit).
_jit = functools.partial(numba.njit, cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)


def _load_threading_layer() -> bool:
    """Load Numba's threading layer now; True when it is ``workqueue`` (launches must then be serialised).

    GNU OpenMP reads ``OMP_WAIT_POLICY`` once, when it is loaded. Unless the
    user set it, ``_config.CPU_OMP_WAIT_POLICY`` is put in the environment for
    that moment only, so it reaches Numba's OpenMP runtime and no other.
    Nothing changes when the layer was already loaded.
    """
    policy = _config.CPU_OMP_WAIT_POLICY
    if policy and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = policy
        try:
            numba.get_num_threads()  # loads the layer
        finally:
            os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        numba.get_num_threads()
    return numba.threading_layer() == "workqueue"


_SERIALISE = _load_threading_layer()
_lock = threading.Lock()


#: task.dtype -> (storage dtype the kernel sees, compute dtype)
_TYPES = {
    "float64": (np.dtype(np.float64), np.dtype(np.float64)),
    "float32": (np.dtype(np.float32), np.dtype(np.float32)),
    "float16": (np.dtype(np.int16), np.dtype(np.float32)),
    "bfloat16": (np.dtype(np.uint16), np.dtype(np.float32)),
}
#: task.dtype -> names of the numpy dtypes its arrays may have (bfloat16 may arrive as its bits)
_NAMES = {"float64": ("float64",), "float32": ("float32",), "float16": ("float16",), "bfloat16": ("bfloat16", "uint16")}
#: a zero-length array per storage dtype: it tells the kernel which element type the addresses point to
_PROTO = {name: np.empty(0, dtype=st) for name, (st, _) in _TYPES.items()}

_ADD = 1  # task flag: add[j] is added
_NOISE = 2  # task flag: noise[j] * gauss is added
_FIRST = 4  # row flag of a two-axis task: the gather along the rows is the first step
_SRC = 8  # task or row flag: the noise is drawn at the flat index of the element read (Task.noise_by_source)

# columns of the tables the wrapper builds: outer, n, m, inner, first column in the concatenated vectors,
# first segment, end segment, flags; then for a two-axis task (column 8 set): nA, mA, mid, first row in the
# concatenated row vectors, row flags; and for every task the rows of x (column 14). A two-axis task's
# (outer, n, m, inner) are those of its output seen as (outer * mA * mid, m, inner).
_SHAPE_COLS = 16
_TWO, _NA, _MA, _MID, _R0, _RFLAGS, _XROWS = 8, 9, 10, 11, 12, 13, 14
_WORK_COLS = 7  # task, o0, o1, j0, j1, i0, i1


def _hardware_f16() -> bool:
    """Whether the kernels are built for this CPU and it converts float16 in hardware (x86 F16C).

    Then float16 goes through LLVM's ``fpext``/``fptrunc`` (``vcvtph2ps``/``vcvtps2ph``,
    16 lanes at a time, round to nearest even); else through the integer code below.
    """
    if numba_config.CPU_NAME is not None:  # a portable build (NUMBA_CPU_NAME): assume nothing
        return False
    return bool(binding.get_host_cpu_features().get("f16c", False))


_F16C = _hardware_f16()

_GOLDEN = np.uint64(_noise.GOLDEN)
_MIX1 = np.uint64(_noise.MIX1)
_MIX2 = np.uint64(_noise.MIX2)
_TWO_PI = np.float64(_noise.TWO_PI)
_INV_2_53 = np.float64(_noise.INV_2_53)


# --------------------------------------------------------------------------- raw memory and bits


@intrinsic
def _pointer(typingctx, address, proto):
    """``address`` (int64) as a pointer to elements of ``proto``'s dtype."""
    if not isinstance(address, types.Integer) or not isinstance(proto, types.Array):
        return None
    ptr_type = types.CPointer(proto.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(address, proto), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_bits(typingctx, value):
    """The bit pattern of the float32 ``value``, as a non-negative int64."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(value), codegen


@intrinsic
def _f16_to_f32_hw(typingctx, bits):
    """The float16 whose bit pattern is the low 16 bits of ``bits``, widened to float32 by the CPU."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 16:
            value = builder.trunc(value, ir.IntType(16))
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_f16_hw(typingctx, value):
    """The float32 ``value`` rounded to float16 by the CPU (nearest even), as int16 bits."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(value), codegen


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """The bfloat16 bits ``bits`` (uint16) as float32: the bits are the top half of the float32's, exactly."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    """float32 to bfloat16 bits (uint16), round to nearest even, exactly as ml_dtypes' cast.

    A NaN becomes the canonical quiet NaN with its sign, as in ml_dtypes. Written
    in 32-bit integer operations: twice the SIMD lanes that Numba's int64 gets.
    """
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def c(v):
            return ir.Constant(i32, v)

        u = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(u, c(16)), c(1))
        rounded = builder.lshr(builder.add(builder.add(u, c(0x7FFF)), odd), c(16))
        nan = builder.icmp_unsigned(">", builder.and_(u, c(0x7FFFFFFF)), c(0x7F800000))
        quiet = builder.or_(builder.and_(builder.lshr(u, c(16)), c(0x8000)), c(0x7FC0))
        return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))

    return types.uint16(value), codegen


@_jit
def _f16_to_f32(h):
    """IEEE half bits (int64, 0..0xffff) to float32, exactly as numpy's float16 -> float32 cast."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0x1F:  # inf and NaN keep their payload, like numpy
        return _f32_from_bits(sign | 0x7F800000 | (mant << 13))
    if exp == 0:  # zero and subnormals: mant * 2**-24 is exact in float32
        v = np.float32(mant) * np.float32(5.960464477539063e-08)
        return -v if sign else v
    return _f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13))


@_jit
def _f32_to_f16(y):
    """float32 to IEEE half bits (int64), round to nearest even, exactly as numpy's cast."""
    u = _f32_bits(y)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf, or NaN with the top of its payload (never a zero payload), like numpy
        if a == 0x7F800000:
            return sign | 0x7C00
        m = (a >> 13) & 0x3FF
        return sign | 0x7C00 | (m if m != 0 else 1)
    if a >= 0x47800000:  # >= 65536: infinity
        return sign | 0x7C00
    if a < 0x38800000:  # below the smallest normal half: float addition of 0.5 rounds to a multiple of 2**-24
        return sign | (_f32_bits(_f32_from_bits(a) + np.float32(0.5)) - 0x3F000000)
    # normal: rebias the exponent, round the 13 dropped bits to nearest even (a carry may give infinity)
    return sign | ((a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13)


def _widen(v):
    """A stored element as the compute dtype (typed by the overload below)."""
    raise NotImplementedError


def _narrow(y, proto):
    """A compute-dtype value rounded to ``proto``'s storage dtype (typed by the overload below)."""
    raise NotImplementedError


def _like(value, arr):
    """``value`` (float64) rounded to ``arr``'s dtype (typed by the overload below)."""
    raise NotImplementedError


@overload(_widen, jit_options={"fastmath": False})
def _widen_impl(v):
    if v == types.int16:
        if _F16C:
            return lambda v: _f16_to_f32_hw(v)
        return lambda v: _f16_to_f32(np.int64(v) & 0xFFFF)
    if v == types.uint16:
        return lambda v: _bf16_to_f32(v)
    if v in (types.float32, types.float64):
        return lambda v: v
    return None


@overload(_narrow, jit_options={"fastmath": False})
def _narrow_impl(y, proto):
    if proto.dtype == types.int16:
        if _F16C:
            return lambda y, proto: _f32_to_f16_hw(y)
        return lambda y, proto: np.int16(_f32_to_f16(y))
    if proto.dtype == types.uint16:
        return lambda y, proto: _f32_to_bf16(y)
    if proto.dtype in (types.float32, types.float64):
        return lambda y, proto: y
    return None


@overload(_like, jit_options={"fastmath": False})
def _like_impl(value, arr):
    if arr.dtype == types.float32:
        return lambda value, arr: np.float32(value)
    if arr.dtype == types.float64:
        return lambda value, arr: value
    return None


# --------------------------------------------------------------------------- noise


@_jit
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@_jit
def _gauss(key, idx):
    """:func:`fastsplit._noise.gauss` for one index: uint64 arithmetic wraps, Box-Muller in float64."""
    h1 = _mix(key + (np.uint64(2) * idx + np.uint64(1)) * _GOLDEN)
    h2 = _mix(key + (np.uint64(2) * idx + np.uint64(2)) * _GOLDEN)
    u1 = (np.float64(h1 >> np.uint64(11)) + np.float64(1.0)) * _INV_2_53
    u2 = np.float64(h2 >> np.uint64(11)) * _INV_2_53
    return math.sqrt(np.float64(-2.0) * math.log(u1)) * math.cos(_TWO_PI * u2)


# --------------------------------------------------------------------------- kernel


@_jit
def _box_plain(x, out, proto, n, m, inner, c0, src, scale, segs, s0, s1, o0, o1, j0, j1, i0, i1):
    """``out = x[src] * scale`` on one box, segment by segment (no add, no noise).

    Every inner loop runs over a slice from 0: Numba then knows the index is
    not negative, drops its wraparound check, and LLVM vectorises the loop.
    """
    for o in range(o0, o1):
        xrow = x[o * n * inner : (o + 1) * n * inner]
        orow = out[o * m * inner : (o + 1) * m * inner]
        for g in range(s0, s1):
            d = segs[g, 0]
            a = max(d, j0)
            b = min(d + segs[g, 2], j1)
            if a >= b:
                continue
            block = segs[g, 3] == 0
            s = segs[g, 1] - d  # in a block, new unit j is a copy of unit j + s
            sc = scale[c0 + a : c0 + b]
            if inner == 1:
                dst = orow[a:b]
                if block:  # contiguous source and destination
                    blk = xrow[a + s : b + s]
                    for k in range(b - a):
                        dst[k] = _narrow(_widen(blk[k]) * sc[k], proto)
                else:
                    idx = src[c0 + a : c0 + b]
                    for k in range(b - a):
                        dst[k] = _narrow(_widen(xrow[np.uint64(idx[k])]) * sc[k], proto)
            else:
                for k in range(b - a):
                    sj = a + k + s if block else src[c0 + a + k]
                    f = sc[k]
                    col = xrow[sj * inner + i0 : sj * inner + i1]
                    dst = orow[(a + k) * inner + i0 : (a + k) * inner + i1]
                    for i in range(i1 - i0):
                        dst[i] = _narrow(_widen(col[i]) * f, proto)


@_jit
def _box_general(x, out, proto, n, m, inner, c0, src, scale, add, noise, key, flags, o0, o1, j0, j1, i0, i1):
    """``out = x[src] * scale + add + noise * gauss`` on one box, element by element.

    A zero ``noise[j]`` still adds ``0.0 * gauss`` as the reference does, which
    only matters for the sign of a zero result, so the draw is only made then.
    The draw's index is the output element's, or with ``_SRC`` the input element's.
    """
    with_add = (flags & _ADD) != 0
    with_noise = (flags & _NOISE) != 0
    by_source = (flags & _SRC) != 0
    for o in range(o0, o1):
        for j in range(j0, j1):
            f = scale[c0 + j]
            xs = (o * n + src[c0 + j]) * inner
            os = (o * m + j) * inner
            for i in range(i0, i1):
                y = _widen(x[xs + i]) * f
                if with_add:
                    y = y + add[c0 + j]
                if with_noise:
                    sd = noise[c0 + j]
                    if sd != 0.0 or y == 0.0:
                        y = y + _like(sd * _gauss(key, np.uint64((xs if by_source else os) + i)), scale)
                out[os + i] = _narrow(y, proto)


# --------------------------------------------------------------------------- two-axis tasks
#
# A two-axis task's output, seen as rows of (m, inner), is a one-axis gather along the columns whose
# rows are themselves gathered: output row r = (o, a, q) of (outer, mA, mid) reads x row
# (o, rsrc[a], q) of (outer, nA, mid). The column segments and boxes are those of a one-axis task
# with outer * mA * mid rows; each row adds one factor (rscale[a]), applied before or after the
# column factor with the first step's result rounded to the dtype in between, as two splits would.


@_jit
def _row_of(r, na, ma, mid, r0, rsrc):
    """(a, x row) of output row ``r`` of a two-axis task: its unit along the rows and the row of x it reads."""
    mm = ma * mid
    o = r // mm
    rem = r - o * mm
    a = rem // mid
    q = rem - a * mid
    return a, (o * na + rsrc[r0 + a]) * mid + q


@_jit
def _two(v, fc, fr, mode, proto):
    """A stored element times two factors, as two splits: ``mode`` 0 one step (``fr`` is 1), 1 rows first, 2 columns first."""
    if mode == 0:
        return _narrow(_widen(v) * fc, proto)
    if mode == 1:
        return _narrow(_widen(_narrow(_widen(v) * fr, proto)) * fc, proto)
    return _narrow(_widen(_narrow(_widen(v) * fc, proto)) * fr, proto)


@_jit
def _box2_plain(x, out, proto, n, m, inner, c0, src, scale, segs, s0, s1, o0, o1, j0, j1, i0, i1,
                na, ma, mid, r0, rsrc, rscale, rows_first):
    """:func:`_box_plain` for a two-axis task (no add, no noise on either axis): one row factor more.

    A row whose factor is 1 (an unsplit unit of a scaled role, or any unit of an unscaled one)
    is a one-axis row: multiplying by 1 and rounding a stored value are exact.
    """
    for r in range(o0, o1):
        a_, xr = _row_of(r, na, ma, mid, r0, rsrc)
        xrow = x[xr * n * inner : (xr + 1) * n * inner]
        orow = out[r * m * inner : (r + 1) * m * inner]
        fr = rscale[r0 + a_]
        mode = 0 if fr == 1 else (1 if rows_first else 2)
        for g in range(s0, s1):
            d = segs[g, 0]
            a = max(d, j0)
            b = min(d + segs[g, 2], j1)
            if a >= b:
                continue
            block = segs[g, 3] == 0
            s = segs[g, 1] - d
            sc = scale[c0 + a : c0 + b]
            if inner == 1:
                dst = orow[a:b]
                if block:  # one loop per mode: each vectorises
                    blk = xrow[a + s : b + s]
                    if mode == 0:
                        for k in range(b - a):
                            dst[k] = _narrow(_widen(blk[k]) * sc[k], proto)
                    elif mode == 1:
                        for k in range(b - a):
                            dst[k] = _narrow(_widen(_narrow(_widen(blk[k]) * fr, proto)) * sc[k], proto)
                    else:
                        for k in range(b - a):
                            dst[k] = _narrow(_widen(_narrow(_widen(blk[k]) * sc[k], proto)) * fr, proto)
                else:
                    idx = src[c0 + a : c0 + b]
                    for k in range(b - a):
                        dst[k] = _two(xrow[np.uint64(idx[k])], sc[k], fr, mode, proto)
            else:
                for k in range(b - a):
                    sj = a + k + s if block else src[c0 + a + k]
                    f = sc[k]
                    col = xrow[sj * inner + i0 : sj * inner + i1]
                    dst = orow[(a + k) * inner + i0 : (a + k) * inner + i1]
                    for i in range(i1 - i0):
                        dst[i] = _two(col[i], f, fr, mode, proto)


@_jit
def _step(y, f, with_add, a, with_noise, sd, key, idx, like):
    """One step of :func:`_box_general` on a compute-dtype value: ``y * f (+ a) (+ sd * gauss(key, idx))``."""
    y = y * f
    if with_add:
        y = y + a
    if with_noise and (sd != 0.0 or y == 0.0):
        y = y + _like(sd * _gauss(key, np.uint64(idx)), like)
    return y


@_jit
def _box2_general(x, out, proto, n, m, inner, c0, src, scale, add, noise, key, flags, o0, o1, j0, j1, i0, i1,
                  na, ma, mid, r0, rsrc, rscale, radd, rnoise, rkey, rflags):
    """:func:`_box_general` for a two-axis task, element by element.

    A step's noise index is the element's flat index in that step's result: the
    intermediate ``(outer, mA, mid, n, inner)`` (rows first) or ``(outer, nA, mid, m, inner)``
    (columns first) for the first step, ``out`` for the second. A step drawn by source
    (``_SRC``) uses the flat index in its input instead: ``x`` for the first step, the
    intermediate for the second.
    """
    c_add = (flags & _ADD) != 0
    c_noise = (flags & _NOISE) != 0
    r_add = (rflags & _ADD) != 0
    r_noise = (rflags & _NOISE) != 0
    c_src = (flags & _SRC) != 0
    r_src = (rflags & _SRC) != 0
    rows_first = (rflags & _FIRST) != 0
    zero = _like(0.0, scale)
    for r in range(o0, o1):
        a_, xr = _row_of(r, na, ma, mid, r0, rsrc)
        fr = rscale[r0 + a_]
        ar = radd[r0 + a_] if r_add else zero
        sr = rnoise[r0 + a_] if r_noise else 0.0
        for j in range(j0, j1):
            fc = scale[c0 + j]
            ac = add[c0 + j] if c_add else zero
            sc = noise[c0 + j] if c_noise else 0.0
            sj = src[c0 + j]
            xs = (xr * n + sj) * inner
            os = (r * m + j) * inner
            first = (r * n + sj) * inner if rows_first else (xr * m + j) * inner
            for i in range(i0, i1):
                y = _widen(x[xs + i])
                if rows_first:
                    y = _step(y, fr, r_add, ar, r_noise, sr, rkey, (xs if r_src else first) + i, scale)
                    y = _widen(_narrow(y, proto))
                    y = _step(y, fc, c_add, ac, c_noise, sc, key, (first if c_src else os) + i, scale)
                else:
                    y = _step(y, fc, c_add, ac, c_noise, sc, key, (xs if c_src else first) + i, scale)
                    y = _widen(_narrow(y, proto))
                    y = _step(y, fr, r_add, ar, r_noise, sr, rkey, (first if r_src else os) + i, scale)
                out[os + i] = _narrow(y, proto)


def _signatures():
    sigs = []
    for storage, compute in _TYPES.values():
        st = numba.from_dtype(storage)
        ct = numba.from_dtype(compute)
        i1, i2, u1, f1 = types.int64[::1], types.int64[:, ::1], types.uint64[::1], types.float64[::1]
        sigs.append(
            types.void(
                st[::1], i1, i1, i2, u1, i1, ct[::1], ct[::1], f1, i2, i2, i1,  # one axis (and columns)
                u1, i1, ct[::1], ct[::1], f1,  # rows of two-axis tasks: keys, src, scale, add, noise
            )
        )
    return sigs


@_jit
def _part(p, proto, xaddr, oaddr, shape, keys, src, scale, add, noise, segs, work, parts,
          rkeys, rsrc, rscale, radd, rnoise):
    """The boxes ``work[parts[p]:parts[p+1]]``."""
    for w in range(parts[p], parts[p + 1]):
        t = work[w, 0]
        outer, n, m, inner = shape[t, 0], shape[t, 1], shape[t, 2], shape[t, 3]
        c0, flags = shape[t, 4], shape[t, 7]
        x = numba.carray(_pointer(xaddr[t], proto), shape[t, _XROWS] * n * inner)
        out = numba.carray(_pointer(oaddr[t], proto), outer * m * inner)
        o0, o1, j0, j1, i0, i1 = work[w, 1], work[w, 2], work[w, 3], work[w, 4], work[w, 5], work[w, 6]
        if shape[t, _TWO] == 0:
            if flags == 0:
                _box_plain(x, out, proto, n, m, inner, c0, src, scale, segs, shape[t, 5], shape[t, 6],
                           o0, o1, j0, j1, i0, i1)
            else:
                _box_general(x, out, proto, n, m, inner, c0, src, scale, add, noise, keys[t], flags,
                             o0, o1, j0, j1, i0, i1)
            continue
        na, ma, mid, r0, rflags = shape[t, _NA], shape[t, _MA], shape[t, _MID], shape[t, _R0], shape[t, _RFLAGS]
        if flags == 0 and (rflags & (_ADD | _NOISE)) == 0:
            _box2_plain(x, out, proto, n, m, inner, c0, src, scale, segs, shape[t, 5], shape[t, 6],
                        o0, o1, j0, j1, i0, i1, na, ma, mid, r0, rsrc, rscale, (rflags & _FIRST) != 0)
        else:
            _box2_general(x, out, proto, n, m, inner, c0, src, scale, add, noise, keys[t], flags,
                          o0, o1, j0, j1, i0, i1, na, ma, mid, r0, rsrc, rscale, radd, rnoise, rkeys[t], rflags)


@_jit(_signatures(), parallel=True)
def _kernel(proto, xaddr, oaddr, shape, keys, src, scale, add, noise, segs, work, parts,
            rkeys, rsrc, rscale, radd, rnoise):
    """Every box of every task in one parallel region, ``prange`` over the parts."""
    for p in prange(parts.shape[0] - 1):
        _part(p, proto, xaddr, oaddr, shape, keys, src, scale, add, noise, segs, work, parts,
              rkeys, rsrc, rscale, radd, rnoise)


@_jit(_signatures())
def _kernel_serial(proto, xaddr, oaddr, shape, keys, src, scale, add, noise, segs, work, parts,
                   rkeys, rsrc, rscale, radd, rnoise):
    """:func:`_kernel` on the calling thread, for work too small to wake other threads for."""
    for p in range(parts.shape[0] - 1):
        _part(p, proto, xaddr, oaddr, shape, keys, src, scale, add, noise, segs, work, parts,
              rkeys, rsrc, rscale, radd, rnoise)


# --------------------------------------------------------------------------- wrapper


def available() -> tuple[bool, str]:
    """Whether this backend can run here: ``(True, "numba X.Y ...")`` (importing this module needs numba)."""
    layer = numba.threading_layer()
    return True, f"numba {numba.__version__} ({numba.get_num_threads()} threads, threading layer {layer})"


def _launch(args, nbytes: int) -> None:
    """Run the kernel: on this thread when the work is small, else in one parallel region.

    Parts go to the threads one at a time (chunk size 1, a dynamic schedule), so
    a thread that the OS takes away for a while does not hold back the others.
    """
    if nbytes < _config.CPU_PARALLEL_MIN_BYTES or numba.get_num_threads() == 1:
        _kernel_serial(*args)
        return
    previous = numba.set_parallel_chunksize(1)
    try:
        if _SERIALISE:
            with _lock:
                _kernel(*args)
        else:
            _kernel(*args)
    finally:
        numba.set_parallel_chunksize(previous)


def _segments(runs: np.ndarray, run_task: np.ndarray, short: int):
    """Merge neighbouring short runs of one task: ``(d, s, length, gather)`` rows and each row's task."""
    length = runs[:, 2]
    gather = length < short
    first = np.ones(runs.shape[0], dtype=bool)
    first[1:] = ~(gather[1:] & gather[:-1] & (run_task[1:] == run_task[:-1]))
    starts = np.flatnonzero(first)
    segs = np.empty((starts.shape[0], 4), dtype=np.int64)
    segs[:, :2] = runs[starts, :2]
    segs[:, 2] = np.add.reduceat(length, starts) if starts.size else 0
    segs[:, 3] = gather[starts]
    return segs, run_task[starts]


def _boxes(outer, m, inner, itemsize: int, chunk: int):
    """Cut every task into boxes of at most ``chunk`` output bytes; group them into parts of about ``chunk``.

    Returns ``work`` (``int64[w, 7]``: task, o0, o1, j0, j1, i0, i1), ``parts``
    (``int64[p + 1]``, boundaries in ``work``) and the total output bytes. Cost: O(number of boxes) numpy work.
    """
    chunk = max(int(chunk), itemsize)
    row = m * inner * itemsize
    col = inner * itemsize
    whole_rows = row <= chunk
    whole_cols = col <= chunk
    ob = np.where(whole_rows, np.maximum(1, chunk // np.maximum(row, 1)), 1)
    jb = np.where(whole_rows, np.maximum(m, 1), np.where(whole_cols, chunk // np.maximum(col, 1), 1))
    ib = np.where(whole_cols, np.maximum(inner, 1), chunk // itemsize)
    no, nj, ni = -(-outer // ob), -(-m // jb), -(-inner // ib)
    count = np.where(outer * m * inner > 0, no * nj * ni, 0)
    total = int(count.sum())
    task = np.repeat(np.arange(outer.shape[0], dtype=np.int64), count)
    local = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    nj_t, ni_t = nj[task], ni[task]
    work = np.empty((total, _WORK_COLS), dtype=np.int64)
    work[:, 0] = task
    for lo, k, size, limit in (
        (1, local // (nj_t * ni_t), ob[task], outer[task]),
        (3, (local // ni_t) % nj_t, jb[task], m[task]),
        (5, local % ni_t, ib[task], inner[task]),
    ):
        work[:, lo] = k * size
        work[:, lo + 1] = np.minimum(work[:, lo] + size, limit)
    nbytes = (work[:, 2] - work[:, 1]) * (work[:, 4] - work[:, 3]) * (work[:, 6] - work[:, 5]) * itemsize
    end = np.cumsum(nbytes)
    total_bytes = int(end[-1]) if total else 0
    part = (end - nbytes) // chunk
    cuts = np.flatnonzero(part[1:] != part[:-1]) + 1
    parts = np.concatenate([[0], cuts, [total]]).astype(np.int64) if total else np.zeros(1, dtype=np.int64)
    return work, parts, total_bytes


_DTYPE_OK: dict = {}  # (numpy dtype, task.dtype) -> whether arrays of that dtype hold task.dtype


def _flags(step) -> int:
    """``_ADD``, ``_NOISE`` and ``_SRC`` of a task (its gather along the columns) or of its ``rows``."""
    flags = _ADD if step.add is not None else 0
    if step.noise is not None:
        flags |= _NOISE | (_SRC if getattr(step, "noise_by_source", False) else 0)
    return flags


def _check(t) -> tuple:
    """The task's row of the shape table and its two data addresses, or TypeError/ValueError."""
    x, out = t.x, t.out
    if not isinstance(x, np.ndarray) or not isinstance(out, np.ndarray):
        raise TypeError(f"the numba backend takes numpy arrays, got {type(x).__name__} and {type(out).__name__}")
    m = t.src.shape[0]
    r = t.rows
    if r is None:
        if x.ndim != 3 or out.ndim != 3 or out.shape != (x.shape[0], m, x.shape[2]):
            raise ValueError(f"task shapes do not match: x {x.shape}, out {out.shape}, {m} new units")
    else:
        ma = r.src.shape[0]
        if x.ndim != 5 or out.shape != (x.shape[0], ma, x.shape[2], m, x.shape[4]):
            raise ValueError(f"two-axis task shapes do not match: x {x.shape}, out {out.shape}, {ma} and {m} new units")
    ok = _DTYPE_OK.get((x.dtype, t.dtype))
    if ok is None:
        ok = _DTYPE_OK.setdefault((x.dtype, t.dtype), x.dtype.name in _NAMES[t.dtype])
    if not ok or out.dtype != x.dtype:
        raise ValueError(f"task arrays of dtype {x.dtype} / {out.dtype} do not hold {t.dtype}")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("task arrays must be C-contiguous")
    if not (x.dtype.isnative and out.dtype.isnative and x.flags.aligned and out.flags.aligned):
        # the kernel reads raw addresses: a '>f4' array would be read with its bytes swapped
        raise ValueError(f"task arrays must be aligned and in native byte order, got {x.dtype.str} / {out.dtype.str}")
    if not out.flags.writeable:
        raise ValueError("task output is read-only")
    flags = _flags(t)
    if r is None:
        row = (x.shape[0], x.shape[1], m, x.shape[2], flags, 0, 0, 0, 0, 0, x.shape[0])
    else:
        outer, na, mid, n, inner = x.shape
        rflags = _flags(r) | (_FIRST if r.first else 0)
        row = (outer * ma * mid, n, m, inner, flags, 1, na, ma, mid, rflags, outer * na * mid)
    return row, x.__array_interface__["data"][0], out.__array_interface__["data"][0]


def _run_dtype(name: str, tasks: list, checked: list) -> None:
    storage, compute = _TYPES[name]
    keep = [i for i, (row, _, _) in enumerate(checked) if row[0] * row[2] * row[3]]
    if not keep:
        return
    tasks = [tasks[i] for i in keep]
    count = len(tasks)
    table = np.array([checked[i][0] for i in keep], dtype=np.int64)
    shape = np.zeros((count, _SHAPE_COLS), dtype=np.int64)
    shape[:, :4] = table[:, :4]
    shape[:, 7] = table[:, 4]
    shape[:, [_TWO, _NA, _MA, _MID, _RFLAGS, _XROWS]] = table[:, 5:]
    m = shape[:, 2]
    shape[:, 4] = np.cumsum(m) - m
    xaddr = np.array([checked[i][1] for i in keep], dtype=np.int64)
    oaddr = np.array([checked[i][2] for i in keep], dtype=np.int64)

    src = np.concatenate([t.src for t in tasks]).astype(np.int64, copy=False)
    if src.min() < 0 or np.any(np.maximum.reduceat(src, shape[:, 4]) >= shape[:, 1]):
        raise ValueError("a task's src indexes outside its input")
    scale = np.concatenate([t.scale for t in tasks]).astype(compute)
    add = np.zeros(0, dtype=compute)
    noise = np.zeros(0)
    flags = shape[:, 7]
    if np.any(flags & _ADD):
        add = np.zeros(src.shape[0], dtype=compute)
        for i in np.flatnonzero(flags & _ADD):
            add[shape[i, 4] : shape[i, 4] + m[i]] = tasks[i].add
    if np.any(flags & _NOISE):
        noise = np.zeros(src.shape[0])
        for i in np.flatnonzero(flags & _NOISE):
            noise[shape[i, 4] : shape[i, 4] + m[i]] = tasks[i].noise
    keys = np.array([t.key for t in tasks], dtype=np.uint64)

    runs = [t.runs if t.runs is not None else column_runs(t.src) for t in tasks]
    run_task = np.repeat(np.arange(count, dtype=np.int64), [r.shape[0] for r in runs])
    segs, seg_task = _segments(np.concatenate(runs).astype(np.int64, copy=False), run_task, _config.CPU_GATHER_RUN)
    d, s, length = segs[:, 0], segs[:, 1], segs[:, 2]
    block = segs[:, 3] == 0
    if (np.any(d < 0) or np.any(d + length > m[seg_task]) or np.any(s[block] < 0)
            or np.any(s[block] + length[block] > shape[seg_task[block], 1])
            or np.any(src[shape[seg_task, 4] + d][block] != s[block])):
        raise ValueError("a task's runs do not match its src")  # block copies trust them: never read out of bounds
    seg_count = np.bincount(seg_task, minlength=count)
    shape[:, 6] = np.cumsum(seg_count)
    shape[:, 5] = shape[:, 6] - seg_count

    rows = _row_vectors(tasks, shape, compute)

    work, parts, nbytes = _boxes(shape[:, 0], m, shape[:, 3], storage.itemsize, _config.CPU_CHUNK_BYTES)
    # the kernel only holds addresses; the caller's tasks keep the arrays alive until it returns
    _launch((_PROTO[name], xaddr, oaddr, shape, keys, src, scale, add, noise, segs, work, parts) + rows, nbytes)


def _row_vectors(tasks: list, shape: np.ndarray, compute) -> tuple:
    """The row vectors of the two-axis tasks, concatenated: ``(keys, src, scale, add, noise)``; fills ``shape[:, _R0]``."""
    keys = np.zeros(len(tasks), dtype=np.uint64)
    two = np.flatnonzero(shape[:, _TWO])
    if two.size == 0:
        return keys, np.zeros(0, np.int64), np.zeros(0, compute), np.zeros(0, compute), np.zeros(0)
    rows = [tasks[i].rows for i in two]
    ma = shape[two, _MA]
    r0 = np.cumsum(ma) - ma
    shape[two, _R0] = r0
    src = np.concatenate([r.src for r in rows]).astype(np.int64, copy=False)
    if src.min() < 0 or np.any(np.maximum.reduceat(src, r0) >= shape[two, _NA]):
        raise ValueError("a two-axis task's row src indexes outside its input")
    scale = np.concatenate([r.scale for r in rows]).astype(compute)
    add = np.zeros(0, dtype=compute)
    noise = np.zeros(0)
    if any(r.add is not None for r in rows):
        add = np.zeros(src.shape[0], dtype=compute)
        for k, r in enumerate(rows):
            if r.add is not None:
                add[r0[k] : r0[k] + ma[k]] = r.add
    if any(r.noise is not None for r in rows):
        noise = np.zeros(src.shape[0])
        for k, r in enumerate(rows):
            if r.noise is not None:
                noise[r0[k] : r0[k] + ma[k]] = r.noise
    keys[two] = [r.key for r in rows]
    return keys, src, scale, add, noise


def run(tasks) -> None:
    """Write every task's ``out``: one parallel region per dtype present.

    Cost: each output written once, each gathered input element read once;
    O(tasks + columns + boxes) numpy work to build the tables.

    Raises:
        TypeError, ValueError: for arrays this backend cannot take (not numpy,
            not C-contiguous, not aligned or not in native byte order, shapes or
            dtypes that do not match the task), before any task is written.
    """
    by_dtype: dict[str, tuple[list, list]] = {}
    for t in tasks:
        if t.dtype not in _TYPES:
            raise ValueError(f"the numba backend does not split {t.dtype} tensors")
        group = by_dtype.setdefault(t.dtype, ([], []))
        group[0].append(t)
        group[1].append(_check(t))
    for name, (group, checked) in by_dtype.items():
        _run_dtype(name, group, checked)
