"""Any task: binary, regression and custom losses train exactly like a plainly written monolithic twin;
labels are checked against the loss before training; metrics are computed at the label holder and equal
scikit-learn / plain arithmetic on the twin's outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

import splitnn
from splitnn.data import Dataset
from splitnn.errors import ConfigurationError, LabelError
from splitnn.training import VerticalSplitNN, epoch_batches
from splitnn.training.topologies import MultiHolderSplitNN
from splitnn.workers.losses import check_loss_at
from tests.helpers import assert_same_weights


def _workers(*names):
    return [splitnn.VirtualWorker(n) for n in names]


def _binary(n: int, seed: int) -> Dataset:
    """Float 0/1 labels that depend on the features (so the net learns something)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + 0.3 * torch.randn(n, generator=g)) > 0).float()
    return Dataset(x, y, "binary")


def _regression(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.linspace(-1, 1, 6) + 0.1 * torch.randn(n, generator=g)
    return Dataset(x, y, "regression")


def _segments(inputs: int, outputs: int = 1) -> list[nn.Module]:
    return [
        nn.Sequential(nn.Linear(inputs, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, outputs)),
    ]


def _twin(segments, data, loss_fn, make_opt, *, epochs, batch_size, seed=0):
    """The same layers as one nn.Sequential, trained in fit's data order with the loss written plainly."""
    net = nn.Sequential(*copy.deepcopy(segments))
    opt = make_opt(net.parameters())
    for epoch in range(epochs):
        for idx in epoch_batches(len(data), batch_size, seed=seed, epoch=epoch):
            opt.zero_grad()
            loss_fn(net(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return net


def test_binary_task_with_bce_matches_its_twin_and_auc_equals_scikit_learn():
    torch.manual_seed(0)
    train, test = _binary(160, seed=1), _binary(90, seed=2)
    segments = _segments(10)
    initial = copy.deepcopy(segments)
    model = splitnn.SplitNN(
        segments, _workers("alice", "bob"), loss="bce_with_logits", optimizer="sgd:lr=0.1,momentum=0.9"
    )
    history = model.fit(train, epochs=3, batch_size=16, test_data=test, metrics=["accuracy", "auc"], progress=False)

    def bce(out, y):  # one logit per sample against (N,) labels
        return F.binary_cross_entropy_with_logits(out, y.view(-1, 1))

    twin = _twin(initial, train, bce, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), epochs=3, batch_size=16)
    assert_same_weights(model.collect(), twin)

    result = model.evaluate(test, metrics=["accuracy", "auc"])
    with torch.no_grad():
        logits = twin.eval()(test.features)
    assert result.metrics["auc"] == roc_auc_score(test.labels.numpy(), logits.flatten().double().numpy())
    assert (
        result.accuracy
        == result.metrics["accuracy"]
        == ((logits.flatten() > 0).float() == test.labels).sum().item() / 90
    )
    assert result.metrics["auc"] > 0.8  # it learned: the oracle compares something meaningful
    assert history.metric("auc")[-1] == result.metrics["auc"]
    assert history.final.test_metrics == result.metrics
    assert list(result.metrics) == ["accuracy", "auc"]
    assert "auc" in str(result)


def test_regression_with_mse_matches_its_twin_and_mse_mae_equal_plain_arithmetic():
    torch.manual_seed(1)
    train, test = _regression(150, seed=3), _regression(70, seed=4)
    segments = _segments(6)
    initial = copy.deepcopy(segments)
    model = splitnn.SplitNN(segments, _workers("alice", "bob"), loss="mse", optimizer="adam:lr=0.01")
    model.fit(train, epochs=4, batch_size=32, progress=False)

    def mse(out, y):
        return F.mse_loss(out, y.view(-1, 1))

    twin = _twin(initial, train, mse, lambda p: torch.optim.Adam(p, lr=0.01), epochs=4, batch_size=32)
    assert_same_weights(model.collect(), twin)

    result = model.evaluate(test, metrics=["mse", "mae"])
    with torch.no_grad():
        err = (twin.eval()(test.features).flatten() - test.labels).double()
    assert result.metrics["mse"] == pytest.approx(float((err**2).mean()), rel=1e-6)
    assert result.metrics["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)
    assert result.loss == pytest.approx(result.metrics["mse"], rel=1e-5)  # the mse loss is the mse metric
    assert math.isnan(result.accuracy)  # regression: no accuracy by default
    assert model.evaluate(test).metrics == {}


def test_a_callable_loss_trains_like_the_named_one_in_process():
    torch.manual_seed(2)
    train = _regression(96, seed=5)
    segments = _segments(6)
    named = splitnn.SplitNN(copy.deepcopy(segments), _workers("alice", "bob"), loss="mse")
    custom = splitnn.SplitNN(
        copy.deepcopy(segments), _workers("alice", "bob"), loss=lambda out, y: F.mse_loss(out, y.view(-1, 1))
    )
    h1 = named.fit(train, epochs=2, batch_size=16, progress=False)
    h2 = custom.fit(train, epochs=2, batch_size=16, progress=False)
    assert h1.losses() == h2.losses()
    assert_same_weights(named.collect(), custom.collect())


def test_multi_label_targets_with_bce_and_per_sample_accuracy():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = torch.stack([(x[:, 0] > 0), (x[:, 1] > 0), (x[:, 0] + x[:, 1] > 0)], dim=1).float()
    data = Dataset(x, y, "multi-label")
    model = splitnn.SplitNN(_segments(5, outputs=3), _workers("alice", "bob"), loss="bce_with_logits")
    model.fit(data, epochs=1, batch_size=16, progress=False)
    result = model.evaluate(data)
    with torch.no_grad():
        out = model.collect()(x)
    assert result.accuracy == ((out > 0).float() == y).all(dim=1).sum().item() / 64  # a sample: all labels right


@pytest.mark.parametrize(
    "loss, labels, outputs, match",
    [
        ("nll", torch.rand(20), 3, r"'d' .*float32 labels but loss 'nll' needs integer class labels.*bce_with_logits"),
        ("cross_entropy", torch.arange(20) % 4, 3, r"label 3 but the model has only 3 outputs"),
        ("mse", torch.rand(20, 2), 1, r"labels of shape \(2,\) per sample but the model outputs \(1,\).*'mse'"),
        ("bce_with_logits", torch.rand(20) * 3, 1, r"targets in \[.*\] but loss 'bce_with_logits' needs 0/1"),
        ("nll", torch.zeros(20, 2, dtype=torch.long), 3, r"shape \(2,\) per sample .* must have shape \(\)"),
    ],
)
def test_labels_that_do_not_suit_the_loss_are_refused_before_training(loss, labels, outputs, match):
    model = splitnn.SplitNN(_segments(4, outputs=outputs), _workers("alice", "bob"), loss=loss)
    bob = model.label_holder
    model.data_holder.add_dataset("d", features=torch.randn(20, 4))
    bob.add_dataset("d", labels=labels)
    with pytest.raises(LabelError, match=match):
        model.fit("d", epochs=1, progress=False)
    assert model.ledger.total() == 0  # nothing moved: refused from the label holder's summary alone


def test_label_checks_run_on_summaries_not_labels():
    """The researcher checks labels from the label holder's DatasetStats: no label byte moves."""
    data = _binary(40, seed=0)
    model = splitnn.SplitNN(_segments(10), _workers("alice", "bob"), loss="bce_with_logits")
    model.prepare(data)
    stats = model.label_holder.dataset_stats(model.prepare(data)[0])
    assert (stats.label_dtype, stats.label_shape, stats.label_min, stats.label_max, stats.label_integral) == (
        "float32",
        (),
        0.0,
        1.0,
        True,
    )
    assert model.ledger.total(kind="labels") == 0


def test_metric_errors_are_clear_and_early():
    reg = splitnn.SplitNN(_segments(6), _workers("alice", "bob"), loss="mse")
    data = _regression(30, seed=0)
    with pytest.raises(ConfigurationError, match=r"metric 'auc' needs a classification loss.*mse"):
        reg.evaluate(data, metrics=["auc"])
    with pytest.raises(ConfigurationError, match="unknown metric 'f1'"):
        reg.evaluate(data, metrics=["f1"])
    with pytest.raises(ConfigurationError, match="computed on test_data"):
        reg.fit(data, metrics=["mse"], progress=False)
    clf = splitnn.SplitNN(_segments(10), _workers("alice", "bob"), loss="bce_with_logits")
    with pytest.raises(ConfigurationError, match="'mse' is for regression"):
        clf.evaluate(_binary(30, seed=0), metrics=["mse"])
    ones = Dataset(torch.randn(30, 10), torch.ones(30), "ones")
    with pytest.raises(LabelError, match="both classes"):
        clf.fit(_binary(30, seed=0), test_data=ones, metrics=["auc"], progress=False)
    assert clf.ledger.total(kind="activation") == 0  # refused before training
    ten = splitnn.SplitNN(splitnn.models.tutorial_mlp(), _workers("alice", "bob", "claire"))
    g = torch.Generator().manual_seed(0)
    mnist_like = Dataset(torch.randn(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g), "x", 10)
    with pytest.raises(ConfigurationError, match="'auc' is for binary tasks"):
        ten.evaluate(mnist_like, metrics=["auc"])


def test_auc_of_two_class_log_softmax_outputs():
    """nll with two classes: the score is log p1 - log p0, which ranks like p1."""
    torch.manual_seed(4)
    data = _binary(80, seed=6)
    labels = data.labels.long()
    segments = [nn.Sequential(nn.Linear(10, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 2), nn.LogSoftmax(dim=1))]
    model = splitnn.SplitNN(segments, _workers("alice", "bob"), loss="nll")
    clf = Dataset(data.features, labels, "two-class", 2)
    model.fit(clf, epochs=2, batch_size=16, progress=False)
    result = model.evaluate(clf, metrics=["accuracy", "auc"])
    with torch.no_grad():
        out = model.collect()(data.features)
    assert result.metrics["auc"] == roc_auc_score(labels.numpy(), (out[:, 1] - out[:, 0]).double().numpy())


def test_topologies_compute_metrics_at_their_label_holder():
    torch.manual_seed(5)
    data = _binary(120, seed=7)
    bottoms = [nn.Sequential(nn.Linear(5, 4), nn.ReLU()) for _ in range(2)]
    top = [nn.Linear(8, 1)]
    a1, a2, bob = _workers("a1", "a2", "bob")
    vertical = VerticalSplitNN(bottoms, [a1, a2], top, bob, loss="bce_with_logits")
    vertical.fit(data, epochs=2, batch_size=16, progress=False)
    result = vertical.evaluate(data, metrics=["accuracy", "auc"])
    with torch.no_grad():
        logits = vertical.collect()(data.features).flatten()
    assert result.metrics["auc"] == roc_auc_score(data.labels.numpy(), logits.double().numpy())

    h1, h2, b = _workers("h1", "h2", "b")
    multi = MultiHolderSplitNN(_segments(10)[0], _segments(10)[1:], [h1, h2], b, loss="bce_with_logits")
    multi.fit(data, epochs=1, batch_size=16, progress=False)
    result = multi.evaluate(data, metrics=["auc"])  # rows evaluated holder by holder: AUC needs all of them
    with torch.no_grad():
        logits = multi.collect()(data.features).flatten()
    assert result.metrics == {"auc": roc_auc_score(data.labels.numpy(), logits.double().numpy())}


def test_a_callable_loss_needs_an_in_process_label_holder():
    class Networked:  # what a RemoteWorker looks like to the check
        name = "bob"

    with pytest.raises(ConfigurationError, match="takes losses by name only"):
        check_loss_at(lambda o, t: o.sum(), Networked())
    assert check_loss_at("mse", Networked()) == "mse"
    with pytest.raises(ConfigurationError, match="unknown loss 'hinge'"):
        check_loss_at("hinge", Networked())


def test_datasets_take_float_targets_and_numpy_and_keep_class_checks():
    import numpy as np

    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    d = Dataset(x, np.array([0.5, 1.0, 0.0, 2.5, -1.0], dtype=np.float32), "reg")
    assert d.labels.dtype == torch.float32 and d.num_classes is None and len(d) == 5
    assert Dataset(torch.zeros(2, 3), torch.tensor([0, 4]), "cls").num_classes is None
    with pytest.raises(splitnn.DataError, match="num_classes describes integer class labels"):
        Dataset(torch.zeros(2, 3), torch.zeros(2), "x", 2)
    with pytest.raises(LabelError, match="NaN"):
        Dataset(torch.zeros(2, 3), torch.tensor([0.0, float("nan")]), "x")
    with pytest.raises(LabelError, match="NaN"):
        splitnn.VirtualWorker("bob").add_dataset("d", labels=torch.tensor([float("inf"), 0.0]))
