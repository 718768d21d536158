"""Compaction plans: the inverse of a split. Keep a subset of units, merge twins.

A :class:`CompactPlan` describes an axis of ``width`` units that becomes
``new_width`` units: the kept units ``src`` (ascending), and *merge groups*
``representative -> twins`` whose twins are dropped after their outgoing rows
have been added to the representative's. It is the exact inverse of a
``symmetry="none"`` :class:`~fastsplit.SplitPlan` when every copy is merged
back into its original (the copies' outgoing rows ``r_j v`` add up to ``v``).

A plan runs through the same gather as a split (``fastsplit.split_many`` and
its kernels: a ``src`` shorter than the axis), with ``ratio`` all ones and
``offset`` all zeros. Merging needs one step more than a gather, so a plan with
merge groups goes through :func:`compact_many` (or :func:`compact`), which runs
the gather and then writes each representative's merged value:

| role | merged value of a representative ``r`` with twins ``t`` | inverse of the split rule |
| --- | --- | --- |
| ``"incoming"``, ``"bias"``, ``"copy"`` | ``x[r]`` (the twins hold the same values) | copy |
| ``"outgoing"``, ``"moment1"`` | ``x[r] + sum(x[t])`` | ``x·r``: the shares add up |
| ``"moment2"`` | ``(sqrt(x[r]) + sum(sqrt(x[t])))**2`` | ``v·r²``: the roots add up |

Everything that depends only on widths and indices is plain numpy and is
worked out once per plan.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _core, _dispatch, interop
from ._core import Job
from ._errors import SplitError
from .plan import _indices as _spec_indices
from .plan import _readonly

#: roles whose merged value is a sum over the group, and the one that adds square roots
_SUM_ROLES = ("outgoing", "moment1")
_ROOT_ROLES = ("moment2",)


@dataclasses.dataclass(frozen=True, eq=False)
class CompactPlan:
    """How an axis of ``width`` units keeps ``new_width`` of them, merging twins into representatives.

    Make one with :func:`compact_plan`. The arrays are read-only.

    Attributes:
        width: old width ``n``.
        src: ``int64[m]`` the kept units, ascending (``keep`` is the same array).
            Representatives are kept; twins and removed units are not.
        merge: ``((representative, (twin, ...)), ...)`` sorted by representative;
            each twin's outgoing rows are added to its representative's.

    Like a :class:`~fastsplit.SplitPlan` it has ``new_width``, ``ratio`` (ones),
    ``offset`` (zeros), ``symmetry="none"``, ``sigma=0``, ``seed=None`` and
    ``is_copy`` (all False), so ``fastsplit.Job(x, compact_plan, ...)`` runs
    through ``split_many`` as a gather. A plan with merge groups has no
    per-unit ratio (a merged row is a sum, not a scaled row): reading its
    ``ratio`` raises :class:`~fastsplit.SplitError`, which is what stops
    ``split_many`` from running it on outgoing weights or moments, where a plain
    gather would lose the twins' rows. Run such a plan with :func:`compact_many`.
    """

    width: int
    src: np.ndarray
    merge: tuple = ()

    symmetry = "none"
    sigma = 0.0
    seed = None

    def __post_init__(self):
        width = operator.index(self.width)
        if width < 1:
            raise SplitError(f"width must be at least 1, got {width}")
        src = np.asarray(self.src)
        if src.ndim != 1 or not (np.issubdtype(src.dtype, np.integer) or src.size == 0):
            raise SplitError(f"src must be a 1-D integer array, got dtype {src.dtype} and shape {src.shape}")
        src = src.astype(np.int64)
        if src.size == 0:
            raise SplitError(f"a compaction must keep at least one of the {width} units")
        bad = (src < 0) | (src >= width)
        if bad.any():
            raise SplitError(f"kept unit {int(src[bad][0])} is out of range for width {width}")
        if np.any(np.diff(src) <= 0):
            raise SplitError("the kept units must be in ascending order, each once")
        kept = np.zeros(width, dtype=bool)
        kept[src] = True
        groups = []
        seen = np.zeros(width, dtype=bool)
        for rep, twins in self.merge:
            rep = operator.index(rep)
            twins = tuple(operator.index(t) for t in twins)
            for u in (rep, *twins):
                if not 0 <= u < width:
                    raise SplitError(f"merge index {u} is out of range for width {width}")
                if seen[u]:
                    raise SplitError(f"unit {u} appears in more than one merge group")
                seen[u] = True
            if not kept[rep]:
                raise SplitError(f"representative {rep} of a merge group must be kept")
            for t in twins:
                if kept[t]:
                    raise SplitError(f"twin {t} of representative {rep} is kept; twins are dropped after merging")
            if twins:
                groups.append((rep, tuple(sorted(twins))))
        groups.sort()
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "src", _readonly(src))
        object.__setattr__(self, "merge", tuple(groups))

    # -- the attributes fastsplit.split_many reads ---------------------------------------------------

    @property
    def new_width(self) -> int:
        """Width after the compaction, ``m``."""
        return int(self.src.shape[0])

    @property
    def keep(self) -> np.ndarray:
        """The kept units, ascending (the same array as ``src``)."""
        return self.src

    @property
    def ratio(self) -> np.ndarray:
        """``float64[m]`` ones. Raises SplitError for a plan with merge groups (see the class docstring)."""
        if self.merge:
            raise SplitError(
                "this CompactPlan merges units, which a plain gather cannot do for outgoing weights and moments: "
                "run it with fastsplit.compact.compact_many (or compact)"
            )
        return _readonly(np.ones(self.new_width))

    @property
    def offset(self) -> np.ndarray:
        """``float64[m]`` zeros: a compaction never offsets a bias."""
        return _readonly(np.zeros(self.new_width))

    @property
    def is_copy(self) -> np.ndarray:
        """``bool[m]``, all False: a compaction makes no copies."""
        return np.zeros(self.new_width, dtype=bool)

    @property
    def noise_key(self) -> int:
        from ._noise import key_from_seed

        return key_from_seed(0)

    @property
    def counts(self) -> np.ndarray:
        """``int64[width]``: 1 for a kept unit, 0 for a removed one or a twin."""
        c = np.zeros(self.width, dtype=np.int64)
        c[self.src] = 1
        return c

    # -- views --------------------------------------------------------------------------------------

    @property
    def removed(self) -> np.ndarray:
        """``int64``: every unit that is not kept (twins included), ascending."""
        return np.flatnonzero(self.counts == 0).astype(np.int64)

    @property
    def twins(self) -> np.ndarray:
        """``int64``: the merged twins, ascending."""
        return np.array(sorted(t for _, ts in self.merge for t in ts), dtype=np.int64)

    @property
    def dropped(self) -> np.ndarray:
        """``int64``: the units removed without being merged (their outgoing rows are discarded)."""
        return np.setdiff1d(self.removed, self.twins).astype(np.int64)

    @property
    def is_identity(self) -> bool:
        """True when the plan keeps every unit (and so merges none)."""
        return self.new_width == self.width

    @property
    def gather(self) -> CompactPlan:
        """The same kept units without merge groups: the gather step of this plan."""
        return self if not self.merge else CompactPlan(self.width, self.src)

    def expand(self, k: int) -> CompactPlan:
        """Each unit ``u`` read as ``k`` consecutive channels ``u*k .. u*k+k-1`` (DepthwiseConv multiplier).

        Cost: O(width * k) numpy work.
        """
        k = operator.index(k)
        if k == 1:
            return self
        q = np.arange(k)
        src = (self.src[:, None] * k + q[None, :]).reshape(-1)
        merge = [(r * k + i, tuple(t * k + i for t in ts)) for r, ts in self.merge for i in range(k)]
        return CompactPlan(self.width * k, src, tuple(merge))

    def embed(self, total: int, offset: int) -> CompactPlan:
        """This plan placed at ``[offset, offset + width)`` of an axis of length ``total``; other units are kept.

        Cost: O(total) numpy work.
        """
        total = operator.index(total)
        offset = operator.index(offset)
        if offset < 0 or offset + self.width > total:
            raise SplitError(
                f"cannot embed a plan of width {self.width} at offset {offset} in an axis of length {total}"
            )
        return concat([identity(offset), self, identity(total - offset - self.width)])

    def __repr__(self) -> str:
        return (
            f"CompactPlan(width={self.width}, new_width={self.new_width}, "
            f"dropped={self.dropped.size}, merged={self.twins.size})"
        )


def identity(width: int) -> CompactPlan | None:
    """The plan that keeps all ``width`` units (None for width 0, for :func:`concat`)."""
    return CompactPlan(width, np.arange(width)) if width > 0 else None


def concat(parts: Sequence[CompactPlan | None]) -> CompactPlan:
    """The plan of a concatenated axis: each part's units at its offset (None parts are skipped)."""
    srcs, merge, off = [], [], 0
    for p in parts:
        if p is None:
            continue
        srcs.append(p.src + off)
        merge += [(r + off, tuple(t + off for t in ts)) for r, ts in p.merge]
        off += p.width
    return CompactPlan(off, np.concatenate(srcs), tuple(merge))


