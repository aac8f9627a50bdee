"""Devices on a real GPU (marked ``cuda``; skipped where ``torch.cuda.is_available()`` is False).

A split ResNet trained with every party on the GPU, or with parties on the CPU and the GPU mixed, fused and eager,
in-process and over `splitnn worker --device cuda:0` processes, ends close to the same run on the CPU (within a
tolerance: GPU kernels add in another order), with exactly the same ledger; what the researcher gets back is on
the CPU; device tensors cross the wire as the same bytes as CPU tensors. `benchmarks/gpu_check.sh` runs these.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import splitnn
from splitnn.training import epoch_batches
from tests.cut_models import SmallResNet
from tests.helpers import toy_dataset

pytestmark = pytest.mark.cuda

NAMES = ("alice", "bob", "claire")
CPU = torch.device("cpu")
EPOCHS, BATCH, SEED = 2, 32, 3
OPT = "sgd:lr=0.05,momentum=0.9"
BLOCKS = ["layer1", "layer2"]  # one value crosses each cut
INSIDE = ["layer1.1.conv2", "layer2.0.bn1"]  # two values cross each cut


@pytest.fixture(autouse=True)
def _full_precision():
    """No TF32 (it rounds float32 products to 10 mantissa bits) and deterministic cuDNN, so that the GPU
    computes what the CPU does up to the order of additions."""
    flags = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    ) = flags


def _run(devices, *, at=BLOCKS, fuse=True, epochs=EPOCHS):
    torch.manual_seed(0)
    model = SmallResNet(width=8)
    data = toy_dataset(192, shape=(1, 12, 12), seed=1)
    workers = [splitnn.VirtualWorker(n, fuse=fuse, device=d) for n, d in zip(NAMES, devices)]
    split = splitnn.SplitNN(splitnn.cut(model, at=at), workers, optimizer=OPT)
    history = split.fit(data, epochs=epochs, batch_size=BATCH, seed=SEED, progress=False)
    return split, history, data


def _links(split):
    return [(l.src, l.dst, l.kind, l.count, l.nbytes) for l in split.ledger.links()]


def _assert_close_state(got: dict, want: dict, tol: float) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].device == CPU, f"{k} came back on {got[k].device}"
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def cpu_runs():
    """The reference: every party on the CPU, for each cut."""
    runs = {}
    for name, at in (("blocks", BLOCKS), ("inside", INSIDE)):
        split, history, _ = _run(["cpu"] * 3, at=at)
        runs[name] = (history.losses(), split.collect_state(), _links(split))
    return runs


@pytest.mark.parametrize(
    "devices",
    [["cuda"] * 3, ["cpu", "cuda", "cpu"], ["cuda", "cpu", "cuda"], ["cuda:0", "cuda", "cpu"]],
    ids=["all-gpu", "gpu-in-the-middle", "cpu-in-the-middle", "data-holder-and-middle-on-gpu"],
)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("cut", ["blocks", "inside"])
def test_a_split_on_gpus_trains_as_on_the_cpu(cpu_runs, devices, fuse, cut):
    losses, state, links = cpu_runs[cut]
    split, history, _ = _run(devices, at=BLOCKS if cut == "blocks" else INSIDE, fuse=fuse)
    for stage, dev in zip(split.stages, devices):  # each party's weights and optimizer state on its device
        hosted = stage.worker._segments[stage.key]
        want = torch.device(dev).type
        assert {p.device.type for p in hosted.module.parameters()} == {want}
        assert {b.device.type for b in hosted.module.buffers()} == {want}
        momenta = [s["momentum_buffer"] for s in hosted.optimizer.state.values()]
        assert momenta and {m.device.type for m in momenta} == {want}
    torch.testing.assert_close(history.losses(), losses, rtol=1e-3, atol=1e-4)
    _assert_close_state(split.collect_state(), state, 2e-3)
    assert _links(split) == links  # the same bytes whatever the devices


def test_the_gpu_split_matches_the_unsplit_model_on_the_gpu():
    """Same device, same kernels: the fused split runs the unsplit model's own graph."""
    split, _, data = _run(["cuda"] * 3)
    torch.manual_seed(0)
    twin = copy.deepcopy(SmallResNet(width=8)).cuda()
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    feats, labels = data.features.cuda(), data.labels.cuda()
    for epoch in range(EPOCHS):
        for idx in epoch_batches(len(data), BATCH, seed=SEED, epoch=epoch):
            opt.zero_grad()
            F.nll_loss(twin(feats[idx.cuda()]), labels[idx.cuda()]).backward()
            opt.step()
    want = {k: v.cpu() for k, v in twin.state_dict().items()}
    _assert_close_state(split.collect_state(), want, 1e-5)  # adaptive pooling's CUDA backward adds atomically


