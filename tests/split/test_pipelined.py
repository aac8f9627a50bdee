"""Pipelined training in-process: K batches in flight compute what the schedule's definition says, exactly.

The oracles write the definition out plainly: stage ``s`` computes batch ``t`` of an epoch, forward
and backward, with its weights after the updates of batches ``0 .. t - d(s)`` (``W_s(t - d(s) + 1)``),
where its depth ``d(s)`` is ``K`` at the data holder, 1 at the label holder and ``ceil(K / 2)`` at a
middle party of three; ``W_s(j + 1)`` is the optimizer's step from ``W_s(j)`` with batch ``j``'s gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import splitnn
from splitnn.errors import ConfigurationError
from splitnn.split.driver import run_in_process
from splitnn.training import Trainable, epoch_batches
from splitnn.training.topologies import UShapedSplitNN
from splitnn.workers.schedules import LockStep, Pipelined
from tests.helpers import assert_same_weights, four_stages, sgd_step, toy_dataset

NAMES = ("alice", "bob", "claire")


def test_k2_two_parties_by_hand():
    """Two parties, Linear layers, SGD, 4 batches of 2 samples, K = 2: each update written out.

    Depths: alice 2 (her batch t uses A(t - 1)), bob 1 (his batch t uses B(t), fresh)."""
    torch.manual_seed(0)
    alice_seg, bob_seg = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    w0 = [alice_seg.weight, alice_seg.bias, bob_seg[0].weight, bob_seg[0].bias]
    w0 = [t.detach().clone() for t in w0]
    data = toy_dataset(8, shape=(3,), classes=3, name="tiny")
    lr = 0.5
    model = splitnn.SplitNN(
        [alice_seg, bob_seg], [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")], optimizer=f"sgd:lr={lr}"
    )
    model.fit(data, epochs=1, batch_size=2, shuffle=False, pipeline=2, progress=False)

    def grad(w, rows):
        w = [t.clone().requires_grad_() for t in w]
        x, y = data.features[rows], data.labels[rows]
        out = F.log_softmax(F.linear(F.linear(x, w[0], w[1]), w[2], w[3]), dim=1)
        return torch.autograd.grad(F.nll_loss(out, y), w)

    b0, b1, b2, b3 = [torch.arange(2 * t, 2 * t + 2) for t in range(4)]
    a0, c0 = w0[:2], w0[2:]  # alice's weights (Linear 3->4), bob's (Linear 4->3)
    g = grad(a0 + c0, b0)  # batch 0: A0, B0
    a1, c1 = sgd_step(a0, g[:2], lr), sgd_step(c0, g[2:], lr)
    g = grad(a0 + c1, b1)  # batch 1: alice started it before batch 0's gradient came back: A0; bob: B1
    a2, c2 = sgd_step(a1, g[:2], lr), sgd_step(c1, g[2:], lr)
    g = grad(a1 + c2, b2)  # batch 2: A1, B2
    a3, c3 = sgd_step(a2, g[:2], lr), sgd_step(c2, g[2:], lr)
    g = grad(a2 + c3, b3)  # batch 3: A2, B3
    w4 = sgd_step(a3, g[:2], lr) + sgd_step(c3, g[2:], lr)
    trained = model.collect()
    got = [trained[0].weight, trained[0].bias, trained[1].weight, trained[1].bias]
    for g, e in zip(got, w4):
        assert torch.equal(g, e)
    # ... which lock-step would not give (its batch t sees W(t)): the oracle tells them apart
    lock = w0
    for rows in (b0, b1, b2, b3):
        lock = sgd_step(lock, grad(lock, rows), lr)
    assert not torch.equal(lock[0], w4[0])


def _three_layers():
    """Linear+ReLU, Linear+Tanh, Linear+LogSoftmax (one segment per party) and their initial weights, flat."""
    torch.manual_seed(1)
    segs = [
        nn.Sequential(nn.Linear(3, 5), nn.ReLU()),
        nn.Sequential(nn.Linear(5, 4), nn.Tanh()),
        nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)),
    ]
    return segs, [t.detach().clone() for s in segs for t in (s[0].weight, s[0].bias)]


def _three_layer_grad(data):
    """The gradient of the three layers' NLL on ``rows`` of ``data`` at the flat weights ``w``, written out."""

    def grad(w, rows):
        w = [t.clone().requires_grad_() for t in w]
        h = torch.tanh(F.linear(torch.relu(F.linear(data.features[rows], w[0], w[1])), w[2], w[3]))
        out = F.log_softmax(F.linear(h, w[4], w[5]), dim=1)
        return torch.autograd.grad(F.nll_loss(out, data.labels[rows]), w)

    return grad


