"""OpenMined's three SplitNN tutorials for PySyft 0.2 run as published on the facade, and train correctly.

Each tutorial's code cells (``tests/syft/tutorial_code.py``, verbatim) run in one
namespace as a notebook would, with only the epochs, the import line and the
torchvision data cell replaced (``tests/syft/notebook.py``), on the first 2,000
MNIST test images for 2 epochs (Tutorial 2's test cell on the next 500). The
oracles: Tutorial 1 ends with exactly the weights of plain PyTorch trained the
same way; Tutorials 2 and 3 end with exactly the weights of splitnn's own
SplitNN on the same places; every segment's weights moved; the ledger holds
exactly the transfers the tutorial makes, gradients at every cut included.
"""

from __future__ import annotations

import math
import re
from itertools import pairwise

import pytest
import torch
from torch import nn

import splitnn.syft as sy
from splitnn.syft import TensorsNotCollocatedException
from tests.helpers import assert_same_weights
from tests.syft.conftest import HELD_OUT, TRAIN
from tests.syft.helpers import (
    BATCH,
    EPOCHS,
    TutorialRun,
    epoch_losses,
    link_table,
    plain_twin_of_tutorial_1,
    run_tutorial,
    train_with_splitnn,
)
from tests.syft.tutorial_code import TUTORIAL_1, TUTORIAL_2, TUTORIAL_3

#: The layer sizes of each tutorial's segments (all three train 784-128-640-10).
THREE = [(784, 128), (128, 640), (640, 10)]
SEGMENTS = {1: [(784, 128, 640), (640, 10)], 2: THREE, 3: THREE}
PLACES = {1: ["alice", "bob"], 2: ["alice", "bob", "claire"], 3: ["alice", "bob", "alice"]}
CELLS = {1: TUTORIAL_1, 2: TUTORIAL_2, 3: TUTORIAL_3}


@pytest.fixture(scope="module")
def runs(mnist):
    """Each tutorial's run, made once for this module: ``runs(n)``."""
    train, test = mnist
    done: dict[int, TutorialRun] = {}

    def get(number: int) -> TutorialRun:
        if number not in done:
            done[number] = run_tutorial(CELLS[number], train, test if number == 2 else None)
        return done[number]

    return get


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"tutorial-{n}")
def tutorial(request, runs) -> tuple[int, TutorialRun]:
    return request.param, runs(request.param)


def test_runs_to_the_end(tutorial):
    number, run = tutorial
    assert run.places == PLACES[number]
    losses = epoch_losses(run.printed)
    assert len(losses) == EPOCHS, run.printed
    assert losses[1] < losses[0], losses
    if number == 2:  # the test cell ran too, on the held-out images and on the training images
        pattern = r"(Test|Train) set: Accuracy (\d+)/(\d+) \((\d+)%\)"
        accuracy = [re.fullmatch(pattern, line) for line in run.printed[-2:]]
        assert all(accuracy), run.printed
        assert [int(m[3]) for m in accuracy] == [HELD_OUT, TRAIN]
        assert all(int(m[2]) > 0.5 * int(m[3]) for m in accuracy), run.printed  # 10 classes: far above chance


def test_every_segment_trains(tutorial):
    _, run = tutorial
    assert len(run.initial) == len(run.models)
    for i, (model, before) in enumerate(zip(run.models, run.initial)):
        for name, value in model.state_dict().items():
            assert not torch.equal(value, before[name]), f"segment {i} ({run.places[i]}): {name} never changed"


def _steps(n: int) -> int:
    return math.ceil(n / BATCH)


def _expected_links(number: int) -> dict:
    """Every transfer the tutorial makes, from its network, placement and loops alone."""
    places, segments = PLACES[number], SEGMENTS[number]
    links: dict = {}

    def add(key, count, nbytes):
        c, b = links.get(key, (0, 0))
        links[key] = (c + count, b + nbytes)

    def forward(n: int, passes: int, *, backward: bool) -> None:
        """``passes`` passes over ``n`` images: features in, activations across, (gradients back)."""
        add(("researcher", places[0], "features"), passes * _steps(n), passes * n * 784 * 4)
        for sizes, src, dst in zip(segments, places, places[1:]):
            if src != dst:
                add((src, dst, "activation"), passes * _steps(n), passes * n * sizes[-1] * 4)
                if backward:
                    add((dst, src, "gradient"), passes * _steps(n), passes * n * sizes[-1] * 4)

    for sizes, place in zip(segments, places):  # model.send(location)
        add(("researcher", place, "weights"), 1, sum((a * b + b) * 4 for a, b in pairwise(sizes)))
    forward(TRAIN, EPOCHS, backward=True)
    add(("researcher", places[-1], "labels"), EPOCHS * _steps(TRAIN), EPOCHS * TRAIN * 8)  # int64
    add((places[-1], "researcher", "output"), EPOCHS * _steps(TRAIN), EPOCHS * _steps(TRAIN) * 4)  # each loss
    if number == 2:  # test(splitNN, testloader, ...) and test(splitNN, trainloader, ...): no gradients
        for n in (HELD_OUT, TRAIN):
            forward(n, 1, backward=False)
            add((places[-1], "researcher", "output"), _steps(n), n * 10 * 4)
    return links