def _indices(width: int, spec, what: str) -> np.ndarray:
    if spec is None:
        return np.zeros(0, dtype=np.int64)
    return _spec_indices(width, spec, what)


def _groups(width: int, merge) -> list[tuple[int, tuple]]:
    if merge is None:
        return []
    if isinstance(merge, Mapping):
        items = list(merge.items())
    else:
        items = []
        for g in merge:
            g = list(np.asarray(g, dtype=np.int64).reshape(-1)) if not np.isscalar(g) else [g]
            if not g:
                continue
            items.append((g[0], g[1:]))
    out = []
    for rep, twins in items:
        try:
            rep = operator.index(rep)
        except TypeError:
            raise SplitError(f"a merge representative must be an integer, got {rep!r}") from None
        twins = [twins] if np.isscalar(twins) else list(np.asarray(twins).reshape(-1))
        try:
            twins = [operator.index(t) for t in twins]
        except TypeError:
            raise SplitError(f"the twins of {rep} must be integers, got {twins!r}") from None
        for u in (rep, *twins):
            if not 0 <= u < width:
                raise SplitError(f"merge index {u} is out of range for width {width}")
        out.append((rep, tuple(twins)))
    return out


def compact_plan(width: int, remove=None, merge=None) -> CompactPlan:
    """Make a :class:`CompactPlan` for a layer of ``width`` units.

    Args:
        width: number of units now.
        remove: units to drop with their outgoing rows (integer indices, a
            repeated index is fine, or a boolean mask of length ``width``).
            Exact when the unit's value is zero wherever it is read; to keep a
            nonzero constant, fold it into the consumer's bias first (what
            ``fastsplit.keras.prune`` does).
        merge: twins to merge, either ``{representative: twins}`` (twins an
            index or a sequence) or a sequence of groups whose first index is
            the representative. Each twin is dropped and its outgoing rows are
            added to the representative's; exact when the twins' incoming
            weights and biases equal the representative's.

    Returns:
        The plan. Cost: O(width) numpy work.

    Raises:
        SplitError: an index out of range, a unit in two merge groups (or
            both removed and merged), or nothing left to keep.
    """
    width = operator.index(width)
    if width < 1:
        raise SplitError(f"width must be at least 1, got {width}")
    drop = np.unique(_indices(width, remove, "remove"))
    groups = _groups(width, merge)
    removed = np.zeros(width, dtype=bool)
    removed[drop] = True
    in_group = np.zeros(width, dtype=bool)
    for rep, twins in groups:
        for u in (rep, *twins):
            if in_group[u]:
                raise SplitError(f"unit {u} appears in more than one merge group (merge groups must not overlap)")
            if removed[u]:
                raise SplitError(f"unit {u} is both removed and in a merge group")
            in_group[u] = True
        removed[list(twins)] = True
    if removed.all():
        raise SplitError(f"the compaction would remove all {width} units; keep at least one")
    return CompactPlan(width, np.flatnonzero(~removed), tuple((r, t) for r, t in groups if t))


