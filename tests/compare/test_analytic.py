"""The analytic model of bytes per client against the ledger, to the byte."""

from __future__ import annotations

import math

import pytest
import torch

from splitnn.compare import CommModel, CompareConfig, build_model, client_bytes, crossover, run_method
from splitnn.compare.analytic import iid_shard_sizes, mean_bytes_per_client
from splitnn.errors import ConfigurationError
from tests.helpers import toy_dataset


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return build_model("mlp", (1, 28, 28), 10)


def test_comm_model_from_segments_measures_the_sizes(mlp):
    comm = CommModel.from_segments(*mlp, (1, 28, 28))
    params = 784 * 128 + 128 + 128 * 640 + 640 + 640 * 10 + 10
    assert comm == CommModel.from_counts(params=params, client_params=784 * 128 + 128, cut_size=128)
    assert comm.cut_bytes == 128 * 4 and comm.model_bytes == comm.grad_bytes == params * 4


@pytest.mark.parametrize("method", ["split", "fedavg", "large-batch", "splitfed-v1", "splitfed-v2"])
@pytest.mark.parametrize("clients", [1, 2, 3, 5])
def test_measured_bytes_per_client_equal_the_analytic_model(mlp, method, clients):
    train, test = toy_dataset(103, seed=1), toy_dataset(20, seed=2)  # 103: uneven shards, short batches
    config = CompareConfig(model="mlp", clients=(clients,), epochs=2, batch_size=16)
    result = run_method(method, clients, train, test, config, mlp)
    assert result.client_bytes == result.predicted_client_bytes  # every client, to the byte
    assert result.bytes_by_kind == result.predicted_bytes_by_kind
    assert result.matches_model and min(result.client_bytes) > 0
    comm = CommModel.from_segments(*mlp, (1, 28, 28))
    assert result.bytes_per_client == mean_bytes_per_client(method, comm, 103, clients, epochs=2, batch_size=16)


def test_the_model_holds_for_label_skewed_shards_and_several_local_epochs(mlp):
    train, test = toy_dataset(120, seed=3), toy_dataset(20, seed=4)
    config = CompareConfig(
        model="mlp", clients=(4,), epochs=2, local_epochs=2, batch_size=16, partition="dirichlet:0.3"
    )
    for method in ("split", "fedavg", "large-batch", "splitfed-v1", "splitfed-v2"):
        result = run_method(method, 4, train, test, config, mlp)
        assert result.client_bytes == result.predicted_client_bytes, method
    assert len(set(result.client_bytes)) > 1  # the shards really are uneven


def test_one_client_every_method_is_the_same_centralized_training(mlp):
    train, test = toy_dataset(80, seed=5), toy_dataset(40, seed=6)
    config = CompareConfig(model="mlp", clients=(1,), epochs=2, batch_size=16)
    methods = ("split", "fedavg", "large-batch", "splitfed-v1", "splitfed-v2")
    results = [run_method(m, 1, train, test, config, mlp) for m in methods]
    assert len({(r.accuracy, r.test_loss) for r in results}) == 1


def test_closed_form_mean_equals_the_mean_of_the_per_client_model():
    comm = CommModel(model_bytes=1000, grad_bytes=900, client_bytes=70, cut_bytes=12)
    for d in (7, 64, 1001):
        for k in (1, 2, 3, 7):
            for method in ("split", "fedavg", "large-batch", "splitfed-v1", "splitfed-v2"):
                for rounds in (None, 1, 3):
                    kw = dict(epochs=3, batch_size=10, local_epochs=3, round_batches=rounds)
                    per = client_bytes(method, comm, iid_shard_sizes(d, k), **kw)
                    expected = sum(sum(p.values()) for p in per) / k
                    assert mean_bytes_per_client(method, comm, d, k, **kw) == pytest.approx(expected)


