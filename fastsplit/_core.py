"""``split``, ``split_many`` and ``Job``: check, lay out, dispatch, hand back.

Everything that depends only on shapes and the plan is worked out here in
numpy (the per-column ``scale``/``add``/``noise`` vectors and the 3-D view);
the backends receive :class:`Task` objects and do arithmetic only.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _dispatch, interop
from ._errors import SplitError
from .plan import SplitPlan

#: role -> (power of the ratio, add the bias offset, add noise)
ROLES = {
    "incoming": (0, False, True),
    "bias": (0, True, False),
    "outgoing": (1, False, False),
    "copy": (0, False, False),
    "moment1": (1, False, False),
    "moment2": (2, False, False),
}
CHANNELS = ("last", "first")
DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass
class Job:
    """One tensor to split: the arguments of :func:`split` for :func:`split_many`.

    Attributes:
        x: numpy, CuPy, TensorFlow, JAX or PyTorch array.
        plan: the :class:`SplitPlan` of the units on ``axis``.
        axis: the unit axis.
        role: ``"incoming"``, ``"bias"``, ``"outgoing"``, ``"copy"``, ``"moment1"``
            or ``"moment2"``.
        channels: ``"last"`` or ``"first"``: how an axis of ``P * width``
            entries is read (positions × units, or units × positions).
        out: optional preallocated result (numpy, CuPy or PyTorch).
    """

    x: Any
    plan: SplitPlan
    axis: int = -1
    role: str = "incoming"
    channels: str = "last"
    out: Any = None


@dataclass
class Task:
    """One job as the backends see it: a gather along the middle of a 3-D view.

    ``out[o, j, i] = x[o, src[j], i] * scale[j] + add[j] + noise[j] * gauss(key, (o*m + j)*inner + i)``

    ``x`` and ``out`` are C-contiguous numpy or CuPy arrays of shapes
    ``(outer, n, inner)`` and ``(outer, m, inner)``; ``src``/``scale``/``add``/``noise``
    are host numpy arrays of length ``m`` (``add``/``noise`` None when zero).
    ``dtype`` names the element type (bfloat16 CuPy arrays arrive as 16-bit integers (uint16 or int16)).
    """

    x: Any
    out: Any
    src: np.ndarray
    scale: np.ndarray
    add: np.ndarray | None
    noise: np.ndarray | None
    key: int
    dtype: str
    runs: np.ndarray = field(default=None, repr=False)


#: CPU results are aligned to this many bytes: TensorFlow's oneDNN kernels abort on a
#: DLPack import that is not 64-byte aligned, and JAX silently copies one.
ALIGN = 64


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous numpy array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def column_runs(src: np.ndarray) -> np.ndarray:
    """Maximal runs of consecutive source indices, as an ``int64[r, 3]`` array.

    Row ``(d, s, length)`` means ``src[d:d+length] == arange(s, s+length)``. A plan
    from :func:`fastsplit.plan` has the old units as one run followed by one
    run per block of adjacent split units, so a kernel can copy whole blocks.
    Cost: O(m) numpy work.
    """
    m = src.shape[0]
    if m == 0:
        return np.zeros((0, 3), dtype=np.int64)
    brk = np.flatnonzero(np.diff(src) != 1) + 1
    starts = np.concatenate([[0], brk]).astype(np.int64)
    ends = np.concatenate([brk, [m]]).astype(np.int64)
    return np.stack([starts, src[starts], ends - starts], axis=1)


_DTYPE_NAMES = {np.dtype(n): n for n in ("float16", "float32", "float64")}

#: per-plan arrays that depend only on the plan, computed once (a growth event applies one
#: plan to many tensors: kernel, bias, every optimizer slot)
_PLAN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _derived(plan) -> dict:
    d = _PLAN_CACHE.get(plan)
    if d is None:
        d = {"runs": column_runs(plan.src), "key": plan.noise_key, "scale": {},
             "offset": plan.offset if np.any(plan.offset != 0) else None}
        _PLAN_CACHE[plan] = d
    return d


def _scale(plan, power: int) -> np.ndarray:
    cache = _derived(plan)["scale"]
    if power not in cache:
        cache[power] = np.ascontiguousarray(plan.ratio**power if power else np.ones(plan.new_width), dtype=np.float64)
    return cache[power]


def _dtype_name(native: interop.Native) -> str:
    if native.bf16:
        return "bfloat16"
    dt = native.array.dtype
    name = _DTYPE_NAMES.get(dt)
    if name is not None:
        return name
    name = getattr(dt, "name", str(dt))
    if name not in DTYPES:
        raise SplitError(f"unsupported dtype {name}: fastsplit splits float16, bfloat16, float32 and float64 tensors")
    return name


def _view3(shape: tuple, axis: int, width: int, channels: str) -> tuple[int, int, int, int]:
    """(outer, n, inner, positions) of the 3-D view, or SplitError."""
    n = shape[axis]
    if n == width:
        positions = 1
    elif n > 0 and n % width == 0:
        positions = n // width
    else:
        raise SplitError(
            f"axis {axis} has length {n}, which is neither the plan width {width} nor a multiple of it"
        )
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    if channels == "last":
        outer *= positions
    else:
        inner *= positions
    return outer, width, inner, positions


def _column_std(xp, x3, units: np.ndarray) -> np.ndarray:
    """float64 standard deviation of each listed unit's entries of a 3-D view."""
    if units.size == 0:
        return np.zeros(0)
    sub = x3[:, xp.asarray(units), :]
    if sub.dtype.itemsize == 2:
        sub = sub.astype(np.float32)
    std = sub.std(axis=(0, 2), dtype=np.float64)
    return np.asarray(std.get() if hasattr(std, "get") else std, dtype=np.float64)


