"""What pipelining costs in accuracy: Fashion-MNIST, the tutorial network, 5 epochs, K batches in flight.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --data-dir ../shared/data/fashion-mnist
        [--pipeline 1,2,4,8,16] [--seeds 0,1,2] [--epochs 5] [--predict 0.5] [--standardize] [--json out.json]

Each run is ``splitnn.SplitNN(tutorial_mlp(...), alice/bob/claire VirtualWorkers, SGD lr 0.03)``
``.fit(train, epochs, batch_size=64, seed=s, pipeline=K, test_data=test)`` in-process: a
networked run with the same seed computes the same weights bit for bit (tests/workers/
test_pipelined_remote.py), so the accuracy holds for it too; its throughput over a WAN is
what ``benchmarks/bench_wan.py --pipeline`` measures. The table gives, per K, the final test
accuracy of each seed, their mean and its difference to lock-step (K = 1) over the same seeds,
the mean over the last two epochs and the last epoch's training loss (steadier measures than
one test accuracy). ``--predict BETA`` turns on weight prediction for the pipelined runs
(``SplitNN(..., weight_prediction=BETA)``; lock-step is unaffected), ``--standardize``
standardises the pixels with the training set's per-pixel statistics
(:func:`splitnn.data.standardize`) for every run, lock-step included.
``--load out.json`` prints the table of an earlier run.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import splitnn  # noqa: E402
from splitnn.data import load_dataset, standardize  # noqa: E402
from splitnn.models import tutorial_mlp  # noqa: E402

NAMES = ("alice", "bob", "claire")


def run_one(train, test, k: int, seed: int, epochs: int, predict: float | None = None) -> dict:
    torch.manual_seed(seed)
    workers = [splitnn.VirtualWorker(n) for n in NAMES]
    model = splitnn.SplitNN(tutorial_mlp(classes=train.num_classes), workers, weight_prediction=predict)
    start = time.perf_counter()
    history = model.fit(train, epochs=epochs, batch_size=64, seed=seed, test_data=test, pipeline=k, progress=False)
    seconds = time.perf_counter() - start
    return {
        "k": k,
        "seed": seed,
        "predict": predict if k > 1 else None,
        "accuracy": [e.test_accuracy for e in history.epochs],
        "train_loss": history.losses(),
        "train_seconds": sum(e.seconds for e in history.epochs),
        "seconds": seconds,
    }


def print_table(runs: list[dict], epochs: int) -> None:
    """Per K: the final test accuracy of each seed, its mean and the mean difference to lock-step (K = 1) over
    the same seeds, the mean over the last two epochs (one test accuracy swings by +-2 points from epoch to
    epoch at this learning rate), and the last epoch's mean training loss."""
    ks = sorted({r["k"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    acc = {(r["k"], r["seed"]): r["accuracy"] for r in runs}
    loss = {(r["k"], r["seed"]): r["train_loss"][-1] for r in runs}
    print(f"\nFashion-MNIST, tutorial MLP, {epochs} epochs, batch 64, SGD lr 0.03, seeds {seeds}")
    print(
        "| K | test accuracy per seed | mean | vs lock-step (points) | mean of the last 2 epochs | vs lock-step "
        "| training loss, last epoch |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in ks:
        final = [acc[(k, s)][-1] for s in seeds]
        last2 = [statistics.mean(acc[(k, s)][-2:]) for s in seeds]
        cells = [" ".join(f"{a:.4f}" for a in final), f"{statistics.mean(final):.4f}"]
        if all((1, s) in acc for s in seeds):
            cells.append(f"{100 * statistics.mean(acc[(k, s)][-1] - acc[(1, s)][-1] for s in seeds):+.2f}")
            base2 = [statistics.mean(acc[(1, s)][-2:]) for s in seeds]
            cells += [
                f"{statistics.mean(last2):.4f}",
                f"{100 * (statistics.mean(last2) - statistics.mean(base2)):+.2f}",
            ]
        else:
            cells += ["-", f"{statistics.mean(last2):.4f}", "-"]
        cells.append(f"{statistics.mean(loss[(k, s)] for s in seeds):.3f}")
        print(f"| {k} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="Fashion-MNIST IDX files (default: splitnn's search)"
    )
    parser.add_argument("--pipeline", default="1,2,4,8,16", help="batches in flight, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of weights and data order, comma-separated")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--predict", type=float, default=None, help="weight prediction's factor (pipelined runs)")
    parser.add_argument("--standardize", action="store_true", help="standardise the pixels (every run)")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument("--load", type=Path, default=None, help="print the table of an earlier --json, train nothing")
    args = parser.parse_args()
    if args.load is not None:
        runs = json.loads(args.load.read_text())
        print_table(runs, len(runs[0]["accuracy"]))
        return
    torch.set_num_threads(1)
    load = dict(data_dir=args.data_dir, download=args.data_dir is None, progress=False)
    train, test = load_dataset("fashion-mnist", "train", **load), load_dataset("fashion-mnist", "test", **load)
    if args.standardize:
        train, test = standardize(train, test)
    ks = [int(k) for k in args.pipeline.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for k in ks:
        for seed in seeds:
            r = run_one(train, test, k, seed, args.epochs, args.predict)
            runs.append(r)
            print(
                f"K={k:>2} seed {seed}: test accuracy {r['accuracy'][-1]:.4f} "
                f"({len(train) * args.epochs / r['train_seconds']:,.0f} samples/s in-process)",
                flush=True,
            )
    print_table(runs, args.epochs)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
