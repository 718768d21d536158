"""Where split units sit: plan expressions and the records of the graph walk.

A tensor's unit axis is labelled with a *reference* to the group(s) whose units
it holds (:class:`GroupRef`, or :class:`ConcatRef` for a concatenation) and with
:class:`Units`, the axis and its layout. :func:`evaluate` turns a reference into
the plan of that axis once the groups' plans are chosen. Plain data, no Keras.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..compact import CompactPlan
from ..compact import concat as compact_concat
from ..compact import identity as compact_identity
from ..plan import SplitPlan

# -- plan expressions ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupRef:
    """The units of group ``gid``; each unit repeated ``expand`` times (DepthwiseConv multiplier).

    ``first``: a consumer that reads each unit's first copy only (:func:`first_copy_only`).
    """

    gid: int
    width: int
    expand: int = 1
    first: bool = False


@dataclasses.dataclass(frozen=True)
class ConcatRef:
    """A concatenation along the unit axis: ``parts`` are (GroupRef | ConcatRef | None, width)."""

    parts: tuple


def identity_plan(width: int, like=None):
    """The plan that keeps all ``width`` units, of the kind of ``like`` (a SplitPlan unless it is a CompactPlan)."""
    if isinstance(like, CompactPlan):
        return compact_identity(width)
    return SplitPlan(width, np.arange(width), np.ones(width), np.zeros(width))


def expand_plan(plan, k: int):
    """Each unit ``u`` read as ``k`` consecutive channels ``u*k .. u*k+k-1`` (no bias offsets)."""
    if isinstance(plan, CompactPlan):
        return plan.expand(k)
    if k == 1:
        return plan
    q = np.arange(k)
    src = (plan.src[:, None] * k + q[None, :]).reshape(-1)
    ratio = np.repeat(plan.ratio, k)
    return SplitPlan(plan.width * k, src, ratio, np.zeros(src.shape[0]), plan.symmetry, plan.sigma, plan.seed)


def first_copy_only(plan):
    """``plan`` as its consumers see it when all outgoing weight stays on each unit's first copy.

    The ratios become 1 on the first copy and 0 on the others, as a ``"fresh"`` plan's (the only
    kind that may hold zero ratios; only its incoming weights draw, so on a consumer it is these
    ratios and nothing else). For a unit whose copies must not be read (a rotary embedding turns
    them at other frequencies, ``in_place``).
    """
    if isinstance(plan, CompactPlan):
        return plan
    ratio = np.where(plan.is_copy, 0.0, 1.0)
    return SplitPlan(plan.width, plan.src, ratio, np.zeros(plan.new_width), "fresh", 0.0, plan.seed)


def in_place(plan):
    """``plan`` with each unit's copies right after it (``src`` = ``repeat(arange(n), m)``), or None.

    None when the units do not all get the same number of copies ``m``. A unit's copies keep
    their order (the first is still the original) with their ratios and offsets. Where a
    unit's position on the axis carries meaning — a rotary embedding turns dimension ``i`` of
    each half of a head of size ``d`` at frequency ``base^(-2i/d)`` — old unit ``i`` then sits at
    ``m*i`` in a head of ``m*d`` and keeps its frequency. Cost: O(new width) numpy work.
    """
    counts = plan.counts
    if len(set(counts.tolist())) != 1:
        return None
    order = np.argsort(plan.src, kind="stable")
    return SplitPlan(plan.width, plan.src[order], plan.ratio[order], plan.offset[order], plan.symmetry,
                     plan.sigma, plan.seed)


def concat_plans(parts: list):
    """The plan of a concatenated axis: each part's new units take the place of its old ones."""
    if any(isinstance(p, CompactPlan) for p in parts):
        return compact_concat(parts)
    srcs, ratios, offsets, off = [], [], [], 0
    for p in parts:
        srcs.append(p.src + off)
        ratios.append(p.ratio)
        offsets.append(p.offset)
        off += p.width
    first = next((p for p in parts if not p.is_identity), parts[0])
    return SplitPlan(off, np.concatenate(srcs), np.concatenate(ratios), np.concatenate(offsets),
                     first.symmetry, first.sigma, first.seed)


def same_plan(a, b) -> bool:
    """Whether two plans (both SplitPlans or both CompactPlans) do the same to an axis."""
    if isinstance(a, CompactPlan) or isinstance(b, CompactPlan):
        return (type(a) is type(b) and a.width == b.width and np.array_equal(a.src, b.src)
                and a.merge == b.merge)
    return (a.width == b.width and np.array_equal(a.src, b.src) and np.array_equal(a.ratio, b.ratio)
            and np.array_equal(a.offset, b.offset))


