"""Transformers cut with splitnn.cut (torch.export) across `splitnn worker` processes: each segment travels as a
graph of allow-listed ATen ops plus safetensors weights, to workers that trust no class at all, and trains with
the fine-tuning recipe (AdamW with decay rules, warmup then cosine, clipping by the global norm) equal, torch.equal,
to the same run on in-process workers and to the unsplit model trained by a plain PyTorch loop (torch.optim.AdamW
with two parameter groups, nanoGPT's schedule written out, torch.nn.utils.clip_grad_norm_): GPT-2 (U-shaped),
BERT, Hugging Face's ViT, a timm-style ViT, Llama, a classifier around nn.TransformerEncoder and GPT-2 with
LoRA: the four models of issue 27's table and their families; and BERT with a padding mask, its two keyword
inputs one Dataset of named features."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import splitnn
from splitnn.training import epoch_batches
from tests.split import transformer_models as tm
from tests.split.test_finetune_recipe import nanogpt_lr
from tests.transport.cluster import Cluster

pytest.importorskip("transformers")
pytestmark = [pytest.mark.network, pytest.mark.timeout(600)]

N, BATCH, SEED, EPOCHS = 16, 4, 3, 2
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
    history = split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False, clip_grad_norm=clip)
    return history.losses(), split.collect_state(), split


def _remote_and_local(cluster, model, at, example, placement, data, clip, output=None):
    """The same cut trained on worker processes (``placement`` names them, e.g. alice, bob, alice) and on
    in-process workers of the same names: (losses, state, split) of each."""
    names = sorted(set(placement))
    remote = dict(zip(names, cluster.connect(*names)))
    try:
        got = _train(
            splitnn.cut(model, at, example=example, output=output),
            [remote[n] for n in placement],
            data,
            "cross_entropy",
            clip,
        )
    finally:
        for w in remote.values():
            w.close()
    local = {n: splitnn.VirtualWorker(n) for n in names}
    want = _train(
        splitnn.cut(model, at, example=example, output=output),
        [local[n] for n in placement],
        data,
        "cross_entropy",
        clip,
    )
    return got, want


def _assert_same(remote, local):
    assert remote[0] == local[0]
    assert list(remote[1]) == list(local[1])
    for k, v in local[1].items():
        assert torch.equal(remote[1][k], v), k


def train_twin(model, forward, data, clip):
    """The unsplit model trained by a plain PyTorch loop with the recipe written out: AdamW with decay on matrices
    only, nanoGPT's warmup-then-cosine learning rate, torch.nn.utils.clip_grad_norm_, F.cross_entropy (what the
    remote loss "cross_entropy" names), in fit's data order. Returns the state dict."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-2, betas=(0.9, 0.99))
    it = 0
    for epoch in range(EPOCHS):
        for idx in epoch_batches(len(data), BATCH, seed=SEED, epoch=epoch):
            for g in opt.param_groups:
                g["lr"] = nanogpt_lr(it, "cosine")
            opt.zero_grad(set_to_none=True)
            x = {k: v[idx] for k, v in data.features.items()} if data.named else data.features[idx]
            loss = F.cross_entropy(forward(model, x), data.labels[idx])
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            it += 1
    return model.state_dict()


def _assert_twin(state, twin):
    """Every weight the segments hold equals the unsplit twin's (all of them: the segments hold the model's keys)."""
    assert list(state) == list(twin)
    for k, v in state.items():
        assert torch.equal(v, twin[k]), f"{k} differs from the unsplit twin"


