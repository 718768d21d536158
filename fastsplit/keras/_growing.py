"""The growth callback that SplitOnPlateau and SplitEvery share: it composes

- ``_monitor``: the monitored quantity and the plateau bookkeeping (its base class),
- ``_layers``: the layers that may grow, from :func:`fastsplit.keras.coupled_groups`,
- ``_budget``: which units split, under ``select``, ``max_units`` and ``max_params``,
- ``_replay``: ``restore_best_weights`` across growth,
- ``_resume``: the state saved for ``keras.callbacks.BackupAndRestore``,

and does the events themselves: prune dead units (``prune_dead``), split, log.
The subclasses decide only *when* to grow (``on_epoch_end``).
"""

from __future__ import annotations

import warnings

import numpy as np
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule
from keras.saving import deserialize_keras_object, register_keras_serializable, serialize_keras_object

from ..compact import CompactPlan
from ..plan import SYMMETRIES
from ..plan import plan as make_plan
from . import _budget, _scores, _select
from ._args import check_bool, check_choice, check_dir, check_int, check_real
from ._errors import GrowthError
from ._layers import (
    check_layer_names,
    graph_groups,
    group_named,
    group_widths,
    growable_layers,
    refusals,
    scored_layer,
    why_not_growable,
)
from ._monitor import PlateauMonitor
from ._replay import restore_best
from ._resume import (
    check_state,
    checkpoint_widths,
    fit_to_widths,
    has_checkpoint,
    history_state,
    load_history,
    save_state,
    saved_states,
)


def _print(msg):
    from keras.src.utils import io_utils

    io_utils.print_msg(msg)


class _Rewarm:
    """The learning rate after a growth event: a linear ramp from 0 back to its value over ``steps`` steps.

    A float learning rate (a variable) is assigned before each step of the ramp and given back at its
    end; a ``LearningRateSchedule`` is wrapped in :class:`RewarmSchedule`, which multiplies it by the
    ramp inside the step (the traced step is rebuilt by the event anyway), and unwrapped at the end.
    """

    def __init__(self, opt, steps, base, begin):
        self.opt, self.steps, self.base, self.begin = opt, steps, base, begin

    @classmethod
    def start(cls, model, steps, running):
        opt = model.optimizer
        begin = int(np.asarray(opt.iterations))
        if running is not None:  # a new event during a ramp: ramp again from the same base
            running.finish(model)
        lr = opt._learning_rate
        if isinstance(lr, LearningRateSchedule):
            opt.learning_rate = RewarmSchedule(lr, begin, steps)
            return cls(opt, steps, lr, begin)
        if not hasattr(lr, "assign"):
            raise GrowthError(f"rewarm_steps needs a float learning rate or a LearningRateSchedule, got {lr!r}")
        return cls(opt, steps, float(np.asarray(lr)), begin)

    def step(self, model) -> bool:
        """Before a training step: set this step's rate; True once the ramp is over (and undone)."""
        done = int(np.asarray(self.opt.iterations)) - self.begin
        if done >= self.steps:
            self.finish(model)
            return True
        if not isinstance(self.base, float):
            return False  # the schedule wrapper ramps inside the step
        from ._surgery import sync_jax

        sync_jax(model)  # the next step then reads its state, this rate included, from the variables
        self.opt._learning_rate.assign(self.base * (done + 1) / self.steps)
        return False

    def finish(self, model):
        from ._surgery import sync_jax

        sync_jax(model)
        if isinstance(self.base, float):
            self.opt._learning_rate.assign(self.base)
        else:
            self.opt.learning_rate = self.base


@register_keras_serializable(package="fastsplit")
class RewarmSchedule(LearningRateSchedule):
    """``base(step) * min(1, (step - begin + 1) / steps)``: a schedule ramped back up after a growth event.

    Registered, so a model saved during a ramp loads with its optimizer.
    """

    def __init__(self, base, begin, steps):
        self.base, self.begin, self.steps = base, int(begin), int(steps)

    def __call__(self, step):
        ramp = ops.clip((ops.cast(step, "float32") - self.begin + 1.0) / self.steps, 0.0, 1.0)
        return self.base(step) * ramp

    def get_config(self):
        return {"base": serialize_keras_object(self.base), "begin": self.begin, "steps": self.steps}

    @classmethod
    def from_config(cls, config):
        return cls(deserialize_keras_object(config["base"]), config["begin"], config["steps"])


