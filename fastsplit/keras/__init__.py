"""Keras 3 integration: widen live models, grow them while they train.

``widen(model, plans)`` splits units of a built Functional or Sequential model
in place (the same object keeps training, saving and predicting);
``coupled_groups(model)`` shows which units must be split together;
``history(model)`` lists the growth events, also after saving and loading.
Works with the TensorFlow, JAX and PyTorch Keras backends.
"""

from ._errors import GrowthError
from ._event import GrowthEvent, LayerGrowth
from ._history import GrownFunctional, GrownSequential, history
from ._rules import register_rule
from ._units import CoupledGroup
from ._widen import widen


def coupled_groups(model) -> list[CoupledGroup]:
    """The groups of units that must be split together, in graph order.

    Every producing layer (Dense, Conv, ConvTranspose, SeparableConv, also
    inside nested models and traced custom layers) is in exactly one group.
    Each :class:`CoupledGroup` lists its producing layers (one plan splits them
    all: a layer alone, or every layer feeding one residual stream through
    ``Add``, ``+`` and friends), its width, the layers it touches, its
    consumers, the layers that need uniform copies (LayerNormalization,
    RMSNormalization, GroupNormalization across the units) and, when it cannot
    be split, why (``refused``; ``group.splittable`` is ``not refused``).

    Cost: one walk over the model's graph; no weights are read.
    """
    from ._graph import Graph

    return Graph(model).groups()


__all__ = ["CoupledGroup", "GrowthError", "GrownFunctional", "GrownSequential", "GrowthEvent", "LayerGrowth",
           "coupled_groups", "history", "register_rule", "widen"]

# --- growing while training (callbacks) ---
from .split_every import SplitEvery  # noqa: E402
from .split_on_plateau import SplitOnPlateau  # noqa: E402
from .split_on_slope import SplitOnSlope  # noqa: E402

__all__ += ["SplitEvery", "SplitOnPlateau", "SplitOnSlope"]

# --- dead units: find them, prune them, merge twins ---
from ._prune import merge_twins, prune  # noqa: E402
from ._stats import UnitStats, dead_units, unit_stats  # noqa: E402

__all__ += ["UnitStats", "dead_units", "merge_twins", "prune", "unit_stats"]
