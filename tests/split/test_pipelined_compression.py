"""Pipelining and compression at the cut together, in-process: K batches in flight with codecs compute what the
pipelined rule says on the values the codecs let through, exactly.

The oracles share no code with the engine: the pipelined update rule is written out (as in
tests/split/test_pipelined.py: stage ``s`` computes batch ``t``, forward and backward, with its weights after
``t - d(s) + 1`` updates of the epoch) and so are the codecs' round trips (tests/codec_twins.py:
fp16 a cast there and back, int8 per row ``round((x - min) / scale)`` with ``scale = (max - min) / 255``, topk the
largest magnitudes with the dropped rest added to the next tensor of the same cut and direction). The sender
encodes every batch of a cut and direction in batch order under both schedules, so error feedback sees the same
sequence; the ledger's bytes per batch are those of lock-step with the same codec.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import splitnn
from splitnn.accounting import Ledger
from splitnn.training import epoch_batches
from tests.codec_twins import AtCut, fp16, int8, plain, topk
from tests.cut_models import Gated
from tests.helpers import assert_same_weights, four_stages, sgd_step, toy_dataset

NAMES = ("alice", "bob", "claire")


CODECS = {"none": plain, "fp16": fp16, "int8": int8, "topk:0.25": topk(0.25)}


# ---------------------------------------------------------------------- K = 2, two parties, every update by hand
@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_k2_two_parties_compressed_by_hand(codec):
    """Alice (Linear 3->4) sends q(her activation) to bob (Linear 4->3, log-softmax), who sends back q(the gradient of
    what he received); K = 2: alice's batch t runs on A(t - 1), bob's on B(t); SGD, 4 batches of 2."""
    q = CODECS[codec]
    torch.manual_seed(0)
    alice_seg, bob_seg = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    w0 = [t.detach().clone() for t in (alice_seg.weight, alice_seg.bias, bob_seg[0].weight, bob_seg[0].bias)]
    initial = copy.deepcopy([alice_seg, bob_seg])
    data = toy_dataset(8, shape=(3,), classes=3, name="tiny")
    lr = 0.5
    model = splitnn.SplitNN(
        [alice_seg, bob_seg],
        [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")],
        optimizer=f"sgd:lr={lr}",
        compression=codec,
    )
    history = model.fit(data, epochs=1, batch_size=2, shuffle=False, pipeline=2, progress=False)

    losses = []

    def grads(a, b, rows):
        """Alice's and bob's gradients of one batch: alice on weights ``a``, bob on ``b``, the codec at the cut."""
        x, y = data.features[rows], data.labels[rows]
        with torch.no_grad():
            sent = q(F.linear(x, a[0], a[1]), {})  # what bob decodes
        bw = [t.clone().requires_grad_() for t in b]
        h = sent.clone().requires_grad_()
        loss = F.nll_loss(F.log_softmax(F.linear(h, bw[0], bw[1]), dim=1), y)
        losses.append(loss.item())
        gw, gb, gh = torch.autograd.grad(loss, [*bw, h])
        back = q(gh, {})  # what alice decodes
        aw = [t.clone().requires_grad_() for t in a]
        ga = torch.autograd.grad(F.linear(x, aw[0], aw[1]), aw, back)
        return list(ga), [gw, gb]

    rows = [torch.arange(2 * t, 2 * t + 2) for t in range(4)]
    A, B = [w0[:2]], [w0[2:]]  # each party's weights after 0, 1, 2, ... updates
    for t in range(4):
        ga, gb = grads(A[max(0, t - 1)], B[t], rows[t])
        A.append(sgd_step(A[-1], ga, lr))
        B.append(sgd_step(B[-1], gb, lr))
    trained = model.collect()
    got = [trained[0].weight, trained[0].bias, trained[1].weight, trained[1].bias]
    for g, e in zip(got, A[4] + B[4]):
        assert torch.equal(g, e)
    assert history.losses() == pytest.approx([sum(losses) / 4], rel=1e-6)

    # the oracle tells the codec apart: the same pipelined run without it ends elsewhere
    plain_model = splitnn.SplitNN(
        initial, [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")], optimizer=f"sgd:lr={lr}"
    )
    plain_model.fit(data, epochs=1, batch_size=2, shuffle=False, pipeline=2, progress=False)
    assert not torch.equal(plain_model.collect()[0].weight, A[4][0])


# ---------------------------------------------------------------------- the rule as a loop, codecs at the cuts
def _delayed_coded_twin(segments, data, *, depths, crossing, activation, gradient, epochs, batch_size, seed):
    """Segment s computes batch t with its weights after max(0, t - depths[s] + 1) updates of the epoch; at each cut
    that crosses parties the activation and its gradient go through the codecs (one error feedback state per cut and
    direction, used in batch order); one momentum-SGD optimizer over every segment steps after each batch."""
    twin = [copy.deepcopy(s) for s in segments]
    opt = optim.SGD([p for s in twin for p in s.parameters()], lr=0.1, momentum=0.9)
    states = [({}, {}) for _ in twin[:-1]]
    losses = []
    for epoch in range(epochs):
        versions = [[copy.deepcopy(seg.state_dict())] for seg in twin]
        for t, idx in enumerate(epoch_batches(len(data), batch_size, seed=seed, epoch=epoch)):
            stale = copy.deepcopy(twin)
            for s, seg in enumerate(stale):
                seg.load_state_dict(versions[s][max(0, t - depths[s] + 1)])
            x = data.features[idx]
            for i, seg in enumerate(stale):
                x = seg(x)
                if i < len(stale) - 1 and crossing[i]:
                    fa, fg = states[i]
                    x = AtCut.apply(x, lambda v, s=fa: activation(v.detach(), s), lambda g, s=fg: gradient(g, s))
            loss = F.nll_loss(x, data.labels[idx])
            loss.backward()
            losses.append((loss.item(), len(idx)))
            for p, q in zip((p for s in twin for p in s.parameters()), (p for s in stale for p in s.parameters())):
                p.grad = q.grad
            opt.step()
            for s, seg in enumerate(twin):
                versions[s].append(copy.deepcopy(seg.state_dict()))
    return nn.Sequential(*twin), losses


def _segments(seed=3):
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 4), nn.LogSoftmax(dim=1)),
    ]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(
    "activation,gradient", [("int8", "int8"), ("fp16", "fp16"), ("int8", "fp16"), ("topk:0.25", "topk:0.25")]
)
def test_fit_pipelined_compressed_follows_the_definition(k, activation, gradient):
    segments = _segments()
    data = toy_dataset(90, shape=(3, 4), classes=4, seed=2)
    model = splitnn.SplitNN(
        copy.deepcopy(segments),
        [splitnn.VirtualWorker(n) for n in NAMES],
        optimizer="sgd:lr=0.1,momentum=0.9",
        compression={"activation": activation, "gradient": gradient},
    )
    history = model.fit(data, epochs=2, batch_size=8, seed=5, pipeline=k, progress=False)
    twin, losses = _delayed_coded_twin(
        segments,
        data,
        depths=[k, (k + 1) // 2, 1],
        crossing=[True, True],
        activation=CODECS[activation],
        gradient=CODECS[gradient],
        epochs=2,
        batch_size=8,
        seed=5,
    )
    assert_same_weights(model.collect(), twin)
    per_epoch = len(losses) // 2  # an epoch's loss: the mean over its samples
    means = [sum(v * n for v, n in part) / sum(n for _, n in part) for part in (losses[:per_epoch], losses[per_epoch:])]
    assert history.losses() == pytest.approx(means, rel=1e-6)


def test_consecutive_stages_and_one_compressed_cut_follow_the_definition():
    """Alice runs stages 0-1, bob 2-3: only cut 1 crosses, so only it is coded (int8 forward, topk back)."""
    torch.manual_seed(5)
    segs = four_stages()
    data = toy_dataset(60, shape=(3, 4), classes=4, seed=3)
    a, b = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    model = splitnn.SplitNN(
        copy.deepcopy(segs),
        [a, a, b, b],
        optimizer="sgd:lr=0.1,momentum=0.9",
        compression={"activation": "int8", "gradient": "topk:0.25"},
    )
    model.fit(data, epochs=1, batch_size=6, seed=1, pipeline=3, progress=False)
    twin, _ = _delayed_coded_twin(
        segs,
        data,
        depths=[3, 3, 1, 1],
        crossing=[False, True, False],
        activation=int8,
        gradient=topk(0.25),
        epochs=1,
        batch_size=6,
        seed=1,
    )
    assert_same_weights(model.collect(), twin)


# ---------------------------------------------------------------------- the ledger: what lock-step sends, per batch
class RecordingLedger(Ledger):
    """A ledger that also keeps every record, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple] = []

    def record(self, src, dst, kind, nbytes, raw=None):
        self.records.append((src, dst, kind, nbytes, raw))
        super().record(src, dst, kind, nbytes, raw)


