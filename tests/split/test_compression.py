"""Compression at the cuts, in-process: SplitNN(..., compression=...) trains to exactly the weights of the unsplit
model trained with the codec applied at the cuts by hand (the twin below writes the arithmetic plainly), fused and
eager; "none" changes nothing; the ledger records the codecs' bytes beside the raw size; bad specs are refused early."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitnn
from splitnn.errors import ConfigurationError
from splitnn.split.compression import CutCompression, parse_compression
from splitnn.training import epoch_batches
from splitnn.wire import compress
from tests.codec_twins import TWIN_CODECS, AtCut
from tests.cut_models import Gated
from tests.helpers import toy_dataset

NAMES = ("alice", "bob", "claire")
EPOCHS, BATCH, SEED, N = 2, 16, 5, 64


def _segments():
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(20, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 12), nn.Tanh()),
        nn.Sequential(nn.Linear(12, 10), nn.LogSoftmax(dim=1)),
    ]


def _opt(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def train_twin(segments, data, activation, gradient):
    """The unsplit model trained by hand in fit's data order, with the codecs applied at both cuts."""
    segs = copy.deepcopy(segments)
    params = [p for s in segs for p in s.parameters()]
    opt = _opt(params)
    states = [({}, {}) for _ in range(len(segs) - 1)]  # per cut: (activation, gradient) error feedback
    losses = []
    for epoch in range(EPOCHS):
        for idx in epoch_batches(len(data), BATCH, seed=SEED, epoch=epoch):
            opt.zero_grad()
            x = data.features[idx]
            for i, seg in enumerate(segs):
                x = seg(x)
                if i < len(segs) - 1:
                    fa, fg = states[i]
                    x = AtCut.apply(
                        x,
                        (lambda t, s=fa: activation(t.detach(), s)) if activation else (lambda t: t),
                        (lambda t, s=fg: gradient(t, s)) if gradient else (lambda t: t),
                    )
            loss = F.nll_loss(x, data.labels[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return segs, losses


def _split(compression, fuse=True, segments=None, names=NAMES):
    workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in dict.fromkeys(names)]
    by_name = {w.name: w for w in workers}
    return splitnn.SplitNN(
        copy.deepcopy(segments or _segments()), [by_name[n] for n in names], optimizer=_opt, compression=compression
    )


# --------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize(
    "activation,gradient", [("fp16", "fp16"), ("bf16", "none"), ("int8", "int8"), ("none", "int8"), ("topk:0.25",) * 2]
)
def test_compressed_training_equals_the_unsplit_model_with_the_codec_by_hand(activation, gradient, fuse):
    data = toy_dataset(N, shape=(20,), seed=1)
    split = _split({"activation": activation, "gradient": gradient}, fuse)
    history = split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    twin, twin_losses = train_twin(_segments(), data, TWIN_CODECS.get(activation), TWIN_CODECS.get(gradient))
    assert history.losses() == pytest.approx([sum(twin_losses[:4]) / 4, sum(twin_losses[4:]) / 4], rel=1e-6)
    got = list(split.collect().parameters())
    want = [p for s in twin for p in s.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # the bytes of each crossing are the codec's payload for its shape, beside the raw size
    steps = EPOCHS * N // BATCH
    for src, dst, kind, width, spec in (
        ("alice", "bob", "activation", 16, activation),
        ("bob", "claire", "activation", 12, activation),
        ("bob", "alice", "gradient", 16, gradient),
        ("claire", "bob", "gradient", 12, gradient),
    ):
        raw = BATCH * width * 4
        sent = compress.get_codec(spec).nbytes(torch.empty(BATCH, width)) if spec != "none" else raw
        assert split.ledger.total(src=src, dst=dst, kind=kind) == steps * sent
        assert split.ledger.raw_total(src=src, dst=dst, kind=kind) == steps * raw
        assert split.ledger.count(src=src, dst=dst, kind=kind) == steps


@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.25"])
def test_predict_applies_the_codec_without_touching_the_error_feedback(spec):
    data = toy_dataset(N, shape=(20,), seed=2)
    split, ref = _split(spec), _split(spec)
    split.fit(data, epochs=1, batch_size=BATCH, seed=SEED, progress=False)
    layers = split.collect()
    code = TWIN_CODECS[spec]
    x = data.features[:8]
    with torch.no_grad():  # evaluation: the codec without error feedback
        want = layers[4:](code(layers[2:4](code(layers[:2](x), {})), {}))
    assert torch.equal(split.predict(x), want)
    assert torch.equal(split.predict(x), want)
    # training goes on from the sender's state as training left it: as if nothing had been predicted
    split.fit(data, epochs=1, batch_size=BATCH, seed=SEED + 1, progress=False)
    ref.fit(data, epochs=1, batch_size=BATCH, seed=SEED, progress=False)
    ref.fit(data, epochs=1, batch_size=BATCH, seed=SEED + 1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(split.collect().parameters(), ref.collect().parameters()))


@pytest.mark.parametrize("none", [None, "none", {"activation": "none"}, ["none", {"gradient": "none"}], {1: "none"}])
def test_no_compression_is_bit_identical_and_sets_nothing(none):
    data = toy_dataset(N, shape=(20,), seed=3)
    ref = _split(None)
    ref.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    split = _split(none)
    assert all(s.worker.codecs(s.key) == ("none", "none") for s in split.stages)
    assert all(not c.active for c in split.compression)
    split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(split.collect().parameters(), ref.collect().parameters()))
    assert split.ledger.links() == ref.ledger.links()


