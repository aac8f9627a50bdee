"""FLOPs and time per worker: exact counts for known layers, charged to the right party."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting.flops import ComputeMeter, MeteredWorker, unwrap
from splitnn.workers import Worker
from tests.helpers import assert_same_weights, toy_dataset, train_twin

B, IN, HID, OUT = 16, 12, 8, 4


def _two_party_model(meter: ComputeMeter, *, fuse: bool):
    torch.manual_seed(0)
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(IN, HID), nn.ReLU()),
        nn.Sequential(nn.Linear(HID, OUT), nn.LogSoftmax(dim=1)),
    ]
    alice = meter.wrap(splitnn.VirtualWorker("alice", fuse=fuse))
    bob = meter.wrap(splitnn.VirtualWorker("bob", fuse=fuse))
    return splitnn.SplitNN(segments, [alice, bob]), segments


def test_metered_worker_is_a_worker_and_shares_the_ledger():
    meter = ComputeMeter()
    inner = splitnn.VirtualWorker("alice")
    alice = meter.wrap(inner)
    assert isinstance(alice, Worker) and isinstance(alice, MeteredWorker)
    assert unwrap(alice) is inner and meter.wrap(alice).inner is inner
    model, _ = _two_party_model(meter, fuse=False)
    assert model.data_holder.ledger is model.ledger is unwrap(model.data_holder).ledger


def test_flops_are_exact_and_charged_to_the_party_that_computes():
    """Linear(i, o) on B rows: 2·B·i·o forward; backward: the same for the weight gradient and,
    unless the input is raw data, again for the input gradient."""
    meter = ComputeMeter()
    model, _ = _two_party_model(meter, fuse=False)
    data = toy_dataset(B, shape=(IN,), classes=OUT)
    model.fit(data, epochs=1, batch_size=B, progress=False)
    alice, bob = meter.stats("alice"), meter.stats("bob")
    assert alice.forward_flops == 2 * B * IN * HID
    assert alice.backward_flops == 2 * B * IN * HID  # weight gradient only: no gradient for raw data
    assert bob.forward_flops == 2 * B * HID * OUT
    assert bob.backward_flops == 2 * 2 * B * HID * OUT  # weight gradient and the gradient sent back to alice
    assert alice.other_flops == bob.other_flops == 0  # an SGD step is element-wise: not counted
    assert alice.flops == alice.forward_flops + alice.backward_flops
    assert alice.seconds > 0 and alice.calls > 0


def test_fused_autograd_charges_every_backward_to_the_label_holder():
    """Why the comparison runs workers with fuse=False: one fused backward runs inside bob's call."""
    meter = ComputeMeter()
    model, _ = _two_party_model(meter, fuse=True)
    model.fit(toy_dataset(B, shape=(IN,), classes=OUT), epochs=1, batch_size=B, progress=False)
    assert meter.stats("alice").backward_flops == 0
    assert meter.stats("bob").backward_flops == 2 * 2 * B * HID * OUT + 2 * B * IN * HID


def test_metering_does_not_change_the_numbers():
    meter = ComputeMeter()
    model, segments = _two_party_model(meter, fuse=False)
    initial = copy.deepcopy(segments)
    data = toy_dataset(64, shape=(IN,), classes=OUT)
    model.fit(data, epochs=2, batch_size=16, seed=3, progress=False)
    assert_same_weights(model.collect(), train_twin(initial, data, epochs=2, batch_size=16, seed=3))


def test_nested_measurements_count_once_and_time_only_mode():
    meter = ComputeMeter()
    x, w = torch.randn(4, 5), torch.randn(5, 3)
    with meter.measure("a", "forward"):
        x @ w
        with meter.measure("b", "forward"):
            x @ w
    assert meter.stats("a").forward_flops == 2 * 2 * 4 * 5 * 3
    assert meter.stats("b").calls == 0
    timer = ComputeMeter(count_flops=False)
    with timer.measure("a", "forward"):
        x @ w
    assert timer.stats("a").flops == 0 and timer.stats("a").calls == 1
    meter.reset()
    assert meter.stats("a").flops == 0
    assert "forward FLOPs" in meter.format_table()


def test_an_error_inside_a_call_still_ends_the_measurement():
    meter = ComputeMeter()
    with pytest.raises(RuntimeError), meter.measure("a", "forward"):
        raise RuntimeError("boom")
    with meter.measure("a", "forward"):  # not stuck in a "nested" state
        torch.randn(2, 3) @ torch.randn(3, 2)
    assert meter.stats("a").forward_flops == 2 * 2 * 3 * 2
