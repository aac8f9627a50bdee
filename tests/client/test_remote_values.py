"""Several values at a cut and compression at the cut, across three `splitnn worker` processes.

Several values: a ResNet cut inside its blocks (the shortcut crosses), a skip over two cuts and a model whose
mask and integer index cross beside its activation (their gradient is None) train over the network -- per-op
pulls and shipped epochs -- to exactly the in-process weights, BatchNorm statistics, losses and ledger (and the
in-process run equals the unsplit model: tests/split/test_cut_exactness.py). A model that takes a tuple gets
it over the network, and probes describe several values.

Compression: a compressed networked run equals the compressed in-process run (the same bytes are encoded by the
sender and decoded by the receiver), with identical ledgers whose bytes are the codecs' own.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splitnn
from splitnn.wire import compress
from splitnn.workers import ValueShape
from tests.cut_models import Gated, Masked, SkipTwo, SmallResNet
from tests.helpers import toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice", "bob", "claire")
OPT = "sgd:lr=0.05,momentum=0.9"
SHIP = [False, True]
SHIP_IDS = ["per-op", "shipped"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("values")) as cl:
        for n in NAMES:
            cl.start(n, "--allow-outputs")
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _cut_links(ledger) -> list:
    return [l for l in ledger.links() if l.kind in ("activation", "gradient")]


def _train_both(remote, segments_of, data, *, ship, compression=None, epochs=2, batch=16):
    """The same model trained over the network and in process: (networked, in-process, their histories)."""
    net = splitnn.SplitNN(segments_of(), remote, optimizer=OPT, ship_epochs=ship, compression=compression)
    twin = splitnn.SplitNN(
        segments_of(), [splitnn.VirtualWorker(n) for n in NAMES], optimizer=OPT, compression=compression
    )
    histories = [m.fit(data, epochs=epochs, batch_size=batch, seed=4, progress=False) for m in (net, twin)]
    return net, twin, histories


def _assert_same(net, twin, histories) -> None:
    assert histories[0].losses() == histories[1].losses()
    got, want = net.collect().state_dict(), twin.collect().state_dict()  # weights and BatchNorm statistics
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert _cut_links(net.ledger) == _cut_links(twin.ledger)  # sent and raw bytes, per link


# ------------------------------------------------------------------------------ several values
CASES = {  # model, cut points, data shape
    "resnet-inside-blocks": (lambda: SmallResNet(width=4), ["layer1.1.conv2", "layer2.0.bn1"], (1, 12, 12)),
    "skip-over-two-cuts": (SkipTwo, ["mid", "head"], (20,)),
    "mask-and-index": (Gated, ["mid", "head"], (20,)),
}


@pytest.mark.parametrize("ship", SHIP, ids=SHIP_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_several_values_cross_between_worker_processes_as_in_process(remote, case, ship):
    make, at, shape = CASES[case]
    torch.manual_seed(0)
    model = make()
    data = toy_dataset(64, shape=shape, seed=2)
    net, twin, histories = _train_both(remote, lambda: splitnn.cut(model, at=at), data, ship=ship)
    _assert_same(net, twin, histories)
    segs = splitnn.cut(model, at=at)
    first = segs[0](data.features[:16])  # with autograd on: which values need a gradient
    assert isinstance(first, tuple) and len(first) >= 2
    steps = 2 * 64 // 16
    sent = sum(t.numel() * t.element_size() for t in first)
    back = sum(t.numel() * t.element_size() for t in first if t.is_floating_point() and t.requires_grad)
    if case == "mask-and-index":  # the mask and the index cross forward only
        assert sorted(str(t.dtype) for t in first) == ["torch.float32", "torch.float32", "torch.int64"]
        assert back == 16 * 16 * 4
    assert net.ledger.total(src="alice", dst="bob", kind="activation") == steps * sent
    assert net.ledger.total(src="bob", dst="alice", kind="gradient") == steps * back
    assert net.ledger.count(src="bob", dst="alice", kind="gradient") == steps


def test_a_tuple_input_and_probes_of_several_values_over_the_network(remote):
    torch.manual_seed(0)
    model = Masked().eval()
    segments = splitnn.cut(model, at=["table"])
    net = splitnn.SplitNN(segments, remote[:2])
    here = splitnn.SplitNN(splitnn.cut(model, at=["table"]), [splitnn.VirtualWorker(n) for n in NAMES[:2]])
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(6, 20, generator=g), (torch.rand(6, 16, generator=g) > 0.5).float()
    got = net.predict((x, mask))
    assert torch.equal(got, model(x, mask)) and torch.equal(got, here.predict((x, mask)))
    assert net.ledger.total(src="researcher", dst="alice", kind="features") == 6 * 20 * 4 + 6 * 16 * 4
    assert net.ledger.total(src="alice", dst="bob", kind="activation") == 6 * 16 * 4 + 6 * 8  # h and the index
    # shapes of several values, with their dtypes, both ways over the wire
    inputs = (ValueShape((2, 20)), ValueShape((2, 16)))
    out = remote[0].probe(net.stages[0].key, inputs)
    assert out == (ValueShape((2, 16), torch.float32), ValueShape((2,), torch.int64))
    assert remote[1].probe(net.stages[1].key, out) == (2, 10)


# ------------------------------------------------------------------------------------ compression
def _mlp():
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(20, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 12), nn.Tanh()),
        nn.Sequential(nn.Linear(12, 10), nn.LogSoftmax(dim=1)),
    ]


@pytest.mark.parametrize("ship", SHIP, ids=SHIP_IDS)
@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.25", {"activation": "int8", "gradient": "fp16"}], ids=str)
def test_compressed_training_over_the_network_equals_in_process(remote, spec, ship):
    data = toy_dataset(64, shape=(20,), seed=3)
    net, twin, histories = _train_both(remote, _mlp, data, ship=ship, compression=spec)
    _assert_same(net, twin, histories)
    # the bytes recorded are the codec's payloads exactly, the raw size beside them
    act = compress.get_codec(spec if isinstance(spec, str) else spec["activation"])
    grad = compress.get_codec(spec if isinstance(spec, str) else spec["gradient"])
    steps, h = 2 * 64 // 16, torch.empty(16, 12)
    assert net.ledger.total(src="bob", dst="claire", kind="activation") == steps * act.nbytes(h)
    assert net.ledger.total(src="claire", dst="bob", kind="gradient") == steps * grad.nbytes(h)
    assert net.ledger.raw_total(src="claire", dst="bob", kind="gradient") == steps * 16 * 12 * 4
    # evaluation crosses the same codecs (without error feedback), over the network as in process
    assert net.evaluate(data, batch_size=32).loss == twin.evaluate(data, batch_size=32).loss


@pytest.mark.parametrize("ship", SHIP, ids=SHIP_IDS)
def test_several_values_at_a_compressed_cut_over_the_network(remote, ship):
    """One values payload carries int8 codes of the activation and the mask and the plain int64 index; the
    gradient comes back as topk with error feedback at bob, None for the mask and the index."""
    torch.manual_seed(0)
    model = Gated()
    data = toy_dataset(64, shape=(20,), seed=5)
    spec = [{"activation": "int8", "gradient": "topk:0.5"}, "fp16"]
    net, twin, histories = _train_both(
        remote, lambda: splitnn.cut(model, at=["mid", "head"]), data, ship=ship, compression=spec
    )
    _assert_same(net, twin, histories)
    assert net.ledger.total(kind="activation") < net.ledger.raw_total(kind="activation")