def test_several_values_at_a_compressed_cut_each_count_their_bytes():
    """Gated: h (float, needs a gradient), a mask (float, none) and an index (int64) cross the first cut."""
    torch.manual_seed(0)
    model = Gated()
    data = toy_dataset(N, shape=(20,), seed=4)
    int8_codec = compress.get_codec("int8")
    ledgers, weights = [], []
    for fuse in (True, False):
        split = splitnn.SplitNN(
            splitnn.cut(model, at=["mid", "head"]),
            [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES],
            optimizer=_opt,
            compression=[{"activation": "int8", "gradient": "fp16"}, "none"],
        )
        split.fit(data, epochs=1, batch_size=BATCH, seed=SEED, progress=False)
        ledgers.append(split.ledger.links())
        weights.append(split.collect_state())
    assert ledgers[0] == ledgers[1] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    ledger, steps = split.ledger, N // BATCH
    h = torch.empty(BATCH, 16)
    act = 2 * int8_codec.nbytes(h) + BATCH * 8  # h and the mask compressed, the index plain
    assert ledger.total(src="alice", dst="bob", kind="activation") == steps * act
    assert ledger.raw_total(src="alice", dst="bob", kind="activation") == steps * (2 * BATCH * 16 * 4 + BATCH * 8)
    grad = compress.get_codec("fp16").nbytes(h)  # only h's gradient crosses back
    assert ledger.total(src="bob", dst="alice", kind="gradient") == steps * grad
    assert ledger.count(src="bob", dst="alice", kind="gradient") == steps
    assert ledger.total(src="bob", dst="claire", kind="activation") == ledger.raw_total(src="bob", dst="claire")


def test_a_cut_inside_one_party_compresses_nothing():
    split = _split("int8", names=("alice", "alice", "bob"))
    assert [s.worker.codecs(s.key) for s in split.stages] == [("none", "none"), ("int8", "none"), ("none", "int8")]
    data = toy_dataset(N, shape=(20,), seed=5)
    split.fit(data, epochs=1, batch_size=BATCH, seed=SEED, progress=False)
    assert split.ledger.total(kind="activation") < split.ledger.raw_total(kind="activation")


# ------------------------------------------------------------------------------- what is accepted
def test_compression_specs():
    both = CutCompression("int8", "int8")
    assert parse_compression("int8", 2) == (both, both)
    assert parse_compression(None, 2) == (CutCompression(),) * 2
    assert parse_compression({"gradient": "fp16"}, 1) == (CutCompression("none", "fp16"),)
    assert parse_compression(["topk:0.10", None], 2) == (CutCompression("topk:0.1", "topk:0.1"), CutCompression())
    assert parse_compression({1: {"activation": "bf16"}}, 2) == (CutCompression(), CutCompression("bf16", "none"))
    assert parse_compression(compress.get_codec("fp16"), 1) == (CutCompression("fp16", "fp16"),)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("zip", "unknown codec 'zip'"),
        ("topk:0", r"topk ratio must be in \[1/1024, 1\]"),
        ("topk:0.0005", r"topk ratio must be in \[1/1024, 1\]"),
        ("int8:3", "takes no parameter"),
        ({"activation": "int8", "gradients": "fp16"}, "keys 'activation' and/or 'gradient'"),
        ({0: {}}, "keys 'activation' and/or 'gradient'"),
        (["int8"], "one entry per cut: this model has 2 cut"),
        ({2: "int8"}, "cut indices 0..1"),
        ({0: "int8", "gradient": "fp16"}, "cut indices"),
        ({"activation": 8}, "a codec is a name"),
        (8, "got a int"),
    ],
)
def test_bad_compression_is_refused_before_anything_is_placed(spec, match):
    workers = [splitnn.VirtualWorker(n) for n in NAMES]
    with pytest.raises(ConfigurationError, match=match):
        splitnn.SplitNN(_segments(), workers, compression=spec)
    assert all(not w.segment_keys() for w in workers)


class _NoCodecs:
    """A worker without the codec capability (everything else delegated)."""

    def __init__(self, inner):
        self.__dict__["_inner"] = inner

    def __getattr__(self, name):
        if name == "set_codecs":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def test_a_worker_that_cannot_compress_is_named():
    workers = [splitnn.VirtualWorker("alice"), _NoCodecs(splitnn.VirtualWorker("bob")), splitnn.VirtualWorker("claire")]
    with pytest.raises(ConfigurationError, match="compression at cut 0: worker 'bob' cannot compress"):
        splitnn.SplitNN(_segments(), workers, compression="fp16")
    assert not workers[0].segment_keys()
    splitnn.SplitNN(_segments(), workers)  # without compression it is a worker like any other
