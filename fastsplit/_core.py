"""``split``, ``split_many`` and ``Job``: the public entry points of a split.

The work is done by the one executor in :mod:`fastsplit._gather` (shared with
``fastsplit.compact.compact_many``): it checks every job, works out in numpy
everything that depends only on shapes and plans, hands the backends
:class:`Task` objects and brings the results back. The names below that are
not defined here are re-exported from there for the backends and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._gather import (  # noqa: F401 - re-exported
    ALIGN,
    CHANNELS,
    DTYPES,
    ROLES,
    Job,
    Rows,
    Task,
    aligned_empty,
    column_runs,
    execute,
)
from .plan import SplitPlan

__all__ = ["Job", "Rows", "Task", "aligned_empty", "column_runs", "split", "split_many"]


def split_many(jobs: Sequence[Job], *, backend: str = "auto") -> list:
    """Split many tensors in one pass: one kernel launch per device, one parallel region on the CPU.

    Args:
        jobs: the :class:`Job` objects of one growth event. A job with
            ``also`` set is split on two axes in the same pass (see :class:`Job`).
        backend: ``"auto"`` (CuPy for CUDA memory, else Numba when installed,
            else numpy), ``"numba"``, ``"cupy"`` or ``"numpy"``.

    Returns:
        One new array per job, of the job's framework and device.

    Raises:
        SplitError: for any bad job (before anything is written), jobs on
            different devices, or a backend that cannot take this memory.
            Every job is checked before any is exported or written (see
            :func:`fastsplit._gather.execute`): what each ``x`` and ``out``
            is and its dtype, the plans and axes, and that no ``out`` shares
            memory with any input or any other ``out`` of the call.

    Cost: each output is written once and each input read about once; the
    inputs are never modified. The checks cost O(jobs) (O(jobs log jobs) with
    ``out`` arrays), never a pass over the data.
    """
    return execute(jobs, backend=backend)


def split(x, plan: SplitPlan, axis: int = -1, *, role: str = "incoming", channels: str = "last",
          backend: str = "auto", out=None, also=None, factor: float = 1.0):
    """Split one tensor along ``axis`` according to ``plan``.

    ``out[..., j, ...] = x[..., src[j], ...] * ratio[j]**p`` (+ ``offset[j]`` for a
    bias, + noise for incoming weights of a ``"noise"`` plan), where ``p`` is 0 for
    ``"incoming"``/``"bias"``/``"copy"``, 1 for ``"outgoing"``/``"moment1"`` and 2 for
    ``"moment2"``. When ``x.shape[axis]`` is ``P * plan.width`` (a Flatten between
    a conv and a Dense), the axis is read as ``P`` positions × ``width`` units
    (``channels="last"``) or ``width`` × ``P`` (``channels="first"``).

    Args:
        x: numpy, CuPy, TensorFlow, JAX or PyTorch array of float16, bfloat16,
            float32 or float64, any strides. Never modified. A numpy array in
            the other byte order (``">f4"``) or not aligned is read through a
            native copy; the result is then in native byte order. NaN and
            infinities in ``x`` are data: they are copied like any value.
        plan: from :func:`fastsplit.plan`.
        axis: the unit axis.
        role: see above.
        channels: ``"last"`` or ``"first"``.
        backend: ``"auto"``, ``"numba"``, ``"cupy"`` or ``"numpy"``.
        out: optional preallocated result (numpy, CuPy or PyTorch) of the right
            shape, dtype and device, writable, in native byte order and
            sharing no memory with ``x`` (refused otherwise). Any strides: a
            non-contiguous or unaligned ``out`` is written through a copy.
        also: optional second axis ``(plan, axis, role[, channels])``, split
            after the first in the same pass (see :class:`Job`).
        factor: a constant that multiplies the first step's gathered entries
            with the ratio power, before offsets and draws (see :class:`Job`).

    Returns:
        A new array of the same kind and device as ``x`` (``out`` when given).

    Cost: one read of the gathered entries and one write of the result; a
    framework tensor moves through DLPack with no copy.
    """
    return split_many([Job(x, plan, axis, role, channels, out, also, factor)], backend=backend)[0]
