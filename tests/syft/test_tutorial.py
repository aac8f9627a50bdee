"""The tutorial's own code, with only the import changed, trains exactly like splitnn.SplitNN.

The code is OpenMined's "MultiLayer Split Neural Network" tutorial as quoted in
issue 5 (``tests/syft/tutorial_code.py``), exec'd verbatim on the first 2,000
MNIST test images for 2 epochs; the variants change only its model list and
placement. The oracle is splitnn's own SplitNN on VirtualWorkers with the same
seed and batches: final weights must be torch.equal, and the facade's ledger must
hold exactly the transfers the tutorial makes.
"""

from __future__ import annotations

import runpy
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from torch import nn

import splitnn
import splitnn.syft as sy
from splitnn.syft.modules import location_of
from tests.helpers import assert_same_weights
from tests.syft.conftest import SUBSET
from tests.syft.helpers import EPOCHS, epoch_losses, link_table, run_tutorial, train_with_fit, train_with_loop
from tests.syft.tutorial_code import MODELS, TUTORIAL, variant

REPO = Path(__file__).resolve().parents[2]

TWO_SEGMENTS = """\
models = [nn.Sequential(nn.Linear(784, 128), nn.ReLU()),
          nn.Sequential(nn.Linear(128, 10), nn.LogSoftmax(dim=1))]
"""

#: name: (tutorial code, hidden sizes, place of each segment, oracle)
SCENARIOS = {
    "alice-bob-claire": (TUTORIAL, (128, 640), ["alice", "bob", "claire"], "fit"),
    "two-segments": (variant(TWO_SEGMENTS, "zip(models, [alice, bob])"), (128,), ["alice", "bob"], "loop"),
    "bob-twice": (variant(MODELS, "zip(models, [alice, bob, bob])"), (128, 640), ["alice", "bob", "bob"], "fit"),
}


@dataclass
class Run:
    printed: list[str]
    home: list[nn.Module]  # the tutorial's segments after the final .get()s
    ledger: splitnn.Ledger  # the facade's ledger
    oracle: splitnn.SplitNN
    oracle_printed: list[str] | None
    hidden: tuple[int, ...]
    places: list[str]


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def run(request, mnist_subset) -> Run:
    code, hidden, places, oracle_kind = SCENARIOS[request.param]
    namespace, printed = run_tutorial(code, mnist_subset)
    home = [model.get() for model in namespace["models"]]  # the final .get()s
    ledger = sy.ledger()
    sy.unhook()
    if oracle_kind == "fit":
        oracle, oracle_printed = train_with_fit(mnist_subset, hidden, places), None
    else:
        oracle, oracle_printed = train_with_loop(mnist_subset, hidden, places)
    return Run(printed, home, ledger, oracle, oracle_printed, hidden, places)


def test_final_weights_equal_splitnn(run):
    assert all(location_of(m) is None for m in run.home)  # home, local again
    assert_same_weights(nn.Sequential(*run.home), run.oracle.collect())


def test_epoch_losses_fall(run):
    losses = epoch_losses(run.printed)
    assert len(losses) == EPOCHS, run.printed
    assert losses[1] < losses[0] * 0.9, losses
    if run.oracle_printed is not None:  # same per-batch losses, summed the tutorial's way
        assert run.printed == run.oracle_printed


def _expected_links(hidden: tuple[int, ...], places: list[str]) -> dict:
    """Every transfer the tutorial makes, from its network and placement alone."""
    n, batches = SUBSET, -(-SUBSET // 64)
    steps = EPOCHS * batches
    links: dict = {}

    def add(key, count, nbytes):
        c, b = links.get(key, (0, 0))
        links[key] = (c + count, b + nbytes)

    for (fan_in, fan_out), place in zip(pairwise((784, *hidden, 10)), places):
        weights = (fan_in * fan_out + fan_out) * 4
        add(("researcher", place, "weights"), 1, weights)  # model.send(location)
        add((place, "researcher", "weights"), 1, weights)  # the final model.get()
    add(("researcher", places[0], "features"), steps, EPOCHS * n * 784 * 4)  # images.send
    add(("researcher", places[-1], "labels"), steps, EPOCHS * n * 8)  # labels.send (int64)
    for width, src, dst in zip(hidden, places, places[1:]):
        if src != dst:
            add((src, dst, "activation"), steps, EPOCHS * n * width * 4)  # .detach().move()
            add((dst, src, "gradient"), steps, EPOCHS * n * width * 4)  # .grad.copy().move()
    add((places[-1], "researcher", "output"), steps, steps * 4)  # running_loss += loss.get()
    return links


def test_ledger_holds_exactly_the_tutorials_transfers(run):
    assert link_table(run.ledger) == _expected_links(run.hidden, run.places)


def test_cut_transfers_match_splitnn(run):
    kinds = ("activation", "gradient")
    assert link_table(run.ledger, kinds) == link_table(run.oracle.ledger, kinds)
    assert link_table(run.ledger, kinds)  # not vacuous


def test_three_worker_ledger_figures(mnist_subset):
    """The headline numbers, spelled out: 2 epochs x 2,000 images, 32 batches per epoch."""
    namespace, _ = run_tutorial(TUTORIAL, mnist_subset)
    for model in namespace["models"]:
        model.get()
    assert link_table(sy.ledger()) == {
        ("researcher", "alice", "weights"): (1, 401_920),  # (784*128 + 128) * 4
        ("researcher", "bob", "weights"): (1, 330_240),  # (128*640 + 640) * 4
        ("researcher", "claire", "weights"): (1, 25_640),  # (640*10 + 10) * 4
        ("researcher", "alice", "features"): (64, 12_544_000),  # 2 * 2000 * 784 * 4
        ("researcher", "claire", "labels"): (64, 32_000),  # 2 * 2000 * 8
        ("alice", "bob", "activation"): (64, 2_048_000),  # 2 * 2000 * 128 * 4
        ("bob", "claire", "activation"): (64, 10_240_000),  # 2 * 2000 * 640 * 4
        ("claire", "bob", "gradient"): (64, 10_240_000),
        ("bob", "alice", "gradient"): (64, 2_048_000),
        ("claire", "researcher", "output"): (64, 256),  # one float32 loss per batch
        ("alice", "researcher", "weights"): (1, 401_920),
        ("bob", "researcher", "weights"): (1, 330_240),
        ("claire", "researcher", "weights"): (1, 25_640),
    }


def test_example_script_holds_the_tutorial_verbatim_and_runs(shared_data, monkeypatch, capsys):
    script = REPO / "examples" / "pysyft_tutorial.py"
    assert TUTORIAL in script.read_text()
    assert TUTORIAL in (REPO / "README.md").read_text()  # the README section "Coming from PySyft" quotes it verbatim
    monkeypatch.setattr(
        sys,
        "argv",
        [str(script), "--data-dir", str(shared_data), "--limit", "600", "--holdout", "100", "--epochs", "1"],
    )
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "Epoch 0 - Training loss: " in out
    assert "Accuracy on the 100 held-out images: " in out
    assert "bob         claire      activation" in out
