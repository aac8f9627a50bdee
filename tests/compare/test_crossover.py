"""The paper's claim on the VGG-style CNN: split learning's bytes per client fall below FedAvg's
where the analytic model says, and its clients compute far less."""

from __future__ import annotations

import pytest
import torch

from splitnn.compare import CommModel, CompareConfig, build_model, crossover, run_method
from tests.helpers import toy_dataset

# The crossover is at K* ~ E·D·c / (R·W): with the VGG net (W = 14.4 MB of weights,
# c = 25 KB at the cut per 28x28 sample) and one epoch, D = 860 samples put it at
# K* = 2, so the test trains K = 1 and K = 2 only (a few seconds on one core).
SAMPLES = 860


@pytest.fixture(scope="module")
def vgg_runs():
    torch.manual_seed(0)
    segments = build_model("vgg", (1, 28, 28), 10)
    train, test = toy_dataset(SAMPLES, seed=11), toy_dataset(16, seed=12)
    config = CompareConfig(model="vgg", clients=(1, 2), epochs=1, batch_size=86)
    runs = {(m, k): run_method(m, k, train, test, config, segments) for k in (1, 2) for m in ("split", "fedavg")}
    return CommModel.from_segments(*segments, (1, 28, 28)), runs


def test_vgg_is_a_few_million_parameters_cut_after_the_first_block(vgg_runs):
    comm, _ = vgg_runs
    assert 3_000_000 < comm.model_bytes // 4 < 5_000_000
    assert comm.cut_bytes == 32 * 14 * 14 * 4
    assert comm.client_bytes < comm.model_bytes / 1000


def test_measured_crossover_lies_where_the_analytic_model_puts_it(vgg_runs):
    comm, runs = vgg_runs
    k_star = crossover(comm, SAMPLES, epochs=1)
    assert k_star == 2
    for run in runs.values():
        assert run.matches_model, (run.method, run.clients)
    bytes_ = {key: run.bytes_per_client for key, run in runs.items()}
    assert bytes_["split", k_star - 1] > bytes_["fedavg", k_star - 1]  # below K*: split sends more ...
    assert bytes_["split", k_star] < bytes_["fedavg", k_star]  # ... from K* on, less
    assert bytes_["fedavg", 1] == bytes_["fedavg", 2]  # FedAvg's cost per client does not fall with K


def test_split_clients_compute_at_least_ten_times_less_than_fedavg_clients(vgg_runs):
    _, runs = vgg_runs
    for k in (1, 2):
        split, fedavg = runs["split", k], runs["fedavg", k]
        assert min(split.client_flops) > 0
        assert 10 * split.flops_per_client <= fedavg.flops_per_client
        assert 10 * max(split.client_flops) <= min(fedavg.client_flops)
