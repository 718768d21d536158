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
from collections.abc import Mapping, Sequence

import numpy as np

from . import _gather
from ._errors import SplitError
from ._gather import Job
from ._gather import bf16_bits_to_f32 as _bf16_bits_to_f32  # noqa: F401 - used by fastsplit.keras
from ._gather import f32_to_bf16_bits as _f32_to_bf16_bits  # noqa: F401 - used by fastsplit.keras
from .plan import AxisPlan, _integer, _readonly
from .plan import _indices as _spec_indices


@dataclasses.dataclass(frozen=True, eq=False)
class CompactPlan(AxisPlan):
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
        width = _integer("width", self.width, 1)
        try:
            src = np.asarray(self.src)
        except (TypeError, ValueError):
            raise SplitError(f"src must be a 1-D integer array, got {self.src!r}") from None
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
        for rep, twins in _pairs(self.merge):
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
        k = _integer("k", k, 1)
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
        total = _integer("total", total)
        offset = _integer("offset", offset)
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


def _pairs(merge) -> list[tuple[int, tuple]]:
    """``CompactPlan.merge`` as ``[(representative, (twin, ...))]`` of ints, or SplitError naming the entry."""
    try:
        items = list(merge)
    except TypeError:
        raise SplitError(f"merge must be a sequence of (representative, twins) pairs, got {merge!r}") from None
    out = []
    for item in items:
        try:
            rep, twins = item
            out.append((_integer("a merge representative", rep), tuple(_integer("a twin", t) for t in twins)))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SplitError):
                raise SplitError(f"merge entry {item!r}: {exc}") from None
            raise SplitError(f"merge entries must be (representative, twins) pairs of integers, got {item!r}") from None
    return out


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
        try:
            groups = list(merge)
        except TypeError:
            raise SplitError(f"merge must be a mapping or a sequence of groups, got {merge!r}") from None
        items = []
        for g in groups:
            try:
                arr = np.asarray(g)
            except (TypeError, ValueError):
                raise SplitError(f"a merge group must be integer indices, got {g!r}") from None
            if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
                raise SplitError(f"a merge group must be integer indices, got {g!r}")
            g = [int(u) for u in arr.reshape(-1)]
            if not g:
                continue
            items.append((g[0], g[1:]))
    out = []
    for rep, twins in items:
        rep = _integer("a merge representative", rep)
        try:
            twins = [twins] if np.isscalar(twins) else list(np.asarray(twins).reshape(-1))
            twins = [_integer("a twin", t) for t in twins]
        except (SplitError, TypeError, ValueError):
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
    width = _integer("width", width, 1)
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


def compact_many(jobs: Sequence[Job], *, backend: str = "auto") -> list:
    """Run many jobs of :class:`CompactPlan` (and :class:`~fastsplit.SplitPlan`) in one pass.

    The jobs go through the executor of ``fastsplit.split_many`` (one kernel
    launch per dtype on the GPU, one parallel region on the CPU), gathering the
    kept units; then, for the jobs whose plan has merge groups and whose role
    sums (``"outgoing"``, ``"moment1"``, ``"moment2"``; see the module
    docstring), each representative's entries are overwritten with the merged
    value, computed on the array module of the data (NumPy or CuPy) in float32
    (float64 for float64 tensors).

    A job split on two axes (``Job.also``) is the composition of its two steps,
    as in ``split_many``: the first step's result (merged, and rounded to the
    dtype) is what the second step gathers and merges. Its merge step rewrites
    the representatives' slices along each merging axis from the members'
    slices of the input, so it needs no intermediate array either. The one
    exception: a two-axis job that merges on one axis and draws noise on the
    other (a ``symmetry="noise"`` :class:`~fastsplit.SplitPlan` in the role
    ``"incoming"``) runs as two passes, its first step in the batch's call
    and its second in one more call, through an intermediate array; when the
    noise is the second step's, its scale is then measured on that
    intermediate, as two ``compact`` calls would, not on ``x``.

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
    return _gather.execute(jobs, backend=backend, merge=True)


def compact(x, plan: CompactPlan, axis: int = -1, *, role: str = "incoming", channels: str = "last",
            backend: str = "auto", out=None, also=None):
    """Compact one tensor along ``axis`` according to ``plan`` (see :func:`compact_many`).

    Returns:
        A new array of the same kind and device as ``x`` (``out`` when given).
    """
    return compact_many([Job(x, plan, axis, role, channels, out, also)], backend=backend)[0]


__all__ = ["CompactPlan", "compact", "compact_many", "compact_plan", "concat", "identity"]