# -- running plans ------------------------------------------------------------------------------------------


def _group_table(plan: CompactPlan):
    """Merge groups by size: ``[(members int64[G, k] (representative first), positions int64[G])]``.

    ``positions`` are the representatives' places among the kept units.
    """
    by_size: dict = {}
    for rep, twins in plan.merge:
        by_size.setdefault(1 + len(twins), []).append((rep, *twins))
    out = []
    for k in sorted(by_size):
        members = np.asarray(by_size[k], dtype=np.int64)
        out.append((members, np.searchsorted(plan.src, members[:, 0]).astype(np.int64)))
    return out


def _bf16_bits_to_f32(xp, a):
    return (a.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


def _f32_to_bf16_bits(xp, a):
    bits = a.astype(xp.float32).view(xp.uint32)
    bits = bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))  # round to nearest even
    return (bits >> 16).astype(xp.uint16)


def _merge_into(xp, x3, out3, plan: CompactPlan, role: str, raw_bf16: bool) -> None:
    """Write each representative's merged value into ``out3`` (the gathered ``(outer, m, inner)`` result)."""
    ct = np.float64 if x3.dtype == np.float64 else np.float32
    for members, pos in _group_table(plan):
        cols = x3[:, xp.asarray(members.reshape(-1)), :]
        cols = _bf16_bits_to_f32(xp, cols) if raw_bf16 else cols.astype(ct)
        cols = cols.reshape(x3.shape[0], members.shape[0], members.shape[1], x3.shape[2])
        if role in _ROOT_ROLES:
            merged = xp.sqrt(xp.maximum(cols, 0)).sum(axis=2) ** 2
        else:
            merged = cols.sum(axis=2)
        merged = _f32_to_bf16_bits(xp, merged).view(out3.dtype) if raw_bf16 else merged.astype(out3.dtype)
        out3[:, xp.asarray(pos), :] = merged


