"""Split plans: which units are copied, and how each copy shares the work.

Everything here is plain numpy and depends only on widths and indices, so a plan
is worked out once and then applied by any backend to any number of tensors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np

from ._errors import SplitError

SYMMETRIES = ("none", "nudge", "noise", "asymmetric", "direction", "fresh")

#: symmetries whose plans draw from the counter-based generator (``sigma`` and ``seed`` are kept)
DRAWING = ("noise", "direction", "fresh")

#: defaults of :func:`plan`'s ``eps`` and ``sigma`` for the symmetries that use them
DEFAULT_EPS = {"nudge": 1e-3, "direction": 0.1}
DEFAULT_SIGMA = {"noise": 0.01, "fresh": 1.0}

_RATIO_SUM_TOL = 1e-6

#: the largest ``eps``, ``sigma`` and bias offset a plan takes: half the largest float32, so that a
#: float32 (or bfloat16) bias plus its offset stays finite. What a float16 tensor cannot hold is refused
#: when the plan meets one (``fastsplit.split``), since a plan does not know its tensors' dtypes.
LARGEST = float(np.finfo(np.float32).max) / 2


def _integer(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int (a bool or a float is refused), at least ``minimum``; or SplitError."""
    if isinstance(value, (bool, np.bool_)):
        raise SplitError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise SplitError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise SplitError(f"{name} must be at least {minimum}, got {v}")
    return v


