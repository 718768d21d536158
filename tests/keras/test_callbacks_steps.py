"""Growth on a schedule in steps (in the middle of epochs) and the learning-rate re-warm-up after an event."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from fitting import data, make_model

import fastsplit.keras as fk
from fastsplit.keras import GrowthError


class PerStep(keras.callbacks.Callback):
    """The rate each step trains with and the hidden width after each step."""

    def __init__(self):
        super().__init__()
        self.lrs, self.units, self.epochs_seen = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        opt = self.model.optimizer
        self.lrs.append(float(np.asarray(opt._get_current_learning_rate())))

    def on_train_batch_end(self, batch, logs=None):
        self.units.append(self.model.get_layer("hidden").units)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen.append(epoch)


def fit(model, callbacks, epochs=2):
    x, y = data(256)  # 8 batches of 32 per epoch
    return model.fit(x, y, epochs=epochs, batch_size=32, callbacks=callbacks, verbose=0)


def test_split_every_steps_grows_in_the_middle_of_epochs_and_the_logs_follow():
    model = make_model(units=2)
    probe = PerStep()
    hist = fit(model, [fk.SplitEvery(steps=5, verbose=0, max_units=16), probe])
    # after steps 5, 10 and 15 (16 steps in all): 2 -> 4 -> 8 -> 16
    assert probe.units == [2] * 4 + [4] * 5 + [8] * 5 + [16] * 2
    assert probe.epochs_seen == [0, 1]
    assert hist.history["units/hidden"] == [4, 16]
    assert hist.history["split"] == [2, 12]  # units added during each epoch
    assert np.all(np.isfinite(hist.history["loss"]))
    assert len(fk.history(model)) == 3


def test_split_every_takes_epochs_or_steps_not_both():
    with pytest.raises(GrowthError, match="exactly one of epochs= and steps="):
        fk.SplitEvery(1, steps=3)
    with pytest.raises(GrowthError, match="exactly one of epochs= and steps="):
        fk.SplitEvery()
    with pytest.raises(GrowthError, match="steps"):
        fk.SplitEvery(steps=0)
    with pytest.raises(GrowthError, match="rewarm_steps"):
        fk.SplitEvery(1, rewarm_steps=-1)


def test_rewarm_ramps_a_float_rate_and_gives_it_back():
    model = make_model(units=2, optimizer=keras.optimizers.Adam(0.01))
    probe = PerStep()
    fit(model, [fk.SplitEvery(steps=5, verbose=0, max_units=8, rewarm_steps=3), probe])
    third = 0.01 / 3
    want = [0.01] * 5 + [third, 2 * third, 0.01, 0.01, 0.01] + [third, 2 * third] + [0.01] * 4
    np.testing.assert_allclose(probe.lrs, want, rtol=1e-6)
    # the variable is back in place: other callbacks may still set the rate
    model.optimizer.learning_rate = 0.005
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.005)


def test_rewarm_multiplies_a_schedule_and_unwraps_it():
    sched = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=4, decay_rate=0.5)
    model = make_model(units=2, optimizer=keras.optimizers.Adam(sched))
    probe = PerStep()
    fit(model, [fk.SplitEvery(steps=5, verbose=0, max_units=4, rewarm_steps=3), probe])
    base = [float(np.asarray(sched(i))) for i in range(16)]
    ramp = [1.0] * 5 + [1 / 3, 2 / 3] + [1.0] * 9
    np.testing.assert_allclose(probe.lrs, np.multiply(base, ramp), rtol=1e-5)
    assert model.optimizer._learning_rate is sched


def test_split_on_plateau_rewarms_after_its_event():
    model = make_model(units=2, optimizer=keras.optimizers.SGD(0.1))
    probe = PerStep()
    grow = fk.SplitOnPlateau(monitor="loss", min_delta=10.0, patience=0, max_units=4, verbose=0, rewarm_steps=4)
    fit(model, [grow, probe], epochs=3)
    # the event at the end of epoch 2 (step 16): steps 17..19 ramp, step 20 is back at 0.1
    np.testing.assert_allclose(probe.lrs[16:21], [0.025, 0.05, 0.075, 0.1, 0.1], rtol=1e-6)
    assert probe.lrs[:16] == pytest.approx([0.1] * 16)


def test_a_ramped_schedule_survives_serialization():
    """An optimizer saved during a ramp (its rate a RewarmSchedule) is rebuilt with the same rates."""
    from fastsplit.keras._growing import RewarmSchedule

    sched = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=4, decay_rate=0.5)
    opt = keras.optimizers.Adam(RewarmSchedule(sched, 5, 3))
    again = keras.optimizers.Adam.from_config(opt.get_config())
    for step in (4, 5, 6, 7, 9):
        assert float(np.asarray(again._learning_rate(step))) == float(np.asarray(opt._learning_rate(step)))
