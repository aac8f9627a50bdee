"""Devices, on the CPU: checking the device string, placing a party on its device ("meta": shapes only,
nothing computed), and moving every value that crosses a cut to the *receiver's* device (a spy on the move,
since no second real device is here). The same runs on real GPUs are in test_devices_cuda.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splitnn
import splitnn.workers.virtual as virtual
from splitnn.errors import ConfigurationError, WorkerError
from splitnn.split.chain import bind_workers
from splitnn.split.stage import probe_chain
from splitnn.workers.devices import resolve_device
from splitnn.workers.refs import BatchRef
from tests.cut_models import SmallResNet
from tests.helpers import toy_dataset

NAMES = ("alice", "bob", "claire")
META = torch.device("meta")
CPU = torch.device("cpu")


# -- the device string ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["cpu", "cpu:0", torch.device("cpu")])
def test_cpu_in_any_spelling_is_the_cpu(given):
    assert resolve_device(given, "bob") == CPU
    assert splitnn.VirtualWorker("bob", device=given).device == CPU


def test_cpu_is_the_default():
    w = splitnn.VirtualWorker("bob")
    assert w.device == CPU
    assert "device" not in repr(w)
    assert "device='meta'" in repr(splitnn.VirtualWorker("bob", device="meta"))


@pytest.mark.parametrize(
    "given, match",
    [
        ("cdua:0", r"worker 'bob': 'cdua:0' is not a device torch knows .*write 'cpu', 'cuda', 'cuda:N'"),
        ("gpu", r"worker 'bob': 'gpu' is not a device torch knows"),
        (0, r"worker 'bob': device must be a string such as 'cpu' or 'cuda:0'.*got int 0"),
        (None, r"worker 'bob': device must be a string"),
    ],
)
def test_a_bad_device_is_refused_naming_the_worker(given, match):
    with pytest.raises(ConfigurationError, match=match):
        splitnn.VirtualWorker("bob", device=given)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
@pytest.mark.parametrize("given", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_with_the_fix(given):
    with pytest.raises(ConfigurationError) as err:
        splitnn.VirtualWorker("bob", device=given)
    text = str(err.value)
    assert f"worker 'bob': device '{given}' was asked for, but" in text
    assert "device='cpu'" in text and "--device cpu" in text


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda:1", "bob") == torch.device("cuda", 1)
    assert resolve_device("cuda", "bob") == torch.device("cuda", 1)  # the current one, with its index
    with pytest.raises(ConfigurationError, match=r"worker 'bob': device 'cuda:2' does not exist: 2 CUDA device"):
        resolve_device("cuda:2", "bob")


def test_a_missing_gpu_message_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ConfigurationError, match="no CUDA GPU is visible to this process"):
        resolve_device("cuda:0", "bob")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigurationError, match=r"built without CUDA.*install a CUDA build of torch"):
        resolve_device("cuda:0", "bob")


# -- placement: everything of a party lives on its device ---------------------------------------------------
def test_a_worker_puts_its_segment_optimizer_and_data_on_its_device():
    w = splitnn.VirtualWorker("bob", device="meta")
    seg = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    w.add_segment("s", seg, "sgd:lr=0.1,momentum=0.9")
    hosted = w._segments["s"]
    assert all(t.device == META for t in [*seg.parameters(), *seg.buffers()])  # moved in place, as module.to
    opt_params = [p for group in hosted.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in seg.parameters()]  # built over the moved parameters
    w.add_dataset("d", features=torch.randn(5, 4), labels=torch.arange(5))
    assert w._data["d"].features.device == META and w._data["d"].labels.device == META
    assert w.probe("s", (2, 4)) == (2, 3)  # shapes, computed on the meta device
    # a map-style dataset is read on the CPU, batch by batch; each batch moves to the worker's device
    rows = [torch.randn(4) for _ in range(5)]
    w.add_dataset("m", features=rows)
    assert w._data["m"].features is rows
    batch = w._batch(BatchRef("m", torch.tensor([3, 1])), "features")
    assert batch.device == META and batch.shape == (2, 4)


def test_a_cut_resnet_is_placed_and_probed_on_meta_without_computing():
    torch.manual_seed(0)
    workers = [splitnn.VirtualWorker(n, device="meta") for n in NAMES]
    split = splitnn.SplitNN(splitnn.cut(SmallResNet(width=4), at=["layer1.1.conv2", "layer2"]), workers)
    for stage in split.stages:
        module = stage.worker._segments[stage.key].module
        assert {t.device for t in [*module.parameters(), *module.buffers()]} == {META}
    shapes = probe_chain(split.stages, (2, 1, 12, 12))  # two values cross the first cut
    assert shapes == (2, 10)


def test_nothing_is_handed_out_from_the_meta_device():
    w = splitnn.VirtualWorker("bob", device="meta")
    w.add_segment("s", nn.Linear(4, 3), None)
    w.add_dataset("d", features=torch.randn(5, 4), labels=torch.arange(5))
    for call, arg in ((w.get_state, "s"), (w.fetch_segment, "s"), (w.get_grads, "s"), (w.dataset_stats, "d")):
        with pytest.raises(WorkerError, match="worker 'bob' computes on the 'meta' device"):
            call(arg)


def test_received_values_land_on_the_receivers_device():
    """alice (CPU) -> bob (meta): what bob receives, and what it computes from it, is on bob's device."""
    alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob", device="meta")
    bind_workers([alice, bob], None)
    alice.add_segment("a", nn.Linear(4, 3), None)
    bob.add_segment("b", nn.Linear(3, 2), None)
    alice.add_dataset("d", features=torch.randn(6, 4))
    out = alice.forward("a", BatchRef("d", torch.arange(6)))
    assert alice._peek(out)[0].device == CPU
    ref = bob.forward("b", out)
    hosted = bob._segments["b"]
    assert hosted.inp.device == META and hosted.out.device == META
    assert bob._peek(ref)[0].shape == (6, 2)
    assert [(l.src, l.dst, l.kind, l.nbytes) for l in bob.ledger.links()] == [("alice", "bob", "activation", 72)]
    # the researcher's input moves to the data holder's device too
    put = bob.put(torch.randn(2, 3), src="researcher", kind="features")
    assert bob._peek(put)[0].device == META


