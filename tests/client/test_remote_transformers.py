"""Transformers cut with splitnn.cut (torch.export) across `splitnn worker` processes: each segment travels as a
graph of allow-listed ATen ops plus safetensors weights, to workers that trust no class at all, and trains with
the fine-tuning recipe (AdamW with decay rules, warmup then cosine, clipping by the global norm) equal, torch.equal,
to the same run on in-process workers. The in-process runs equal the unsplit models (tests/split)."""

from __future__ import annotations

import pytest
import torch

import splitnn
from tests.split import transformer_models as tm
from tests.transport.cluster import Cluster

pytest.importorskip("transformers")
pytestmark = [pytest.mark.network, pytest.mark.timeout(600)]

N, BATCH, SEED = 16, 4, 3
SPEC = "adamw:lr=1e-2,betas=(0.9,0.99),weight_decay=0.1,decay=matrices,schedule=cosine,warmup=2,total=8,min_lr=1e-3"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("xfmr")) as cl:
        for n in ("alice", "bob"):
            cl.start(n)  # no --trust: an exported segment is ops and weights, no class to import
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _ids(n, seed):
    return torch.randint(0, tm.VOCAB, (n, tm.SEQ + 1), generator=torch.Generator().manual_seed(seed))


def _train(segments, workers, data, loss, clip):
    split = splitnn.SplitNN(segments, workers, optimizer=SPEC, loss=loss)
    history = split.fit(data, epochs=2, batch_size=BATCH, seed=SEED, progress=False, clip_grad_norm=clip)
    return history.losses(), split.collect_state(), split


def _assert_same(remote, local):
    assert remote[0] == local[0]
    assert list(remote[1]) == list(local[1])
    for k, v in local[1].items():
        assert torch.equal(remote[1][k], v), k


class ClassDimFirst(torch.nn.Module):
    """GPT-2 whose logits come as (batch, vocabulary, position): the named loss "cross_entropy" (a remote label
    holder takes losses by name) reads classes on dimension 1."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits.transpose(1, 2)


@pytest.mark.slow
def test_gpt2_u_shape_trains_across_workers_as_in_process(cluster):
    """U-shaped: the embeddings, the first block, the last block and the head at the data holder's worker, which
    keeps the labels (the shifted ids: text never leaves it), the middle blocks at the other worker."""
    torch.manual_seed(0)
    model = ClassDimFirst(tm.gpt2())
    ids = _ids(N, 1)
    data = splitnn.Dataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    at = ["lm.transformer.h.1", "lm.transformer.h.3"]
    example = data.features[:2]
    alice, bob = cluster.connect("alice", "bob")
    try:
        got = _train(splitnn.cut(model, at, example=example), [alice, bob, alice], data, "cross_entropy", 0.05)
    finally:
        alice.close()
        bob.close()
    va, vb = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    want = _train(splitnn.cut(model, at, example=example), [va, vb, va], data, "cross_entropy", 0.05)
    _assert_same(got, want)


@pytest.mark.slow
def test_bert_trains_across_workers_as_in_process(cluster):
    """Every segment at a worker process, the loss by name at the last one (labels there)."""
    torch.manual_seed(0)
    model = tm.bert()
    ids = _ids(N, 2)[:, :-1].contiguous()
    labels = torch.randint(0, tm.CLASSES, (N,), generator=torch.Generator().manual_seed(3))
    data = splitnn.Dataset(ids, labels)
    at = ["bert.encoder.layer.2"]
    example = {"input_ids": ids[:2]}
    remote = cluster.connect("alice", "bob")
    try:
        got = _train(splitnn.cut(model, at, example=example), remote, data, "cross_entropy", clip=0.05)
    finally:
        for w in remote:
            w.close()
    local = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    want = _train(splitnn.cut(model, at, example=example), local, data, "cross_entropy", clip=0.05)
    _assert_same(got, want)
    local = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    unclipped = _train(splitnn.cut(model, at, example=example), local, data, "cross_entropy", clip=None)
    assert unclipped[0] != got[0]  # the clipping bit: the equality above covers it


@pytest.mark.slow
def test_lora_adapters_train_across_workers_as_in_process_with_the_base_frozen(cluster):
    """peft's LoRA applied before the cut: the frozen base travels frozen (requires_grad in the spec) and only the
    adapters train at the workers."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model = ClassDimFirst(peft.get_peft_model(tm.gpt2(), config))
    ids = _ids(N, 4)
    data = splitnn.Dataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    at = ["lm.base_model.model.transformer.h.2"]
    example = data.features[:2]
    remote = cluster.connect("alice", "bob")
    try:
        got = _train(splitnn.cut(model, at, example=example), remote, data, "cross_entropy", 1.0)
    finally:
        for w in remote:
            w.close()
    local = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    want = _train(splitnn.cut(model, at, example=example), local, data, "cross_entropy", 1.0)
    _assert_same(got, want)
    start = model.state_dict()
    moved = {k for k, v in got[1].items() if not torch.equal(v, start[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable and all("lora_" in k for k in moved)  # the adapters trained, the base did not move