def test_k3_three_parties_by_hand():
    """Three parties, 5 batches, K = 3: depths 3, 2, 1, so batch t uses A(t - 2), B(t - 1), C(t) (at least 0)."""
    segs, w0 = _three_layers()
    data = toy_dataset(10, shape=(3,), classes=3, seed=1, name="tiny")
    lr = 0.3
    model = splitnn.SplitNN(segs, [splitnn.VirtualWorker(n) for n in NAMES], optimizer=f"sgd:lr={lr}")
    model.fit(data, epochs=1, batch_size=2, shuffle=False, pipeline=3, progress=False)
    grad = _three_layer_grad(data)

    b = [torch.arange(2 * t, 2 * t + 2) for t in range(5)]
    a, m, c = [w0[:2]], [w0[2:4]], [w0[4:]]  # each party's weights after 0, 1, 2, ... updates

    def update(g):
        a.append(sgd_step(a[-1], g[:2], lr))
        m.append(sgd_step(m[-1], g[2:4], lr))
        c.append(sgd_step(c[-1], g[4:], lr))

    update(grad(a[0] + m[0] + c[0], b[0]))  # batch 0: A0 B0 C0
    update(grad(a[0] + m[0] + c[1], b[1]))  # batch 1: A0 B0 C1
    update(grad(a[0] + m[1] + c[2], b[2]))  # batch 2: A0 B1 C2
    update(grad(a[1] + m[2] + c[3], b[3]))  # batch 3: A1 B2 C3
    update(grad(a[2] + m[3] + c[4], b[4]))  # batch 4: A2 B3 C4
    w5 = a[5] + m[5] + c[5]
    trained = model.collect()
    got = [t for layer in (trained[0], trained[2], trained[4]) for t in (layer.weight, layer.bias)]
    for g, e in zip(got, w5):
        assert torch.equal(g, e)