def _payload(codec, rows, width):
    """Bytes of one codec payload for a rows x width float32 tensor: a 24-byte header (magic, codec, dtype, shape),
    then fp16 2 bytes a value; int8 a float32 scale and zero point per row and a byte a value."""
    return {"fp16": 24 + 2 * rows * width, "int8": 24 + 8 * rows + rows * width}[codec]


@pytest.mark.parametrize("codec", ["int8", "fp16"])
@pytest.mark.parametrize("threads", [False, True], ids=["one-thread", "threads"])
def test_ledger_bytes_per_batch_equal_lockstep(codec, threads):
    data = toy_dataset(200)  # batches of 16, the last of 8
    runs = {}
    for k in (1, 4):
        torch.manual_seed(6)
        ledger = RecordingLedger()
        model = splitnn.SplitNN(
            splitnn.models.tutorial_mlp(),
            [splitnn.VirtualWorker(n, ledger=ledger) for n in NAMES],
            ledger=ledger,
            compression=codec,
            threads=threads,
        )
        history = model.fit(data, epochs=2, batch_size=16, pipeline=k, progress=False)
        runs[k] = (ledger, history)
    (lock, hl), (piped, hp) = runs[1], runs[4]
    assert sorted(piped.records) == sorted(lock.records)
    assert lock.links() == piped.links()
    assert [e.bytes_sent for e in hl.epochs] == [e.bytes_sent for e in hp.epochs]
    assert hl.losses() != hp.losses()  # ... while the numbers differ (stale weights)
    # each crossing is one codec payload of its batch's shape, beside the raw size
    want = []
    for epoch in range(2):
        for idx in epoch_batches(200, 16, seed=0, epoch=epoch):
            n = len(idx)
            for src, dst, kind, width in (
                ("alice", "bob", "activation", 128),
                ("bob", "claire", "activation", 640),
                ("claire", "bob", "gradient", 640),
                ("bob", "alice", "gradient", 128),
            ):
                want.append((src, dst, kind, _payload(codec, n, width), 4 * n * width))
    cut = [r for r in piped.records if r[2] in ("activation", "gradient")]
    assert sorted(cut) == sorted(want)


