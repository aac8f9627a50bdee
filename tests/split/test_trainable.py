"""The Trainable base class: a model with only the required methods trains under fit with the defaults
(lock-step, fit's data order or its own epoch_plan), and every optional capability it lacks is refused
before any work, naming the rule."""

from __future__ import annotations

import pytest
import torch

import splitnn
from splitnn.errors import ConfigurationError
from splitnn.training import Trainable, epoch_batches
from tests.helpers import toy_dataset, train_twin


class Minimal(Trainable):
    """Only what a Trainable must have, over a SplitNN's steps."""

    def __init__(self, segments):
        self.chain = splitnn.SplitNN(segments, [splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")])
        self.ledger = self.chain.ledger

    def prepare(self, data):
        return self.chain.prepare(data)

    def train_batch(self, dataset, indices):
        return self.chain.train_batch(dataset, indices)

    def eval_batch(self, dataset, indices, *, keep=None):
        return self.chain.eval_batch(dataset, indices)

    def parties(self):
        return self.chain.parties()


class InOrder(Minimal):
    """Chooses its own batches: the data in order, whatever fit's shuffle says."""

    def epoch_plan(self, dataset, n, batch_size, *, shuffle=True, seed=0, epoch=0):
        return epoch_batches(n, batch_size, shuffle=False)


def _segments():
    torch.manual_seed(3)
    return splitnn.models.tutorial_mlp()


@pytest.mark.parametrize("cls, shuffle", [(Minimal, True), (InOrder, False)])
def test_the_defaults_train_as_the_monolithic_twin(cls, shuffle):
    segments, data = _segments(), toy_dataset(96)
    twin = train_twin(segments, data, epochs=2, batch_size=16, shuffle=shuffle)
    model = cls(segments)
    history = model.fit(data, epochs=2, batch_size=16, progress=False)  # Trainable.fit: splitnn.training.fit
    assert len(history.epochs) == 2
    for a, b in zip(model.chain.collect().state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    assert model.evaluate(data).count == 96


@pytest.mark.parametrize(
    "options, rule",
    [
        (dict(pipeline=2), "trains one batch at a time"),
        (dict(accumulate=2), "cannot accumulate or clip across its parties"),
        (dict(metrics=["auc"], test_data="test"), "cannot compute metrics"),
        (dict(checkpoint_dir="unused"), "cannot be checkpointed"),
    ],
)
def test_what_a_model_lacks_is_refused_before_any_work(options, rule, tmp_path):
    model, data = Minimal(_segments()), toy_dataset(32)
    if options.get("test_data") == "test":
        options["test_data"] = toy_dataset(16, seed=1)
    if "checkpoint_dir" in options:
        options["checkpoint_dir"] = tmp_path / "ckpt"
    before = [p.clone() for p in model.chain.collect().parameters()]
    with pytest.raises(ConfigurationError, match=rule):
        model.fit(data, epochs=1, progress=False, **options)
    assert all(torch.equal(a, b) for a, b in zip(before, model.chain.collect().parameters()))


def test_a_model_that_is_no_trainable_is_refused_naming_the_base_class():
    with pytest.raises(ConfigurationError, match="derive it from splitnn.training.Trainable"):
        splitnn.fit(object(), toy_dataset(8))
    with pytest.raises(TypeError, match="abstract"):
        Trainable()
