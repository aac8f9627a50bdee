"""Running the tutorial's code with the facade, and splitnn's own training of the same network."""

from __future__ import annotations

import contextlib
import io
import math

import torch
from torch import nn, optim

import splitnn
from splitnn.data import Dataset
from splitnn.models import tutorial_mlp
from splitnn.training import epoch_batches
from tests.syft.tutorial_code import IMPORTS

EPOCHS, BATCH, LR, SEED = 2, 64, 0.03, 0


class EpochLoader:
    """The tutorial's ``trainloader``: (images, labels) batches, images (B, 1, 28, 28).

    Each pass reshuffles like ``SplitNN.fit`` (``epoch_batches`` with the same seed
    and the pass number as epoch), so both see the same batches in the same order.
    """

    def __init__(self, data: Dataset, batch_size: int = BATCH, seed: int = SEED) -> None:
        self.data, self.batch_size, self.seed, self.passes = data, batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.data.labels) / self.batch_size)

    def __iter__(self):
        batches = epoch_batches(len(self.data.labels), self.batch_size, seed=self.seed, epoch=self.passes)
        self.passes += 1
        for idx in batches:
            yield self.data.features[idx], self.data.labels[idx]


def run_tutorial(code: str, data: Dataset, epochs: int = EPOCHS) -> tuple[dict, list[str]]:
    """Exec the tutorial's import cell, then ``code``, given ``epochs`` and a ``trainloader``.

    Returns the namespace and the lines the code printed.
    """
    namespace = {"__name__": "tutorial", "epochs": epochs, "trainloader": EpochLoader(data)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(IMPORTS + code, "<tutorial>", "exec"), namespace)
    return namespace, out.getvalue().splitlines()


def splitnn_model(hidden: tuple[int, ...], places: list[str], *, flatten: bool) -> splitnn.SplitNN:
    """splitnn's SplitNN of the tutorial network (seed 0, SGD lr 0.03) on fresh VirtualWorkers."""
    torch.manual_seed(SEED)
    segments = tutorial_mlp(hidden, flatten=flatten)
    workers = {name: splitnn.VirtualWorker(name) for name in places}
    return splitnn.SplitNN(segments, [workers[n] for n in places], optimizer=lambda p: optim.SGD(p, lr=LR))


def train_with_fit(data: Dataset, hidden: tuple[int, ...], places: list[str]) -> splitnn.SplitNN:
    """The same network trained by ``SplitNN.fit`` (image batches, first segment flattens)."""
    model = splitnn_model(hidden, places, flatten=True)
    model.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    return model


def train_with_loop(data: Dataset, hidden: tuple[int, ...], places: list[str]) -> tuple[splitnn.SplitNN, list[str]]:
    """The same network trained by splitnn's low-level loop on flattened batches.

    Returns the model and the epoch lines the tutorial would print for it.
    """
    model = splitnn_model(hidden, places, flatten=False)
    n, lines = len(data.labels), []
    for epoch in range(EPOCHS):
        batches = epoch_batches(n, BATCH, seed=SEED, epoch=epoch)
        running_loss = 0
        for idx in batches:
            x, y = data.features[idx], data.labels[idx]
            model.zero_grads()
            loss = nn.NLLLoss()(model.forward(x.view(x.shape[0], -1)), y)
            loss.backward()
            model.backward()
            model.step()
            running_loss += loss.detach()
        lines.append(f"Epoch {epoch} - Training loss: {running_loss / len(batches)}")
    return model, lines


def epoch_losses(lines: list[str]) -> list[float]:
    """The losses the tutorial printed, one per epoch."""
    prefix = "Training loss: "
    return [float(line.split(prefix)[1]) for line in lines if prefix in line]


def link_table(ledger: splitnn.Ledger, kinds: tuple[str, ...] | None = None) -> dict[tuple, tuple[int, int]]:
    """{(from, to, kind): (transfers, bytes)} of a ledger, optionally only some kinds."""
    return {(l.src, l.dst, l.kind): (l.count, l.nbytes) for l in ledger.links() if kinds is None or l.kind in kinds}
