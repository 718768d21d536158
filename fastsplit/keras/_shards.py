"""Growth of JAX arrays that live on several devices (``keras.distribution.ModelParallel``, ``DataParallel``).

A variable whose value is a ``jax.Array`` on more than one device is a :class:`Sharded` entry value of
the one surgery pipeline (``_surgery.apply``): it is exported shard by shard (DLPack, no copy), the
kernel phase turns it into one job per addressable output shard (:class:`Expansion`), and the import
phase puts the results back together with ``jax.make_array_from_single_device_arrays``: the new value
has the old value's ``NamedSharding`` (same mesh, same ``PartitionSpec``), optimizer slots included.

Per output shard, on the device that will hold it:

* each split axis that is **not sharded** is split whole, from the device's own shard, with the
  event's plan: no communication (a replicated variable, a bias under ``ModelParallel``, every
  variable under ``DataParallel``: each device splits its own replica);
* each split axis that **is sharded** needs the source units of the new shard's units; the units
  the device holds are read in place, the others are sliced where they live and put on the device
  (``jax.device_put`` of those slices only), and the job reads them through a plan restricted to
  the shard (:class:`LocalPlan`). The whole tensor is never gathered on one device or on the host;
  the device assembles one contiguous input of the units it needs (a copy of at most its shard plus
  what it received).

Cost per event: each device reads its own shard once (twice where a sharded axis is split: the
assembly copy), receives the bytes of the source units it does not hold (reported per device in
``GrowthEvent.transfers`` against the ideal and against a gather of the whole tensors), and writes
its new shard once. Draws (``symmetry`` ``"fresh"``, ``"noise"``, ``"direction"``) are measured on
the whole tensor: the size of a source unit (standard deviation, or root mean square for
``"direction"``) is combined from per-shard moments (O(width) numbers per shard reach the host).

What holds for the draws: a replicated variable (every device holds all of it) draws exactly as an
unsharded split, on every device. For a sharded one, each output shard draws with its own generator key
(from the plan's seed and the shard's position in the tensor, so replicas of a shard are
bit-identical and different shards draw independently), at the scale of the whole source unit as in
an unsharded split. The draws are therefore valid draws of the same distribution as the unsharded
ones, not the same numbers. ``"direction"`` needs every copy of a unit to share one direction: it is
refused where the copies of a unit would land in different shards of a sharded axis. ``"fresh"`` and
``"none"`` keep the function exactly, as unsharded.

Refused before anything changes (``GrowthError``): a new length that the mesh axes sharding it do not
divide (the message names the variable, the mesh axes and the widths that would fit), an array whose
sharding is not a ``NamedSharding`` or that is sharded across processes (a replicated one grows), draws on a
sharded axis that holds several positions per unit (a Flatten), and prune or merge of a sharded (not
replicated) variable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from .. import _noise, interop
from .._gather import ROLES
from ..plan import DRAWING, AxisPlan
from ._errors import GrowthError

__all__ = ["Expansion", "LocalPlan", "Sharded", "fill", "on_devices"]


def on_devices(value) -> bool:
    """Whether ``value`` is a JAX array on more than one device (sharded or replicated)."""
    devices = getattr(value, "devices", None)
    return callable(devices) and type(value).__module__.split(".", 1)[0] in ("jax", "jaxlib") and len(devices()) > 1


def _name(device) -> str:
    return f"{device.platform}:{device.id}"


def _box(index: tuple, shape: tuple) -> tuple:
    """``((start, stop), ...)`` of a shard's index (a tuple of slices)."""
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