def _real(name: str, value, minimum: float | None = None) -> float:
    """``value`` as a finite float of size at most :data:`LARGEST` (not a bool, not a string); or SplitError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise SplitError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > LARGEST:
        raise SplitError(f"{name} must be finite and at most {LARGEST:.3g} in size, got {value!r}")
    if minimum is not None and v < minimum:
        raise SplitError(f"{name} must be at least {minimum}, got {value!r}")
    return v


def _reals(name: str, value) -> np.ndarray:
    """``value`` as a new float64 array, from integers or floats only (strings, booleans, objects refused)."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nesting
        raise SplitError(f"{name} must be an array of real numbers, got {value!r} ({exc})") from None
    if arr.dtype.kind not in "iuf":
        raise SplitError(f"{name} must be an array of real numbers, got dtype {arr.dtype}: {value!r}")
    return arr.astype(np.float64)  # a copy: the plan never shares memory with the caller


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
    plus ``offset[j]`` for a bias, and draws of the noise generator on incoming
    weights for the symmetries in :data:`DRAWING`. A plan with merge groups
    (``merge``, compaction only) also adds twins into representatives;
    ``gather`` is the same plan without them, the part a gather kernel runs.

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
    ascending unit order. The arrays are read-only copies of the ones given.

    The constructor refuses (:class:`SplitError`, naming the field and the
    value) a width that is not an integer of at least 1, a ``src`` that is not
    1-D integers within the width or leaves a unit without a copy, ratios or
    offsets that are not real numbers of the shape of ``src``, ratios that are
    not positive and finite or whose copies of one unit do not sum to 1,
    offsets that are not finite or larger in size than :data:`LARGEST`, an
    unknown symmetry, a sigma that is negative, not finite or not a number,
    and a seed that is not an integer. A ``"fresh"`` plan must give each
    unit's first copy ratio 1 and its extra copies ratio 0 (the only zero
    ratios any plan may hold): anything else would not keep the function.

    Attributes:
        width: old width ``n``.
        src: ``int64[m]`` source unit of each new unit.
        ratio: ``float64[m]`` share of the outgoing weights; the ratios of all
            copies of one unit sum to 1.
        offset: ``float64[m]`` bias offset of each new unit (symmetry breaking).
        symmetry: one of :data:`SYMMETRIES` (see :func:`plan`).
        sigma: scale of the generator's draws on the incoming weights: the
            noise of ``"noise"`` and ``"fresh"`` in standard deviations of the
            source unit's incoming weights, the ``eps`` of ``"direction"`` in
            their root mean square; 0 for the other symmetries.
        seed: key of the counter-based noise generator (the symmetries in
            :data:`DRAWING` only).
    """

    width: int
    src: np.ndarray
    ratio: np.ndarray
    offset: np.ndarray
    symmetry: str = "none"
    sigma: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        width = _integer("width", self.width, 1)
        try:
            src = np.asarray(self.src)
        except (TypeError, ValueError):
            raise SplitError(f"src must be a 1-D integer array, got {self.src!r}") from None
        if src.ndim != 1 or not np.issubdtype(src.dtype, np.integer):
            raise SplitError(f"src must be a 1-D integer array, got dtype {src.dtype} and shape {src.shape}")
        src = src.astype(np.int64)  # a copy
        m = src.shape[0]
        ratio = _reals("ratio", self.ratio)
        offset = _reals("offset", self.offset)
        if ratio.shape != (m,) or offset.shape != (m,):
            raise SplitError(
                f"ratio and offset must have the shape of src ({m},), got {ratio.shape} and {offset.shape}"
            )
        bad = (src < 0) | (src >= width)
        if bad.any():
            raise SplitError(f"src index {int(src[bad][0])} is out of range for width {width}")
        counts = np.bincount(src, minlength=width)
        if (counts == 0).any():
            raise SplitError(f"unit {int(np.flatnonzero(counts == 0)[0])} has no copy: a split plan never drops units")
        _check_symmetry(self.symmetry)
        fresh = self.symmetry == "fresh"
        bad = ~((ratio >= 0) if fresh else (ratio > 0)) | ~np.isfinite(ratio)
        if bad.any():
            raise SplitError(f"ratios must be {'non-negative' if fresh else 'positive'} and finite, got "
                             f"{float(ratio[bad][0])!r}")
        if fresh:
            _check_fresh_ratios(src, ratio)
        sums = np.bincount(src, weights=ratio, minlength=width)
        if not np.allclose(sums, 1.0, rtol=0, atol=_RATIO_SUM_TOL):
            u = int(np.argmax(np.abs(sums - 1.0)))
            raise SplitError(f"the ratios of the copies of unit {u} sum to {float(sums[u])!r}, not 1")
        bad = ~(np.abs(offset) <= LARGEST)  # NaN and inf included
        if bad.any():
            raise SplitError(f"offsets must be finite and at most {LARGEST:.3g} in size, got "
                             f"{float(offset[bad][0])!r} for new unit {int(np.flatnonzero(bad)[0])}")
        sigma = _real("sigma", self.sigma, 0.0)
        seed = None if self.seed is None else _integer("seed", self.seed)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "src", _readonly(src))
        object.__setattr__(self, "ratio", _readonly(ratio))
        object.__setattr__(self, "offset", _readonly(offset))
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "seed", seed)

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
        place); the noise of ``"noise"`` and the fresh weights of ``"fresh"``
        go only to the extra copies.
        """
        return _is_copy(self.src)

    @property
    def direction(self) -> np.ndarray:
        """``float64[m]``: the coefficient ``c_j`` of each new unit along its source's direction.

        A ``"direction"`` plan moves the incoming weights of copy ``j`` of unit
        ``u`` by ``c_j * eps * rms(w_u) * g_u``, with one standard normal vector
        ``g_u`` for all copies of ``u``. Copy number ``c`` (0 for the original,
        in order of appearance) of the ``k`` copies of a unit starts from the
        nudge pattern ``p_c = 1 - 2c/(k-1)`` and is centred with the plan's
        ratios, ``c_j = p_j - sum_i r_i p_i / sum_i r_i`` over the copies of
        that unit, so that ``sum_j r_j c_j = 0`` for any ratios (equal ratios
        leave the pattern as it is: ``+1, -1`` for a pair). A unit with one
        copy gets 0. Defined for every plan; only ``"direction"`` uses it.
        Cost: O(m) numpy work.
        """
        src, ratio = self.src, self.ratio
        counts = np.bincount(src, minlength=self.width)
        order = np.argsort(src, kind="stable")
        starts = np.cumsum(counts) - counts
        c = np.empty(src.shape[0], dtype=np.float64)
        c[order] = np.arange(src.shape[0]) - np.repeat(starts, counts)
        k = counts[src]
        p = np.where(k > 1, 1.0 - 2.0 * c / np.maximum(k - 1, 1), 0.0)
        mean = np.bincount(src, weights=ratio * p, minlength=self.width)
        total = np.bincount(src, weights=ratio, minlength=self.width)
        return p - (mean / np.where(total > 0, total, 1.0))[src]

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
        total = _integer("total", total)
        offset = _integer("offset", offset)
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


def _check_symmetry(symmetry) -> None:
    if not isinstance(symmetry, str) or symmetry not in SYMMETRIES:
        raise SplitError(f"symmetry must be one of {SYMMETRIES}, got {symmetry!r}")


def _is_copy(src: np.ndarray) -> np.ndarray:
    """True for every new unit but the first with its source."""
    first = np.zeros(src.shape[0], dtype=bool)
    _, idx = np.unique(src, return_index=True)
    first[idx] = True
    return ~first


def _check_fresh_ratios(src: np.ndarray, ratio: np.ndarray) -> None:
    """A ``"fresh"`` plan keeps each unit's outgoing weights on its first copy (ratio 1), none on the others (0)."""
    want = np.where(_is_copy(src), 0.0, 1.0)
    bad = ratio != want
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise SplitError(f"a 'fresh' plan gives each unit's first copy ratio 1 and its fresh copies ratio 0 (zero "
                         f"outgoing weights keep the function); new unit {j} has ratio {float(ratio[j])!r}")