def test_split_handoffs_follow_the_round_robin_turns():
    comm = CommModel(model_bytes=0, grad_bytes=0, client_bytes=100, cut_bytes=0)
    # 3 clients, 2 epochs: turns 0 1 2 0 1 2; client 0 starts with the weights, client 2 ends with them
    assert [p["weights"] for p in client_bytes("split", comm, [5, 5, 5], epochs=2, batch_size=4)] == [
        (1 + 2) * 100,
        (2 + 2) * 100,
        (2 + 1) * 100,
    ]
    assert client_bytes("split", comm, [5], epochs=3, batch_size=4)[0]["weights"] == 0


def test_splitfed_sends_each_client_segment_up_once_per_round_trained_and_down_once_per_round():
    comm = CommModel(model_bytes=0, grad_bytes=0, client_bytes=60, cut_bytes=12)
    # shards 5, 3, 8 in batches of 2: 3, 2, 4 batches; rounds of 2 batches: 2 rounds, clients train in 2, 1, 2
    per = client_bytes("splitfed-v1", comm, [5, 3, 8], epochs=2, batch_size=2, round_batches=2)
    assert [p["weights"] for p in per] == [2 * (2 + 2) * 60, 2 * (1 + 2) * 60, 2 * (2 + 2) * 60]
    assert [p["activation"] for p in per] == [p["gradient"] for p in per] == [2 * 5 * 12, 2 * 3 * 12, 2 * 8 * 12]
    # a round per epoch: up and down once per epoch; v2 moves the same bytes; one client averages nothing
    per = client_bytes("splitfed-v2", comm, [5, 3, 8], epochs=2, batch_size=2)
    assert [p["weights"] for p in per] == [2 * 2 * 60] * 3
    assert client_bytes("splitfed-v1", comm, [16], epochs=2, batch_size=2)[0]["weights"] == 0
    with pytest.raises(ConfigurationError, match="round_batches"):
        client_bytes("splitfed-v1", comm, [5, 3], epochs=1, batch_size=2, round_batches=0)


def test_crossover_is_where_split_falls_below_fedavg():
    comm = CommModel.from_counts(params=1_000_000, client_params=1000, cut_size=1000)
    # split: 2·E·D·c/K (+ hand-offs); FedAvg: 2·R·W  =>  K* ≈ E·D·c / (R·W) = D / 1000: 2.5 for D = 2500
    assert crossover(comm, 2500, epochs=1) == 3
    split = [mean_bytes_per_client("split", comm, 2500, k, epochs=1) for k in (2, 3)]
    fedavg = mean_bytes_per_client("fedavg", comm, 2500, 3, epochs=1)
    assert split[0] >= fedavg > split[1]
    # two epochs in one FedAvg round double K* to 5, and the client-side hand-offs (2 per client
    # and epoch, 4000 B each) push it to 6: split(5) = (2·2·2500·4000 + 2·9·4000) / 5 > 2·4e6
    assert crossover(comm, 2500, epochs=2, local_epochs=2) == 6
    assert crossover(comm, 10, epochs=1) == 1  # tiny data: split is cheaper from the start
    huge_cut = CommModel.from_counts(params=10, client_params=1, cut_size=10_000)
    assert crossover(huge_cut, 50, epochs=1, max_clients=20) is None


def test_bad_inputs_are_refused():
    comm = CommModel(1, 1, 1, 1)
    with pytest.raises(ConfigurationError, match="unknown method"):
        client_bytes("gossip", comm, [1], epochs=1, batch_size=1)
    with pytest.raises(ConfigurationError, match="multiple"):
        client_bytes("fedavg", comm, [1], epochs=3, batch_size=1, local_epochs=2)
    with pytest.raises(ConfigurationError):
        iid_shard_sizes(3, 4)
    with pytest.raises(ConfigurationError):
        CommModel(-1, 1, 1, 1)
    assert math.isclose(mean_bytes_per_client("fedavg", comm, 5, 5, epochs=2), 4)
