"""Checkpoint and resume alongside ``keras.callbacks.BackupAndRestore``.

After each epoch a growth callback saves its state (plateau bookkeeping, widths, events
and their plans) to ``STATE_FILE`` in the ``backup_dir`` it shares with
``BackupAndRestore``. When a killed run restarts with a fresh model, the callback reads
the widths of the checkpoint's ``latest.weights.h5``, widens (or prunes) the model to
them before ``BackupAndRestore`` loads it, and takes back the state saved for the
checkpoint's epoch. A state file that cannot be read, or a state that is malformed,
raises :class:`GrowthError` naming the file and the field before the model is touched.
"""

from __future__ import annotations

import json
import math
import numbers
import os

import numpy as np

from ..compact import CompactPlan
from ..plan import SplitPlan
from ..plan import plan as make_plan
from ._errors import GrowthError
from ._event import check_event_dict

STATE_FILE = "fastsplit_state.json"
#: states kept in STATE_FILE: BackupAndRestore may lag one epoch behind the callback
KEEP_STATES = 3
WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"


# ------------------------------------------------------------------------------------------- state file
def save_state(backup_dir, epoch, state: dict):
    """Add ``state`` as the state after 0-based ``epoch`` to ``STATE_FILE``, keeping the last ``KEEP_STATES``.

    Written to a temporary file, then renamed, so a kill never leaves half a file.
    """
    os.makedirs(backup_dir, exist_ok=True)
    path = os.path.join(backup_dir, STATE_FILE)
    states = {}
    if os.path.exists(path):
        with open(path) as f:
            states = json.load(f)
    states[str(epoch + 1)] = state
    keep = sorted(states, key=int)[-KEEP_STATES:]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: states[k] for k in keep}, f)
    os.replace(tmp, path)


def saved_states(backup_dir):
    """``(epoch, states, path)``: the epoch of BackupAndRestore's checkpoint and the saved states
    (1-based epoch as a string -> state); ``epoch`` or ``states`` is None when its file is missing."""
    meta = os.path.join(backup_dir, METADATA_FILE)
    path = os.path.join(backup_dir, STATE_FILE)
    epoch = states = None
    if os.path.exists(meta):
        epoch = _read_json(meta).get("epoch")
    if epoch is not None and os.path.exists(path):
        states = _read_json(path)
    return epoch, states, path


def _read_json(path) -> dict:
    """A JSON object from ``path``; ``GrowthError`` naming the file when it is not one."""
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise GrowthError(f"cannot resume from {path}: {e}") from None
    if not isinstance(out, dict):
        raise GrowthError(f"cannot resume from {path}: it holds a {type(out).__name__}, not a JSON object")
    return out


def _is_int(x, low=0) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low


def _check_plan_dict(v, where):
    if not isinstance(v, dict) or not _is_int(v.get("width"), 1):
        raise GrowthError(f"{where} must be a plan dict with an integer width >= 1; got {v!r:.200}")
    width = v["width"]
    units = v.get("keep", v.get("src"))
    if not isinstance(units, list) or not all(_is_int(u) and u < width for u in units):
        key = "keep" if "keep" in v else "src"
        raise GrowthError(f"{where}[{key!r}] must be a list of unit indices in [0, {width}); got {units!r:.200}")
    if "keep" not in v:
        ratio = v.get("ratio")
        if not isinstance(ratio, list) or len(ratio) != len(units) or not all(
            isinstance(r, numbers.Real) and not isinstance(r, bool) and math.isfinite(r) for r in ratio
        ):
            raise GrowthError(f"{where}['ratio'] must be a list of {len(units)} finite numbers; got {ratio!r:.200}")
        sigma, seed = v.get("sigma", 0.0), v.get("seed")
        if v.get("symmetry", "fresh") != "fresh" or not (
            isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma >= 0
            and (seed is None or _is_int(seed))
        ):
            raise GrowthError(f"{where}: a saved plan's symmetry can only be 'fresh', with a finite sigma >= 0 and "
                              f"an integer seed >= 0 or null; got {v!r:.200}")


def check_state(state, where: str) -> None:
    """``GrowthError`` naming ``where`` and the field when ``state`` is not what :func:`save_state` wrote.

    Cost: O(events + plan entries).
    """
    try:
        if not isinstance(state, dict):
            raise GrowthError(f"the state must be a dict; got {state!r:.200}")
        missing = [k for k in ("epoch", "best", "best_epoch", "wait", "cooldown_counter", "widths",
                               "event_epochs", "events", "plans") if k not in state]  # fmt: skip
        if missing:
            raise GrowthError(f"the state lacks {missing}")
        for key in ("epoch", "best_epoch", "wait", "cooldown_counter"):
            if not _is_int(state[key]):
                raise GrowthError(f"{key} must be an integer >= 0; got {state[key]!r}")
        best = state["best"]
        if best is not None and not (isinstance(best, numbers.Real) and not isinstance(best, bool)):
            raise GrowthError(f"best must be None or a number; got {best!r}")
        widths = state["widths"]
        if not isinstance(widths, dict) or not all(isinstance(k, str) and _is_int(w, 1) for k, w in widths.items()):
            raise GrowthError(f"widths must map layer names to integers >= 1; got {widths!r:.200}")
        lists = {k: state[k] for k in ("event_epochs", "events", "plans")}
        if state.get("event_kinds") is not None:
            lists["event_kinds"] = state["event_kinds"]
        for key, v in lists.items():
            if not isinstance(v, list):
                raise GrowthError(f"{key} must be a list; got {v!r:.200}")
        if len({len(v) for v in lists.values()}) > 1:
            raise GrowthError("event_epochs, events, plans (and event_kinds) must have one entry per event; got "
                              + ", ".join(f"{len(v)} {k}" for k, v in lists.items()))  # fmt: skip
        if not all(_is_int(e) for e in state["event_epochs"]):
            raise GrowthError(f"event_epochs must be integers >= 0; got {state['event_epochs']!r:.200}")
        if not all(k in ("split", "prune") for k in lists.get("event_kinds", [])):
            raise GrowthError(f"event_kinds must be 'split' or 'prune'; got {state['event_kinds']!r:.200}")
        for i, e in enumerate(state["events"]):
            check_event_dict(e, f"events[{i}]")
        for i, ev in enumerate(state["plans"]):
            if not isinstance(ev, dict):
                raise GrowthError(f"plans[{i}] must be a dict layer name -> plan; got {ev!r:.200}")
            for name, v in ev.items():
                _check_plan_dict(v, f"plans[{i}][{name!r}]")
    except GrowthError as e:
        raise GrowthError(f"cannot resume from {where}: {e}") from None


