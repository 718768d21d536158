"""The growth history of a model, kept through ``model.save`` / ``keras.models.load_model``.

The first ``widen`` of a plain ``keras.Model`` (Functional) or ``keras.Sequential``
moves it to a registered subclass, ``fastsplit>GrownFunctional`` or
``fastsplit>GrownSequential``, which adds ``"fastsplit_history"`` (a list of
:meth:`GrowthEvent.to_dict`) to ``get_config`` and reads it back in
``from_config``. The subclasses add nothing else. Loading a grown model needs
``import fastsplit.keras`` first, as for any registered Keras object; both the
``.keras`` format and the legacy ``.h5`` format load it.

A saved history is checked when it is loaded: a malformed one raises
:class:`GrowthError` from ``load_model``, naming the entry and field, before the
model is built. The history also brings back widths that no config holds: a
keras_hub backbone's config is its constructor arguments (``hidden_dim``,
``num_heads``), which cannot say that ``key_dim`` grew, and a user's block that
makes its sublayers in ``__init__`` saves only those arguments; such layers are
rebuilt at their first widths, and ``from_config`` replays the saved events on
them by shape (``_replay.restore_widths``) before Keras loads the weights.
"""

from __future__ import annotations

import keras
from keras.src.models.functional import Functional

from ._errors import GrowthError
from ._event import GrowthEvent, check_event_dict
from ._replay import check_at, locate, restore_widths, unbuilt

KEY = "fastsplit_history"


def _get(model) -> list:
    return getattr(model, "_fastsplit_history", None) or []


class _SavesHistory:
    """Adds the growth history to a model's config and reads it back (the history survives save/load)."""

    def get_config(self):
        config = super().get_config()
        config[KEY] = list(_get(self))
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        hist = check_history(config.pop(KEY, []), config.get("name"))
        model = super().from_config(unbuilt(config) if hist else config, custom_objects=custom_objects)
        # before Keras loads the weights: layers whose config cannot say how they grew come back small
        restore_widths(model, hist, config.get("name"))
        model._fastsplit_history = list(hist)
        return model


@keras.saving.register_keras_serializable(package="fastsplit")
class GrownFunctional(_SavesHistory, Functional):
    """A Functional model that ``fastsplit.keras.widen`` has grown (adds the history to its config)."""


@keras.saving.register_keras_serializable(package="fastsplit")
class GrownSequential(_SavesHistory, keras.Sequential):
    """A Sequential model that ``fastsplit.keras.widen`` has grown (adds the history to its config)."""


# The legacy .h5 format writes the top-level model's class as its bare ``__name__`` and looks that up
# among the custom objects (keras.src.legacy.saving.saving_utils.model_metadata), where
# register_keras_serializable put only "fastsplit>GrownFunctional": without these two names a grown
# model saved as .h5 does not load. Nested grown models are written by registered name.
keras.saving.get_custom_objects().update({cls.__name__: cls for cls in (GrownFunctional, GrownSequential)})

_GROWN = {Functional: GrownFunctional, keras.Sequential: GrownSequential, keras.Model: GrownFunctional}


def record(model, event: GrowthEvent) -> None:
    """Append ``event`` to the model's history (and make the history part of its config)."""
    hist = list(_get(model))
    entry = event.to_dict()
    for path, lg in entry["layers"].items():
        lg["at"] = locate(model, path)  # names may change when the model is rebuilt; child indices do not
    hist.append(entry)
    model._fastsplit_history = hist
    grown = _GROWN.get(type(model))
    if grown is not None:
        model.__class__ = grown
    elif not isinstance(model, (GrownFunctional, GrownSequential)) and "get_config" not in vars(model):
        # a user's subclass: the history goes into the saved config, but only a
        # registered class can read it back
        plain = model.get_config

        def get_config():
            config = plain()
            config[KEY] = list(_get(model))
            return config

        model.get_config = get_config


def check_history(hist, model_name=None) -> list:
    """``hist`` (a saved ``"fastsplit_history"``) when it is a list of :meth:`GrowthEvent.to_dict` dicts.

    Raises ``GrowthError`` naming the model, the entry and the field otherwise.
    Cost: O(events + layers + neurons).
    """
    whose = f" of model {model_name!r}" if isinstance(model_name, str) else ""
    try:
        if not isinstance(hist, list):
            raise GrowthError(f"{KEY} must be a list of GrowthEvent dicts; got {type(hist).__name__} {hist!r:.200}")
        for i, d in enumerate(hist):
            check_event_dict(d, f"{KEY}[{i}]")
            for path, lg in d.get("layers", {}).items():
                check_at(lg.get("at"), f"{KEY}[{i}]['layers'][{path!r}]")
    except GrowthError as e:
        raise GrowthError(f"the saved growth history{whose} is malformed: {e}") from None
    return hist


def history(model) -> list[GrowthEvent]:
    """The growth events of ``model``, oldest first (also after ``keras.models.load_model``)."""
    return [GrowthEvent.from_dict(d) for d in _get(model)]