def evaluate(ref, plans: dict, find):
    """The plan of a tensor's unit axis given the plans of the groups changed now (None: unchanged).

    ``plans`` maps root gids to :class:`SplitPlan` (widen) or :class:`fastsplit.CompactPlan` (prune,
    merge_twins), all of one kind; the result is of that kind.
    """
    if isinstance(ref, GroupRef):
        p = plans.get(find(ref.gid))
        if p is None:
            return None
        return expand_plan(first_copy_only(p) if ref.first else p, ref.expand)
    subs = [(None if sub is None else evaluate(sub, plans, find), width) for sub, width in ref.parts]
    like = next((p for p, _ in subs if p is not None), None)
    if like is None:
        return None
    parts = [identity_plan(width, like) if p is None else p for p, width in subs]
    if len(parts) == 1:
        return parts[0]
    return concat_plans(parts)


def groups_of(ref, find) -> set[int]:
    if ref is None:
        return set()
    if isinstance(ref, GroupRef):
        return {find(ref.gid)}
    out = set()
    for sub, _ in ref.parts:
        out |= groups_of(sub, find)
    return out


def new_length(old: int, plan) -> int:
    """The new length of an axis of ``old`` entries that holds ``old // plan.width`` positions of the units."""
    return old // plan.width * plan.new_width


# -- graph records ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Units:
    """Where the units sit: ``axis`` of a tensor of rank ``rank`` (batch axis 0).

    An axis may hold ``positions * width`` entries, read positions × units
    (``channels="last"``: entry ``p * width + u``) or units × positions
    (``"first"``: entry ``u * positions + p``).
    """

    axis: int
    rank: int
    positions: int = 1
    channels: str = "last"


@dataclasses.dataclass
class Label:
    ref: Any  # GroupRef | ConcatRef
    units: Units


@dataclasses.dataclass
class Use:
    """One variable touched when the group(s) in ``ref`` are split.

    ``kind``: ``"incoming"`` (producer kernel, output axis), ``"bias"`` (producer
    bias or a normaliser's beta that carries the symmetry offsets), ``"state"``
    (per-unit parameter or statistic between producer and consumer, producing
    side) or ``"outgoing"`` (consumer kernel, input axis). ``fold`` is set on an
    ``"outgoing"`` kernel that maps its input linearly to its output channels
    (Dense, Conv, ConvTranspose): ``prune`` can fold a removed unit's constant
    value into that layer's bias through it. ``factor``, when set, is ``factor(plan)``: a
    constant the tensor is multiplied by as well (``Job.factor``; the query kernel of an
    attention layer whose head size grows takes √(k'/k)).
    """

    layer: Any
    path: str
    attr: str  # name of the weight in the layer (for messages)
    var: Any
    axis: int
    kind: str
    ref: Any
    channels: str = "last"
    fold: bool = False
    factor: Any = None
    length: int = dataclasses.field(init=False, default=0)  # the axis's length before the edit

    def __post_init__(self):
        self.length = int(self.var.shape[self.axis])


@dataclasses.dataclass
class Op:
    """One call of a layer or ``keras.ops`` operation in the flattened graph."""

    layer: Any
    path: str
    inputs: list  # tensor keys
    outputs: list
    node: Any = None


@dataclasses.dataclass
class TensorInfo:
    key: Any
    shape: tuple
    kt: Any = None  # the KerasTensor, when there is one


@dataclasses.dataclass
class CoupledGroup:
    """Units that must be split together (see ``coupled_groups``).

    Attributes:
        name: what ``widen`` and the callbacks' ``layers=`` call the group: its first producer's
            path, followed by ``/dimension`` for a layer with more than one growable dimension
            (``block_0/attention/heads``).
        producers: names of the layers (``path`` or ``path/dimension``) whose units form the
            group, in graph order; any of them names the group.
        width: the number of units.
        layers: every layer touched when the group is split (producers, per-unit
            state, pass-through, consumers).
        consumers: layers whose incoming weights receive the units.
        refused: why the group cannot be split (empty when it can).
        uniform: layers that require every unit to get the same number of copies.
        in_place: layers that read each unit at its position on the axis (a rotary embedding):
            every unit gets the same number of copies, placed right after it (:func:`in_place`),
            and their consumers read the first copy only; nothing is removed or merged.
    """

    name: str
    producers: list
    width: int
    layers: list
    consumers: list
    refused: list
    uniform: list
    in_place: list = dataclasses.field(default_factory=list)
    gid: int = -1

    @property
    def splittable(self) -> bool:
        return not self.refused

    @property
    def removable(self) -> bool:
        """Units may be removed or merged: splittable, and no layer normalises across them or reads them at
        their positions (pruning's and merging's refusals, ``_prune._refuse``, say which)."""
        return not (self.refused or self.uniform or self.in_place)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("gid")
        return d
