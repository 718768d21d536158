"""SplitOnSlope: growth when the smoothed training loss flattens, checked every step (mid-epoch)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from fitting import data, make_model

import fastsplit.keras as fk
from fastsplit.keras import GrowthError


def drive(cb, model, losses, per_epoch):
    """Feed ``cb`` the per-step ``losses`` as ``fit`` logs them (each epoch's running mean); the steps it grew after."""
    cb.set_model(model)
    cb.on_train_begin()
    step = 0
    for epoch in range(-(-len(losses) // per_epoch)):
        cb.on_epoch_begin(epoch)
        chunk = losses[epoch * per_epoch : (epoch + 1) * per_epoch]
        for b in range(len(chunk)):
            cb.on_train_batch_begin(b)
            cb.on_train_batch_end(b, {"loss": float(np.mean(chunk[: b + 1])), "accuracy": 0.5})
            step += 1
        cb.on_epoch_end(epoch, {"loss": float(np.mean(chunk))})
    cb.on_train_end()
    return cb.event_steps


def reference_slopes(losses, window, smoothing):
    """The relative improvement per step after each step, computed directly (numpy reference)."""
    ema, out, smooth = 0.0, [], []
    for n, v in enumerate(losses, 1):
        ema = smoothing * ema + (1 - smoothing) * v
        smooth.append(ema / (1 - smoothing**n))
        out.append(None if n <= window else (smooth[-1 - window] - smooth[-1]) / (window * abs(smooth[-1 - window])))
    return out


def test_fires_exactly_when_the_slope_drops_below_the_threshold():
    # exponential decay whose rate drops: 2 % per step for 30 steps, then 0.05 % per step
    rates = [0.02] * 30 + [0.0005] * 30
    losses = 2.0 * np.cumprod([1 - r for r in rates])
    cb = fk.SplitOnSlope(threshold=1e-3, window=5, smoothing=0.5, max_units=4, verbose=0)
    steps = drive(cb, make_model(units=2), losses, per_epoch=8)
    slopes = reference_slopes(losses, 5, 0.5)
    first = next(i + 1 for i, s in enumerate(slopes) if s is not None and s < 1e-3)
    assert steps == [first]  # once, at the first step whose slope is below: then the layer is at its cap
    assert all(s is None or s >= 1e-3 for s in slopes[: first - 1])
    assert 30 < first <= 40  # the smoothed curve needs a few steps of the slow rate


def test_never_fires_while_the_loss_falls_fast_enough():
    losses = 2.0 * 0.98 ** np.arange(60)  # 2 % per step throughout
    model = make_model(units=2)
    before = [w.copy() for w in model.get_weights()]
    cb = fk.SplitOnSlope(threshold=1e-3, window=5, smoothing=0.5, verbose=0)
    assert drive(cb, model, losses, per_epoch=7) == []
    assert cb.slope == pytest.approx(reference_slopes(losses, 5, 0.5)[-1], rel=1e-4)
    assert model.get_layer("hidden").units == 2
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_warmup_and_cooldown_delay_the_trigger_by_their_steps():
    flat = np.full(40, 1.0)  # slope 0 from the start: fires as soon as a window is full
    cb = fk.SplitOnSlope(threshold=1e-3, window=4, warmup_steps=3, cooldown_steps=2, max_units=16, verbose=0)
    # steps 4..8 fill the window: first event after step 3 + 4 + 1; then 2 + 4 + 1 steps apart
    assert drive(cb, make_model(units=2), flat, per_epoch=10) == [8, 15, 22]
    assert cb.event_epochs == [0, 1, 2]


def test_a_quantity_that_should_go_up():
    acc = np.concatenate([np.linspace(0.1, 0.8, 20), np.full(20, 0.8)])
    cb = fk.SplitOnSlope(threshold=1e-3, window=3, smoothing=0.0, monitor="accuracy", max_units=4, verbose=0)
    cb.set_model(make_model(units=2))
    cb.on_train_begin()
    cb.on_epoch_begin(0)
    for b in range(len(acc)):
        cb.on_train_batch_end(b, {"loss": 1.0, "accuracy": float(np.mean(acc[: b + 1]))})
    assert cb.event_steps == [23]  # accuracy at its top from step 20: the window of steps 20..23 is flat


def test_bad_arguments_are_refused():
    for kw, what in [({"threshold": -1}, "threshold"), ({"window": 0}, "window"), ({"smoothing": 1.0}, "smoothing"),
                     ({"warmup_steps": -1}, "warmup_steps"), ({"cooldown_steps": 1.5}, "cooldown_steps"),
                     ({"monitor": "val_loss"}, "training quantity"), ({"rewarm_steps": -2}, "rewarm_steps")]:  # fmt: skip
        with pytest.raises(GrowthError, match=what):
            fk.SplitOnSlope(**kw)


def test_a_missing_monitor_raises_at_the_first_step_and_leaves_the_model():
    model = make_model(units=2)
    before = [w.copy() for w in model.get_weights()]
    cb = fk.SplitOnSlope(monitor="accuracy", verbose=0)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_begin(0)
    with pytest.raises(GrowthError, match="'accuracy' is not in the logs"):
        cb.on_train_batch_end(0, {"loss": 1.0})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


class PerStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.lrs, self.units, self.losses = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lrs.append(float(np.asarray(self.model.optimizer._get_current_learning_rate())))

    def on_train_batch_end(self, batch, logs=None):
        self.units.append(self.model.get_layer("hidden").units)
        self.losses.append(float(logs["loss"]))


def test_in_fit_mid_epoch_growth_keeps_logs_and_history_consistent_and_rewarms():
    """A real fit: a threshold no loss beats fires after every full window; History, the running means and the rate follow."""
    sched = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=4, decay_rate=0.5)
    model = make_model(units=2, optimizer=keras.optimizers.Adam(sched))
    probe = PerStep()
    grow = fk.SplitOnSlope(threshold=10.0, window=3, smoothing=0.0, max_units=8, rewarm_steps=2, verbose=0)
    x, y = data(256)  # 8 batches of 32 per epoch
    hist = model.fit(x, y, epochs=2, batch_size=32, callbacks=[grow, probe], verbose=0)
    # fires after step 4 (4 values fill a window of 3), then 4 steps later: 2 -> 4 -> 8, then capped
    assert grow.event_steps == [4, 8]
    assert probe.units == [2] * 3 + [4] * 4 + [8] * 9  # PerStep runs after the callback that grew
    assert hist.history["units/hidden"] == [8, 8] and hist.history["split"] == [6, 0]
    assert hist.history["params"][-1] == model.count_params()
    # each epoch's logged loss is the running mean at its last step, as without growth
    np.testing.assert_allclose(hist.history["loss"], [probe.losses[7], probe.losses[15]], rtol=1e-6)
    # the rate: the schedule, ramped over 2 steps after each event, then the schedule itself again
    base = np.array([float(np.asarray(sched(i))) for i in range(16)])
    ramp = np.ones(16)
    ramp[[4, 8]] = 0.5
    np.testing.assert_allclose(probe.lrs, base * ramp, rtol=1e-5)
    assert model.optimizer._learning_rate is sched
    assert len(fk.history(model)) == 2


def test_in_fit_progress_bar_shows_the_grown_epoch(capsys):
    """verbose=1 fit with growth inside the first epoch: the bar completes, the growth line and the epoch logs print."""
    model = make_model(units=2)
    grow = fk.SplitOnSlope(threshold=10.0, window=2, smoothing=0.0, max_units=4, verbose=1)
    x, y = data(128)
    hist = model.fit(x, y, epochs=1, batch_size=32, callbacks=[grow], verbose=1)
    out = capsys.readouterr().out
    assert "SplitOnSlope split hidden 2 → 4 units" in out
    assert "4/4" in out  # the bar reached its last step
    assert hist.history["units/hidden"] == [4] and np.isfinite(hist.history["loss"][0])
