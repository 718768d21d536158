"""Checkpoint and resume alongside ``keras.callbacks.BackupAndRestore``.

After each epoch a growth callback saves its state (plateau bookkeeping, widths, events
and their plans) to ``STATE_FILE`` in the ``backup_dir`` it shares with
``BackupAndRestore``. When a killed run restarts with a fresh model, the callback reads
the widths of the checkpoint's ``latest.weights.h5``, widens (or prunes) the model to
them before ``BackupAndRestore`` loads it, and takes back the state saved for the
checkpoint's epoch.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..compact import CompactPlan
from ..plan import SplitPlan
from ..plan import plan as make_plan

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
        with open(meta) as f:
            epoch = json.load(f).get("epoch")
    if epoch is not None and os.path.exists(path):
        with open(path) as f:
            states = json.load(f)
    return epoch, states, path


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
    if isinstance(p, CompactPlan):
        return {"width": int(p.width), "keep": p.src.tolist()}
    return {"width": p.width, "src": p.src.tolist(), "ratio": p.ratio.tolist()}


def plan_from_dict(v):
    if "keep" in v:
        return CompactPlan(width=int(v["width"]), src=np.asarray(v["keep"], dtype=np.int64))
    return SplitPlan(width=v["width"], src=np.asarray(v["src"]), ratio=v["ratio"], offset=np.zeros(len(v["src"])))


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
