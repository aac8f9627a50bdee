"""PySyft Tutorial 1 run as published on splitnn.syft, against its plain-PyTorch twin, in one run.

Tutorial 1's code cells (as the tests run them: tests/syft/notebook.py) train
784-128-640-10 cut in two (alice, bob) with ``move(..., requires_grad=True)``;
the twin is the same layers as one nn.Sequential with one SGD optimizer, fed the
same batches, and ends with the same weights. Runs are interleaved (facade,
twin, facade, ...) so that machine noise hits both alike; the report gives
medians and the ratio facade/twin. Needs MNIST's test set (``--data-dir``).

    OMP_NUM_THREADS=1 python benchmarks/bench_pysyft.py --data-dir ../shared/data [--images 8000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tutorial's cells live with the tests

from splitnn.data import load_dataset  # noqa: E402
from tests.helpers import assert_same_weights  # noqa: E402
from tests.syft.helpers import plain_twin_of_tutorial_1, run_tutorial  # noqa: E402
from tests.syft.tutorial_code import TUTORIAL_1  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_dataset("mnist", "test", data_dir=args.data_dir, limit=args.images, progress=False)
    facade, plain = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run = run_tutorial(TUTORIAL_1, train, epochs=args.epochs)
        facade.append(time.perf_counter() - start)
        start = time.perf_counter()
        twin, _ = plain_twin_of_tutorial_1(train, epochs=args.epochs)
        plain.append(time.perf_counter() - start)
    assert_same_weights(torch.nn.Sequential(*run.models), twin)
    f, p = statistics.median(facade), statistics.median(plain)
    steps = args.epochs * -(-args.images // 64)
    print(f"Tutorial 1, {args.images} images x {args.epochs} epochs ({steps} steps), median of {args.repeats}:")
    print(f"  splitnn.syft  {f:.3f} s")
    print(f"  plain PyTorch {p:.3f} s   (same final weights: torch.equal)")
    print(f"  ratio {f / p:.2f}; {1000 * (f - p) / steps:.2f} ms of facade per step")


if __name__ == "__main__":
    main()
