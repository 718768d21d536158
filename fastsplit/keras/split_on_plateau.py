"""SplitOnPlateau: grow the model when a monitored metric stops improving."""

from __future__ import annotations

from ._args import check_int
from ._growing import GrowthCallback


class SplitOnPlateau(GrowthCallback):
    """Widen the model in place when a monitored metric has stopped improving.

    At the end of every epoch the monitored value is compared with the best so
    far, as in ``keras.callbacks.EarlyStopping``. When it has not improved by
    ``min_delta`` for ``patience`` epochs, the chosen units of every growing layer
    are split into two copies (:func:`fastsplit.keras.widen`, optimizer state
    carried) and training goes on in the same ``fit`` call. The defaults
    reproduce the original article: watch ``val_accuracy``, and double every
    hidden unit as soon as it improves by less than one point.

    Args:
        monitor: quantity in ``logs`` to watch (``"val_accuracy"``; ``"val_loss"``,
            ``"accuracy"``, any compiled metric, ``val_`` or not).
        min_delta: smallest change that counts as an improvement (absolute, >= 0;
            ``mode`` gives the direction).
        patience: epochs without improvement after which the model grows; 0 and
            1 both grow at the first epoch without improvement, as in EarlyStopping.
        mode: ``"auto"``, ``"min"`` or ``"max"``: whether the monitored quantity
            should go down or up; ``"auto"`` infers it from the name.
        cooldown: epochs after a growth event during which it does not grow again.
        start_from_epoch: epochs to wait before watching (warm-up).
        layers: names of the producing layers that may grow; ``None``: every hidden
            Dense/Conv layer whose units can be split, never the output layer.
        select: which units of a layer split: ``"all"`` (double the layer), a
            fraction ``0 < f <= 1`` (the top ``ceil(f * units)`` by score), an
            integer ``k`` (the top k), or ``("threshold", t)`` (every unit whose
            score exceeds ``t``; the article's "threshold loss").
        score: how units are ranked: ``"change"`` (how far their incoming weights
            moved during the last epoch), ``"gradient"`` (gradient norm on
            ``probe``), ``"optimizer"`` (the optimizer's second-moment slots),
            ``"activation"`` (mean absolute activation on ``probe``), or a callable
            ``fn(layer, model) -> scores`` with one number per unit.
        symmetry: how the new units differ from the ones they come from:
            ``"fresh"`` (default: new units with random incoming weights at
            the scale of the source unit's and zero outgoing weights, exact),
            ``"direction"`` (copies moved ``±eps`` along one shared direction,
            second order), ``"nudge"`` (bias offsets, relative to each unit),
            ``"noise"`` (Net2Net noise on the copies' incoming weights),
            ``"asymmetric"`` (unequal outgoing shares, exact) or ``"none"``
            (exact copies). ``"fresh"`` is the default because under Adam,
            AdamW and RMSprop the copies of every other symmetry stay twins
            and the grown model computes no more than before (README,
            "Symmetry breaking"). A layer whose units reach a layer that
            normalises across them (``LayerNormalization`` over the units)
            uses ``"direction"`` instead, with a ``RuntimeWarning`` when
            ``fit`` starts: fresh units would change that layer's mean and variance.
        max_units: largest width a layer may reach (an int for every layer, or a
            dict layer name -> int). A layer at its cap stops growing; one near
            it splits only its best-scoring units.
        max_params: largest parameter count of the whole model; a growth event
            that would pass it splits fewer units (the same fraction of each layer).
        stop_when_grown: when the model cannot grow any more (every layer capped)
            and the plateau persists, stop training, like EarlyStopping.
        restore_best_weights: at the end of training, go back to the weights of
            the best epoch; if the model grew since, they are split the same way
            (exactly: copies without their nudges or offsets, fresh units with
            zero outgoing weights again), so the grown model computes the best
            epoch's function. Units pruned since (``prune_dead``) are folded
            the same way as at the prune, which is exact only if they were
            already dead at the best epoch (a ``RuntimeWarning`` says when not).
        verbose: 0 silent; 1 prints one line per growth event (epoch, layer,
            old → new units, parameters, monitored value), one per prune, and
            when it stops.
        eps: an absolute bias offset (>= 0) for ``symmetry="nudge"`` (the article's 1e-3),
            or the step of ``"direction"``; refused with any other symmetry, the
            default ``"fresh"`` included, which would ignore it. By default
            (None) each unit's nudge is 1e-3 of its own scale, as in ``widen``,
            and the direction's step 0.1.
        probe: held-back data for ``score="gradient"`` (``(x, y)``) and
            ``score="activation"`` (``x`` or ``(x, y)``); also the data of
            ``prune_dead`` when ``prune_data`` is not given.
        seed: seed (an integer >= 0) of the draws of ``"fresh"``, ``"noise"`` and
            ``"direction"`` (each event uses ``seed + event index``; None: the event index).
        backup_dir: the ``backup_dir`` of a ``keras.callbacks.BackupAndRestore`` in
            the same ``fit``: the callback saves its own state there each epoch
            and, when a killed run restarts, widens the fresh model to the
            checkpoint's widths before BackupAndRestore loads it. List this
            callback before BackupAndRestore (and CSVLogger), so that their
            epoch end sees the grown model and its logs.
        prune_dead: at each growth event, first remove the units of the growing
            layers that are dead on ``prune_data`` (zero or constant on every
            sample: :func:`fastsplit.keras.dead_units`) with
            :func:`fastsplit.keras.prune` (their constant value folded into the
            next layer's bias, optimizer slots of the kept units carried), then
            spend ``select``, ``max_units`` and ``max_params`` on splitting the
            smaller model. A layer that is all dead keeps one unit. A prune is
            its own event in ``events`` (``event_kinds`` says ``"prune"``).
        prune_data: the data on which units are judged dead: ``x`` or
            ``(x, y)`` numpy arrays, e.g. the training inputs (a unit dead on a
            small sample may fire on other inputs). Default: ``probe``.
            ``prune_dead=True`` without either raises ``GrowthError``.
        rewarm_steps: after each split, the learning rate climbs linearly from
            0 back to its value over this many steps (default 0: none). A float
            rate is assigned step by step and given back at the end; a
            ``LearningRateSchedule`` is multiplied by the ramp, then unwrapped.

    Attributes:
        events: one ``GrowthEvent`` per growth event, in order; with
            ``prune_dead`` a growth event that pruned adds two: the prune
            (``new_width < old_width``, ``neurons`` = the removed units), then the split.
        event_epochs: the (0-based) epoch at whose end each event happened.
        event_kinds: ``"prune"`` or ``"split"`` for each event.
        best, wait, cooldown_counter, stopped_epoch, best_epoch: as in
            EarlyStopping / ReduceLROnPlateau.

    Each epoch it adds to ``logs`` (so ``History``, ``CSVLogger`` and ``TensorBoard``
    record them): ``units/<layer>`` the width of each growing layer after this
    epoch, ``params`` the model's parameter count, ``split`` the units added
    at this epoch's end, and with ``prune_dead`` ``pruned`` the units removed.

    An epoch whose logs lack a ``val_`` monitor because ``fit`` did not validate
    at its end (``validation_freq=2``) is skipped: it neither counts towards
    ``patience`` and ``cooldown`` nor grows, as in ``EarlyStopping``. A fit
    whose logs never held the monitor ends with a warning.

    Raises:
        GrowthError: (a ``ValueError``) naming the value, for a bad argument
            (here), or at the start of ``fit`` for an unknown monitor, a layer
            that cannot grow, or a score the optimizer cannot give; at an
            epoch's end for a monitor missing from logs that should hold it.

    Cost: nothing per batch; per epoch a copy of each growing kernel with
    ``score="change"``; per growth event one ``widen`` call plus the score;
    with ``prune_dead`` one inference pass over ``prune_data`` per growth event,
    plus one ``prune`` call when a unit is dead.
    """

    def __init__(
        self,
        monitor="val_accuracy",
        min_delta=0.01,
        patience=0,
        mode="auto",
        cooldown=0,
        start_from_epoch=0,
        layers=None,
        select="all",
        score="change",
        symmetry="fresh",
        max_units=None,
        max_params=None,
        stop_when_grown=True,
        restore_best_weights=False,
        verbose=1,
        *,
        eps=None,
        probe=None,
        seed=None,
        backup_dir=None,
        prune_dead=False,
        prune_data=None,
        rewarm_steps=0,
    ):
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
        self.patience = check_int("patience", patience, 0)
        self.cooldown = check_int("cooldown", cooldown, 0)

    def in_cooldown(self):
        return self.cooldown_counter > 0

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        current = self._monitor_value(logs)
        # an epoch that ran no validation (validation_freq > 1) counts for nothing, as in EarlyStopping
        if current is not None and epoch >= self.start_from_epoch:
            cooling = self.in_cooldown()  # this epoch is one of the `cooldown` epochs after a growth event
            if cooling:
                self.cooldown_counter -= 1
                self.wait = 0
            if self._track_best(epoch, current):
                self.wait = 0
            elif not cooling:
                self.wait += 1
                if self.wait >= self.patience and epoch > 0:
                    if self.grow(epoch, logs, current) is not None:
                        self.wait = 0
                        self.cooldown_counter = self.cooldown
                    elif self.stop_when_grown:
                        self._stop(epoch)
        self._log(epoch, logs, self._added_in_epoch)