def test_ledger_holds_exactly_the_tutorials_transfers(tutorial):
    number, run = tutorial
    assert link_table(run.ledger) == _expected_links(number)


def test_gradients_cross_every_cut(tutorial):
    number, run = tutorial
    steps = EPOCHS * _steps(TRAIN)
    links = link_table(run.ledger, ("gradient",))
    cuts = [(dst, src) for src, dst in pairwise(run.places) if src != dst]
    assert cuts and sorted(links) == sorted((dst, src, "gradient") for dst, src in cuts)
    assert all(count == steps for count, _ in links.values())


def test_tutorial_1_equals_plain_pytorch(runs, mnist):
    """The gradient that requires_grad=True sends back trains the bottom segment exactly as one graph would."""
    run = runs(1)
    twin, twin_printed = plain_twin_of_tutorial_1(mnist[0])
    assert_same_weights(nn.Sequential(*run.models), twin)
    assert run.printed == twin_printed  # the same loss at every step, summed the tutorial's way


@pytest.mark.parametrize("number", [2, 3])
def test_tutorials_2_and_3_equal_splitnn(number, runs, mnist):
    run = runs(number)
    oracle = train_with_splitnn(mnist[0], PLACES[number])
    assert_same_weights(nn.Sequential(*run.models), oracle.collect())
    assert link_table(run.ledger, ("gradient",)) == link_table(oracle.ledger, ("gradient",))


def test_tutorial_3_with_two_segments_on_one_worker(mnist):
    """The folded tutorial's ``a[-1].location == models[i+1].location`` branch: no move, no bytes, same training."""
    published = "model_locations = [alice, bob, alice]"
    cells = [cell.replace(published, "model_locations = [alice, bob, bob]") for cell in TUTORIAL_3]
    assert sum(published in cell for cell in TUTORIAL_3) == 1
    run = run_tutorial(cells, mnist[0])
    oracle = train_with_splitnn(mnist[0], ["alice", "bob", "bob"])
    assert_same_weights(nn.Sequential(*run.models), oracle.collect())
    assert set(link_table(run.ledger, ("activation", "gradient"))) == {
        ("alice", "bob", "activation"),
        ("bob", "alice", "gradient"),
    }


def test_tutorial_1_ledger_figures(runs):
    """Tutorial 1's numbers spelled out: 2 epochs x 2,000 images, 32 batches per epoch."""
    assert link_table(runs(1).ledger) == {
        ("researcher", "alice", "weights"): (1, 732_160),  # (784*128 + 128 + 128*640 + 640) * 4
        ("researcher", "bob", "weights"): (1, 25_640),  # (640*10 + 10) * 4
        ("researcher", "alice", "features"): (64, 12_544_000),  # 2 * 2000 * 784 * 4
        ("researcher", "bob", "labels"): (64, 32_000),  # 2 * 2000 * 8
        ("alice", "bob", "activation"): (64, 10_240_000),  # 2 * 2000 * 640 * 4
        ("bob", "alice", "gradient"): (64, 10_240_000),  # sent back by move(..., requires_grad=True)
        ("bob", "researcher", "output"): (64, 256),  # one float32 loss per batch
    }


# The two steps Tutorial 1 comments out: with PySyft 0.2 they fail, because after a.move(...) the
# pointer a points at bob (where the tensor went) while grad_a was moved to alice.
MANUAL_STEPS = (
    "    # grad_a = remote_a.grad.copy().move(models[0].location)",
    "    # a.backward(grad_a)",
)


def test_tutorial_1_with_its_manual_gradient_steps_fails_as_in_pysyft(mnist):
    assert all(sum(step in cell for cell in TUTORIAL_1) == 1 for step in MANUAL_STEPS)
    cells = list(TUTORIAL_1)
    for step in MANUAL_STEPS:
        cells = [cell.replace(step, step.replace("# ", "", 1)) for cell in cells]
    with pytest.raises(TensorsNotCollocatedException) as exc:
        run_tutorial(cells, mnist[0].subset(slice(0, 64)), epochs=1)
    assert {exc.value.first, exc.value.second} == {"bob", "alice"}
    assert "backward" in str(exc.value)


def test_tutorial_1_without_requires_grad_leaves_the_bottom_segment_untrained(mnist):
    """What the keyword does: without it (PySyft 0.2 too) no gradient comes back and alice's segment stays put."""
    published = "a.move(models[1].location, requires_grad=True)"
    assert sum(published in cell for cell in TUTORIAL_1) == 1
    cells = [cell.replace(published, "a.move(models[1].location)") for cell in TUTORIAL_1]
    run = run_tutorial(cells, mnist[0].subset(slice(0, 256)), epochs=1)
    bottom, top = run.models
    assert all(torch.equal(v, run.initial[0][k]) for k, v in bottom.state_dict().items())
    assert not torch.equal(top.state_dict()["0.weight"], run.initial[1]["0.weight"])
    assert ("bob", "alice", "gradient") not in link_table(run.ledger)
    assert not sy.is_hooked()