# -- the move at each cut, forward and backward, fused and eager (a spy: one real device here) ---------------
class _Spy:
    """Stands in for ``to_device``: records (what, target device) and leaves the tensor where it is (CPU)."""

    def __init__(self):
        self.moves: list[tuple[object, torch.device]] = []

    def __call__(self, value, device):
        shapes = tuple(None if t is None else tuple(t.shape) for t in value) if type(value) is tuple else value.shape
        self.moves.append((shapes if type(value) is tuple else tuple(shapes), device))
        return value


def _placed(at, fuse, devices):
    """Three CPU workers holding a cut SmallResNet and data; then each is told it lives on ``devices[i]``
    (all computation stays on the CPU: the spy does not move anything)."""
    torch.manual_seed(0)
    workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES]
    split = splitnn.SplitNN(splitnn.cut(SmallResNet(width=4), at=at), workers, optimizer="sgd:lr=0.1")
    name, _ = split.prepare(toy_dataset(8, shape=(1, 12, 12)))
    for w, d in zip(workers, devices):
        w.device = torch.device(d)
    return split, name


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_each_crossing_moves_to_the_receivers_device(monkeypatch, fuse):
    spy = _Spy()
    monkeypatch.setattr(virtual, "to_device", spy)
    split, name = _placed(["layer1", "fc"], fuse, ["cpu", "meta", "cpu"])  # bob on "another device"
    split.train_batch(name, torch.arange(4))
    fwd = [((4, 4, 12, 12), META), ((4, 8), CPU)]  # alice -> bob, bob -> claire: to the receiver
    # eager: the gradients cross back as tensors, to *their* receiver; fused: autograd carries them (Tensor.to)
    bwd = [] if fuse else [((4, 8), META), ((4, 4, 12, 12), CPU)]
    assert spy.moves == fwd + bwd


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_several_values_at_a_cut_move_together(monkeypatch, fuse):
    spy = _Spy()
    monkeypatch.setattr(virtual, "to_device", spy)
    # cut inside block layer1.1: its hidden activation and its shortcut cross to bob
    split, name = _placed(["layer1.1.conv2", "layer2"], fuse, ["meta", "cpu", "cpu"])
    split.train_batch(name, torch.arange(4))
    two = ((4, 4, 12, 12), (4, 4, 12, 12))
    # alice's batch was held while she was on the CPU, so it moves when read; then the two values cross to
    # bob (and, eager, their two gradients back to alice); bob -> claire: same device, nothing moves
    expected = [((4, 1, 12, 12), META), (two, CPU)] + ([] if fuse else [(two, META)])
    assert spy.moves == expected