def test_k3_weight_prediction_by_hand():
    """K = 3 on three parties with weight prediction (factor 0.25), 6 batches, each forward written out.

    Stage s computes batch t on P_s(t) = W_s(j) + tau x D_s(j), where j = max(0, t - d(s) + 1) is the version
    its forward sees, tau = min(t, d(s) - 1) the batches of the stage still in flight before it (the steps to
    come before batch t's), and D_s(j) the moving average of the stage's updates after j of them:
    D(1) = W(1) - W(0), D(j) = 0.25 x D(j - 1) + 0.75 x (W(j) - W(j - 1)). Nothing is extrapolated before the
    first update (j = 0) or without steps to come (tau = 0, the label holder). The update lands on W_s(t)."""
    segs, w0 = _three_layers()
    initial = copy.deepcopy(segs)
    data = toy_dataset(12, shape=(3,), classes=3, seed=1, name="tiny")
    lr, beta = 0.3, 0.25
    workers = [splitnn.VirtualWorker(n) for n in NAMES]
    model = splitnn.SplitNN(segs, workers, optimizer=f"sgd:lr={lr}", weight_prediction=beta)
    model.fit(data, epochs=1, batch_size=2, shuffle=False, pipeline=3, progress=False)

    grad = _three_layer_grad(data)

    depth = [3, 2, 1]
    W = [[w0[0:2]], [w0[2:4]], [w0[4:6]]]  # W[s][j]: stage s's weights after j updates
    D = [[None], [None], [None]]  # D[s][j]: the moving average after j updates

    def used(s, t):
        j, tau = max(0, t - depth[s] + 1), min(t, depth[s] - 1)
        if j == 0 or tau == 0:
            return W[s][j]
        return [w + tau * d for w, d in zip(W[s][j], D[s][j])]

    for t in range(6):
        g = grad(used(0, t) + used(1, t) + used(2, t), torch.arange(2 * t, 2 * t + 2))
        for s in range(3):
            new = sgd_step(W[s][-1], g[2 * s : 2 * s + 2], lr)
            delta = [a - b for a, b in zip(new, W[s][-1])]
            prev = D[s][-1]
            D[s].append(delta if prev is None else [beta * d + (1 - beta) * n for d, n in zip(prev, delta)])
            W[s].append(new)
    expected = W[0][6] + W[1][6] + W[2][6]
    trained = model.collect()
    got = [t for layer in (trained[0], trained[2], trained[4]) for t in (layer.weight, layer.bias)]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    # ... which plain weight stashing does not give: the oracle tells them apart
    plain = splitnn.SplitNN(initial, [splitnn.VirtualWorker(n) for n in NAMES], optimizer=f"sgd:lr={lr}")
    plain.fit(data, epochs=1, batch_size=2, shuffle=False, pipeline=3, progress=False)
    assert not torch.equal(plain.collect()[0].weight, expected[0])


def _delayed_twin(segments, data, *, depths, epochs, batch_size, make_opt, seed=0, prediction=None):
    """The definition, as a loop over a copy of the segments: segment s computes batch t with its weights after
    j = max(0, t - depths[s] + 1) updates of the epoch; one optimizer over all of them steps after each batch.
    With ``prediction`` (a factor beta), the weights are extrapolated as in test_k3_weight_prediction_by_hand:
    W(j) + tau x D(j), tau = min(t, depths[s] - 1), D the epoch's moving average of the segment's updates."""
    twin = nn.Sequential(*copy.deepcopy(list(segments)))
    opt = make_opt(twin.parameters())
    for epoch in range(epochs):
        versions = [[copy.deepcopy(seg.state_dict())] for seg in twin]  # per segment: W_s(0), W_s(1), ...
        drifts = [[None] for _ in twin]  # per segment: D_s(0) (none), D_s(1), ...
        for t, idx in enumerate(epoch_batches(len(data), batch_size, seed=seed, epoch=epoch)):
            stale = copy.deepcopy(twin)
            for s, seg in enumerate(stale):
                j, tau = max(0, t - depths[s] + 1), min(t, depths[s] - 1)
                seg.load_state_dict(versions[s][j])
                if prediction is not None and j > 0 and tau > 0:
                    with torch.no_grad():
                        for q, d in zip(seg.parameters(), drifts[s][j]):
                            q.copy_(q + tau * d)
            F.nll_loss(stale(data.features[idx]), data.labels[idx]).backward()
            before = [[q.detach().clone() for q in seg.parameters()] for seg in twin]
            for p, q in zip(twin.parameters(), stale.parameters()):
                p.grad = q.grad
            opt.step()
            for s, seg in enumerate(twin):
                versions[s].append(copy.deepcopy(seg.state_dict()))
                if prediction is None:
                    continue
                delta = [q.detach() - b for q, b in zip(seg.parameters(), before[s])]
                prev, beta = drifts[s][-1], prediction
                drifts[s].append(delta if prev is None else [beta * d + (1 - beta) * n for d, n in zip(prev, delta)])
    return twin