class ClassDimFirst(torch.nn.Module):
    """A causal language model whose logits come as (batch, vocabulary, position): the named loss "cross_entropy"
    (a remote label holder takes losses by name) reads classes on dimension 1."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits.transpose(1, 2)


def _lm_data(seed):
    ids = _ids(N, seed)
    return splitnn.Dataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def _class_data(features):
    return splitnn.Dataset(features, torch.randint(0, tm.CLASSES, (N,), generator=torch.Generator().manual_seed(3)))


def _call(model, x):
    return model(x)


def _logits(keyword):
    return lambda model, x: model(**{keyword: x}).logits


@pytest.mark.slow
def test_gpt2_u_shape_trains_across_workers_as_in_process_and_unsplit(cluster):
    """U-shaped: the embeddings, the first block, the last block and the head at the data holder's worker, which
    keeps the labels (the shifted ids: text never leaves it), the middle blocks at the other worker."""
    torch.manual_seed(0)
    model, data = ClassDimFirst(tm.gpt2()), _lm_data(1)
    at = ["lm.transformer.h.1", "lm.transformer.h.3"]
    got, want = _remote_and_local(cluster, model, at, data.features[:2], ["alice", "bob", "alice"], data, 0.05)
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _call, data, 0.05))


@pytest.mark.slow
def test_bert_trains_across_workers_as_in_process_and_unsplit(cluster):
    """Every segment at a worker process, the loss by name at the last one (labels there)."""
    torch.manual_seed(0)
    model = tm.bert()
    ids = _ids(N, 2)[:, :-1].contiguous()
    data = _class_data(ids)
    example = {"input_ids": ids[:2]}
    got, want = _remote_and_local(cluster, model, ["bert.encoder.layer.2"], example, ["alice", "bob"], data, 0.05)
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _logits("input_ids"), data, 0.05))
    local = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    unclipped = _train(
        splitnn.cut(model, ["bert.encoder.layer.2"], example=example), local, data, "cross_entropy", None
    )
    assert unclipped[0] != got[0]  # the clipping bites: the equalities above cover it


@pytest.mark.slow
@pytest.mark.parametrize("clip", [0.05, None], ids=["clipped-lock-step", "shipped-epochs"])
def test_bert_with_a_padding_mask_trains_on_named_features_across_workers_as_in_process_and_unsplit(cluster, clip):
    """Several named inputs per dataset: alice holds input_ids and attention_mask (placed by fit through
    add_dataset: named tensors on the wire), bob the labels and the rest of BERT; the mask matters (rows padded).
    Clipped, fit runs batch by batch; unclipped, each worker runs the epoch it is shipped."""
    torch.manual_seed(0)
    model = tm.bert()
    g = torch.Generator().manual_seed(9)
    ids = _ids(N, 9)[:, :-1].contiguous()
    mask = (torch.arange(tm.SEQ) < torch.randint(4, tm.SEQ + 1, (N, 1), generator=g)).long()
    data = _class_data({"input_ids": ids, "attention_mask": mask})
    example = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    got, want = _remote_and_local(cluster, model, ["bert.encoder.layer.2"], example, ["alice", "bob"], data, clip)
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, lambda m, x: m(**x).logits, data, clip))


@pytest.mark.slow
def test_hf_vit_trains_across_workers_as_in_process_and_unsplit(cluster):
    """Hugging Face's ViTForImageClassification (patches by convolution, class token, learned positions): its
    ModelOutput reaches the loss as "logits"."""
    torch.manual_seed(0)
    model = tm.vit()
    data = _class_data(torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(5)))
    example = {"pixel_values": data.features[:2]}
    got, want = _remote_and_local(
        cluster, model, ["vit.layers.2"], example, ["alice", "bob"], data, 0.05, output="logits"
    )
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _logits("pixel_values"), data, 0.05))


@pytest.mark.slow
def test_timm_style_vit_trains_across_workers_as_in_process_and_unsplit(cluster):
    """timm's ViT layout (the table's `vit_tiny_patch16_224`, in small) cut at blocks.1 and blocks.3: the blocks'
    attn_mask=None never crosses a cut; the class token's expand is recomputed from the batch size."""
    torch.manual_seed(0)
    model = tm.timm_vit()
    data = _class_data(torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(6)))
    got, want = _remote_and_local(
        cluster, model, ["blocks.1", "blocks.3"], data.features[:2], ["alice", "bob", "alice"], data, 0.05
    )
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _call, data, 0.05))


@pytest.mark.slow
def test_llama_trains_across_workers_as_in_process_and_unsplit(cluster):
    """A Llama decoder (RMSNorm, rotary positions recomputed after the cut, SwiGLU), the head at the worker that
    keeps the labels."""
    torch.manual_seed(0)
    model, data = ClassDimFirst(tm.llama()), _lm_data(7)
    got, want = _remote_and_local(
        cluster, model, ["lm.model.layers.2"], data.features[:2], ["alice", "bob"], data, 0.05
    )
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _call, data, 0.05))