def _indices(width: int, spec, what: str, item: str | None = None) -> np.ndarray:
    """``spec`` (integer indices, a repeated index kept, or a boolean mask of length ``width``) as int64.

    ``what`` names ``spec`` in messages, ``item`` one of its indices (``what`` when None). Shared with
    :func:`fastsplit.compact.compact_plan`.
    """
    try:
        arr = np.asarray(spec)
    except (TypeError, ValueError):  # ragged nesting
        raise SplitError(f"{what} must be None, integer indices or a boolean mask, got {spec!r}") from None
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
    eps: float | None = None,
    sigma: float | None = None,
    seed: int | None = None,
) -> SplitPlan:
    """Make a :class:`SplitPlan` for a layer of ``width`` units.

    Symmetry breaking (``symmetry``): ``"none"`` makes plain copies (exact).
    ``"nudge"`` gives copy ``c`` of ``k`` the bias offset ``eps * (1 - 2c/(k-1))``.
    ``"noise"`` adds Gaussian noise ``sigma * std(column)`` to the extra
    copies' incoming weights. ``"asymmetric"`` splits the outgoing weights
    unequally, LEMON-style (exact): copy ``c`` of ``k`` keeps
    ``(k - c) / (k(k+1)/2)`` of them, ``2/3`` and ``1/3`` for a pair, unless
    ``ratios`` says otherwise, so the copies' incoming weights get different
    gradients from the first step. Under Adam none of these lets copies
    drift apart (their gradients differ only by the factor ``r_j``, which
    Adam's step ignores), hence the two below.

    ``"direction"`` splits along a direction, as Splitting Steepest Descent
    does: every copy ``j`` of unit ``u`` (the original included) has its
    incoming weights moved to ``w_u + c_j * d_u``, with one direction
    ``d_u = eps * rms(w_u) * g_u`` per unit (``g_u`` standard normal, drawn by
    the counter-based generator at the flat index of each *source* element,
    so every copy of ``u`` gets the same ``g_u`` on every backend) and
    coefficients :attr:`SplitPlan.direction` that satisfy
    ``sum_j r_j c_j = 0`` for any ratios (``+1, -1`` for a pair). The bias is
    copied unchanged. Bound: for a pre-activation ``z`` moved by ``c_j * delta``
    (``delta = x . d_u``), the next layer receives ``sum_j r_j a(z + c_j delta) v_u``
    where it received ``a(z) v_u``, and by Taylor's theorem
    ``|sum_j r_j a(z + c_j delta) - a(z)| <= sup|a''| / 2 * delta**2 * sum_j r_j c_j**2``:
    the function changes at second order in ``eps`` only (halving ``eps``
    quarters the change; ``sup|a''|`` is 0.77 for tanh). For ReLU the change
    is exactly zero wherever no copy's pre-activation changes sign, and
    at most ``sum_j r_j |c_j delta|`` where one does (a band of width
    ``O(eps)``), so on average it is ``O(eps**2)`` too. Default ``eps = 0.1``:
    each copy's incoming weights move by about ``|c_j| * eps`` of their norm
    (a pair: 10 % each way, copies 20 % apart), which Adam then keeps apart.

    ``"fresh"`` adds new units instead of copies (exact): each extra copy's
    incoming weights are *replaced* by Gaussian draws ``sigma * std(w_u)``
    (at the copy's own flat indices, as ``"noise"`` draws), its bias is 0
    and its outgoing weights are 0 (ratio 0; the original keeps ratio 1 and
    everything it had). Bound: none needed: the next layer receives
    ``a(z_fresh) * 0`` more, so the function does not change at all (up to
    the order of a floating-point sum; a fresh unit whose activation is
    infinite or NaN would give NaN). The fresh units' incoming weights get
    no gradient until their outgoing weights have moved away from 0.
    Default ``sigma = 1.0``: fresh units at the scale of the layer's own
    weights. Optimizer slots: the ratio-power roles give fresh units zero
    state and leave the originals' as they are (``r = 1``): ``"moment1"``
    (``m * r``) and ``"moment2"`` (``v * r**2``) on the producing side, so
    a fresh unit's incoming weights and bias start with no history, and
    ``"outgoing"`` rows. DESIGN's table carries the consuming side's slots
    with ``"copy"``, which gives a fresh unit's zero outgoing row the source
    unit's ``m`` and ``v``: Adam would then move that row along the source's
    recent steps for about ``1/(1 - beta_1)`` steps, unrelated to what the
    fresh unit computes. For a ``"fresh"`` plan, carry the consuming side's
    first moments with ``"moment1"`` instead (zero for fresh units, the same
    for originals); the second moments may keep ``"copy"`` (the source's
    scale as Adam's denominator: small first steps) or take ``"moment2"``
    (zero: larger first steps, about ``lr * (1 - beta_1) / sqrt(1 - beta_2)``).
    This cannot be decided here: a split sees a role, not a side, and
    ``"copy"`` also carries state that must stay copied (a BatchNorm's
    variance). Other ``"copy"`` state (BatchNorm, depthwise kernels) is the
    source's, which keeps the function since the outgoing weights are zero.

    Args:
        width: number of units now.
        neurons: ``None`` splits every unit; integer indices select units (an
            index that appears ``r`` times gets ``r * (copies - 1)`` extra
            copies); a boolean mask of length ``width`` also works.
        copies: each selected unit becomes ``copies`` units (``1`` is a no-op).
        ratios: outgoing shares of the ``copies`` units, positive and summing
            to 1; equal shares by default. With repeated indices the shares
            are equal. Not with ``"fresh"``, whose shares are fixed.
        symmetry: ``"none"``, ``"nudge"`` (default), ``"noise"``,
            ``"asymmetric"``, ``"direction"`` or ``"fresh"`` (see above).
        eps: ``"nudge"``'s bias offset (absolute, default ``1e-3``;
            :meth:`SplitPlan.scaled` makes it relative to each unit's own
            scale, as ``fastsplit.keras.widen`` does by default), or
            ``"direction"``'s step, relative to the root mean square of each
            unit's incoming weights (default ``0.1``, at least 0). Kept in
            the plan's ``sigma`` for ``"direction"``.
        sigma: noise of ``"noise"`` (default ``0.01``) and of ``"fresh"``
            (default ``1.0``), in standard deviations of the source unit's
            incoming weights.
        seed: generator key of ``"noise"``, ``"direction"`` and ``"fresh"``
            (0 when None); the same seed gives the same draws on every backend.

    Returns:
        The plan. Cost: O(width + copies) numpy work.

    Raises:
        SplitError: naming the argument and the bad value, for every argument
            given: a width or copies that is not an integer of at least 1 (a
            float or a bool included), a seed that is not an integer, an
            unknown symmetry, an eps or sigma that is not a finite real number
            of size at most :data:`LARGEST` (sigma also non-negative, and eps
            for ``"direction"``), ratios that are not ``copies`` positive
            numbers summing to 1 or that come with ``"fresh"``, neurons out
            of range or not integers. Checked whatever the symmetry, so a bad
            value never waits for the plan to be used.
    """
    width = _integer("width", width, 1)
    copies = _integer("copies", copies, 1)
    _check_symmetry(symmetry)
    eps = _real("eps", DEFAULT_EPS.get(symmetry, DEFAULT_EPS["nudge"]) if eps is None else eps)
    sigma = _real("sigma", DEFAULT_SIGMA.get(symmetry, DEFAULT_SIGMA["noise"]) if sigma is None else sigma, 0.0)
    seed = None if seed is None else _integer("seed", seed)
    if symmetry == "direction" and eps < 0:
        raise SplitError(f"eps of symmetry='direction' must be at least 0, got {eps!r}")
    chosen = _neuron_indices(width, neurons)
    extra_per_unit = np.bincount(chosen, minlength=width) * (copies - 1)
    k = 1 + extra_per_unit  # copies of each unit, the original included

    if ratios is not None:
        if symmetry == "fresh":
            raise SplitError("ratios cannot be given with symmetry='fresh': the original keeps ratio 1 and each "
                             f"fresh unit 0, got ratios={ratios!r}")
        r = _reals("ratios", ratios).reshape(-1)
        if r.shape != (copies,):
            raise SplitError(f"ratios must have one entry per copy ({copies}), got shape {r.shape}")
        if not np.all(r > 0) or not np.all(np.isfinite(r)):
            raise SplitError(f"ratios must be positive and finite, got {r.tolist()}")
        if abs(r.sum() - 1.0) > _RATIO_SUM_TOL:
            raise SplitError(f"ratios must sum to 1, got {r.tolist()} (sum {float(r.sum())!r})")
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
    elif symmetry == "fresh":
        ratio = np.where(c == 0, 1.0, 0.0)
    else:
        ratio = 1.0 / kj
    offset = np.zeros(src.shape[0])
    if symmetry == "nudge":
        multi = kj > 1
        offset[multi] = eps * (1.0 - 2.0 * c[multi] / (kj[multi] - 1))
    scale = {"noise": sigma, "fresh": sigma, "direction": eps}.get(symmetry, 0.0)
    return SplitPlan(
        width=width,
        src=src,
        ratio=ratio,
        offset=offset,
        symmetry=symmetry,
        sigma=scale,
        seed=(0 if seed is None else seed) if symmetry in DRAWING else None,
    )