@pytest.mark.parametrize("k, prediction", [(2, None), (4, None), (4, 0.5)])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_fit_pipelined_follows_the_definition(k, prediction, opt):
    torch.manual_seed(3)
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 4), nn.LogSoftmax(dim=1)),
    ]
    initial = copy.deepcopy(segments)
    data = toy_dataset(90, shape=(3, 4), classes=4, seed=2)
    spec, make = {
        "sgd": ("sgd:lr=0.1,momentum=0.9", lambda p: optim.SGD(p, lr=0.1, momentum=0.9)),
        "adam": ("adam:lr=0.01", lambda p: optim.Adam(p, lr=0.01)),
    }[opt]
    workers = [splitnn.VirtualWorker(n) for n in NAMES]
    model = splitnn.SplitNN(segments, workers, optimizer=spec, weight_prediction=prediction)
    model.fit(data, epochs=2, batch_size=8, seed=5, pipeline=k, progress=False)
    depths = [k, (k + 1) // 2, 1]  # 1F1B: the middle party keeps half the batches in flight
    twin = _delayed_twin(
        initial, data, depths=depths, epochs=2, batch_size=8, make_opt=make, seed=5, prediction=prediction
    )
    assert_same_weights(model.collect(), twin)


def test_u_shape_and_consecutive_stages_pipelined_follow_the_definition():
    torch.manual_seed(4)
    head, mid, tail = (
        nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU()),
        nn.Sequential(nn.Linear(10, 6), nn.ReLU()),
        nn.Sequential(nn.Linear(6, 4), nn.LogSoftmax(dim=1)),
    )
    initial = copy.deepcopy([head, mid, tail])
    data = toy_dataset(60, shape=(3, 4), classes=4, seed=3)
    alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    u = UShapedSplitNN(head, [mid], tail, alice, bob, optimizer="sgd:lr=0.1")
    u.fit(data, epochs=1, batch_size=6, pipeline=3, progress=False)
    twin = _delayed_twin(
        initial, data, depths=[3, 2, 1], epochs=1, batch_size=6, make_opt=lambda p: optim.SGD(p, lr=0.1)
    )
    assert_same_weights(u.collect(), twin)

    torch.manual_seed(5)
    segs = four_stages()
    initial = copy.deepcopy(segs)
    a, b = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    model = splitnn.SplitNN(segs, [a, a, b, b], optimizer="sgd:lr=0.1")
    model.fit(data, epochs=1, batch_size=6, pipeline=2, progress=False)
    # one cross-party cut: alice's two segments have depth K = 2, bob's two depth 1
    twin = _delayed_twin(
        initial, data, depths=[2, 2, 1, 1], epochs=1, batch_size=6, make_opt=lambda p: optim.SGD(p, lr=0.1)
    )
    assert_same_weights(model.collect(), twin)


def _fit(k, *, threads=False, fuse=True, dropout=False, epochs=2):
    torch.manual_seed(6)
    segments = splitnn.models.tutorial_mlp()
    if dropout:
        segments[1].append(nn.Dropout(0.3))
    model = splitnn.SplitNN(segments, [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES], threads=threads)
    history = model.fit(toy_dataset(200), epochs=epochs, batch_size=16, pipeline=k, progress=False)
    return model, history


def test_threads_give_the_one_thread_numbers_and_ledger():
    one, h1 = _fit(4)
    many, h2 = _fit(4, threads=True)
    assert_same_weights(one.collect(), many.collect())
    assert h1.losses() == h2.losses()
    assert one.ledger.links() == many.ledger.links()


def test_pipelined_ledger_bytes_equal_lockstep():
    lock, hl = _fit(1)
    piped, hp = _fit(8)
    assert lock.ledger.links() == piped.ledger.links()
    assert [e.bytes_sent for e in hl.epochs] == [e.bytes_sent for e in hp.epochs]
    assert hl.losses() != hp.losses()  # ... while the numbers do differ (stale weights)


