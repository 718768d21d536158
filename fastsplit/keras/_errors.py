"""The one error type of ``fastsplit.keras``."""

from __future__ import annotations


class GrowthError(ValueError):
    """A growth, prune or merge that fastsplit.keras refuses, or bad arguments to it.

    The message names the layer or value and the reason. Whenever it is raised
    by ``widen``, ``prune``, ``merge_twins`` or a callback's growth event, the
    model, its optimizer and its history are exactly as they were. A subclass
    of ``ValueError``, as :class:`fastsplit.SplitError` is in the core.
    """


__all__ = ["GrowthError"]
