"""SplitEvery: grow the model on a fixed schedule."""

from __future__ import annotations

import numpy as np

from ._args import check_int
from ._errors import GrowthError
from ._growing import GrowthCallback


class SplitEvery(GrowthCallback):
    """Widen the model in place every ``epochs`` epochs, or every ``steps`` training steps.

    At the end of epoch ``start_from_epoch + epochs - 1`` and every ``epochs``
    epochs after it, the chosen units of every growing layer are split into two
    copies (:func:`fastsplit.keras.widen`, optimizer state carried), and training
    goes on in the same ``fit`` call. With ``steps`` instead, the split happens
    after every ``steps``-th optimizer step (``optimizer.iterations``), in the
    middle of an epoch if it falls there: for runs whose epochs are long, or
    schedules stated in steps. Everything else is as in
    :class:`SplitOnPlateau`, whose arguments these are.

    Args:
        epochs: the period, in epochs (>= 1); give this or ``steps``.
        steps: the period, in training steps (>= 1); give this or ``epochs``.
            The epoch's logs then hold ``split``, the units added during it.
        start_from_epoch: epochs before the schedule starts.
        rewarm_steps: as in :class:`SplitOnPlateau`.
        layers, select, score, symmetry, max_units, max_params, eps, probe,
            seed, backup_dir, prune_dead, prune_data, verbose: as in
            :class:`SplitOnPlateau` (with ``prune_dead``, dead units are
            removed at each scheduled event, before the split).
        stop_when_grown: stop training at the first scheduled growth that finds
            every layer capped (default False: train on at full size).
        monitor, mode: the quantity shown in the growth line and tracked for
            ``restore_best_weights``; a missing one is simply not shown.
        min_delta: what counts as an improvement for ``restore_best_weights``.
        restore_best_weights: as in :class:`SplitOnPlateau` (needs ``monitor``
            in the logs; epochs that ran no validation are skipped, and a fit
            whose logs never held it ends with a warning).

    Cost: as :class:`SplitOnPlateau`.
    """

    _epoch = 0

    def __init__(
        self,
        epochs=None,
        start_from_epoch=0,
        layers=None,
        select="all",
        score="change",
        symmetry="fresh",
        max_units=None,
        max_params=None,
        stop_when_grown=False,
        restore_best_weights=False,
        verbose=1,
        *,
        monitor="val_accuracy",
        mode="auto",
        min_delta=0.0,
        eps=None,
        probe=None,
        seed=None,
        backup_dir=None,
        prune_dead=False,
        prune_data=None,
        steps=None,
        rewarm_steps=0,
    ):
        if (epochs is None) == (steps is None):
            raise GrowthError(f"SplitEvery needs exactly one of epochs= and steps=, got epochs={epochs!r}, "
                              f"steps={steps!r}")
        self.epochs = None if epochs is None else check_int("epochs", epochs, 1)
        self.steps = None if steps is None else check_int("steps", steps, 1)
        super().__init__(
            monitor=monitor,
            mode=mode,
            min_delta=min_delta,
            start_from_epoch=start_from_epoch,
            layers=layers,
            select=select,
            score=score,
            symmetry=symmetry,
            eps=eps,
            max_units=max_units,
            max_params=max_params,
            stop_when_grown=stop_when_grown,
            restore_best_weights=restore_best_weights,
            verbose=verbose,
            probe=probe,
            seed=seed,
            backup_dir=backup_dir,
            prune_dead=prune_dead,
            prune_data=prune_data,
            rewarm_steps=rewarm_steps,
        )

    def _check_monitor(self, model):
        if self.restore_best_weights:
            super()._check_monitor(model)

    @property
    def _unmonitored(self):
        return "had no best epoch to restore" if self.restore_best_weights else None

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        current = None
        if self.monitor in logs or self.restore_best_weights:
            # None for an epoch that ran no validation (validation_freq > 1): nothing to track
            current = self._monitor_value(logs)
            if current is not None:
                self._track_best(epoch, current)
        if self.epochs is not None and epoch >= self.start_from_epoch and \
                (epoch + 1 - self.start_from_epoch) % self.epochs == 0:
            if self.grow(epoch, logs, current) is None and self.stop_when_grown:
                self._stop(epoch)
        self._log(epoch, logs, self._added_in_epoch)

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.steps is None or self._epoch < self.start_from_epoch:
            return
        if int(np.asarray(self.model.optimizer.iterations)) % self.steps == 0:
            self._sync()
            if self.grow(self._epoch, logs) is None and self.stop_when_grown:
                self._stop(self._epoch)