def test_pipelined_schedule_of_depth_one_is_lockstep():
    """The in-flight engine path (stashes, per-batch gradients) with K = 1 gives lock-step's numbers."""
    lock, _ = _fit(1, epochs=1)
    torch.manual_seed(6)
    model = splitnn.SplitNN(splitnn.models.tutorial_mlp(), [splitnn.VirtualWorker(n) for n in NAMES])
    name, n = model.prepare(toy_dataset(200))
    batches = epoch_batches(n, 16, seed=0, epoch=0)
    losses = []
    run_in_process(model.stages, Pipelined(NAMES, len(batches), 1), name, model.loss, batches, losses.append)
    assert_same_weights(lock.collect(), model.collect())
    assert len(losses) == len(batches)


def test_dropout_pipelined_in_one_thread_is_reproducible():
    a, _ = _fit(3, dropout=True)
    b, _ = _fit(3, dropout=True)
    assert_same_weights(a.collect(), b.collect())


def test_evaluation_and_lockstep_epochs_after_a_pipelined_one():
    model, history = _fit(4, epochs=1)
    result = model.evaluate(toy_dataset(64, seed=9))
    assert 0.0 <= result.accuracy <= 1.0
    model.fit(toy_dataset(200), epochs=1, batch_size=16, progress=False)  # lock-step continues from there
    model.fit(toy_dataset(200), epochs=1, batch_size=16, pipeline=2, progress=False)


def test_pipeline_errors_come_before_work():
    model, _ = _fit(1, epochs=1)
    for bad in (0, -1, 65, 2.0, True):
        with pytest.raises(ConfigurationError, match="pipeline"):
            model.fit(toy_dataset(32), epochs=1, pipeline=bad, progress=False)

    class OneAtATime(Trainable):  # the defaults of a Trainable: lock-step only
        ledger = splitnn.Ledger()
        prepare = train_batch = eval_batch = parties = None

    with pytest.raises(ConfigurationError, match="one batch at a time"):
        splitnn.fit(OneAtATime(), toy_dataset(32), pipeline=2)

    class Untrainable:  # not derived from Trainable: refused at fit's entry, naming the base class
        ledger = splitnn.Ledger()

    with pytest.raises(ConfigurationError, match="derive it from splitnn.training.Trainable"):
        splitnn.fit(Untrainable(), toy_dataset(32))


def test_weight_prediction_arguments():
    def make(value):
        return splitnn.SplitNN(
            splitnn.models.tutorial_mlp(), [splitnn.VirtualWorker(n) for n in NAMES], weight_prediction=value
        )

    assert make(True).weight_prediction == 0.5
    assert make(0.9).weight_prediction == 0.9
    assert make(False).weight_prediction is None and make(None).weight_prediction is None
    for bad in (1.0, -0.1, "0.5", 2):
        with pytest.raises(ConfigurationError, match="weight prediction"):
            make(bad)
    # lock-step ignores it: the same numbers as without
    lock, _ = _fit(1, epochs=1)
    torch.manual_seed(6)
    predicted = make(0.5)
    predicted.fit(toy_dataset(200), epochs=1, batch_size=16, progress=False)
    assert_same_weights(lock.collect(), predicted.collect())


def _lockstep_in_process(fuse):
    torch.manual_seed(6)
    model = splitnn.SplitNN(splitnn.models.tutorial_mlp(), [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES])
    name, n = model.prepare(toy_dataset(200))
    batches = epoch_batches(n, 16, seed=0, epoch=0)
    run_in_process(model.stages, LockStep(NAMES, len(batches)), name, model.loss, batches, lambda stats: None)
    return model


def test_a_lockstep_schedule_runs_in_process_on_unfused_workers_and_refuses_fused_ones():
    lock, _ = _fit(1, epochs=1)
    assert_same_weights(lock.collect(), _lockstep_in_process(fuse=False).collect())
    with pytest.raises(ConfigurationError, match="fuse=False"):
        _lockstep_in_process(fuse=True)
