"""Split plans: which units are copied, and how each copy shares the work.

Everything here is plain numpy and depends only on widths and indices, so a plan
is worked out once and then applied by any backend to any number of tensors.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import numpy as np

from ._errors import SplitError

SYMMETRIES = ("none", "nudge", "noise", "asymmetric")

_RATIO_SUM_TOL = 1e-6


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def column_runs(src: np.ndarray) -> np.ndarray:
    """Maximal runs of consecutive source indices, as an ``int64[r, 3]`` array.

    Row ``(d, s, length)`` means ``src[d:d+length] == arange(s, s+length)``. A plan
    from :func:`plan` has the old units as one run followed by one run per block
    of adjacent split units, so a kernel can copy whole blocks.
    Cost: O(m) numpy work.
    """
    m = src.shape[0]
    if m == 0:
        return np.zeros((0, 3), dtype=np.int64)
    brk = np.flatnonzero(np.diff(src) != 1) + 1
    starts = np.concatenate([[0], brk]).astype(np.int64)
    ends = np.concatenate([brk, [m]]).astype(np.int64)
    return np.stack([starts, src[starts], ends - starts], axis=1)


class AxisPlan:
    """What every plan of one axis offers the executor (``fastsplit._gather``): the common base.

    :class:`SplitPlan` and :class:`fastsplit.compact.CompactPlan` derive from it.
    A plan says how an axis of ``width`` units becomes ``new_width``: new unit
    ``j`` reads old unit ``src[j]``, scaled by ``ratio[j]**p`` (the role's power),
    plus ``offset[j]`` for a bias and noise for the extra copies (``is_copy``) of
    a ``symmetry="noise"`` plan. A plan with merge groups (``merge``, compaction
    only) also adds twins into representatives; ``gather`` is the same plan
    without them, the part a gather kernel runs.

    Subclasses provide ``width``, ``src``, ``ratio``, ``offset``, ``symmetry``,
    ``sigma``, ``new_width``, ``is_copy`` and ``noise_key``.
    """

    __slots__ = ()

    #: merge groups ``((representative, (twin, ...)), ...)``: none for a split
    merge: tuple = ()

    @property
    def gather(self) -> AxisPlan:
        """The gather step of this plan: the plan itself when it merges nothing."""
        return self


@dataclasses.dataclass(frozen=True, eq=False)
class SplitPlan(AxisPlan):
    """How one axis of width ``width`` becomes ``new_width`` units.

    New unit ``j`` is a copy of old unit ``src[j]``; it keeps ``ratio[j]`` of the
    outgoing weights and gets ``offset[j]`` added to its bias. For a plan made by
    :func:`plan`, ``src[:width] == arange(width)`` and extra copies follow in
    ascending unit order. The arrays are read-only.

    Attributes:
        width: old width ``n``.
        src: ``int64[m]`` source unit of each new unit.
        ratio: ``float64[m]`` share of the outgoing weights; the ratios of all
            copies of one unit sum to 1.
        offset: ``float64[m]`` bias offset of each new unit (symmetry breaking).
        symmetry: ``"none"``, ``"nudge"`` or ``"noise"``.
        sigma: noise scale, relative to the standard deviation of the source
            unit's incoming weights (``"noise"`` only, else 0).
        seed: key of the counter-based noise generator (``"noise"`` only).
    """

    width: int
    src: np.ndarray
    ratio: np.ndarray
    offset: np.ndarray
    symmetry: str = "none"
    sigma: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        width = operator.index(self.width)
        src = np.asarray(self.src)
        if src.ndim != 1 or not np.issubdtype(src.dtype, np.integer):
            raise SplitError(f"src must be a 1-D integer array, got dtype {src.dtype} and shape {src.shape}")
        src = src.astype(np.int64)
        m = src.shape[0]
        ratio = np.asarray(self.ratio, dtype=np.float64)
        offset = np.asarray(self.offset, dtype=np.float64)
        if ratio.shape != (m,) or offset.shape != (m,):
            raise SplitError(
                f"ratio and offset must have the shape of src ({m},), got {ratio.shape} and {offset.shape}"
            )
        if width < 1:
            raise SplitError(f"width must be at least 1, got {width}")
        bad = (src < 0) | (src >= width)
        if bad.any():
            raise SplitError(f"src index {int(src[bad][0])} is out of range for width {width}")
        counts = np.bincount(src, minlength=width)
        if (counts == 0).any():
            raise SplitError(f"unit {int(np.flatnonzero(counts == 0)[0])} has no copy: a split plan never drops units")
        if not np.all(ratio > 0) or not np.all(np.isfinite(ratio)):
            raise SplitError(f"ratios must be positive and finite, got {ratio[~(ratio > 0) | ~np.isfinite(ratio)][0]}")
        sums = np.bincount(src, weights=ratio, minlength=width)
        if not np.allclose(sums, 1.0, rtol=0, atol=_RATIO_SUM_TOL):
            u = int(np.argmax(np.abs(sums - 1.0)))
            raise SplitError(f"the ratios of the copies of unit {u} sum to {sums[u]!r}, not 1")
        if self.symmetry not in SYMMETRIES:
            raise SplitError(f"symmetry must be one of {SYMMETRIES}, got {self.symmetry!r}")
        if not np.isfinite(float(self.sigma)) or float(self.sigma) < 0:
            raise SplitError(f"sigma must be a non-negative number, got {self.sigma!r}")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "src", _readonly(src))
        object.__setattr__(self, "ratio", _readonly(ratio))
        object.__setattr__(self, "offset", _readonly(offset))
        object.__setattr__(self, "sigma", float(self.sigma))

    @property
    def new_width(self) -> int:
        """Width after the split, ``m``."""
        return int(self.src.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """``int64[width]``: how many units each old unit becomes."""
        return np.bincount(self.src, minlength=self.width).astype(np.int64)

    @property
    def is_copy(self) -> np.ndarray:
        """``bool[m]``: True for an extra copy, False for the first unit of each source.

        The first new unit with a given source is the original (it keeps its
        place); the noise of ``symmetry="noise"`` goes only to the extra copies.
        """
        first = np.zeros(self.new_width, dtype=bool)
        _, idx = np.unique(self.src, return_index=True)
        first[idx] = True
        return ~first

    @property
    def is_identity(self) -> bool:
        """True when the plan changes nothing (no copies, no offsets)."""
        return (
            self.new_width == self.width
            and bool(np.all(self.src == np.arange(self.width)))
            and bool(np.all(self.offset == 0))
        )

    @property
    def noise_key(self) -> int:
        """The 64-bit key of the noise generator for this plan."""
        from ._noise import key_from_seed

        return key_from_seed(0 if self.seed is None else self.seed)

    def scaled(self, scale) -> SplitPlan:
        """This plan with each new unit's bias offset multiplied by ``scale[src[j]]``.

        ``scale`` (``float[width]``, finite) is each old unit's own size, e.g. the norm of its
        incoming weights: a ``"nudge"`` of ``eps`` becomes ``eps`` times that size.
        """
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if scale.shape != (self.width,) or not np.all(np.isfinite(scale)):
            raise SplitError(f"scale must be {self.width} finite numbers, got shape {scale.shape}")
        return dataclasses.replace(self, offset=self.offset * scale[self.src])

    def embed(self, total: int, offset: int) -> SplitPlan:
        """This plan placed at ``[offset, offset + width)`` of an axis of length ``total``.

        Units outside that range map to themselves. The new units of this plan
        take the place of the old ones, so the units after them move up by
        ``new_width - width``. This is how a plan reaches the consumer of a
        ``Concatenate``.

        Cost: O(total) numpy work.
        """
        total = operator.index(total)
        offset = operator.index(offset)
        if offset < 0 or offset + self.width > total:
            raise SplitError(
                f"cannot embed a plan of width {self.width} at offset {offset} in an axis of length {total}"
            )
        before = np.arange(offset, dtype=np.int64)
        after = np.arange(offset + self.width, total, dtype=np.int64)
        ones_b, ones_a = np.ones(before.shape[0]), np.ones(after.shape[0])
        return SplitPlan(
            width=total,
            src=np.concatenate([before, self.src + offset, after]),
            ratio=np.concatenate([ones_b, self.ratio, ones_a]),
            offset=np.concatenate([np.zeros_like(ones_b), self.offset, np.zeros_like(ones_a)]),
            symmetry=self.symmetry,
            sigma=self.sigma,
            seed=self.seed,
        )

    def __repr__(self) -> str:
        return (
            f"SplitPlan(width={self.width}, new_width={self.new_width}, "
            f"split={int((self.counts > 1).sum())}, symmetry={self.symmetry!r})"
        )


def _indices(width: int, spec, what: str, item: str | None = None) -> np.ndarray:
    """``spec`` (integer indices, a repeated index kept, or a boolean mask of length ``width``) as int64.

    ``what`` names ``spec`` in messages, ``item`` one of its indices (``what`` when None). Shared with
    :func:`fastsplit.compact.compact_plan`.
    """
    arr = np.asarray(spec)
    if arr.dtype == bool:
        if arr.shape != (width,):
            raise SplitError(f"a boolean {what} mask must have length {width}, got shape {arr.shape}")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
        raise SplitError(f"{what} must be None, integer indices or a boolean mask, got {arr.dtype} {arr.shape}")
    arr = arr.reshape(-1).astype(np.int64)
    bad = (arr < 0) | (arr >= width)
    if bad.any():
        raise SplitError(f"{item or what} index {int(arr[bad][0])} is out of range for width {width}")
    return arr


def _neuron_indices(width: int, neurons) -> np.ndarray:
    """Selected units as an int64 array (a repeated index means one more copy)."""
    if neurons is None:
        return np.arange(width, dtype=np.int64)
    return _indices(width, neurons, "neurons", "neuron")


def plan(
    width: int,
    neurons=None,
    *,
    copies: int = 2,
    ratios: Sequence[float] | None = None,
    symmetry: str = "nudge",
    eps: float = 1e-3,
    sigma: float = 0.01,
    seed: int | None = None,
) -> SplitPlan:
    """Make a :class:`SplitPlan` for a layer of ``width`` units.

    Args:
        width: number of units now.
        neurons: ``None`` splits every unit; integer indices select units (an
            index that appears ``r`` times gets ``r * (copies - 1)`` extra
            copies); a boolean mask of length ``width`` also works.
        copies: each selected unit becomes ``copies`` units (``1`` is a no-op).
        ratios: outgoing shares of the ``copies`` units, positive and summing
            to 1; equal shares by default. With repeated indices the shares
            are equal.
        symmetry: ``"none"`` (plain copies, exact), ``"nudge"`` (copy ``c`` of
            ``k`` gets bias offset ``eps * (1 - 2c/(k-1))``), ``"noise"``
            (Gaussian noise ``sigma * std(column)`` on the extra copies'
            incoming weights) or ``"asymmetric"`` (LEMON-style unequal
            outgoing shares, exact: copy ``c`` of ``k`` keeps ``(k - c) / (k(k+1)/2)``
            of the outgoing weights, ``2/3`` and ``1/3`` for a pair, unless
            ``ratios`` says otherwise; the copies' incoming weights then get
            different gradients from the first step).
        eps: bias offset of ``"nudge"`` (absolute; :meth:`SplitPlan.scaled`
            makes it relative to each unit's own scale, as ``fastsplit.keras.widen``
            does by default).
        sigma: relative noise of ``"noise"``.
        seed: noise key; the same seed gives the same noise on every backend.

    Returns:
        The plan. Cost: O(width + copies) numpy work.

    Raises:
        SplitError: naming the bad value.
    """
    width = operator.index(width)
    if width < 1:
        raise SplitError(f"width must be at least 1, got {width}")
    copies = operator.index(copies)
    if copies < 1:
        raise SplitError(f"copies must be at least 1, got {copies}")
    if symmetry not in SYMMETRIES:
        raise SplitError(f"symmetry must be one of {SYMMETRIES}, got {symmetry!r}")
    if not np.isfinite(eps):
        raise SplitError(f"eps must be finite, got {eps!r}")
    if not np.isfinite(sigma) or sigma < 0:
        raise SplitError(f"sigma must be a non-negative number, got {sigma!r}")
    chosen = _neuron_indices(width, neurons)
    extra_per_unit = np.bincount(chosen, minlength=width) * (copies - 1)
    k = 1 + extra_per_unit  # copies of each unit, the original included

    if ratios is not None:
        r = np.asarray(ratios, dtype=np.float64).reshape(-1)
        if r.shape != (copies,):
            raise SplitError(f"ratios must have one entry per copy ({copies}), got {r.shape[0]}")
        if not np.all(r > 0) or not np.all(np.isfinite(r)):
            raise SplitError(f"ratios must be positive, got {r.tolist()}")
        if abs(r.sum() - 1.0) > _RATIO_SUM_TOL:
            raise SplitError(f"ratios must sum to 1, got {r.tolist()} (sum {r.sum()!r})")
        if np.any((k > 1) & (k != copies)):
            raise SplitError("explicit ratios need each selected unit to appear once in neurons")

    extra_src = np.repeat(np.arange(width, dtype=np.int64), extra_per_unit)
    src = np.concatenate([np.arange(width, dtype=np.int64), extra_src])
    # copy number c of each new unit: 0 for the original, then 1, 2, ... in order
    c = np.zeros(src.shape[0], dtype=np.int64)
    if extra_src.size:
        starts = np.cumsum(extra_per_unit) - extra_per_unit
        c[width:] = np.arange(extra_src.size) - np.repeat(starts, extra_per_unit) + 1
    kj = k[src]
    if ratios is not None:
        ratio = np.where(kj > 1, r[np.minimum(c, copies - 1)], 1.0)
    elif symmetry == "asymmetric":
        ratio = (kj - c) / (kj * (kj + 1) / 2.0)
    else:
        ratio = 1.0 / kj
    offset = np.zeros(src.shape[0])
    if symmetry == "nudge":
        multi = kj > 1
        offset[multi] = eps * (1.0 - 2.0 * c[multi] / (kj[multi] - 1))
    return SplitPlan(
        width=width,
        src=src,
        ratio=ratio,
        offset=offset,
        symmetry=symmetry,
        sigma=float(sigma) if symmetry == "noise" else 0.0,
        seed=(0 if seed is None else int(seed)) if symmetry == "noise" else None,
    )
