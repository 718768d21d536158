"""fastsplit: grow neural networks while they train, by splitting units into exact copies.

A hidden unit with incoming weights ``w``, bias ``b`` and outgoing weights ``v``
becomes ``k`` units with the same ``w`` and ``b`` and outgoing weights
``r_1 v ... r_k v`` where ``r_1 + ... + r_k = 1``: the next layer sees the same
input, so the network computes the same function with more capacity.
"""

from . import backends
from ._core import Job, split, split_many
from ._errors import SplitError
from .compact import CompactPlan, compact_plan
from .plan import SplitPlan, plan

__version__ = "0.1.0"

__all__ = ["CompactPlan", "Job", "SplitError", "SplitPlan", "__version__", "backends", "compact_plan", "plan", "split",
           "split_many"]
