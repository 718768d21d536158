"""Growth across two worker processes on this machine (loopback only).

TensorFlow: ``tf.distribute.MultiWorkerMirroredStrategy`` from a loopback ``TF_CONFIG``; JAX:
``keras.distribution.initialize`` with two CPU processes and ``DataParallel`` over their two devices
(the JAX pass; PyTorch has no multi-worker training in Keras and skips). Each test
starts both workers of ``multiworker_scenarios.py`` (one per process, each on data of its own), waits
for them with a time limit, kills them on failure, and compares what they wrote:

- ``widen`` keeps the function and every variable (weights and Adam slots) is bit-identical on both
  workers. Under TensorFlow even when each worker draws its fresh units with a seed of its own: a new
  variable's value is the chief's (the strategy broadcasts initial values), so only the widths must
  agree. Under JAX each process splits its own replica: the same plan and seed everywhere keep them equal;
- ``SplitOnPlateau`` decides from identical reduced state: the logged loss is the same on both workers
  although their own data give different losses, so both grow at the same epoch, rank the same units
  (``"change"`` of identical weights) and draw with the same seed (``seed`` + event index);
- (TensorFlow, slow) ``BackupAndRestore`` (one directory per worker) resumes a run killed after its growth epoch: the
  restarted workers widen a fresh model to the checkpoint's widths, load its weights and the callback's
  state, and end where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import BACKEND

SCRIPT = pathlib.Path(__file__).with_name("multiworker_scenarios.py")
TIMEOUT = 420  # seconds for both workers of one run (TensorFlow's start and the collectives' set-up are most of it)

pytestmark = pytest.mark.skipif(BACKEND == "torch", reason="Keras has no multi-worker training on PyTorch")
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="MultiWorkerMirroredStrategy is TensorFlow's")


def _ports() -> str:
    socks = [socket.socket() for _ in range(2)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return ",".join(str(s.getsockname()[1]) for s in socks)
    finally:
        for s in socks:
            s.close()


def _workers(backend: str, out: pathlib.Path, *names: str, kill_at: str | None = None) -> list[dict]:
    """Run both workers; returns each one's results by scenario name.

    ``kill_at``: a file name; once both workers have written ``OUT/<kill_at>-w<i>`` (in the last
    scenario, which never returns) they are SIGKILLed. Workers still alive at the end are killed.
    """
    ports = _ports()
    env = {**os.environ, "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("XLA_FLAGS", None)
    env.pop("TF_CONFIG", None)
    procs, logs = [], []
    try:
        for i in range(2):
            log = open(out / f"stdout-w{i}.txt", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(SCRIPT), backend, str(i), ports, str(out), *names],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if kill_at and all((out / f"{kill_at}-w{i}").exists() for i in range(2)):
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                break
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    why = "\n".join(f"--- worker {i} (exit {p.returncode})\n{t[-4000:]}" for i, (p, t) in enumerate(zip(procs, texts)))
    if kill_at:
        assert all((out / f"{kill_at}-w{i}").exists() for i in range(2)), why
        assert all(p.returncode == -signal.SIGKILL for p in procs), why
        names = names[:-1]
    results = []
    for p, text in zip(procs, texts):
        got = {}
        for line in text.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                got[r["name"]] = r
        assert (kill_at or p.returncode == 0) and set(got) == set(names), why
        for r in got.values():
            assert r["ok"], r["error"]
        results.append(got)
    return results


def _dumps(out: pathlib.Path, name: str) -> list[dict]:
    return [dict(np.load(out / f"{name}-w{i}.npz")) for i in range(2)]


def _same(a: dict, b: dict, atol: float = 0.0):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if atol:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of both workers under this pass's backend: ``widen``, an uninterrupted ``SplitOnPlateau`` fit,
    and on TensorFlow the first half of the resume test: the same fit with BackupAndRestore, killed after
    the growth epoch (last, in the same processes: starting workers is most of the time)."""
    out = tmp_path_factory.mktemp("multiworker")
    if BACKEND == "tensorflow":
        return out, _workers(BACKEND, out, "widen", "plateau", "resume_kill", kill_at="kill-me")
    return out, _workers(BACKEND, out, "widen", "plateau")


def test_widen_on_two_workers(run):
    out, results = run
    for r in results:
        assert r["widen"]["grew"] == ["h1"] and r["widen"]["moved"] <= 1e-5
    w0, w1 = _dumps(out, "widen")
    assert w0["net/h1/kernel"].shape == (6, 16) and w0["net/h2/kernel"].shape == (16, 9)
    _same(w0, w1)  # bit for bit (under TensorFlow although worker 1 drew h2's fresh units with another seed)


def test_split_on_plateau_grows_the_same_units_on_every_worker(run):
    out, results = run
    a, b = (r["plateau"] for r in results)
    assert a["local_loss"] != b["local_loss"]  # the workers' own data differ...
    assert a["logs"] == b["logs"]  # ...but the logged (reduced) loss does not
    assert a["state"] == b["state"] and a["state"]["event_epochs"] == [1]
    assert a["state"]["plans"][0]["h1"]["seed"] == 7  # seed + event index, the same everywhere
    assert a["widths"] == b["widths"] == {"h1": 12, "h2": 9}
    assert [e["split"] for e in a["logs"]] == [0, 7, 0]
    _same(*_dumps(out, "plateau"))


@tf_only
@pytest.mark.slow
def test_backup_and_restore_resumes_a_killed_run_after_growth(run):
    out, _ = run  # both workers were killed at the end of epoch 1 (the growth epoch), after its checkpoint
    killed = [json.loads((out / f"killed-w{i}.json").read_text()) for i in range(2)]
    assert killed[0] == killed[1] and killed[0]["widths"] == {"h1": 12, "h2": 9}
    results = _workers("tensorflow", out, "resume")
    killed_weights, resumed = _dumps(out, "killed"), _dumps(out, "resumed")
    for i, r in enumerate(results):
        r = r["resume"]
        assert r["widths"] == killed[i]["widths"] and r["initial_epoch"] == 2
        assert r["state"] == killed[i]["state"]  # best, wait, cooldown, event epochs and plans
        _same(resumed[i], killed_weights[i])  # weights, Adam slots and step count
        assert r["final_widths"] == {"h1": 12, "h2": 9}
    final = _dumps(out, "resume")
    _same(*final)
    _same(final[0], _dumps(out, "plateau")[0], atol=1e-6)  # where the uninterrupted run ends
