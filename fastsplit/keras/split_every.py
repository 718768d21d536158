"""SplitEvery: grow the model on a fixed schedule."""

from __future__ import annotations

from ._args import check_int
from ._growing import GrowthCallback


class SplitEvery(GrowthCallback):
    """Widen the model in place every ``epochs`` epochs.

    At the end of epoch ``start_from_epoch + epochs - 1`` and every ``epochs``
    epochs after it, the chosen units of every growing layer are split into two
    copies (:func:`fastsplit.keras.widen`, optimizer state carried), and training
    goes on in the same ``fit`` call. Everything else is as in
    :class:`SplitOnPlateau`, whose arguments these are.

    Args:
        epochs: the period, in epochs (>= 1).
        start_from_epoch: epochs before the schedule starts.
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

    def __init__(
        self,
        epochs,
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
    ):
        self.epochs = check_int("epochs", epochs, 1)
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
        added = 0
        if epoch >= self.start_from_epoch and (epoch + 1 - self.start_from_epoch) % self.epochs == 0:
            if self.grow(epoch, logs, current) is not None:
                added = self.last_added
            elif self.stop_when_grown:
                self._stop(epoch)
        self._log(epoch, logs, added)