def test_the_researcher_gets_outputs_on_the_cpu_and_inputs_go_to_the_data_holder(monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(virtual, "to_device", spy)
    split, _ = _placed(["layer1", "fc"], True, ["meta", "cpu", "meta"])
    split.predict(torch.zeros(2, 1, 12, 12))
    assert spy.moves == [
        ((2, 1, 12, 12), META),  # researcher -> alice
        ((2, 4, 12, 12), CPU),  # alice -> bob
        ((2, 8), META),  # bob -> claire
        ((2, 10), CPU),  # claire's output -> the researcher
    ]


def test_same_device_parties_move_nothing(monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(virtual, "to_device", spy)
    split, name = _placed(["layer1", "layer2"], False, ["cpu", "cpu", "cpu"])
    split.train_batch(name, torch.arange(4))
    split.predict(torch.zeros(2, 1, 12, 12))
    split.collect_state()
    assert spy.moves == []


def test_the_ledger_counts_the_same_bytes_whatever_the_devices(monkeypatch):
    monkeypatch.setattr(virtual, "to_device", _Spy())
    runs = []
    for devices in (["cpu", "cpu", "cpu"], ["meta", "cpu", "meta"]):
        split, name = _placed(["layer1.1.conv2", "layer2"], True, devices)
        split.train_batch(name, torch.arange(4))
        runs.append([(l.src, l.dst, l.kind, l.count, l.nbytes) for l in split.ledger.links()])
    assert runs[0] == runs[1]


# -- networked: `splitnn worker --device` ---------------------------------------------------------------------
def test_worker_cli_refuses_an_unavailable_device_before_serving(tmp_path, capsys):
    from splitnn.cli.main import main

    token = tmp_path / "token"
    token.write_text("a-federation-token-of-some-length\n")
    assert main(["worker", "--name", "bob", "--token-file", str(token), "--device", "cdua"]) == 2
    err = capsys.readouterr().err
    assert "splitnn worker: error: worker 'bob': 'cdua' is not a device" in err, err
    if not torch.cuda.is_available():
        assert main(["worker", "--name", "bob", "--token-file", str(token), "--device", "cuda:0"]) == 2
        err = capsys.readouterr().err
        assert "worker 'bob': device 'cuda:0' was asked for" in err and "--device cpu" in err, err


@pytest.mark.network
@pytest.mark.timeout(120)
def test_a_worker_process_places_its_segments_on_its_device(tmp_path):
    """`splitnn worker --device meta`: the decoded segment is moved to the worker's device (a probe computes
    shapes there; there are no weights to hand back), and the worker says where it computes."""
    from tests.transport.cluster import Cluster

    with Cluster(tmp_path) as cluster:
        cluster.start("bob", "--device", "meta")
        bob = splitnn.connect(cluster.workers["bob"].url, token=cluster.token, name="bob", timeout=60)
        try:
            assert bob.device == "meta"
            bob.add_segment("s", nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), "sgd:lr=0.1")
            assert bob.probe("s", (2, 4)) == (2, 3)
            with pytest.raises(WorkerError, match="worker 'bob' computes on the 'meta' device"):
                bob.fetch_segment("s")
        finally:
            bob.close()


def test_psi_messages_put_at_a_worker_on_another_device_stay_bytes_on_the_cpu():
    """The server puts a PSI message it pulled into its engine (``put(..., kind="psi")``): on a worker whose data
    lives on another device it stays a CPU byte tensor the PSI library can read, and the intersection runs."""
    alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob", fuse=False, device="meta")
    alice.add_dataset("d", features=torch.zeros(4, 1), ids=["p1", "p2", "p3", "p4"])
    bob.add_dataset("d", features=torch.zeros(3, 1), ids=["p4", "p9", "p2"])
    request = alice.take(alice.psi_request("s", "d").id)  # what bob pulls over the peer stream
    arrived = bob.put(request, src="alice", kind="psi")
    assert bob.take(arrived.id).device == CPU
    reply = bob.put(request, src="alice", kind="psi")
    alice.connect_peers({"bob": bob})
    alice.psi_finish("s", bob.psi_reply("d", reply))
    assert alice.psi_size("d") == 2 and bob.ledger.total(src="alice", dst="bob", kind="psi") == 2 * len(request)
