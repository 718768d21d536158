"""The host side of one CUDA launch, in plain numpy: descriptor table and column arrays.

``kernels/split.cu`` reads everything but the tensors from one device byte
buffer, the *blob*, built here and copied to the device in one transfer:

- at offset 0 the descriptor table, one row of :data:`FIELDS` (24 int64) per
  task, in tile order;
- then, each at a 16-byte aligned offset, the per-column arrays the rows refer
  to by byte offset: ``src`` and ``run`` (int64), ``scale`` and ``add`` (the
  compute dtype), ``noise`` (float64); for a task split on two axes also the
  arrays of its second gather (``rsrc``, ``rscale``, ``radd``, ``rnoise``).

A task split on two axes (:class:`RowSpec`) reads a 5-D view ``(outer, nA, mid,
n, inner)`` of x. Its descriptor describes the output as ``outer * mA * mid``
rows of ``(m, inner)``: ``outer`` holds that row count, ``n``/``m``/``src``/...
the gather along the columns, and ``na``/``ma``/``mid``/``rsrc``/... the gather
that picks the row of x each output row reads.

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
          "tile_start", "total", "flags", "pad", "na", "ma", "mid", "rsrc", "rscale", "radd", "rnoise", "rkey")
F = {name: k for k, name in enumerate(FIELDS)}
DESC_BYTES = 8 * len(FIELDS)
ALIGN = 16

#: flag bits, as in kernels/split.cu
F_SCALE = 1
F_ADD = 2
F_NOISE = 4
F_XALIGN = 8
F_OALIGN = 16
F_TWO = 32
F_RFIRST = 64
F_RSCALE = 128
F_RADD = 256
F_RNOISE = 512
F_NSRC = 1024
F_RNSRC = 2048


@dataclass(frozen=True)
class RowSpec:
    """The gather along axis 1 of a two-axis task's 5-D view ``(outer, na, mid, n, inner)``.

    ``first`` is True when this gather is the job's first step, False when the
    gather along the columns is.
    """

    na: int
    mid: int
    src: np.ndarray
    scale: np.ndarray
    add: np.ndarray | None = None
    noise: np.ndarray | None = None
    key: int = 0
    first: bool = True
    noise_by_source: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """What the layout needs from one task: addresses, the 3-D shape and the column arrays.

    ``x`` and ``out`` are device addresses of C-contiguous ``(outer, n, inner)``
    and ``(outer, m, inner)`` arrays, ``m == len(src)``; with ``rows`` set, of
    ``(outer, rows.na, rows.mid, n, inner)`` and ``(outer, len(rows.src), rows.mid, m, inner)``.
    ``noise_by_source`` (and ``rows.noise_by_source``) draws the noise at the
    flat index of the element read (``Task.noise_by_source``).
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
    rows: RowSpec | None = None
    noise_by_source: bool = False

    @property
    def out_rows(self) -> int:
        """Rows of ``(m, inner)`` in the output: ``outer``, times ``mA * mid`` for a two-axis task."""
        r = self.rows
        return int(self.outer) if r is None else int(self.outer) * int(np.shape(r.src)[0]) * int(r.mid)


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
        """The descriptor table as an ``int64[ntasks, len(FIELDS)]`` view of the blob."""
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

    Cost: O(total columns) numpy work; the blob holds 192 bytes per task plus
    the column arrays (shared ``src`` objects are stored once).
    """
    compute = np.dtype(compute)
    if compute not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"compute dtype must be float32 or float64, got {compute}")
    if itemsize not in (2, 4, 8):
        raise ValueError(f"itemsize must be 2, 4 or 8, got {itemsize}")
    tile = tile_elems(itemsize, threads, items)
    order = tuple(k for k, s in enumerate(specs) if s.out_rows * s.m * s.inner > 0)
    ntasks = len(order)
    table = np.zeros((ntasks, len(FIELDS)), dtype=np.int64)
    blob = _Blob(ntasks * DESC_BYTES)
    shared: dict = {}  # id() of a src or (scale, add, noise) -> its blob offsets, stored once
    keep = []  # holds the arrays whose id() keys `shared`
    checked: set = set()
    tiles = 0
    for row, k in enumerate(order):
        s = specs[k]
        m = int(s.m)
        src = np.asarray(s.src)
        if src.shape != (m,) or not np.issubdtype(src.dtype, np.integer):
            raise ValueError(f"task {k}: src must be an integer array of shape ({m},), got {src.dtype} {src.shape}")
        if ("range", id(s.src), s.n) not in checked:  # the tasks of one plan share src: check it once
            if s.n < 1 or src.min() < 0 or src.max() >= s.n:
                raise ValueError(f"task {k}: src must lie in [0, {s.n})")
            checked.add(("range", id(s.src), s.n))
        for name in ("scale", "add", "noise"):
            arr = getattr(s, name)
            if arr is not None and np.shape(arr) != (m,):
                raise ValueError(f"task {k}: {name} must have shape ({m},), got {np.shape(arr)}")
        src_off, run_off = _put_src(blob, shared, keep, s.src, src)
        flags, scale_off, add_off, noise_off = _put_vectors(blob, shared, keep, compute, s.scale, s.add, s.noise,
                                                            (F_SCALE, F_ADD, F_NOISE))
        if s.noise is not None and s.noise_by_source:
            flags |= F_NSRC
        if s.x % ALIGN == 0:
            flags |= F_XALIGN
        if s.out % ALIGN == 0:
            flags |= F_OALIGN
        rows = (0,) * 8
        if s.rows is not None:
            r = s.rows
            rsrc = np.asarray(r.src)
            ma = rsrc.shape[0] if rsrc.ndim == 1 else -1
            if ma < 1 or not np.issubdtype(rsrc.dtype, np.integer):
                raise ValueError(f"task {k}: rows.src must be a non-empty 1-D integer array, got {rsrc.dtype} "
                                 f"{rsrc.shape}")
            if r.na < 1 or r.mid < 1 or rsrc.min() < 0 or rsrc.max() >= r.na:
                raise ValueError(f"task {k}: rows.src must lie in [0, {r.na}) and mid must be positive")
            for name in ("scale", "add", "noise"):
                arr = getattr(r, name)
                if arr is not None and np.shape(arr) != (ma,):
                    raise ValueError(f"task {k}: rows.{name} must have shape ({ma},), got {np.shape(arr)}")
            rsrc_off, _ = _put_src(blob, shared, keep, r.src, rsrc)
            rflags, rscale_off, radd_off, rnoise_off = _put_vectors(blob, shared, keep, compute, r.scale, r.add,
                                                                    r.noise, (F_RSCALE, F_RADD, F_RNOISE))
            flags |= F_TWO | rflags | (F_RFIRST if r.first else 0)
            if r.noise is not None and r.noise_by_source:
                flags |= F_RNSRC
            rows = (r.na, ma, r.mid, rsrc_off, rscale_off, radd_off, rnoise_off, _key_bits(r.key))
        total = s.out_rows * m * int(s.inner)
        table[row] = (
            s.x, s.out, s.out_rows, s.n, m, s.inner, src_off, run_off, scale_off, add_off, noise_off,
            _key_bits(s.key), tiles, total, flags, 0, *rows,
        )
        tiles += -(-total // tile)
    data = np.concatenate([table.view(np.uint8).reshape(-1)] + blob.parts) if ntasks else np.zeros(0, np.uint8)
    return Layout(blob=data, ntasks=ntasks, total_tiles=tiles, tile_elems=tile, order=order)


def _key_bits(key: int) -> np.int64:
    return np.array(int(key) % (1 << 64), dtype=np.uint64).view(np.int64)


def _put_src(blob: _Blob, shared: dict, keep: list, obj, src: np.ndarray) -> tuple[int, int]:
    """Blob offsets of ``src`` and its runs, stored once per ``src`` object."""
    if id(obj) not in shared:
        keep.append(obj)
        shared[id(obj)] = (blob.put(src.astype(np.int64)), blob.put(run_remaining(src)))
    return shared[id(obj)]


def _put_vectors(blob: _Blob, shared: dict, keep: list, compute, scale, add, noise,
                 bits) -> tuple[int, int, int, int]:
    """``(flags, scale, add, noise offsets)`` of one gather's vectors; an all-one scale is left out.

    Tasks that share the vector objects (the tensors of one plan and role) share their blob storage:
    a growth event of many tensors lays out each plan's vectors once.
    """
    key = ("vectors", id(scale), id(add), id(noise), bits)
    if key not in shared:
        keep.append((scale, add, noise))
        shared[key] = _store_vectors(blob, compute, scale, add, noise, bits)
    return shared[key]


def _store_vectors(blob: _Blob, compute, scale, add, noise, bits) -> tuple[int, int, int, int]:
    flags = 0
    scale = np.asarray(scale, dtype=np.float64).astype(compute)
    scale_off = add_off = noise_off = 0
    if np.any(scale != 1):
        flags |= bits[0]
        scale_off = blob.put(scale)
    if add is not None:
        flags |= bits[1]
        add_off = blob.put(np.asarray(add, dtype=np.float64).astype(compute))
    if noise is not None:
        flags |= bits[2]
        noise_off = blob.put(np.asarray(noise, dtype=np.float64))
    return flags, scale_off, add_off, noise_off
