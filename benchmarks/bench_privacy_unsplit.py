"""UnSplit (black-box inversion) against a one-layer convolutional data holder, over seeds, with defenses.

Per seed: ``small_cnn`` (its first segment, conv 3x3 with 8 channels, ReLU, max-pool, is alice's)
trained for one epoch (SGD lr 0.05, batch 64) on 1,500 MNIST test digits; bob inverts 16 other
digits' activations with UnSplit (50 rounds of 20 input steps and 20 surrogate steps, TV weight
0.003), knowing alice's architecture, not her weights. Defenses: noise at the cut (sigma in units
of the mean activation norm, clip to that norm) and NoPeek (alice trains with alpha x dCor).
MSE and SSIM on a [0, 1] pixel scale, against guessing the mean of the 1,500 training digits.

    python benchmarks/bench_privacy_unsplit.py [--data-dir ../shared/data/mnist] [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from splitnn.data import load_dataset
from splitnn.models import small_cnn
from splitnn.privacy.attacks.unsplit import UnSplit, UnSplitConfig
from splitnn.privacy.defenses import CutNoise, NoPeek
from splitnn.privacy.metrics import mse, ssim

REPO = Path(__file__).resolve().parents[1]
SETTINGS = (("none", 0.0), ("noise", 0.01), ("noise", 0.03), ("nopeek", 2.0))


def _quality(rec: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    rec01, true01 = (rec + 1) / 2, (truth + 1) / 2
    return mse(rec01, true01), float(ssim(rec01, true01, data_range=1.0))


def _interval(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.4f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = float(stats.t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return f"{m:.4f} ({m - half:.4f}-{m + half:.4f})"


def run(seed: int, name: str, strength: float, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    torch.manual_seed(seed)
    segments = small_cnn()
    bottom = NoPeek(segments[0], alpha=strength) if name == "nopeek" else segments[0]
    model = nn.Sequential(bottom, *segments[1:])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for idx in torch.randperm(1500).split(64):
        opt.zero_grad()
        F.nll_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    victims = x[1500 + 16 * seed : 1516 + 16 * seed]
    with torch.no_grad():
        acts = segments[0](victims)
        if name == "noise":
            acts = CutNoise(float(acts.flatten(1).norm(dim=1).mean()), strength, seed=seed)(acts)
    rec = UnSplit(lambda: small_cnn()[0], UnSplitConfig(seed=seed)).attack(acts, (1, 28, 28)).reconstructions
    return _quality(rec, victims)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    d = load_dataset("mnist", "test", data_dir=args.data_dir, download=False, progress=False, limit=1500 + 16 * 8)
    x, y = d.features, d.labels
    mean = x[:1500].mean(dim=0, keepdim=True)
    base = [_quality(mean.expand(16, -1, -1, -1), x[1500 + 16 * s : 1516 + 16 * s]) for s in range(args.seeds)]
    print(f"mean image: MSE {_interval([b[0] for b in base])}, SSIM {_interval([b[1] for b in base])}")
    start = time.perf_counter()
    for name, strength in SETTINGS:
        res = [run(s, name, strength, x, y) for s in range(args.seeds)]
        print(f"{name} {strength:g}: MSE {_interval([r[0] for r in res])}, SSIM {_interval([r[1] for r in res])}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