def _prepare(job: Job, native: interop.Native, index: int):
    """Check one job and build its Task (output allocated). Writes nothing."""
    where = f"job {index}: " if index >= 0 else ""
    plan = job.plan
    from .compact import CompactPlan  # here, not at the top: fastsplit.compact imports this module

    if not isinstance(plan, (SplitPlan, CompactPlan)):
        raise SplitError(f"{where}plan must be a SplitPlan or CompactPlan, got {type(plan).__name__}")
    if job.role not in ROLES:
        raise SplitError(f"{where}role must be one of {tuple(ROLES)}, got {job.role!r}")
    if job.channels not in CHANNELS:
        raise SplitError(f"{where}channels must be 'last' or 'first', got {job.channels!r}")
    dtype = _dtype_name(native)
    arr = native.array
    ndim = arr.ndim
    try:
        axis = operator.index(job.axis)
    except TypeError:
        raise SplitError(f"{where}axis must be an integer, got {job.axis!r}") from None
    if not -ndim <= axis < ndim:
        raise SplitError(f"{where}axis {axis} is out of range for a tensor of {ndim} dimensions")
    axis %= ndim
    shape = tuple(int(s) for s in arr.shape)
    try:
        outer, n, inner, positions = _view3(shape, axis, plan.width, job.channels)
    except SplitError as exc:
        raise SplitError(f"{where}{exc}") from None
    m = plan.new_width
    out_shape = shape[:axis] + (positions * m,) + shape[axis + 1 :]

    xp = _dispatch.array_module(native)
    x3 = xp.ascontiguousarray(arr).reshape(outer, n, inner)

    power, with_offset, with_noise = ROLES[job.role]
    derived = _derived(plan)
    add = derived["offset"] if with_offset else None
    noise = None
    if with_noise and plan.symmetry == "noise" and plan.sigma > 0:
        copy = plan.is_copy
        if copy.any():
            units = np.unique(plan.src[copy])
            std = np.zeros(plan.width)
            std[units] = _column_std(xp, x3, units)
            noise = np.where(copy, plan.sigma * std[plan.src], 0.0)

    out_user = job.out
    out_native = None
    if out_user is not None:
        if interop.kind_of(out_user) in ("jax", "tensorflow"):
            raise SplitError(f"{where}out cannot be a {interop.kind_of(out_user)} tensor: those are immutable")
        out_native = interop.export(out_user)
        if out_native.device != native.device:
            raise SplitError(f"{where}out is on {out_native.device}, the input on {native.device}")
        if tuple(out_native.array.shape) != out_shape:
            raise SplitError(f"{where}out has shape {tuple(out_native.array.shape)}, expected {out_shape}")
        if _dtype_name(out_native) != dtype:
            raise SplitError(f"{where}out has dtype {_dtype_name(out_native)}, expected {dtype}")
        if not out_native.array.flags.writeable:
            raise SplitError(f"{where}out is read-only")
    if out_native is not None and out_native.array.flags.c_contiguous:
        out3 = out_native.array.reshape(outer, m, inner)
    else:
        out3 = aligned_empty((outer, m, inner), arr.dtype) if xp is np else xp.empty((outer, m, inner), dtype=arr.dtype)
    task = Task(
        x=x3,
        out=out3,
        src=np.asarray(plan.src),
        scale=_scale(plan, power),
        add=add,
        noise=noise,
        key=derived["key"],
        dtype=dtype,
        runs=derived["runs"],
    )
    return task, native, out_native, out_shape