class Sharded:
    """A variable's multi-device JAX value as an entry value of the surgery pipeline.

    Attributes:
        path: the variable's path (for messages).
        value: the ``jax.Array``.
        sharding: its ``NamedSharding``; the new value gets the same one.
        shards: ``[(device, box, Native)]``, one per addressable shard (replicas included), each
            exported through DLPack without a copy.
        device: the first shard's ``Native.device`` (what ``backend="auto"`` looks at).
    """

    def __init__(self, path: str, value):
        import jax

        self.path = path
        self.value = value
        self.sharding = value.sharding
        self.shape = tuple(int(s) for s in value.shape)
        # across processes (jax.distributed), a replica held whole here is split here, as every process
        # does with the same plan and seed; a shard another process holds cannot be read
        if not value.is_fully_addressable and not value.sharding.is_fully_replicated:
            raise GrowthError(f"variable {path} is sharded across processes: fastsplit grows multi-process arrays "
                              "only when replicated (keras.distribution.DataParallel), not sharded (ModelParallel)")
        if not isinstance(self.sharding, jax.sharding.NamedSharding):
            raise GrowthError(f"variable {path} has a {type(self.sharding).__name__}: fastsplit grows sharded "
                              "variables with a NamedSharding (keras.distribution layouts)")
        self.shards = [(s.device, _box(s.index, self.shape), interop.export(s.data)) for s in value.addressable_shards]
        self.device = self.shards[0][2].device
        self.bf16 = self.shards[0][2].bf16

    def counts(self) -> list[int]:
        """How many pieces each axis is cut into (the product of the sizes of its mesh axes)."""
        return [math.prod(self.sharding.mesh.shape[n] for n in _names(e)) for e in self._spec()]

    def mesh_axes(self, axis: int) -> tuple:
        return _names(self._spec()[axis])

    def _spec(self) -> list:
        spec = list(self.sharding.spec)
        return spec + [None] * (len(self.shape) - len(spec))

    def import_(self, value, new_shape: tuple):
        """The new ``jax.Array`` from ``value``, ``[(device, array)]`` (:meth:`Expansion.finish`); no copy on the CPU."""
        import jax

        natives = {d: n for d, _b, n in self.shards}
        arrays = []
        for device, arr in value:
            native = natives[device]
            if native.device[0] == "cpu":
                a = jax.device_put(arr, device)  # an aligned numpy array: no copy
            else:
                a = interop.import_(arr, native)
                if next(iter(a.devices())) != device:
                    a = jax.device_put(a, device)
            arrays.append(a)
        return jax.make_array_from_single_device_arrays(tuple(new_shape), self.sharding, arrays)


def _names(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fill(value, shape: tuple, dtype, fill_value: float):
    """A new array of ``shape`` filled with ``fill_value``, sharded as ``value`` (each device makes its shard)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda: jnp.full(tuple(shape), fill_value, dtype=dtype), out_shardings=value.sharding)()


@dataclasses.dataclass(eq=False)
class LocalPlan(AxisPlan):
    """A plan restricted to one output shard: what the executor reads of a :class:`~fastsplit.SplitPlan`.

    New unit ``j`` of the shard reads unit ``src[j]`` of the job's input (the units the device
    assembled), with the whole plan's ratio, offset, copy flag and direction coefficient of that unit;
    ``noise_key`` is the shard's own key and ``unit_size`` the size of each input unit measured over
    the whole tensor (None: measured on the input, as for a plain plan).
    """

    width: int
    src: np.ndarray
    ratio: np.ndarray
    offset: np.ndarray
    is_copy: np.ndarray
    direction: np.ndarray
    symmetry: str
    sigma: float
    noise_key: int
    unit_size: np.ndarray | None = None

    @property
    def new_width(self) -> int:
        return int(self.src.shape[0])


def _box_key(key: int, box: tuple) -> int:
    """The generator key of the output shard at ``box``: replicas share it, other shards differ."""
    k = int(key)
    for start, stop in box:
        k = _noise.key_from_seed(k ^ (start * 0x10001 + stop))
    return k


def _expanded(plan, positions: int, channels: str) -> dict:
    """The plan's per-unit vectors over every entry of an axis of ``positions * new_width``."""
    src = np.asarray(plan.src, dtype=np.int64)
    vec = {"ratio": plan.ratio, "offset": plan.offset, "is_copy": plan.is_copy, "direction": plan.direction}
    if positions == 1:
        return {"src": src, **{k: np.asarray(v) for k, v in vec.items()}}
    pos = np.arange(positions, dtype=np.int64)
    if channels == "last":  # entry p * m + j
        full = {"src": (pos[:, None] * plan.width + src[None, :]).reshape(-1)}
        full.update({k: np.tile(np.asarray(v), positions) for k, v in vec.items()})
    else:  # entry j * P + p
        full = {"src": (src[:, None] * positions + pos[None, :]).reshape(-1)}
        full.update({k: np.repeat(np.asarray(v), positions) for k, v in vec.items()})
    return full