def test_several_values_at_a_compressed_cut_pipelined():
    """Gated: a float that needs a gradient, a float mask and an int64 index cross the first cut as one payload; the
    pipelined run moves exactly lock-step's bytes, and a thread per party computes the one-thread numbers."""
    data = toy_dataset(64, shape=(20,), seed=4)
    results = []
    for k, threads in ((1, False), (3, False), (3, True)):
        torch.manual_seed(0)
        model = splitnn.SplitNN(
            splitnn.cut(Gated(), at=["mid", "head"]),
            [splitnn.VirtualWorker(n) for n in NAMES],
            optimizer="sgd:lr=0.1",
            compression=[{"activation": "int8", "gradient": "fp16"}, "int8"],
            threads=threads,
        )
        history = model.fit(data, epochs=1, batch_size=16, seed=2, pipeline=k, progress=False)
        results.append((model, history))
    (lock, hl), (one, h1), (many, h2) = results
    assert lock.ledger.links() == one.ledger.links() == many.ledger.links()
    assert lock.ledger.raw_total() > lock.ledger.total()
    assert_same_weights(one.collect(), many.collect())
    assert h1.losses() == h2.losses()


@pytest.mark.parametrize("codec", ["int8", "topk:0.25"])
def test_threads_give_the_one_thread_numbers(codec):
    def run(threads):
        torch.manual_seed(6)
        model = splitnn.SplitNN(
            splitnn.models.tutorial_mlp(), [splitnn.VirtualWorker(n) for n in NAMES], compression=codec, threads=threads
        )
        return model, model.fit(toy_dataset(200), epochs=2, batch_size=16, pipeline=4, progress=False)

    (one, h1), (many, h2) = run(False), run(True)
    assert_same_weights(one.collect(), many.collect())
    assert h1.losses() == h2.losses()
    assert one.ledger.links() == many.ledger.links()


def test_evaluation_and_lockstep_after_a_compressed_pipelined_epoch():
    """The error feedback carries on from a pipelined epoch into a lock-step one (same encoders at the senders)."""
    torch.manual_seed(6)
    model = splitnn.SplitNN(
        splitnn.models.tutorial_mlp(), [splitnn.VirtualWorker(n) for n in NAMES], compression="topk:0.1"
    )
    model.fit(toy_dataset(200), epochs=1, batch_size=16, pipeline=4, progress=False)
    assert 0.0 <= model.evaluate(toy_dataset(64, seed=9)).accuracy <= 1.0
    model.fit(toy_dataset(200), epochs=1, batch_size=16, progress=False)
    model.fit(toy_dataset(200), epochs=1, batch_size=16, pipeline=2, progress=False)