def compact_many(jobs: Sequence[Job], *, backend: str = "auto") -> list:
    """Run many jobs of :class:`CompactPlan` (and :class:`~fastsplit.SplitPlan`) in one ``split_many`` call.

    Every job is first gathered by one ``split_many`` call (one kernel launch
    on the GPU, one parallel region on the CPU); then, for the jobs whose plan
    has merge groups and whose role sums (``"outgoing"``, ``"moment1"``,
    ``"moment2"``; see the module docstring), each representative's entries
    are overwritten with the merged value, computed on the array module of
    the data (NumPy or CuPy) in float32 (float64 for float64 tensors).

    Args:
        jobs: :class:`fastsplit.Job` objects; ``out`` works as in ``split_many``.
        backend: as in ``split_many``.

    Returns:
        One new array per job, of the job's framework and device (``out`` when given).

    Raises:
        SplitError: for any bad job, before anything is written.

    Cost: the gather reads the kept entries and writes the result once; the
    merge step reads every merge group's entries once more and rewrites the
    representatives' entries: O(outer * (representatives + twins) * inner)
    extra, nothing for plans without merge groups.
    """
    jobs = list(jobs)
    for i, j in enumerate(jobs):
        if not isinstance(j, Job):
            raise SplitError(f"job {i} must be a fastsplit.Job, got {type(j).__name__}")
    merging = [isinstance(j.plan, CompactPlan) and bool(j.plan.merge) and j.role in _core.ROLES for j in jobs]
    if not any(merging):
        return _core.split_many(jobs, backend=backend)
    natives: list[Any] = [interop.export(j.x) if m else None for j, m in zip(jobs, merging, strict=False)]
    inner_jobs, outs = [], []
    for j, m, nat in zip(jobs, merging, natives, strict=False):
        if not m:
            inner_jobs.append(j)
            outs.append(None)
            continue
        # a writable out (numpy, CuPy, PyTorch) is filled through its exported array, so that the merge step
        # can write into it; anything else goes to split_many as given, which refuses it
        out, out_nat = j.out, None
        if out is not None and interop.kind_of(out) in ("numpy", "cupy", "torch"):
            out_nat = interop.export(out)
            out = out_nat.array if out_nat.array.flags.c_contiguous else None
        outs.append(out_nat)
        inner_jobs.append(Job(nat.array, j.plan.gather, j.axis, j.role, j.channels, out))
    results = _core.split_many(inner_jobs, backend=backend)
    for j, m, nat, res in zip(jobs, merging, natives, results, strict=False):
        if not m or not (j.role in _SUM_ROLES or j.role in _ROOT_ROLES):
            continue
        xp = _dispatch.array_module(nat)
        arr = nat.array
        axis = operator.index(j.axis) % arr.ndim
        outer, n, inner, _ = _core._view3(tuple(int(s) for s in arr.shape), axis, j.plan.width, j.channels)
        x3 = xp.ascontiguousarray(arr).reshape(outer, n, inner)
        res3 = res.reshape(outer, j.plan.new_width, inner)  # C-contiguous (fresh, or a contiguous out): a view
        _merge_into(xp, x3, res3, j.plan, j.role, nat.bf16 and nat.device[0] == "cuda")
    _dispatch.synchronize(natives[merging.index(True)].device)
    final = []
    for j, m, nat, out_nat, res in zip(jobs, merging, natives, outs, results, strict=False):
        if not m:
            final.append(res)
        elif out_nat is not None:
            if res is not out_nat.array:
                out_nat.array[...] = res
            final.append(j.out)
        else:
            final.append(interop.import_(res, nat))
    return final


def compact(x, plan: CompactPlan, axis: int = -1, *, role: str = "incoming", channels: str = "last",
            backend: str = "auto", out=None):
    """Compact one tensor along ``axis`` according to ``plan`` (see :func:`compact_many`).

    Returns:
        A new array of the same kind and device as ``x`` (``out`` when given).
    """
    return compact_many([Job(x, plan, axis, role, channels, out)], backend=backend)[0]


__all__ = ["CompactPlan", "compact", "compact_many", "compact_plan", "concat", "identity"]