class GrowthCallback(PlateauMonitor):
    """Base of :class:`SplitOnPlateau` and :class:`SplitEvery` (private); the arguments are theirs."""

    def __init__(self, *, monitor, mode, min_delta, start_from_epoch, layers, select, score, symmetry, eps,
                 max_units, max_params, stop_when_grown, restore_best_weights, verbose, probe, seed, backup_dir,
                 prune_dead=False, prune_data=None, rewarm_steps=0):  # fmt: skip
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta, start_from_epoch=start_from_epoch)
        self.layers = check_layer_names(layers)
        self.select = select
        self._rule = _select.check_select(select)
        self._score = _scores.check_score(score, probe)
        self.score = score
        self.symmetry = check_choice("symmetry", symmetry, SYMMETRIES)
        self.eps = check_real("eps", eps, low=0, optional=True)
        if self.eps is not None and symmetry not in ("nudge", "direction"):
            raise GrowthError(f"eps is the bias offset of symmetry='nudge' or the step of 'direction'; got eps={eps!r} "
                              f"with symmetry={symmetry!r} (the default is 'fresh')")
        self.max_units = _budget.check_max_units(max_units)
        self.max_params = _budget.check_max_params(max_params)
        self.stop_when_grown = check_bool("stop_when_grown", stop_when_grown)
        self.restore_best_weights = check_bool("restore_best_weights", restore_best_weights)
        self.verbose = check_int("verbose", verbose, 0)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.backup_dir = check_dir("backup_dir", backup_dir)
        self.prune_dead = check_bool("prune_dead", prune_dead)
        if prune_data is not None and not self.prune_dead:
            raise GrowthError("prune_data is only read with prune_dead=True; got prune_dead=False and a prune_data")
        if self.prune_dead and prune_data is None and probe is None:
            raise GrowthError(
                "prune_dead=True needs data to find dead units on: pass prune_data=x or (x, y) (e.g. the "
                "training inputs) or probe=...; got prune_data=None and probe=None"
            )
        self.prune_data = prune_data
        self.rewarm_steps = check_int("rewarm_steps", rewarm_steps, 0)
        self._probe = probe
        self._resumed = None
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self):
        self.reset_plateau()
        self.best_weights = None
        self._best_at_event = 0
        self.events = []
        self.event_epochs = []
        self.event_kinds = []
        self._plans = []  # per event: layer name -> SplitPlan or CompactPlan (replayed onto best weights)
        self.last_added = self.last_pruned = 0
        self._added_in_epoch = 0
        self._rewarm = None

    def _state(self, epoch):
        return {"epoch": epoch + 1, **self.plateau_state(), "widths": self.widths(),
                **history_state(self.events, self.event_epochs, self.event_kinds, self._plans)}  # fmt: skip

    def _load_state(self, state):
        self.load_plateau_state(state)
        self.events, self.event_epochs, self.event_kinds, self._plans = load_history(state)
        self.best_weights = None
        self._best_at_event = len(self._plans)

    # --------------------------------------------------------------- set up
    _resumed_state = None

    def set_model(self, model):
        super().set_model(model)
        if self.backup_dir is not None and self._resumed is not model:
            self._resumed = model
            self._resume()

    def on_train_begin(self, logs=None):
        model = self.model
        if self._resumed_state is None:
            self._reset()
        self._resumed_state = None
        self.begin_monitoring()
        self._check_layers(model)
        self._check_monitor(model)
        self._score.check(model)
        if self.prune_dead:
            from ._stats import model_inputs

            model_inputs(model, self._dead_data(), what="prune_data" if self.prune_data is not None else "probe")
        if self.max_params is not None and model.count_params() > self.max_params:
            warnings.warn(
                f"max_params={self.max_params} is below the model's {model.count_params()} parameters: it will not grow",
                stacklevel=2,
            )

    def _check_layers(self, model):
        groups = graph_groups(model)
        if self.layers is None:
            names = growable_layers(model, groups)
            if not names:
                refused = "; ".join(refusals(groups))
                raise GrowthError(
                    f"{type(self).__name__}: the model has no hidden Dense/Conv layer that can grow "
                    f"(layers={[lay.name for lay in model.layers]}" + (f"; refused: {refused})" if refused else ")")
                )
        else:
            names = list(self.layers)
            for name in names:
                why = why_not_growable(model, name, groups)
                if why is not None:
                    raise GrowthError(f"{type(self).__name__}(layers={self.layers!r}): {why}")
        unranked = [n for n in names if scored_layer(model, n, groups) is None]
        if unranked:
            self._check_unranked(unranked)
        self._symmetries = self._symmetry_per_layer(names, groups)
        if isinstance(self.max_units, dict):
            unknown = sorted(set(self.max_units) - set(names))
            if unknown:
                raise GrowthError(f"max_units names layers that do not grow: {unknown} (growing: {names})")
        self._names = names

    def _check_unranked(self, names):
        """Groups whose units are not a kernel's last axis (heads, ``key_dim``, ``d_model``) grow whole."""
        what = (f"{type(self).__name__}(layers={self.layers!r}): {names} are not Dense/Conv layers whose kernel's "
                "last axis holds the units (attention heads, key_dim, an embedding's width)")
        if _select.needs_scores(self._rule):
            raise GrowthError(f"{what}: their units have no score to rank by; use select='all' (got {self.select!r})")
        if self.prune_dead:
            raise GrowthError(f"{what}: prune_dead finds dead units of Dense/Conv layers only")
        if self.backup_dir is not None:
            raise GrowthError(f"{what}: backup_dir reads Dense/Conv widths from the checkpoint only")

    def _symmetry_per_layer(self, names, groups):
        """layer name -> the symmetry its splits use: ``symmetry``, except that ``"fresh"`` gives way to
        ``"direction"`` (with a ``RuntimeWarning``, once per fit) for a layer whose units reach a layer that
        normalises across them, whose mean and variance fresh units would change (``widen`` does the same)."""
        from ._widen import FRESH_FALLBACK, fresh_blocked_by, fresh_fallback_message

        out = {}
        if self.symmetry != "fresh":
            return out
        for name in names:
            group = group_named(groups, name)
            blocked = fresh_blocked_by(group) if group is not None else []
            if blocked:
                out[name] = FRESH_FALLBACK
                warnings.warn(f"{type(self).__name__}: " + fresh_fallback_message(name, blocked), RuntimeWarning,
                              stacklevel=2)
        return out

    def _layer_objs(self):
        """The layers the scores read (the growing names that are Dense/Conv layers)."""
        groups = graph_groups(self.model)
        return [lay for lay in (scored_layer(self.model, n, groups) for n in self._names) if lay is not None]

    def widths(self):
        """Current unit count of each layer (or group) that may grow."""
        names = getattr(self, "_names", None) or growable_layers(self.model)
        return group_widths(self.model, names)

    def _dead_data(self):
        """The data on which dead units are found (``prune_data``, else ``probe``)."""
        return self.prune_data if self.prune_data is not None else self._probe

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.last_added = self.last_pruned = 0
        self._added_in_epoch = 0
        if _budget.ranks_units(self._rule, self.max_units, self.max_params):
            self._score.begin_epoch(self._layer_objs())

    # --------------------------------------------------------- best weights
    def _track_best(self, epoch, current):
        """EarlyStopping's bookkeeping: returns True when ``current`` improves on the best."""
        if self.restore_best_weights and self.best_weights is None:
            self._snapshot_best(epoch)
        if self._improved(epoch, current):
            if self.restore_best_weights:
                self._snapshot_best(epoch)
            return True
        return False

    def _snapshot_best(self, epoch):
        self.best_weights = self.model.get_weights()
        try:  # the architecture at the best epoch, for a replay of the growth since (``_replay``)
            self._best_config = self.model.get_config()
        except NotImplementedError as exc:
            self._best_config = exc
        self._best_at_event = len(self._plans)

    def _restore_best(self):
        restore_best(self.model, self.best_weights, self._best_config, self._plans[self._best_at_event :],
                     self._dead_data(), type(self).__name__)  # fmt: skip

    #: what the callback could not do in a fit whose logs never held ``monitor`` (None: it needs no monitor)
    _unmonitored = "never grew"

    def on_train_end(self, logs=None):
        if self._unmonitored is not None:
            self.warn_if_unseen(self._unmonitored)
        if self.stopped_epoch > 0 and self.verbose > 0:
            _print(
                f"Epoch {self.stopped_epoch + 1}: {type(self).__name__} stopped training: fully grown "
                f"({self._size_text()}) and {self.monitor} stopped improving"
            )
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                _print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self._restore_best()

    # ---------------------------------------------------------------- grow
    def _choose(self):
        """Units to split per layer (layer name -> sorted indices), after both caps."""
        groups = graph_groups(self.model)
        widths = group_widths(self.model, self._names, groups)
        layers = {n: (widths[n], scored_layer(self.model, n, groups)) for n in self._names}
        return _budget.choose_units(self.model, layers, rule=self._rule, score=self._score,
                                    max_units=self.max_units, max_params=self.max_params)  # fmt: skip

    def prune_dead_units(self, epoch, value=None):
        """Remove the units of the growing layers that are dead on the prune data; returns the GrowthEvent or None.

        Dead means :func:`fastsplit.keras.dead_units` with ``threshold=0``: zero (or
        constant) on every sample of the data, so :func:`fastsplit.keras.prune`
        with ``data=`` removes them exactly on that data. A layer whose units are
        all dead keeps its first unit. Cost: one inference pass over the data,
        then one ``prune`` call when anything is dead.
        """
        from . import dead_units, prune

        model = self.model
        data = self._dead_data()
        dead = dead_units(model, data, layers=self._names)
        widths = {g.producers[0]: g.width for g in graph_groups(model)}
        units = {}
        for path, idx in dead.items():
            if len(idx) and len(idx) >= widths.get(path, len(idx) + 1):
                idx = idx[1:]  # every unit is dead: keep one, so the layer (and the model) survives
            if len(idx):
                units[path] = np.asarray(idx, dtype=np.int64)
        if not units:
            return None
        before = self.widths()
        params_before = model.count_params()
        event = prune(model, units, data=data, optimizer="carry")
        plans = {}
        for path, lg in event.layers.items():
            keep = np.setdiff1d(np.arange(lg.old_width), np.asarray(lg.neurons, dtype=np.int64))
            self._score.pruned(path.rsplit("/", 1)[-1], keep)
            if path in units:
                plans[path] = CompactPlan(width=lg.old_width, src=keep)
        self._record(epoch, event, "prune", plans)
        after = self.widths()
        self.last_pruned = sum(before.values()) - sum(after.values())
        if self.verbose > 0:
            shrank = ", ".join(f"{n} {before[n]} → {after[n]}" for n in before if after[n] != before[n])
            _print(f"\nEpoch {epoch + 1}: {type(self).__name__} pruned {self.last_pruned} dead units: {shrank}; "
                   f"params {params_before:,} → {model.count_params():,}{self._shown(value)}")  # fmt: skip
        return event

    def grow(self, epoch, logs=None, value=None):
        """Prune dead units (with ``prune_dead``), then split the chosen units.

        Returns the split's GrowthEvent; the prune's when only dead units were
        removed; None when nothing changed (no dead unit and every layer capped).
        """
        from . import widen

        self.last_added = self.last_pruned = 0
        pruned = self.prune_dead_units(epoch, value) if self.prune_dead else None
        chosen = self._choose()
        if not chosen:
            return pruned
        before = self.widths()
        params_before = self.model.count_params()
        seed = (self.seed or 0) + len(self._plans)  # one key per event: fresh draws differ between events
        eps = self.eps  # None: each symmetry's own default
        symmetries = getattr(self, "_symmetries", {})
        plans = {
            name: make_plan(before[name], idx, symmetry=symmetries.get(name, self.symmetry), eps=eps, seed=seed)
            for name, idx in chosen.items()
        }
        if self.symmetry == "nudge" and self.eps is None:  # widen scales the nudge to each unit
            event = widen(self.model, dict(chosen), symmetry="nudge", optimizer="carry")
        else:
            event = widen(self.model, plans, symmetry=self.symmetry, eps=eps, optimizer="carry")
        self._record(epoch, event, "split", plans)
        after = self.widths()
        self.last_added = sum(after.values()) - sum(before.values())
        self._added_in_epoch += self.last_added
        if self.rewarm_steps:
            self._rewarm = _Rewarm.start(self.model, self.rewarm_steps, self._rewarm)
        if self.verbose > 0:
            grew = ", ".join(f"{n} {before[n]} → {after[n]}" for n in plans)
            _print(f"\nEpoch {epoch + 1}: {type(self).__name__} split {grew} units; "
                   f"params {params_before:,} → {self.model.count_params():,}{self._shown(value)}")  # fmt: skip
        return event

    def on_train_batch_begin(self, batch, logs=None):
        if self._rewarm is not None and self._rewarm.step(self.model):
            self._rewarm = None

    def _record(self, epoch, event, kind, plans):
        self.events.append(event)
        self.event_epochs.append(epoch)
        self.event_kinds.append(kind)
        self._plans.append(plans)

    def _shown(self, value):
        return "" if value is None else f" ({self.monitor} {value:.4f})"

    def _size_text(self):
        return ", ".join(f"{n} {w} units" for n, w in self.widths().items())

    def _log(self, epoch, logs, added):
        """Put the model's size after this epoch's action into ``logs`` (History, CSVLogger, TensorBoard)."""
        if logs is None:
            return
        for name, w in self.widths().items():
            logs[f"units/{name}"] = w
        logs["params"] = int(self.model.count_params())
        logs["split"] = int(added)
        if self.prune_dead:
            logs["pruned"] = int(self.last_pruned)
        if self.backup_dir is not None:
            save_state(self.backup_dir, epoch, self._state(epoch))

    def _sync(self):
        """Inside a JAX ``fit`` between two batches the live values are in the trainer's state: into the variables."""
        from ._surgery import sync_jax

        sync_jax(self.model)

    def _stop(self, epoch):
        self.stopped_epoch = max(epoch, 1)
        self.model.stop_training = True

    # --------------------------------------------------- BackupAndRestore
    def _resume(self):
        """Before BackupAndRestore loads its checkpoint: widen the model to the checkpoint's widths."""
        if not has_checkpoint(self.backup_dir):
            return
        model = self.model
        if getattr(self, "_names", None) is None:
            self._names = self.layers if self.layers is not None else growable_layers(model)
        saved = checkpoint_widths(self.backup_dir, model, self._names)
        epoch, states, path = saved_states(self.backup_dir)
        state = None if states is None else states.get(str(epoch))
        if state is not None:  # a malformed state is refused before the model is resized
            check_state(state, f"{path} (the state after epoch {epoch})")
        resized = fit_to_widths(model, saved, self.widths())
        if states is not None:
            if state is None:
                warnings.warn(
                    f"{type(self).__name__}: no saved state for epoch {epoch} in {path}; put it before "
                    "BackupAndRestore in the callbacks list. Plateau tracking restarts.",
                    stacklevel=2,
                )
                return
            if state["widths"] != self.widths():
                warnings.warn(
                    f"{type(self).__name__}: the checkpoint's widths {self.widths()} differ from the saved "
                    f"state's {state['widths']}; put {type(self).__name__} before BackupAndRestore",
                    stacklevel=2,
                )
            self._load_state(state)
            self._resumed_state = state
        if self.verbose > 0 and resized:
            _print(f"{type(self).__name__}: resumed grown model ({self._size_text()}) from {self.backup_dir}")
