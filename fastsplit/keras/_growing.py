"""What SplitOnPlateau and SplitEvery share: checking arguments, finding the layers
that may grow, pruning dead units (``prune_dead``), choosing units, calling ``widen``,
logging, restoring best weights, and resuming after ``keras.callbacks.BackupAndRestore``.

The subclasses decide only *when* to grow (``on_epoch_end``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings

import numpy as np
from keras.src.callbacks.monitor_callback import MonitorCallback

from ..compact import CompactPlan
from ..plan import SYMMETRIES, SplitPlan
from ..plan import plan as make_plan
from . import _scores, _select
from ._layers import (
    coupled_producers,
    graph_groups,
    growable_layers,
    model_at_widths,
    producer_widths,
    refusals,
    why_not_growable,
    width_of,
)

_MAX_DIRECTION = ("acc", "auc", "precision", "recall", "f1", "iou", "r2", "top_k", "true_positives")
_MIN_DIRECTION = ("loss", "error", "crossentropy", "hinge", "poisson", "divergence", "false_")

STATE_FILE = "fastsplit_state.json"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_int(name, value, low):
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {name}={value!r}")
    return int(value)


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


def _direction(monitor):
    base = monitor.removeprefix("val_").lower()
    if any(k in base for k in _MIN_DIRECTION):
        return "min"
    if any(k in base for k in _MAX_DIRECTION):
        return "max"
    return None


def exact(p: SplitPlan) -> SplitPlan:
    """The same copies and shares without symmetry breaking (reproduces a function exactly)."""
    return SplitPlan(width=p.width, src=p.src, ratio=p.ratio, offset=np.zeros_like(p.offset), symmetry="none")


def unit_costs(model, names):
    """Parameters one more unit adds, per layer name (incoming column, bias, per-unit state, outgoing rows;
    for a coupled group, those of every producer of the group).

    Cost: one model build per layer.
    """
    groups = graph_groups(model)
    named = set(names)
    widths = {layer.name: width_of(layer) for layer in model.layers if layer.name in named}
    widths.update({p: w for p, w in producer_widths(groups).items() if p not in widths})
    coupled = coupled_producers(groups)
    base = model_at_widths(model, widths, coupled).count_params()
    out = {}
    for name in names:
        w = dict(widths)
        for mate in coupled.get(name, [name]):  # one more unit of a coupled group widens all its producers
            if mate in w:
                w[mate] += 1
        out[name] = max(1, model_at_widths(model, w, coupled).count_params() - base)
    return out


class GrowthCallback(MonitorCallback):
    """Base of :class:`SplitOnPlateau` and :class:`SplitEvery` (private)."""

    def __init__(
        self,
        *,
        monitor,
        mode,
        min_delta,
        start_from_epoch,
        layers,
        select,
        score,
        symmetry,
        eps,
        max_units,
        max_params,
        stop_when_grown,
        restore_best_weights,
        verbose,
        probe,
        seed,
        backup_dir,
        prune_dead=False,
        prune_data=None,
    ):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max'; got mode={mode!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged quantity; got monitor={monitor!r}")
        if not isinstance(min_delta, numbers.Real) or isinstance(min_delta, bool) or not math.isfinite(min_delta):
            raise ValueError(f"min_delta must be a finite number; got min_delta={min_delta!r}")
        super().__init__(monitor, mode, min_delta=min_delta)
        self._min_delta_abs = abs(float(min_delta))
        self.start_from_epoch = _check_int("start_from_epoch", start_from_epoch, 0)
        if layers is not None:
            if isinstance(layers, str):
                layers = [layers]
            layers = list(layers)
            if not layers or not all(isinstance(n, str) for n in layers):
                raise ValueError(f"layers must be None or a non-empty list of layer names; got layers={layers!r}")
        self.layers = layers
        self.select = select
        self._rule = _select.check_select(select)
        self._score = _scores.check_score(score, probe)
        self.score = score
        if symmetry not in SYMMETRIES:
            raise ValueError(f"symmetry must be one of {SYMMETRIES}; got symmetry={symmetry!r}")
        self.symmetry = symmetry
        if not isinstance(eps, numbers.Real) or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite number; got eps={eps!r}")
        self.eps = float(eps)
        if isinstance(max_units, dict):
            max_units = {k: _check_int(f"max_units[{k!r}]", v, 1) for k, v in max_units.items()}
        elif max_units is not None:
            max_units = _check_int("max_units", max_units, 1)
        self.max_units = max_units
        self.max_params = None if max_params is None else _check_int("max_params", max_params, 1)
        self.stop_when_grown = bool(stop_when_grown)
        self.restore_best_weights = bool(restore_best_weights)
        self.verbose = _check_int("verbose", verbose, 0)
        self.seed = seed
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)
        if not isinstance(prune_dead, (bool, np.bool_)):
            raise ValueError(f"prune_dead must be True or False; got prune_dead={prune_dead!r}")
        self.prune_dead = bool(prune_dead)
        if prune_data is not None and not self.prune_dead:
            raise ValueError("prune_data is only read with prune_dead=True; got prune_dead=False and a prune_data")
        if self.prune_dead and prune_data is None and probe is None:
            raise ValueError(
                "prune_dead=True needs data to find dead units on: pass prune_data=x or (x, y) (e.g. the "
                "training inputs) or probe=...; got prune_data=None and probe=None"
            )
        self.prune_data = prune_data
        self._probe = probe
        self.events = []
        self.event_epochs = []
        self._plans = []  # per event: layer name -> SplitPlan (for replaying onto best weights)
        self._resumed = None
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self):
        self.best = None
        self.wait = 0
        self.cooldown_counter = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.best_weights = None
        self._best_at_event = 0
        self.events = []
        self.event_epochs = []
        self.event_kinds = []
        self._plans = []
        self.last_added = self.last_pruned = 0

    def _state(self, epoch):
        return {
            "epoch": epoch + 1,
            "best": None if self.best is None else float(self.best),
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "widths": self.widths(),
            "event_epochs": list(self.event_epochs),
            "event_kinds": list(self.event_kinds),
            "events": [_event_dict(e) for e in self.events],
            "plans": [{k: _plan_dict(p) for k, p in ev.items()} for ev in self._plans],
        }

    def _load_state(self, state):
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]
        self.cooldown_counter = state["cooldown_counter"]
        self.event_epochs = list(state["event_epochs"])
        self.events = [_event_from_dict(d) for d in state["events"]]
        self.event_kinds = list(state.get("event_kinds") or [_kind_of(e) for e in self.events])
        self._plans = [{k: _plan_from_dict(v) for k, v in ev.items()} for ev in state["plans"]]
        self.best_weights = None
        self._best_at_event = len(self._plans)

    # --------------------------------------------------------------- set up
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

    _resumed_state = None

    def _check_layers(self, model):
        groups = graph_groups(model)
        if self.layers is None:
            names = growable_layers(model, groups)
            if not names:
                refused = "; ".join(refusals(groups))
                raise ValueError(
                    f"{type(self).__name__}: the model has no hidden Dense/Conv layer that can grow "
                    f"(layers={[lay.name for lay in model.layers]}" + (f"; refused: {refused})" if refused else ")")
                )
        else:
            names = list(self.layers)
            for name in names:
                why = why_not_growable(model, name, groups)
                if why is not None:
                    raise ValueError(f"{type(self).__name__}(layers={self.layers!r}): {why}")
        if isinstance(self.max_units, dict):
            unknown = sorted(set(self.max_units) - set(names))
            if unknown:
                raise ValueError(f"max_units names layers that do not grow: {unknown} (growing: {names})")
        self._names = names

    def _check_monitor(self, model):
        names = metric_names(model) if self.mode == "auto" else None
        base = self.monitor.removeprefix("val_")
        if names is not None and base not in names and self.monitor not in names:
            raise ValueError(
                f"{type(self).__name__}: unknown monitor={self.monitor!r}; the model logs "
                f"{sorted(names)} (and val_ versions with validation data)"
            )
        if self.monitor_op is None:
            from keras import ops

            direction = self.mode if self.mode != "auto" else _direction(self.monitor)
            if direction is None:
                try:
                    self._set_monitor_op()
                except ValueError:
                    return  # decided at the first epoch end, once the metrics are built
            else:
                self.monitor_op = ops.less if direction == "min" else ops.greater
        self.min_delta = -self._min_delta_abs if self._op_is_less() else self._min_delta_abs

    def _op_is_less(self):
        from keras import ops

        return self.monitor_op is ops.less

    def _monitor_value(self, logs):
        if self.monitor_op is None:
            self._set_monitor_op()
            self.min_delta = -self._min_delta_abs if self._op_is_less() else self._min_delta_abs
        if self.monitor not in logs:
            raise ValueError(
                f"{type(self).__name__}: monitor={self.monitor!r} is not in the logs "
                f"({', '.join(sorted(logs))}); pass validation_data to fit() to monitor a val_ quantity"
            )
        return float(logs[self.monitor])

    def _layer_objs(self):
        return [self.model.get_layer(n) for n in self._names]

    def widths(self):
        """Current unit count of each layer that may grow."""
        names = getattr(self, "_names", None) or growable_layers(self.model)
        return {n: width_of(self.model.get_layer(n)) for n in names}

    def _dead_data(self):
        """The data on which dead units are found (``prune_data``, else ``probe``)."""
        return self.prune_data if self.prune_data is not None else self._probe

    def on_epoch_begin(self, epoch, logs=None):
        self.last_added = self.last_pruned = 0
        if _select.needs_scores(self._rule) or self.max_units is not None or self.max_params is not None:
            self._score.begin_epoch(self._layer_objs())

    # --------------------------------------------------------- best weights
    def _track_best(self, epoch, current):
        """EarlyStopping's bookkeeping: returns True when ``current`` improves on the best."""
        if self.restore_best_weights and self.best_weights is None:
            self._snapshot_best(epoch)
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self._snapshot_best(epoch)
            return True
        return False

    def _snapshot_best(self, epoch):
        self.best_weights = self.model.get_weights()
        self._best_widths = self.widths()
        self._best_at_event = len(self._plans)

    def _restore_best(self):
        model = self.model
        if self._best_at_event == len(self._plans):
            model.set_weights(self.best_weights)
            return
        # the best epoch had fewer units: rebuild that model, split it exactly as
        # the run did since, and take its weights (same function as at the best epoch)
        from . import widen

        shadow = model_at_widths(model, self._best_widths)
        shadow.set_weights(self.best_weights)
        inexact = []
        for plans in self._plans[self._best_at_event :]:
            if _is_prune(plans):
                from . import prune

                # the units pruned since may have been alive at the best epoch: then their mean on the
                # prune data is folded into the consumer's bias, which is close to, not exactly, that function
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    prune(shadow, plans, data=self._dead_data(), optimizer="reset")
                inexact += [w for w in caught if issubclass(w.category, RuntimeWarning)]
            else:
                widen(shadow, {k: exact(p) for k, p in plans.items()}, symmetry="none", optimizer="reset")
        model.set_weights(shadow.get_weights())
        if inexact:
            warnings.warn(
                f"{type(self).__name__}: units pruned after the best epoch were not dead at it; the restored "
                "weights fold their mean value on the prune data into the next layer's bias, so they compute "
                f"the best epoch's function only approximately ({inexact[0].message})",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose > 0:
            from keras.src.utils import io_utils

            io_utils.print_msg(
                f"Epoch {self.stopped_epoch + 1}: {type(self).__name__} stopped training: fully grown "
                f"({self._size_text()}) and {self.monitor} stopped improving"
            )
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                from keras.src.utils import io_utils

                io_utils.print_msg(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self._restore_best()

    # ---------------------------------------------------------------- grow
    def _cap(self, name):
        if isinstance(self.max_units, dict):
            return self.max_units.get(name)
        return self.max_units

    def _choose(self):
        """Units to split per layer (layer name -> sorted indices), after both caps."""
        model = self.model
        wanted = {}
        for layer in self._layer_objs():
            n = width_of(layer)
            cap = self._cap(layer.name)
            if cap is not None and n >= cap:
                continue
            ranked = _select.needs_scores(self._rule) or (cap is not None and 2 * n > cap) or self.max_params
            scores = self._score(layer, model) if ranked else None
            chosen = _select.cap_units(_select.choose(self._rule, n, scores), n, cap)
            if len(chosen):
                wanted[layer.name] = chosen
        if wanted and self.max_params is not None:
            budget = self.max_params - model.count_params()
            wanted = _select.cap_params(wanted, unit_costs(model, list(wanted)), budget)
        return {k: np.sort(v) for k, v in wanted.items() if len(v)}

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
        self.events.append(event)
        self.event_epochs.append(epoch)
        self.event_kinds.append("prune")
        self._plans.append(plans)
        after = self.widths()
        self.last_pruned = sum(before.values()) - sum(after.values())
        if self.verbose > 0:
            from keras.src.utils import io_utils

            shrank = ", ".join(f"{n} {before[n]} → {after[n]}" for n in before if after[n] != before[n])
            shown = "" if value is None else f" ({self.monitor} {value:.4f})"
            io_utils.print_msg(
                f"\nEpoch {epoch + 1}: {type(self).__name__} pruned {self.last_pruned} dead units: {shrank}; "
                f"params {params_before:,} → {model.count_params():,}{shown}"
            )
        return event

    def grow(self, epoch, logs=None, value=None):
        """Prune dead units (with ``prune_dead``), then split the chosen units.

        Returns the split's GrowthEvent; the prune's when only dead units were
        removed; None when nothing changed (no dead unit and every layer capped).
        """
        self.last_added = self.last_pruned = 0
        pruned = self.prune_dead_units(epoch, value) if self.prune_dead else None
        chosen = self._choose()
        if not chosen:
            return pruned
        before = self.widths()
        params_before = self.model.count_params()
        seed = None if self.seed is None else int(self.seed) + len(self._plans)
        plans = {
            name: make_plan(before[name], idx, symmetry=self.symmetry, eps=self.eps, seed=seed)
            for name, idx in chosen.items()
        }
        from . import widen

        event = widen(self.model, plans, symmetry=self.symmetry, eps=self.eps, optimizer="carry")
        self.events.append(event)
        self.event_epochs.append(epoch)
        self.event_kinds.append("split")
        self._plans.append(plans)
        after = self.widths()
        self.last_added = sum(after.values()) - sum(before.values())
        if self.verbose > 0:
            from keras.src.utils import io_utils

            grew = ", ".join(f"{n} {before[n]} → {after[n]}" for n in plans)
            shown = "" if value is None else f" ({self.monitor} {value:.4f})"
            io_utils.print_msg(
                f"\nEpoch {epoch + 1}: {type(self).__name__} split {grew} units; "
                f"params {params_before:,} → {self.model.count_params():,}{shown}"
            )
        return event

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
            self._save_state(epoch)

    def _stop(self, epoch):
        self.stopped_epoch = max(epoch, 1)
        self.model.stop_training = True

    # --------------------------------------------------- BackupAndRestore
    def _save_state(self, epoch):
        os.makedirs(self.backup_dir, exist_ok=True)
        path = os.path.join(self.backup_dir, STATE_FILE)
        states = {}
        if os.path.exists(path):
            with open(path) as f:
                states = json.load(f)
        states[str(epoch + 1)] = self._state(epoch)
        keep = sorted(states, key=int)[-3:]  # BackupAndRestore may lag one epoch behind us
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({k: states[k] for k in keep}, f)
        os.replace(tmp, path)

    def _resume(self):
        """Before BackupAndRestore loads its checkpoint: widen the model to the checkpoint's widths."""
        weights = os.path.join(self.backup_dir, "latest.weights.h5")
        meta = os.path.join(self.backup_dir, "training_metadata.json")
        if not os.path.exists(weights):
            return
        import h5py

        from . import prune, widen

        model = self.model
        if getattr(self, "_names", None) is None:
            self._names = self.layers if self.layers is not None else growable_layers(model)
        saved = {}
        keys = _h5_layer_keys(model)
        with h5py.File(weights, "r") as f:
            for name in self._names:
                key = f"layers/{keys.get(name, name)}/vars/0"
                if key in f:
                    saved[name] = int(f[key].shape[-1])
        now = self.widths()
        plans, cuts = {}, {}
        for name, w in saved.items():
            if w < now[name]:  # units were pruned before the checkpoint (prune_dead)
                cuts[name] = np.arange(w, now[name])
            if w > now[name]:
                extra = np.arange(w - now[name]) % now[name]
                plans[name] = make_plan(now[name], extra, symmetry="none")
        # the values do not matter: BackupAndRestore overwrites them, optimizer slots included
        if cuts:
            prune(model, cuts, optimizer="carry")
        if plans:
            widen(model, plans, symmetry="none", optimizer="carry")
        epoch = None
        if os.path.exists(meta):
            with open(meta) as f:
                epoch = json.load(f).get("epoch")
        path = os.path.join(self.backup_dir, STATE_FILE)
        if epoch is not None and os.path.exists(path):
            with open(path) as f:
                states = json.load(f)
            state = states.get(str(epoch))
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
        if self.verbose > 0 and (plans or cuts):
            from keras.src.utils import io_utils

            io_utils.print_msg(f"{type(self).__name__}: resumed grown model ({self._size_text()}) from {self.backup_dir}")


def _h5_layer_keys(model):
    """layer name -> its group under ``layers/`` in a ``.weights.h5`` file.

    Keras names saved layers by class and position, never by ``layer.name``
    (``keras.src.saving.saving_lib._save_container_state``); this repeats that naming.
    """
    from keras.src.utils import naming

    used, out = {}, {}
    for layer in model.layers:
        base = naming.to_snake_case(type(layer).__name__)
        if base in used:
            used[base] += 1
            key = f"{base}_{used[base]}"
        else:
            used[base] = 0
            key = base
        out[layer.name] = key
    return out


def _plan_dict(p):
    if isinstance(p, CompactPlan):
        return {"width": int(p.width), "keep": p.src.tolist()}
    return {"width": p.width, "src": p.src.tolist(), "ratio": p.ratio.tolist()}


def _plan_from_dict(v):
    if "keep" in v:
        return CompactPlan(width=int(v["width"]), src=np.asarray(v["keep"], dtype=np.int64))
    return SplitPlan(width=v["width"], src=np.asarray(v["src"]), ratio=v["ratio"], offset=np.zeros(len(v["src"])))


def _is_prune(plans) -> bool:
    return any(isinstance(p, CompactPlan) for p in plans.values())


def _kind_of(event) -> str:
    """``"prune"`` when every layer of the event got narrower, else ``"split"`` (for states saved without kinds)."""
    layers = event.get("layers", {}) if isinstance(event, dict) else getattr(event, "layers", {})
    widths = [(g["old_width"], g["new_width"]) if isinstance(g, dict) else (g.old_width, g.new_width)
              for g in layers.values()]  # fmt: skip
    return "prune" if widths and all(n < o for o, n in widths) else "split"


def _event_dict(e):
    if isinstance(e, dict):
        return e
    if hasattr(e, "to_dict"):
        return e.to_dict()
    return {"repr": repr(e)}


def _event_from_dict(d):
    from . import GrowthEvent

    try:
        return GrowthEvent.from_dict(d)
    except Exception:
        return d
