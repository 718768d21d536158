"""Monitoring: the quantity a growth callback watches, which way it should go, and the
plateau bookkeeping of ``EarlyStopping`` / ``ReduceLROnPlateau`` (best, wait, cooldown).

An epoch whose logs lack a ``val_`` quantity because ``fit`` ran no validation
at its end (``validation_freq > 1``) is skipped, as EarlyStopping and
ReduceLROnPlateau skip it; a fit in which the quantity never appeared ends with
one warning. A quantity missing although validation ran, or a training
quantity missing, raises.
"""

from __future__ import annotations

import warnings

from keras.src.callbacks.monitor_callback import MonitorCallback

from ._args import check_choice, check_int, check_real
from ._errors import GrowthError

#: name fragments of quantities that should go up, and of those that should go down
MAX_DIRECTION = ("acc", "auc", "precision", "recall", "f1", "iou", "r2", "top_k", "true_positives")
MIN_DIRECTION = ("loss", "error", "crossentropy", "hinge", "poisson", "divergence", "false_")
#: the plateau bookkeeping saved with a checkpoint
PLATEAU_KEYS = ("best", "best_epoch", "wait", "cooldown_counter")


def direction(monitor: str) -> str | None:
    """``"min"`` or ``"max"`` read from the quantity's name, or None when the name does not say."""
    base = monitor.removeprefix("val_").lower()
    if any(k in base for k in MIN_DIRECTION):
        return "min"
    if any(k in base for k in MAX_DIRECTION):
        return "max"
    return None


def metric_names(model):
    """Names that can appear in ``logs`` without the ``val_`` prefix, or None if unknown."""
    names = {"loss"}
    cm = getattr(model, "_compile_metrics", None)
    if cm is None:
        return names
    if getattr(cm, "built", False):
        names.update(m.name for m in cm.metrics)
        return names
    user = []
    for attr in ("_user_metrics", "_user_weighted_metrics"):
        v = getattr(cm, attr, None)
        if v is None:
            continue
        if isinstance(v, dict):
            return None  # per-output metrics are named after outputs: do not guess
        for m in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(m, (list, tuple, dict)):
                return None
            user.append(m)
    for m in user:
        if isinstance(m, str):
            names.add(m)
        elif hasattr(m, "name"):
            names.add(m.name)
        elif hasattr(m, "__name__"):
            names.add(m.__name__)
        else:
            return None
    return names


class PlateauMonitor(MonitorCallback):
    """``MonitorCallback`` with the checks and the plateau bookkeeping the growth callbacks share.

    Attributes ``best``, ``wait``, ``cooldown_counter``, ``stopped_epoch`` and
    ``best_epoch`` are those of ``EarlyStopping`` / ``ReduceLROnPlateau``.
    """

    def __init__(self, *, monitor, mode, min_delta, start_from_epoch):
        check_choice("mode", mode, ("auto", "min", "max"))
        if not isinstance(monitor, str) or not monitor:
            raise GrowthError(f"monitor must be the name of a logged quantity; got monitor={monitor!r}")
        # an absolute amount: mode gives the direction (Keras takes abs() of a negative one silently)
        min_delta = check_real("min_delta", min_delta, low=0)
        start_from_epoch = check_int("start_from_epoch", start_from_epoch, 0)
        super().__init__(monitor, mode, min_delta=min_delta)
        self._min_delta_abs = min_delta
        self.start_from_epoch = start_from_epoch
        self._validated = False  # fit ran validation in this epoch (on_test_begin was called)
        self._seen = False  # the monitored quantity was in some epoch's logs of this fit
        self.reset_plateau()

    def reset_plateau(self):
        self.best = None
        self.wait = 0
        self.cooldown_counter = 0
        self.stopped_epoch = 0
        self.best_epoch = 0

    def plateau_state(self) -> dict:
        """The bookkeeping to save with a checkpoint (``PLATEAU_KEYS``), JSON-able."""
        return {
            "best": None if self.best is None else float(self.best),
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_plateau_state(self, state: dict):
        for key in PLATEAU_KEYS:
            setattr(self, key, state[key])

    def _check_monitor(self, model):
        """Before the first batch: an unknown monitor raises; the direction is fixed when the name tells it."""
        names = metric_names(model) if self.mode == "auto" else None
        base = self.monitor.removeprefix("val_")
        if names is not None and base not in names and self.monitor not in names:
            raise GrowthError(
                f"{type(self).__name__}: unknown monitor={self.monitor!r}; the model logs "
                f"{sorted(names)} (and val_ versions with validation data)"
            )
        if self.monitor_op is None:
            from keras import ops

            way = self.mode if self.mode != "auto" else direction(self.monitor)
            if way is None:
                try:
                    self._set_monitor_op()
                except ValueError:
                    return  # decided at the first epoch end, once the metrics are built
            else:
                self.monitor_op = ops.less if way == "min" else ops.greater
        self.min_delta = -self._min_delta_abs if self._op_is_less() else self._min_delta_abs

    def _op_is_less(self):
        from keras import ops

        return self.monitor_op is ops.less

    # ------------------------------------------------- which epochs hold the monitored value
    def begin_monitoring(self):
        """At the start of ``fit``: no epoch has shown the monitored quantity yet."""
        self._seen = False
        self._validated = False

    def on_epoch_begin(self, epoch, logs=None):
        self._validated = False

    def on_test_begin(self, logs=None):
        # fit() passes its callbacks to the evaluate() of its validation step, so this says
        # that the epoch now ending validated (and its logs should hold the val_ quantities)
        self._validated = True

    def _monitor_value(self, logs) -> float | None:
        """The monitored value in ``logs``, or None for an epoch that ran no validation (skip it).

        Raises ``GrowthError`` naming what the logs hold when a training quantity is
        missing, or a ``val_`` quantity is missing although validation ran.
        """
        if self.monitor not in logs:
            if self.monitor.startswith("val_") and not self._validated:
                return None  # validation_freq > 1, or no validation data at all: warned at train end
            where = "validation ran at this epoch's end, but " if self.monitor.startswith("val_") else ""
            raise GrowthError(
                f"{type(self).__name__}: {where}monitor={self.monitor!r} is not in the logs "
                f"({', '.join(sorted(logs))})"
            )
        if self.monitor_op is None:
            try:
                self._set_monitor_op()
            except ValueError:
                raise GrowthError(
                    f"{type(self).__name__}: cannot tell whether monitor={self.monitor!r} should go up or down; "
                    "pass mode='max' or mode='min'"
                ) from None
            self.min_delta = -self._min_delta_abs if self._op_is_less() else self._min_delta_abs
        self._seen = True
        return float(logs[self.monitor])

    def warn_if_unseen(self, what: str):
        """At the end of ``fit``: one warning when no epoch's logs held the monitored quantity.

        ``what`` says what the callback could therefore not do.
        """
        if self._seen:
            return
        warnings.warn(
            f"{type(self).__name__}: monitor={self.monitor!r} was in the logs of no epoch of this fit, so it "
            f"{what}. Pass validation_data (or validation_split) to fit() to monitor a val_ quantity, with a "
            "validation_freq that validates within the epochs",
            stacklevel=3,
        )

    def _improved(self, epoch, current) -> bool:
        """EarlyStopping's bookkeeping: True (and ``best``, ``best_epoch`` updated) when ``current`` improves."""
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            return True
        return False