def _draws(plan, role: str) -> np.ndarray | None:
    """The new units that get draws (``moved``), or None when the step draws nothing (as ``_gather._Step``)."""
    if not ROLES[role][2] or plan.symmetry not in DRAWING or not plan.sigma > 0:
        return None
    moved = plan.direction != 0 if plan.symmetry == "direction" else plan.is_copy
    return moved if moved.any() else None


def _xp(native):
    if native.device[0] == "cuda":
        import cupy

        return cupy
    return np


def _float64(xp, a, native):
    if native.bf16 and native.device[0] == "cuda":
        return (a.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32).astype(xp.float64)
    return a.astype(xp.float64)


class Expansion:
    """The kernel phase of an event with :class:`Sharded` entries: one job per output shard.

    ``entries`` is what ``_surgery.run_kernels`` runs (the plain entries, then one :class:`_Piece` per
    output shard of each sharded entry), ``run`` the kernel call to use (one call per device: the
    executor takes one device a call), and :meth:`finish` gives each sharded entry its value
    ``[(device, array)]`` for :meth:`Sharded.import_`. Everything that can be refused is checked in
    the constructor, before any transfer; ``transfers`` gets, per device, the bytes received, the
    ideal (the source units of its new shards that it does not hold) and what a gather of the whole
    tensors would bring.
    """

    def __init__(self, split: list, run: Callable | None, transfers: dict):
        self.plain = [e for e in split if not isinstance(e.native, Sharded)]
        self.sharded = [e for e in split if isinstance(e.native, Sharded)]
        self.transfers = transfers
        self._run = run
        self.pieces: dict = {}
        _check_widths(self.sharded)
        self.work = [_work(e) for e in self.sharded]  # every refusal before any transfer
        self.entries = list(self.plain)
        for e, work in zip(self.sharded, self.work):
            self.pieces[id(e)] = [_piece(e, w, transfers) for w in work]
            self.entries.extend(self.pieces[id(e)])

    def run(self, jobs, backend: str = "auto"):
        from .. import _core

        run = self._run or _core.split_many
        groups: dict = {}
        for i, j in enumerate(jobs):
            groups.setdefault(interop.export(j.x).device, []).append(i)
        if len(groups) <= 1:
            return run(jobs, backend=backend)
        out = [None] * len(jobs)
        for idx in groups.values():
            for i, arr in zip(idx, run([jobs[i] for i in idx], backend=backend), strict=True):
                out[i] = arr
        return out

    def finish(self) -> None:
        for e in self.sharded:
            e.value = [(p.device, p.value) for p in self.pieces[id(e)]]
            self.pieces[id(e)] = None


@dataclasses.dataclass(eq=False)
class _Piece:
    """One output shard of a sharded entry, as ``run_kernels`` reads an entry."""

    device: object
    base: object  # the input the device assembled
    steps: list
    factor: float
    native: object = None
    value: object = None


@dataclasses.dataclass
class _Work:
    device: object
    box: tuple  # the new shard's box
    cells: list  # [(holder device, holder Native, holder box, {axis: global indices}, grid position)]
    grid: tuple  # number of cells along each sharded split axis
    steps: list
    ideal: int


