"""SplitOnSlope: grow the model when the smoothed training loss stops falling fast enough, checked every step."""

from __future__ import annotations

from collections import deque

from ._args import check_int, check_real
from ._errors import GrowthError
from ._growing import GrowthCallback


class SplitOnSlope(GrowthCallback):
    """Widen the model in place, mid-epoch, when the smoothed training loss has flattened out.

    After every training step the callback updates an exponential moving average
    of the per-step loss; once it holds ``window + 1`` values, it compares the
    newest with the one ``window`` steps earlier. When the relative improvement
    per step, ``(old - new) / (window * |old|)`` (the other way round for a
    quantity that should go up), is below ``threshold``, the chosen units of
    every growing layer are split as by :class:`SplitOnPlateau` and training
    goes on. The staged-training and LEMON results grow on such a loss-slope
    trigger, early, rather than after convergence (DESIGN.md, "When and where to grow").

    The average and the window start afresh ``warmup_steps`` steps into the fit
    and ``cooldown_steps`` steps after each event, so the first event comes
    after step ``warmup_steps + window + 1`` at the earliest, and the next one
    at least ``cooldown_steps + window + 1`` steps later, on the grown model's own slope.

    ``fit`` logs the epoch's running mean at each step; the callback recovers
    each step's loss from it (``(b+1)·mean_b − b·mean_{b−1}``: exact for equal
    batches, a short last batch weighs as a full one). With
    ``steps_per_execution > 1`` a call covers several steps and adds their mean.

    Args:
        threshold: the smallest relative improvement per step that is still
            progress (>= 0); below it the model grows. ``1e-3`` over a window of
            50 steps: grow when the loss fell by less than 5 % in 50 steps.
        window: steps the slope is measured over (>= 1).
        smoothing: the weight of the past in the moving average, in [0, 1)
            (0: the raw per-step loss); bias-corrected as in Adam.
        warmup_steps: steps at the start of the fit before watching.
        cooldown_steps: steps after an event before watching again.
        monitor: the training quantity whose slope is watched (``"loss"``, or a
            compiled metric such as ``"accuracy"``; not a ``val_`` one, which
            has no per-step value).
        mode: ``"auto"``, ``"min"`` or ``"max"``, as in :class:`SplitOnPlateau`.
        stop_when_grown: stop training at the first trigger that finds every
            layer capped (default False: train on at full size).
        rewarm_steps: as in :class:`SplitOnPlateau`: the learning rate (a float
            or a schedule) climbs back from 0 over this many steps after each event.
        layers, select, score, symmetry, max_units, max_params, eps, probe,
            seed, backup_dir, prune_dead, prune_data, verbose: as in
            :class:`SplitOnPlateau` (a resumed run starts its window afresh).

    Attributes:
        events, event_epochs, event_kinds: as in :class:`SplitOnPlateau`.
        event_steps: the step (counted from the start of the fit, 1-based)
            after which each growth event happened.
        slope: the last relative improvement per step measured (None before
            the window is full).

    Each epoch's logs get ``units/<layer>``, ``params`` and ``split`` (the
    units added during the epoch), as with :class:`SplitEvery`.

    Cost: per step one read of the logged loss and a few float operations; per
    event as :class:`SplitOnPlateau`.
    """

    def __init__(
        self,
        threshold=1e-3,
        window=50,
        smoothing=0.9,
        warmup_steps=0,
        cooldown_steps=0,
        layers=None,
        select="all",
        score="change",
        symmetry="fresh",
        max_units=None,
        max_params=None,
        stop_when_grown=False,
        verbose=1,
        *,
        monitor="loss",
        mode="auto",
        eps=None,
        probe=None,
        seed=None,
        backup_dir=None,
        prune_dead=False,
        prune_data=None,
        rewarm_steps=0,
    ):
        if isinstance(monitor, str) and monitor.startswith("val_"):
            raise GrowthError(f"SplitOnSlope watches a training quantity, logged every step; got monitor={monitor!r} "
                              "(validation runs only at epoch ends: use SplitOnPlateau for it)")
        self.threshold = check_real("threshold", threshold, low=0)
        self.window = check_int("window", window, 1)
        self.smoothing = check_real("smoothing", smoothing, low=0)
        if self.smoothing >= 1:
            raise GrowthError(f"smoothing must be in [0, 1); got smoothing={smoothing!r}")
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.cooldown_steps = check_int("cooldown_steps", cooldown_steps, 0)
        super().__init__(
            monitor=monitor, mode=mode, min_delta=0.0, start_from_epoch=0, layers=layers, select=select, score=score,
            symmetry=symmetry, eps=eps, max_units=max_units, max_params=max_params, stop_when_grown=stop_when_grown,
            restore_best_weights=False, verbose=verbose, probe=probe, seed=seed, backup_dir=backup_dir,
            prune_dead=prune_dead, prune_data=prune_data, rewarm_steps=rewarm_steps,
        )  # fmt: skip

    _unmonitored = None  # every step's logs hold the quantity, or the first step raises

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.step = 0  # steps of this fit so far
        self.event_steps = []
        self._restart(self.warmup_steps)

    def _restart(self, wait):
        """Watch again after ``wait`` more steps, with an empty average and window."""
        self._wait_until = self.step + wait
        self._ema, self._ema_n = 0.0, 0
        self._recent = deque(maxlen=self.window + 1)
        self.slope = None

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch
        self._batch, self._total = -1, 0.0  # the running mean's batch index and sum at the last call

    def on_train_batch_end(self, batch, logs=None):
        value = self._monitor_value(logs or {})
        total = (batch + 1) * value  # the running mean back to a sum over the epoch's batches
        n = batch - self._batch
        loss = (total - self._total) / n
        self._batch, self._total = batch, total
        self.step += n
        if self.step > self._wait_until and self._fires(loss):
            self._sync()
            if self.grow(self._epoch, logs) is not None:
                self.event_steps.append(self.step)
                self._restart(self.cooldown_steps)
            elif self.stop_when_grown:
                self._stop(self._epoch)
            else:
                self._restart(self.cooldown_steps)  # capped: look again a window later, not every step

    def _fires(self, loss) -> bool:
        """Add one step's value to the average; True when the window is full and its slope is below the threshold."""
        b = self.smoothing
        self._ema = b * self._ema + (1 - b) * loss
        self._ema_n += 1
        self._recent.append(self._ema / (1 - b**self._ema_n))  # bias-corrected, as Adam's moments
        if len(self._recent) <= self.window:
            return False
        old, new = self._recent[0], self._recent[-1]
        gain = (old - new) if self._op_is_less() else (new - old)
        self.slope = gain / (self.window * max(abs(old), 1e-12))
        return self.slope < self.threshold

    def on_epoch_end(self, epoch, logs=None):
        self._log(epoch, logs, self._added_in_epoch)
