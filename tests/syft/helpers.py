"""Running the published tutorials with the facade, and the oracles they are checked against."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn, optim

import splitnn
import splitnn.syft as sy
from splitnn.data import Dataset
from splitnn.models import tutorial_mlp
from splitnn.syft.modules import location_of
from splitnn.training import epoch_batches
from tests.syft import notebook

EPOCHS, BATCH, LR, SEED = 2, 64, 0.03, 0


class Loader:
    """A stand-in for the tutorials' ``DataLoader``: (images, labels) batches of MNIST.

    Images are (B, 1, 28, 28), normalised as torchvision's ``ToTensor()`` and
    ``Normalize((0.5,), (0.5,))`` (splitnn's reader does exactly that);
    ``dataset`` and ``len()`` are as a ``DataLoader``'s. With ``shuffle`` each
    pass reshuffles like ``SplitNN.fit`` (``epoch_batches`` with the pass number
    as epoch), so a twin or ``fit`` sees the same batches in the same order.
    """

    def __init__(self, data: Dataset, batch_size: int = BATCH, *, shuffle: bool = True, seed: int = SEED) -> None:
        self.data, self.batch_size, self.shuffle, self.seed, self.passes = data, batch_size, shuffle, seed, 0
        self.dataset = torch.utils.data.TensorDataset(data.features, data.labels)

    def __len__(self) -> int:
        return math.ceil(len(self.data.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.data.labels)
        batches = epoch_batches(n, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.passes)
        self.passes += 1
        for idx in batches:
            yield self.data.features[idx], self.data.labels[idx]


@dataclass
class TutorialRun:
    """What a tutorial left behind: its namespace, what it printed, the ledger, the segments' weights."""

    namespace: dict
    printed: list[str]
    ledger: splitnn.Ledger
    initial: list[dict[str, torch.Tensor]] = field(default_factory=list)  # each segment's weights when placed

    @property
    def models(self) -> list[nn.Module]:
        return self.namespace["models"]

    @property
    def places(self) -> list[str]:
        return [location_of(m).id for m in self.models]  # torch is unhooked: no .location


def run_tutorial(
    cells: Sequence[str], train: Dataset, test: Dataset | None = None, epochs: int = EPOCHS
) -> TutorialRun:
    """Run a tutorial's published cells (see :mod:`tests.syft.notebook`) and unhook torch afterwards.

    The segments' initial weights are copied right after the cell that sends them.
    """
    initial: list[dict[str, torch.Tensor]] = []

    def snapshot(namespace: dict) -> None:
        models = namespace.get("models")
        if not initial and models and all(m.location is not None for m in models):
            initial.extend(copy.deepcopy(m.state_dict()) for m in models)

    testloader = None if test is None else Loader(test, shuffle=False)
    try:
        namespace, printed = notebook.run(
            cells, epochs=epochs, trainloader=Loader(train), testloader=testloader, after_cell=snapshot
        )
        return TutorialRun(namespace, printed, sy.ledger(), initial)
    finally:
        sy.unhook()


def plain_twin_of_tutorial_1(train: Dataset, epochs: int = EPOCHS) -> tuple[nn.Sequential, list[str]]:
    """Tutorial 1's network trained by plain PyTorch: one model, one SGD, the same seed and batches.

    Returns the model and the lines Tutorial 1 would print for it.
    """
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Linear(128, 640),
        nn.ReLU(),
        nn.Linear(640, 10),
        nn.LogSoftmax(dim=1),
    )
    opt = optim.SGD(model.parameters(), lr=LR)
    loader, lines = Loader(train), []
    for epoch in range(epochs):
        running_loss = 0
        for images, labels in loader:
            opt.zero_grad()
            loss = nn.NLLLoss()(model(images.view(images.shape[0], -1)), labels)
            loss.backward()
            opt.step()
            running_loss += loss.detach()
        lines.append(f"Epoch {epoch} - Training loss: {running_loss / len(loader)}")
    return model, lines


def train_with_splitnn(train: Dataset, places: list[str], epochs: int = EPOCHS) -> splitnn.SplitNN:
    """splitnn's own SplitNN of the 784-128-640-10 network on ``places``, trained by ``fit``."""
    torch.manual_seed(SEED)
    segments = tutorial_mlp((128, 640), flatten=True)
    workers = {name: splitnn.VirtualWorker(name) for name in places}
    model = splitnn.SplitNN(segments, [workers[n] for n in places], optimizer=lambda p: optim.SGD(p, lr=LR))
    model.fit(train, epochs=epochs, batch_size=BATCH, seed=SEED, progress=False)
    return model


def epoch_losses(lines: list[str]) -> list[float]:
    """The losses the tutorial printed, one per epoch."""
    prefix = "Training loss: "
    return [float(line.split(prefix)[1]) for line in lines if prefix in line]


def link_table(ledger: splitnn.Ledger, kinds: tuple[str, ...] | None = None) -> dict[tuple, tuple[int, int]]:
    """{(from, to, kind): (transfers, bytes)} of a ledger, optionally only some kinds."""
    return {(l.src, l.dst, l.kind): (l.count, l.nbytes) for l in ledger.links() if kinds is None or l.kind in kinds}