def _check_widths(entries: list) -> None:
    """Every new length must be divisible by the mesh axes that shard it; names the widths that fit."""
    need: dict = {}  # id(plan) -> (plan, lcm of the width steps)
    bad = None
    for e in entries:
        sh: Sharded = e.native
        counts = sh.counts()
        for axis, plan, _role, _ch in e.steps:
            k = counts[axis]
            if k == 1:
                continue
            positions = sh.shape[axis] // plan.width
            step = k // math.gcd(positions, k)
            prev = need.get(id(plan), (plan, 1))[1]
            need[id(plan)] = (plan, prev * step // math.gcd(prev, step))
            if e.new_shape[axis] % k and bad is None:
                bad = (e, axis, plan, k)
    if bad is None:
        return
    e, axis, plan, k = bad
    step = need[id(plan)][1]
    first = (plan.width // step + 1) * step
    fits = ", ".join(str(first + i * step) for i in range(3))
    names = e.native.mesh_axes(axis)
    names = repr(names[0]) if len(names) == 1 else repr(names)
    raise GrowthError(
        f"cannot grow {e.target.path}: axis {axis} would have {e.new_shape[axis]} entries (new width "
        f"{plan.new_width}), which mesh axis {names} ({k} devices) cannot "
        f"shard evenly; new widths that fit every sharded variable of this group: {fits}, ... (multiples of {step})"
    )


def _work(e) -> list:
    """What every output shard of entry ``e`` needs: its cells (source blocks) and its local steps."""
    sh: Sharded = e.native
    counts = sh.counts()
    new_shape = tuple(e.new_shape)
    out_boxes = {d: _box(idx, new_shape) for d, idx in sh.sharding.devices_indices_map(new_shape).items()}
    holders = [(d, box, n) for d, box, n in sh.shards]
    own = {d: (box, n) for d, box, n in holders}
    itemsize = np.dtype(str(e.target.dtype)).itemsize if str(e.target.dtype) != "bfloat16" else 2
    split_axes = {axis for axis, *_ in e.steps}
    replicated = bool(sh.sharding.is_fully_replicated)  # each device holds it all: drawn as unsharded
    sizes = {}
    for axis, plan, role, channels in e.steps:
        positions = sh.shape[axis] // plan.width
        moved = _draws(plan, role)
        if moved is not None and counts[axis] > 1 and positions > 1:
            raise GrowthError(f"cannot grow {e.target.path}: axis {axis} holds {positions} positions of each unit and "
                              f"is sharded; draws (symmetry={plan.symmetry!r}) on it are not supported: use "
                              "symmetry='none' or a layout that does not shard this axis")
        if moved is not None and plan.symmetry == "direction" and counts[axis] > 1:
            per = plan.new_width // counts[axis]
            pairs = np.unique(np.stack([plan.src[moved], np.flatnonzero(moved) // per]), axis=1)
            if pairs.shape[1] != np.unique(plan.src[moved]).shape[0]:
                raise GrowthError(
                    f"cannot grow {e.target.path} with symmetry='direction': the copies of a unit would land in "
                    f"different shards of axis {axis} (mesh axes {', '.join(map(repr, sh.mesh_axes(axis)))}), which "
                    "cannot share one direction; use symmetry='fresh' (the default) or 'noise'")
        if moved is not None and not replicated:
            sizes[axis] = _unit_sizes(sh, axis, plan, positions, channels, moved)
    work = []
    for d, box in out_boxes.items():
        if d not in own:
            continue
        steps, need = [], {}
        for axis, plan, role, channels in e.steps:
            positions = sh.shape[axis] // plan.width
            size = sizes.get(axis)
            key = plan.noise_key if replicated else _box_key(plan.noise_key, box)
            if counts[axis] == 1:
                local = LocalPlan(plan.width, np.asarray(plan.src), np.asarray(plan.ratio), np.asarray(plan.offset),
                                  plan.is_copy, plan.direction, plan.symmetry, plan.sigma, key, size)
                steps.append((axis, local, role, channels))
                continue
            full = _expanded(plan, positions, channels)
            j0, j1 = box[axis]
            src = full["src"][j0:j1]
            units = np.unique(src)
            need[axis] = units
            local = LocalPlan(int(units.shape[0]), np.searchsorted(units, src), full["ratio"][j0:j1],
                              full["offset"][j0:j1], full["is_copy"][j0:j1], full["direction"][j0:j1],
                              plan.symmetry, plan.sigma, key, None if size is None else size[units])
            steps.append((axis, local, role, "last"))
        cells, grid = _cells(sh, d, box, need, split_axes, holders)
        held = own[d][0]
        inside = math.prod(
            int(np.count_nonzero((need[a] >= held[a][0]) & (need[a] < held[a][1]))) if a in need
            else (sh.shape[a] if a in split_axes else box[a][1] - box[a][0])
            for a in range(len(sh.shape)))
        total = math.prod(len(need[a]) if a in need else (sh.shape[a] if a in split_axes else box[a][1] - box[a][0])
                          for a in range(len(sh.shape)))
        work.append(_Work(d, box, cells, grid, steps, (total - inside) * itemsize))
    return work


def _cells(sh: Sharded, device, box: tuple, need: dict, split_axes: set, holders: list) -> tuple:
    """The blocks of the old tensor that the new shard at ``box`` reads, each from a device that holds it.

    Along a sharded split axis, the needed units are cut at the old shards' boundaries; every other axis
    is read whole (a split axis that is not sharded) or over the box's own range (an axis that does not
    change). A block the device holds itself is read there.
    """
    sharded = sorted(need)
    parts = []
    for a in sharded:
        n = sh.shape[a] // sh.counts()[a]
        chunk = need[a] // n
        parts.append([(int(c), need[a][chunk == c]) for c in np.unique(chunk)])
    grid = tuple(len(p) for p in parts)
    cells = []
    for pos in np.ndindex(*grid) if grid else [()]:
        want = []
        for a in range(len(sh.shape)):
            if a in need:
                c, _units = parts[sharded.index(a)][pos[sharded.index(a)]]
                n = sh.shape[a] // sh.counts()[a]
                want.append((c * n, (c + 1) * n))
            elif a in split_axes:
                want.append((0, sh.shape[a]))
            else:
                want.append(box[a])
        want = tuple(want)
        found = [(d, n) for d, b, n in holders if b == want]
        if not found:
            raise GrowthError(f"variable {sh.path}: no device holds the block {want} that the new shard {box} "
                              "reads (an unexpected sharding)")
        mine = [(d, n) for d, n in found if d == device]
        d, n = mine[0] if mine else found[device.id % len(found)]
        idx = {a: parts[sharded.index(a)][pos[sharded.index(a)]][1] - want[a][0] for a in sharded}
        cells.append((d, n, want, idx, pos))
    return cells, grid


def _take(xp, arr, idx: dict):
    """``arr`` at the local indices ``idx`` (axis -> indices); a view when they are all of it in order."""
    for a, ix in idx.items():
        if not (len(ix) == arr.shape[a] and np.array_equal(ix, np.arange(arr.shape[a]))):
            arr = xp.take(arr, xp.asarray(ix), axis=a)
    return arr


def _put(arr, native, device):
    """``arr`` (numpy or CuPy, on ``native``'s device) put on ``device``; returns the array there and its bytes."""
    import jax

    if native.device[0] == "cpu":
        moved = jax.device_put(np.ascontiguousarray(arr), device)
    else:
        moved = jax.device_put(jax.dlpack.from_dlpack(_xp(native).ascontiguousarray(arr)), device)
    return interop.export(moved).array, int(arr.nbytes)


def _piece(e, w: _Work, transfers: dict) -> _Piece:
    """Assemble the input of one output shard on its device (receiving the blocks it does not hold)."""
    received = 0
    blocks = {}
    for d, native, _want, idx, pos in w.cells:
        xp = _xp(native)
        block = _take(xp, native.array, idx)
        if d != w.device:
            block, nbytes = _put(block, native, w.device)
            received += nbytes
        blocks[pos] = block
    xp = _xp(w.cells[0][1])
    sharded = sorted(idx for idx in w.cells[0][3])
    if not w.grid or math.prod(w.grid) == 1:
        x = blocks[next(iter(blocks))]
    elif len(w.grid) == 1:
        x = xp.concatenate([blocks[(i,)] for i in range(w.grid[0])], axis=sharded[0])
    else:
        rows = [xp.concatenate([blocks[(i, j)] for j in range(w.grid[1])], axis=sharded[1]) for i in range(w.grid[0])]
        x = xp.concatenate(rows, axis=sharded[0])
    t = transfers.setdefault(_name(w.device), {"received": 0, "ideal": 0, "gather": 0})
    t["received"] += received
    t["ideal"] += w.ideal
    t["gather"] += _gather_bytes(e, w)
    return _Piece(w.device, x, w.steps, e.factor)


def _gather_bytes(e, w: _Work) -> int:
    """What gathering the whole old tensor on the device would bring: all of it but the device's own shard."""
    sh: Sharded = e.native
    held = next(b for d, b, _n in sh.shards if d == w.device)
    itemsize = 2 if str(e.target.dtype) == "bfloat16" else np.dtype(str(e.target.dtype)).itemsize
    return (math.prod(sh.shape) - math.prod(b - a for a, b in held)) * itemsize


def _unit_sizes(sh: Sharded, axis: int, plan, positions: int, channels: str, moved: np.ndarray) -> np.ndarray:
    """Each moved source unit's standard deviation (root mean square for ``"direction"``) over the whole tensor.

    Per distinct shard: count, mean and sum of squared deviations of the unit's entries there (on its
    device; O(units) numbers come back); then Chan's combination. Other units get 0 (never read).
    """
    rms = plan.symmetry == "direction"
    units = np.unique(plan.src[moved])
    n_all = np.zeros(plan.width)
    mean = np.zeros(plan.width)
    m2 = np.zeros(plan.width)
    seen = set()
    for _d, box, native in sh.shards:
        if box in seen:
            continue
        seen.add(box)
        lo, hi = box[axis]
        arr = native.array
        xp = _xp(native)
        if hi - lo == sh.shape[axis]:  # the whole axis (unsharded): the executor's 3-D view
            outer = math.prod(arr.shape[:axis]) * (positions if channels == "last" else 1)
            inner = math.prod(arr.shape[axis + 1:]) * (1 if channels == "last" else positions)
            x3 = xp.ascontiguousarray(arr).reshape(outer, plan.width, inner)
            mine, local = units, units
        else:
            x3 = arr.reshape(math.prod(arr.shape[:axis]), hi - lo, math.prod(arr.shape[axis + 1:]))
            mine = units[(units >= lo) & (units < hi)]
            local = mine - lo
        if mine.size == 0:
            continue
        sub = _float64(xp, x3[:, xp.asarray(local), :], native)
        cnt = sub.shape[0] * sub.shape[2]
        mu = sub.mean(axis=(0, 2))
        sq = ((sub - mu[None, :, None]) ** 2).sum(axis=(0, 2))
        mu, sq = (np.asarray(v.get() if hasattr(v, "get") else v, dtype=np.float64) for v in (mu, sq))
        n0 = n_all[mine]
        tot = n0 + cnt
        delta = mu - mean[mine]
        m2[mine] += sq + delta**2 * n0 * cnt / np.where(tot > 0, tot, 1)
        mean[mine] += delta * cnt / np.where(tot > 0, tot, 1)
        n_all[mine] = tot
    var = m2 / np.where(n_all > 0, n_all, 1)
    return np.sqrt(var + mean**2) if rms else np.sqrt(var)
