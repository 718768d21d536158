"""The host side of one CUDA launch, in plain numpy: descriptor table and column arrays.

``kernels/split.cu`` reads everything but the tensors from one device byte
buffer, the *blob*, built here and copied to the device in one transfer:

- at offset 0 the descriptor table, one row of :data:`FIELDS` (16 int64) per
  task, in tile order;
- then, each at a 16-byte aligned offset, the per-column arrays the rows refer
  to by byte offset: ``src`` and ``run`` (int64), ``scale`` and ``add`` (the
  compute dtype), ``noise`` (float64).

Tasks of one plan share their ``src``/``run`` arrays (same ``src`` object), so a
growth event moves a few kilobytes of index data, not one array per tensor.
Nothing here needs CuPy; the kernel's use of the table is emulated on the CPU
by ``tests/test_cupy_backend.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..plan import column_runs

#: descriptor fields, in the order of ``struct Desc`` in kernels/split.cu
FIELDS = ("x", "out", "outer", "n", "m", "inner", "src", "run", "scale", "add", "noise", "key",
          "tile_start", "total", "flags", "pad")
F = {name: k for k, name in enumerate(FIELDS)}
DESC_BYTES = 8 * len(FIELDS)
ALIGN = 16

#: flag bits, as in kernels/split.cu
F_SCALE = 1
F_ADD = 2
F_NOISE = 4
F_XALIGN = 8
F_OALIGN = 16


@dataclass(frozen=True)
class TaskSpec:
    """What the layout needs from one task: addresses, the 3-D shape and the column arrays.

    ``x`` and ``out`` are device addresses of C-contiguous ``(outer, n, inner)``
    and ``(outer, m, inner)`` arrays, ``m == len(src)``.
    """

    x: int
    out: int
    outer: int
    n: int
    m: int
    inner: int
    src: np.ndarray
    scale: np.ndarray
    add: np.ndarray | None = None
    noise: np.ndarray | None = None
    key: int = 0


@dataclass(frozen=True)
class Layout:
    """One launch: the blob, how many tasks and tiles, and which spec each row came from.

    Attributes:
        blob: ``uint8`` buffer to copy to the device as it is.
        ntasks: rows of the descriptor table (tasks with no elements are left out).
        total_tiles: tiles of all tasks; the grid walks ``range(total_tiles)``.
        tile_elems: elements per tile, ``threads * items * vector_width``.
        order: for each row, the index of its spec in the list given to :func:`build`.
    """

    blob: np.ndarray
    ntasks: int
    total_tiles: int
    tile_elems: int
    order: tuple

    @property
    def table(self) -> np.ndarray:
        """The descriptor table as an ``int64[ntasks, 16]`` view of the blob."""
        return self.blob[: self.ntasks * DESC_BYTES].view(np.int64).reshape(self.ntasks, len(FIELDS))


def vector_width(itemsize: int) -> int:
    """Elements in one 16-byte vector."""
    return 16 // itemsize


def tile_elems(itemsize: int, threads: int, items: int) -> int:
    """Elements per tile: each of ``threads`` threads handles ``items`` 16-byte vectors."""
    return threads * items * vector_width(itemsize)


def run_remaining(src: np.ndarray) -> np.ndarray:
    """``int64[m]``: how many columns from ``j`` on continue ``j``'s run of consecutive sources.

    ``src[j + t] == src[j] + t`` for ``t < run[j]``, and ``run[j] >= 1``. The kernel
    moves a 16-byte vector spanning columns ``j .. j + s`` in one load only when
    ``run[j] > s``. Cost: O(m).
    """
    runs = column_runs(np.asarray(src, dtype=np.int64))
    ends = np.repeat(runs[:, 0] + runs[:, 2], runs[:, 2])
    return (ends - np.arange(src.shape[0], dtype=np.int64)).astype(np.int64)


class _Blob:
    """Byte sections appended at 16-byte aligned offsets."""

    def __init__(self, start: int):
        self.parts: list[np.ndarray] = []
        self.size = start

    def put(self, arr: np.ndarray) -> int:
        pad = -self.size % ALIGN
        if pad:
            self.parts.append(np.zeros(pad, dtype=np.uint8))
            self.size += pad
        offset = self.size
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        self.parts.append(raw)
        self.size += raw.shape[0]
        return offset


def build(specs: Sequence[TaskSpec], *, itemsize: int, compute, threads: int, items: int) -> Layout:
    """Lay out one launch for tasks of one element type.

    Args:
        specs: the tasks, in any order; tiles follow this order.
        itemsize: bytes per tensor element (2, 4 or 8).
        compute: ``float32`` or ``float64``: the dtype the kernel computes in;
            ``scale`` and ``add`` are rounded to it here, as the reference does.
        threads: threads per block of the launch.
        items: 16-byte vectors per thread per tile.

    Returns:
        The :class:`Layout`. Empty tasks are left out of the table.

    Raises:
        ValueError: a spec whose arrays do not match its shape or whose ``src``
            points outside ``[0, n)`` (the kernel would read out of bounds).

    Cost: O(total columns) numpy work; the blob holds 128 bytes per task plus
    the column arrays (shared ``src`` objects are stored once).
    """
    compute = np.dtype(compute)
    if compute not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"compute dtype must be float32 or float64, got {compute}")
    if itemsize not in (2, 4, 8):
        raise ValueError(f"itemsize must be 2, 4 or 8, got {itemsize}")
    tile = tile_elems(itemsize, threads, items)
    order = tuple(k for k, s in enumerate(specs) if s.outer * s.m * s.inner > 0)
    ntasks = len(order)
    table = np.zeros((ntasks, len(FIELDS)), dtype=np.int64)
    blob = _Blob(ntasks * DESC_BYTES)
    shared: dict[int, tuple[int, int]] = {}
    keep = []  # holds the src arrays whose id() keys `shared`
    tiles = 0
    for row, k in enumerate(order):
        s = specs[k]
        m = int(s.m)
        src = np.asarray(s.src)
        if src.shape != (m,) or not np.issubdtype(src.dtype, np.integer):
            raise ValueError(f"task {k}: src must be an integer array of shape ({m},), got {src.dtype} {src.shape}")
        if s.n < 1 or src.min() < 0 or src.max() >= s.n:
            raise ValueError(f"task {k}: src must lie in [0, {s.n})")
        for name in ("scale", "add", "noise"):
            arr = getattr(s, name)
            if arr is not None and np.shape(arr) != (m,):
                raise ValueError(f"task {k}: {name} must have shape ({m},), got {np.shape(arr)}")
        if id(s.src) not in shared:
            keep.append(s.src)
            shared[id(s.src)] = (blob.put(src.astype(np.int64)), blob.put(run_remaining(src)))
        src_off, run_off = shared[id(s.src)]
        flags = 0
        scale = np.asarray(s.scale, dtype=np.float64).astype(compute)
        scale_off = add_off = noise_off = 0
        if np.any(scale != 1):
            flags |= F_SCALE
            scale_off = blob.put(scale)
        if s.add is not None:
            flags |= F_ADD
            add_off = blob.put(np.asarray(s.add, dtype=np.float64).astype(compute))
        if s.noise is not None:
            flags |= F_NOISE
            noise_off = blob.put(np.asarray(s.noise, dtype=np.float64))
        if s.x % ALIGN == 0:
            flags |= F_XALIGN
        if s.out % ALIGN == 0:
            flags |= F_OALIGN
        total = int(s.outer) * m * int(s.inner)
        table[row] = (
            s.x, s.out, s.outer, s.n, m, s.inner, src_off, run_off, scale_off, add_off, noise_off,
            np.array(int(s.key) % (1 << 64), dtype=np.uint64).view(np.int64), tiles, total, flags, 0,
        )
        tiles += -(-total // tile)
    data = np.concatenate([table.view(np.uint8).reshape(-1)] + blob.parts) if ntasks else np.zeros(0, np.uint8)
    return Layout(blob=data, ntasks=ntasks, total_tiles=tiles, tile_elems=tile, order=order)