def test_the_researcher_gets_everything_on_the_cpu():
    split, _, data = _run(["cuda", "cpu", "cuda"], epochs=1)
    assert all(t.device == CPU for t in split.collect_state().values())
    assert all(t.device == CPU for t in split.collect().state_dict().values())
    seg = split.label_holder.fetch_segment(split.stages[-1].key)
    assert all(t.device == CPU for t in seg.state_dict().values())
    assert all(t.device == CPU for t in split.label_holder.get_grads(split.stages[-1].key).values())
    assert split.predict(data.features[:5]).device == CPU
    assert split.predict(data.features[:5].cuda()).device == CPU  # a GPU input goes to the data holder's device
    assert split.data_holder._data[split.prepare(data)[0]].features.device.type == "cuda"
    # the tutorial's low-level loop: the output comes to the researcher's CPU, attached to the label holder's graph
    before = {k: v.clone() for k, v in split.collect_state().items()}
    split.train()
    split.zero_grads()
    out = split.forward(data.features[:8])
    assert out.device == CPU and out.requires_grad
    F.nll_loss(out, data.labels[:8]).backward()
    split.backward()
    split.step()
    after = split.collect_state()
    assert all(not torch.equal(before[k], after[k]) for k in ("conv1.weight", "fc.weight")), "a party did not train"


def test_device_tensors_cross_the_wire_as_the_same_bytes():
    from splitnn.transport import frames
    from splitnn.wire import compress
    from splitnn.wire.state_codec import encode_state
    from splitnn.wire.tensor_codec import decode_tensor, encode_tensor

    t = torch.randn(3, 5, 7)
    g = t.cuda().requires_grad_()
    assert encode_tensor(g) == encode_tensor(t)
    assert torch.equal(decode_tensor(encode_tensor(g)), t)
    assert encode_tensor(g.transpose(0, 2).contiguous().transpose(0, 2)) == encode_tensor(t)  # strided on the GPU
    assert list(frames.data_frames("activation", 7, g, 64)) == list(frames.data_frames("activation", 7, t, 64))
    state = SmallResNet(width=4).state_dict()
    assert encode_state({k: v.cuda() for k, v in state.items()}) == encode_state(state)
    for name in ("fp16", "bf16", "int8"):  # the compressing codecs of the peer frames, too
        codec = compress.get_codec(name)
        assert codec.encode(g) == codec.encode(t), name
    topk = compress.get_codec("topk:0.25")
    assert torch.equal(compress.decode(topk.encode(g)), compress.decode(topk.encode(t)))


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ship", [True, False], ids=["shipped", "per-op"])
def test_worker_processes_on_the_gpu_train_as_in_process(tmp_path, ship):
    from tests.transport.cluster import Cluster

    devices = {"alice": "cpu", "bob": "cuda:0", "claire": "cuda"}
    with Cluster(tmp_path) as cluster:
        for n in NAMES:
            cluster.start(n, "--device", devices[n])
        remote = [splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n, timeout=60) for n in NAMES]
        try:
            assert [w.device for w in remote] == ["cpu", "cuda:0", "cuda:0"]
            torch.manual_seed(0)
            model = SmallResNet(width=8)
            data = toy_dataset(192, shape=(1, 12, 12), seed=1)
            split = splitnn.SplitNN(splitnn.cut(model, at=BLOCKS), remote, optimizer=OPT, ship_epochs=ship)
            history = split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
            state = split.collect_state()
            links = [l for l in split.ledger.links() if l.kind in ("activation", "gradient")]
        finally:
            for w in remote:
                w.close()
    cpu, cpu_history, _ = _run(["cpu"] * 3, fuse=False)
    torch.testing.assert_close(history.losses(), cpu_history.losses(), rtol=1e-3, atol=1e-4)
    _assert_close_state(state, cpu.collect_state(), 2e-3)
    assert links == [l for l in cpu.ledger.links() if l.kind in ("activation", "gradient")]
