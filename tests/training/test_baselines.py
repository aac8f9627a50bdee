"""FedAvg and large-batch SGD on workers: exact against plain PyTorch, bytes on the right links."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.accounting.flops import ComputeMeter
from splitnn.errors import ConfigurationError, LabelError, ShapeMismatchError
from splitnn.models import small_cnn, tutorial_mlp
from splitnn.training import epoch_batches
from splitnn.training.baselines import FedAvg, LargeBatchSGD, weighted_average
from splitnn.training.baselines.common import CLIENT_SEED_STRIDE
from tests.helpers import assert_same_weights, toy_dataset, train_twin


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _clients(k: int, meter: ComputeMeter | None = None):
    workers = [splitnn.VirtualWorker(f"c{i}", fuse=False) for i in range(k)]
    return [meter.wrap(w) for w in workers] if meter is not None else workers


@pytest.mark.parametrize("builder", [tutorial_mlp, small_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("rounds", [1, 3])
def test_fedavg_one_client_one_local_epoch_is_centralized_training(builder, rounds):
    torch.manual_seed(0)
    segments = builder()
    initial = copy.deepcopy(segments)
    data = toy_dataset(150)
    fed = FedAvg(nn.Sequential(*segments), _clients(1, ComputeMeter()))  # metered, as in the comparison
    fed.fit([data], rounds=rounds, local_epochs=1, batch_size=32, seed=5, progress=False)
    assert_same_weights(fed.model, train_twin(initial, data, epochs=rounds, batch_size=32, seed=5))


def test_fedavg_local_epochs_continue_the_data_order():
    torch.manual_seed(1)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data = toy_dataset(96)
    fed = FedAvg(nn.Sequential(*segments), _clients(1))
    fed.fit([data], rounds=2, local_epochs=2, batch_size=32, seed=2, progress=False)
    assert_same_weights(fed.model, train_twin(initial, data, epochs=4, batch_size=32, seed=2))


def test_large_batch_sgd_one_client_is_centralized_training():
    torch.manual_seed(2)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data = toy_dataset(150)
    lb = LargeBatchSGD(nn.Sequential(*segments), _clients(1, ComputeMeter()))
    lb.fit([data], epochs=2, batch_size=32, seed=4, progress=False)
    assert_same_weights(lb.model, train_twin(initial, data, epochs=2, batch_size=32, seed=4))


def _local_sgd(model: nn.Module, data, *, epochs: int, batch_size: int, seed: int, lr: float = 0.03) -> nn.Module:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for idx in epoch_batches(len(data), batch_size, seed=seed, epoch=epoch):
            opt.zero_grad()
            nn.functional.nll_loss(model(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return model


def test_fedavg_averages_the_clients_weights_by_sample_count():
    torch.manual_seed(3)
    model = nn.Sequential(*tutorial_mlp())
    data = toy_dataset(100)
    shards = [data.subset(slice(0, 70)), data.subset(slice(70, 100))]
    fed = FedAvg(copy.deepcopy(model), _clients(2))
    fed.fit(shards, rounds=1, local_epochs=2, batch_size=16, seed=9, progress=False)
    local = [
        _local_sgd(model, s, epochs=2, batch_size=16, seed=9 + CLIENT_SEED_STRIDE * k) for k, s in enumerate(shards)
    ]
    expected = {
        name: local[0].state_dict()[name] * 0.7 + local[1].state_dict()[name] * 0.3 for name in model.state_dict()
    }
    for name, tensor in fed.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7)
        assert not torch.equal(tensor, local[0].state_dict()[name])


def test_fedavg_bytes_are_two_model_states_per_client_and_round():
    torch.manual_seed(4)
    model = nn.Sequential(*tutorial_mlp())
    data = toy_dataset(90)
    fed = FedAvg(model, _clients(3))
    fed.fit([data.subset(slice(i * 30, (i + 1) * 30)) for i in range(3)], rounds=2, batch_size=16, progress=False)
    size = _state_bytes(model)
    for i in range(3):
        assert fed.ledger.total(src=RESEARCHER, dst=f"c{i}", kind="weights") == 2 * size
        assert fed.ledger.total(src=f"c{i}", dst=RESEARCHER, kind="weights") == 2 * size
    assert fed.ledger.total() == 3 * 2 * 2 * size  # nothing else moves: no data, no labels
    for other in ("c1", "c2"):
        assert fed.ledger.total(src="c0", dst=other) == 0


def test_large_batch_step_averages_gradients_by_batch_size():
    torch.manual_seed(5)
    model = nn.Sequential(*tutorial_mlp())
    data = toy_dataset(48)
    shards = [data.subset(slice(0, 32)), data.subset(slice(32, 48))]
    lb = LargeBatchSGD(copy.deepcopy(model), _clients(2))
    lb.fit(shards, epochs=1, batch_size=32, seed=0, progress=False)  # one step: batches of 32 and 16
    grads = []
    for k, shard in enumerate(shards):
        m = copy.deepcopy(model)
        idx = epoch_batches(len(shard), 32, seed=CLIENT_SEED_STRIDE * k, epoch=0)[0]
        nn.functional.nll_loss(m(shard.features[idx]), shard.labels[idx]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, param in model.named_parameters():
        expected = param.detach() - 0.03 * (grads[0][name] * (2 / 3) + grads[1][name] * (1 / 3))
        torch.testing.assert_close(dict(lb.model.named_parameters())[name].detach(), expected, rtol=1e-6, atol=1e-7)
    # which equals one SGD step on the union batch, up to rounding
    union = copy.deepcopy(model)
    nn.functional.nll_loss(union(data.features), data.labels).backward()
    for (name, p), q in zip(lb.model.named_parameters(), union.parameters()):
        torch.testing.assert_close(
            p.detach(), dict(model.named_parameters())[name].detach() - 0.03 * q.grad, rtol=1e-5, atol=1e-6
        )


def test_large_batch_clients_take_part_once_per_own_batch():
    torch.manual_seed(6)
    model = nn.Sequential(*tutorial_mlp())
    data = toy_dataset(100)
    shards = [data.subset(slice(0, 70)), data.subset(slice(70, 100))]  # 3 batches of 32 vs 1
    lb = LargeBatchSGD(model, _clients(2))
    lb.fit(shards, epochs=2, batch_size=32, progress=False)
    size = _state_bytes(model)
    for name, steps in (("c0", 2 * 3), ("c1", 2 * 1)):
        assert lb.ledger.count(src=RESEARCHER, dst=name, kind="weights") == steps
        assert lb.ledger.total(src=RESEARCHER, dst=name, kind="weights") == steps * size
        assert lb.ledger.total(src=name, dst=RESEARCHER, kind="gradient") == steps * size


def test_weighted_average_is_exact_for_one_state_and_keeps_integer_buffers():
    state = {"w": torch.randn(5), "n": torch.tensor(7)}
    out = weighted_average([state], [13])
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["n"], state["n"])
    two = weighted_average([state, {"w": torch.zeros(5), "n": torch.tensor(1)}], [1, 3])
    torch.testing.assert_close(two["w"], state["w"] / 4)
    assert int(two["n"]) == 7
    with pytest.raises(ConfigurationError, match="different tensors"):
        weighted_average([state, {"v": torch.zeros(5)}], [1, 1])
    with pytest.raises(ConfigurationError):
        weighted_average([state], [0])


def test_bad_configurations_are_refused_before_training():
    model = nn.Sequential(*tutorial_mlp())
    data = toy_dataset(40)
    fed = FedAvg(model, _clients(2))
    with pytest.raises(ConfigurationError, match="2 clients"):
        fed.fit([data], progress=False)
    with pytest.raises(ShapeMismatchError, match="client 1"):
        fed.fit([data, toy_dataset(10, shape=(1, 5, 5))], progress=False)
    wide = toy_dataset(10, classes=12)
    wide.labels[0] = 11
    with pytest.raises(LabelError, match="label 11"):
        fed.fit([data, wide], progress=False)
    with pytest.raises(ConfigurationError, match="rounds"):
        fed.fit([data, data], rounds=0, progress=False)
    assert fed.ledger.total() == 0  # nothing moved
    with pytest.raises(ConfigurationError, match="at least one client"):
        FedAvg(model, [])
    with pytest.raises(ConfigurationError, match="distinct"):
        w = splitnn.VirtualWorker("same")
        FedAvg(model, [w, splitnn.VirtualWorker("same")])

    class NoGrads:
        def __init__(self, worker):
            self._w = worker
            self.name = worker.name

        def __getattr__(self, attr):
            if attr == "get_grads":
                raise AttributeError(attr)
            return getattr(self._w, attr)

    with pytest.raises(ConfigurationError, match="get_grads"):
        LargeBatchSGD(model, [NoGrads(splitnn.VirtualWorker("c0"))])


def test_evaluate_at_the_server_moves_nothing():
    torch.manual_seed(7)
    model = nn.Sequential(*tutorial_mlp())
    fed = FedAvg(model, _clients(1))
    test = toy_dataset(50, seed=1)
    result = fed.evaluate(test)
    with torch.no_grad():
        expected = (model(test.features).argmax(1) == test.labels).float().mean().item()
    assert result.accuracy == pytest.approx(expected) and result.count == 50
    assert fed.ledger.total() == 0