@pytest.mark.slow
def test_transformer_encoder_classifier_trains_across_workers_as_in_process_and_unsplit(cluster):
    """A classifier around torch.nn.TransformerEncoder, cut between its layers (export traces through it)."""
    torch.manual_seed(0)
    model = tm.encoder_classifier()
    data = _class_data(_ids(N, 8)[:, :-1].contiguous())
    got, want = _remote_and_local(cluster, model, ["encoder.layers.2"], data.features[:2], ["alice", "bob"], data, 0.05)
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _call, data, 0.05))


@pytest.mark.slow
def test_lora_adapters_train_across_workers_as_in_process_and_unsplit_with_the_base_frozen(cluster):
    """peft's LoRA applied before the cut: the frozen base travels frozen (requires_grad in the spec) and only the
    adapters train at the workers."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model, data = ClassDimFirst(peft.get_peft_model(tm.gpt2(), config)), _lm_data(4)
    at = ["lm.base_model.model.transformer.h.2"]
    got, want = _remote_and_local(cluster, model, at, data.features[:2], ["alice", "bob"], data, 1.0)
    _assert_same(got, want)
    _assert_twin(got[1], train_twin(model, _call, data, 1.0))
    start = model.state_dict()
    moved = {k for k, v in got[1].items() if not torch.equal(v, start[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable and all("lora_" in k for k in moved)  # the adapters trained, the base did not move


def _gpt2_bf16_at_bob(workers, data, *, ship_epochs=True):
    """GPT-2 U-shaped across ``workers`` (alice, bob): bob hosts the middle blocks; (losses, state, split)."""
    model = ClassDimFirst(tm.gpt2())
    at = ["lm.transformer.h.1", "lm.transformer.h.3"]
    alice, bob = workers
    split = splitnn.SplitNN(
        splitnn.cut(model, at, example=data.features[:2]),
        [alice, bob, alice],
        optimizer=SPEC,
        loss="cross_entropy",
        ship_epochs=ship_epochs,
    )
    history = split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False, clip_grad_norm=1.0)
    return history.losses(), split.collect_state(), split


def _cut_traffic(split):
    return [(l.src, l.dst, l.kind, l.nbytes) for l in split.ledger.links() if l.kind in ("activation", "gradient")]


@pytest.mark.slow
@pytest.mark.parametrize("ship_epochs", [True, False], ids=["shipped", "lock-step"])
def test_bf16_autocast_at_one_worker_process_trains_as_in_process(cluster, ship_epochs):
    """Mixed precision per party across processes: ``connect(..., autocast="bf16")`` to bob (the middle blocks of
    a U-shaped GPT-2, exported ATen graphs) runs them under bf16 autocast at bob's worker, alice in full precision:
    losses and weights torch.equal to in-process workers with ``VirtualWorker("bob", autocast="bf16")``, the same
    bytes over each cut (what bob sends is what it sends in process), and not the full-precision run."""
    data = _lm_data(1)
    url = {n: cluster.workers[n].url for n in ("alice", "bob")}
    alice = splitnn.connect(url["alice"], token=cluster.token, name="alice")
    bob = splitnn.connect(url["bob"], token=cluster.token, name="bob", autocast="bf16")
    try:
        torch.manual_seed(0)
        got = _gpt2_bf16_at_bob([alice, bob], data, ship_epochs=ship_epochs)
    finally:
        alice.close()
        bob.close()
    torch.manual_seed(0)
    local_bob = splitnn.VirtualWorker("bob", autocast="bf16")
    sent = []  # what bob's segment returns in process: the dtype that crosses the cut to alice
    want = _gpt2_bf16_at_bob([splitnn.VirtualWorker("alice"), local_bob], data)
    _assert_same(got, want)
    assert _cut_traffic(got[2]) == _cut_traffic(want[2])
    local_bob.segment(local_bob.segment_keys()[0]).register_forward_hook(lambda m, a, out: sent.append(out.dtype))
    local_bob.probe(local_bob.segment_keys()[0], (2, tm.SEQ, tm.WIDTH))
    assert sent == [torch.float32]  # GPT-2's residual stream: a bf16 block output added to the float32 input
    torch.manual_seed(0)
    full = _gpt2_bf16_at_bob([splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")], data)
    assert got[0] != full[0]  # the field took effect: bf16 matrix products at bob
    assert all(v.dtype == full[1][k].dtype for k, v in got[1].items())  # the weights stay float32