def split_many(jobs: Sequence[Job], *, backend: str = "auto") -> list:
    """Split many tensors in one pass: one kernel launch per device, one parallel region on the CPU.

    Args:
        jobs: the :class:`Job` objects of one growth event.
        backend: ``"auto"`` (CuPy for CUDA memory, else Numba when installed,
            else numpy), ``"numba"``, ``"cupy"`` or ``"numpy"``.

    Returns:
        One new array per job, of the job's framework and device.

    Raises:
        SplitError: for any bad job (before anything is written), jobs on
            different devices, or a backend that cannot take this memory.

    Cost: each output is written once and each input read about once; the
    inputs are never modified.
    """
    jobs = list(jobs)
    for i, j in enumerate(jobs):
        if not isinstance(j, Job):
            raise SplitError(f"job {i} must be a fastsplit.Job, got {type(j).__name__}")
    if not jobs:
        return []
    natives = [interop.export(j.x) for j in jobs]
    devices = {n.device for n in natives}
    if len(devices) > 1:
        raise SplitError(f"all jobs of one split_many call must be on one device, got {sorted(devices)}")
    device = devices.pop()
    prepared = [_prepare(j, n, i if len(jobs) > 1 else -1) for i, (j, n) in enumerate(zip(jobs, natives))]
    impl = _dispatch.resolve(backend, device)
    tasks = [p[0] for p in prepared]
    impl.run(tasks)
    _dispatch.synchronize(device)
    results = []
    for job, (task, native, out_native, out_shape) in zip(jobs, prepared):
        if out_native is None:
            results.append(interop.import_(task.out.reshape(out_shape), native))
            continue
        if not _shares(task.out, out_native.array, device):  # out was not C-contiguous
            out_native.array[...] = task.out.reshape(out_shape)
        results.append(job.out)
    return results


def _shares(a, b, device) -> bool:
    if device[0] == "cuda":
        return a.data.ptr == b.data.ptr
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def split(x, plan: SplitPlan, axis: int = -1, *, role: str = "incoming", channels: str = "last",
          backend: str = "auto", out=None):
    """Split one tensor along ``axis`` according to ``plan``.

    ``out[..., j, ...] = x[..., src[j], ...] * ratio[j]**p`` (+ ``offset[j]`` for a
    bias, + noise for incoming weights of a ``"noise"`` plan), where ``p`` is 0 for
    ``"incoming"``/``"bias"``/``"copy"``, 1 for ``"outgoing"``/``"moment1"`` and 2 for
    ``"moment2"``. When ``x.shape[axis]`` is ``P * plan.width`` (a Flatten between
    a conv and a Dense), the axis is read as ``P`` positions × ``width`` units
    (``channels="last"``) or ``width`` × ``P`` (``channels="first"``).

    Args:
        x: numpy, CuPy, TensorFlow, JAX or PyTorch array of float16, bfloat16,
            float32 or float64. Never modified.
        plan: from :func:`fastsplit.plan`.
        axis: the unit axis.
        role: see above.
        channels: ``"last"`` or ``"first"``.
        backend: ``"auto"``, ``"numba"``, ``"cupy"`` or ``"numpy"``.
        out: optional preallocated result (numpy, CuPy or PyTorch) of the right
            shape, dtype and device.

    Returns:
        A new array of the same kind and device as ``x`` (``out`` when given).

    Cost: one read of the gathered entries and one write of the result; a
    framework tensor moves through DLPack with no copy.
    """
    return split_many([Job(x, plan, axis, role, channels, out)], backend=backend)[0]