def history_state(events, event_epochs, event_kinds, plans) -> dict:
    """The growth history as JSON-able lists (plans without symmetry offsets)."""
    return {
        "event_epochs": list(event_epochs),
        "event_kinds": list(event_kinds),
        "events": [event_dict(e) for e in events],
        "plans": [{k: plan_dict(p) for k, p in ev.items()} for ev in plans],
    }


def load_history(state: dict):
    """``(events, event_epochs, event_kinds, plans)`` from :func:`history_state`'s dict (kinds guessed when missing)."""
    events = [event_from_dict(d) for d in state["events"]]
    kinds = list(state.get("event_kinds") or [kind_of(e) for e in events])
    plans = [{k: plan_from_dict(v) for k, v in ev.items()} for ev in state["plans"]]
    return events, list(state["event_epochs"]), kinds, plans


def plan_dict(p) -> dict:
    """A plan as JSON, for the replay of ``restore_best_weights``: its copies and shares; a ``"fresh"``
    plan also its draws' ``sigma`` and ``seed``, so that a replayed fresh unit gets incoming weights
    again (zero ones, with zero outgoing weights, would never get a gradient)."""
    if isinstance(p, CompactPlan):
        return {"width": int(p.width), "keep": p.src.tolist()}
    d = {"width": p.width, "src": p.src.tolist(), "ratio": p.ratio.tolist()}
    if p.symmetry == "fresh":
        d.update(symmetry="fresh", sigma=float(p.sigma), seed=None if p.seed is None else int(p.seed))
    return d


def plan_from_dict(v):
    if "keep" in v:
        return CompactPlan(width=int(v["width"]), src=np.asarray(v["keep"], dtype=np.int64))
    src = np.asarray(v["src"])
    if v.get("symmetry") == "fresh" or 0 in v["ratio"]:  # only a fresh plan holds zero shares
        return SplitPlan(width=v["width"], src=src, ratio=v["ratio"], offset=np.zeros(len(src)), symmetry="fresh",
                         sigma=v.get("sigma", 1.0), seed=v.get("seed"))
    return SplitPlan(width=v["width"], src=src, ratio=v["ratio"], offset=np.zeros(len(src)))


def kind_of(event) -> str:
    """``"prune"`` when every layer of the event got narrower, else ``"split"`` (for states saved without kinds)."""
    layers = event.get("layers", {}) if isinstance(event, dict) else getattr(event, "layers", {})
    widths = [(g["old_width"], g["new_width"]) if isinstance(g, dict) else (g.old_width, g.new_width)
              for g in layers.values()]  # fmt: skip
    return "prune" if widths and all(n < o for o, n in widths) else "split"


def event_dict(e) -> dict:
    if isinstance(e, dict):
        return e
    if hasattr(e, "to_dict"):
        return e.to_dict()
    return {"repr": repr(e)}


def event_from_dict(d):
    """A ``GrowthEvent`` again, or the dict itself when it is not one."""
    from . import GrowthEvent

    try:
        return GrowthEvent.from_dict(d)
    except Exception:
        return d


# ----------------------------------------------------------------------------------------- checkpoint
def has_checkpoint(backup_dir) -> bool:
    return os.path.exists(os.path.join(backup_dir, WEIGHTS_FILE))


def h5_layer_keys(model) -> dict:
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


def checkpoint_widths(backup_dir, model, names) -> dict:
    """The width of each of the layers ``names`` in the checkpoint's weights (layers it lacks are absent).

    Cost: reads one dataset shape per layer; no weights.
    """
    import h5py

    saved = {}
    keys = h5_layer_keys(model)
    with h5py.File(os.path.join(backup_dir, WEIGHTS_FILE), "r") as f:
        for name in names:
            key = f"layers/{keys.get(name, name)}/vars/0"
            if key in f:
                saved[name] = int(f[key].shape[-1])
    return saved


def fit_to_widths(model, saved, now) -> bool:
    """Prune or widen ``model`` from widths ``now`` to ``saved``; returns whether anything changed.

    The new values do not matter: BackupAndRestore overwrites them, optimizer slots included.
    Cost: at most one ``prune`` and one ``widen`` call.
    """
    from . import prune, widen

    plans, cuts = {}, {}
    for name, w in saved.items():
        if w < now[name]:  # units were pruned before the checkpoint (prune_dead)
            cuts[name] = np.arange(w, now[name])
        if w > now[name]:
            extra = np.arange(w - now[name]) % now[name]
            plans[name] = make_plan(now[name], extra, symmetry="none")
    if cuts:
        prune(model, cuts, optimizer="carry")
    if plans:
        widen(model, plans, symmetry="none", optimizer="carry")
    return bool(plans or cuts)
