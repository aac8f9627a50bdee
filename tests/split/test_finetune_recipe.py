"""The fine-tuning recipe on a cut transformer, in process: AdamW with betas, weight decay on matrices only,
a warmup-then-cosine (or linear) learning rate stepped per optimizer step, clipping by the global norm over
every party, gradient accumulation, frozen parameters and LoRA adapters (peft). Each run equals, torch.equal,
its unsplit twin written plainly with torch (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, and the
schedule written out below, as nanoGPT writes it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import splitnn
from splitnn.errors import ConfigurationError
from splitnn.training import epoch_batches
from tests.split import transformer_models as tm

pytest.importorskip("transformers")

N, BATCH, SEED, EPOCHS = 24, 4, 3, 2
LR, MIN_LR, WARMUP, TOTAL = 1e-2, 1e-3, 2, 8
SPEC = (
    f"adamw:lr={LR},betas=(0.9,0.99),weight_decay=0.1,decay=matrices,"
    f"schedule={{}},warmup={WARMUP},total={TOTAL},min_lr={MIN_LR}"
)


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tm.VOCAB, (N, tm.SEQ + 1), generator=g)
    return splitnn.Dataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def nanogpt_lr(it, decay):
    """nanoGPT's get_lr, written out (the oracle does not call the library's schedule)."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > TOTAL:
        return MIN_LR
    ratio = (it - WARMUP) / (TOTAL - WARMUP)
    if decay == "cosine":
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)
    return LR - ratio * (LR - MIN_LR)


def train_twin(model, data, *, decay="cosine", clip=None, accumulate=1):
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=LR, betas=(0.9, 0.99))
    it = 0
    for epoch in range(EPOCHS):
        batches = epoch_batches(len(data), BATCH, seed=SEED, epoch=epoch)
        for i in range(0, len(batches), accumulate):
            group = batches[i : i + accumulate]
            for g in opt.param_groups:
                g["lr"] = nanogpt_lr(it, decay)
            opt.zero_grad(set_to_none=True)
            for idx in group:
                out = model(input_ids=data.features[idx]).logits
                (lm_loss(out, data.labels[idx]) / len(group)).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            it += 1
    return model, opt


def train_split(model, data, at, *, decay="cosine", clip=None, accumulate=1, workers=None):
    segments = splitnn.cut(model, at, example={"input_ids": data.features[:2]})
    workers = workers or [splitnn.VirtualWorker(f"p{i}") for i in range(len(segments))]
    split = splitnn.SplitNN(segments, workers, optimizer=SPEC.format(decay), loss=lm_loss)
    split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, clip_grad_norm=clip, accumulate=accumulate)
    return split


def assert_equal_states(got, want):
    assert set(got) <= set(want) and got
    for name, value in got.items():
        assert torch.equal(value, want[name]), f"{name} differs by {(value - want[name]).abs().max().item():.3g}"


@pytest.mark.parametrize(
    "decay, clip, accumulate", [("cosine", 1.0, 1), ("linear", 0.05, 2), ("cosine", None, 3), ("cosine", 0.05, 1)]
)
def test_recipe_on_a_cut_gpt2_equals_the_plain_torch_twin(decay, clip, accumulate):
    torch.manual_seed(0)
    model, data = tm.gpt2(), _data()
    twin, _ = train_twin(model, data, decay=decay, clip=clip, accumulate=accumulate)
    split = train_split(
        model, data, ["transformer.h.1", "transformer.h.3"], decay=decay, clip=clip, accumulate=accumulate
    )
    assert_equal_states(split.collect_state(), twin.state_dict())


def test_clipping_changes_the_training_and_is_counted_as_control_bytes():
    """The oracle above must see clipping bite: with a small max norm the weights differ from unclipped."""
    torch.manual_seed(0)
    model, data = tm.gpt2(), _data()
    clipped = train_split(model, data, ["transformer.h.2"], clip=0.05)
    plain = train_split(model, data, ["transformer.h.2"], clip=None)
    a, b = clipped.collect_state(), plain.collect_state()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    steps = EPOCHS * (N // BATCH)
    first = sum(
        1 for _ in splitnn.cut(model, ["transformer.h.2"], example={"input_ids": _data().features[:2]})[0].parameters()
    )
    # one float32 norm per gradient tensor to the researcher per step, never the gradients
    assert clipped.ledger.total(src="p0", kind="control") == steps * first * 4
    assert plain.ledger.total(src="p0", kind="control") == 0


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
    torch.manual_seed(0)
    model, data = tm.gpt2(), _data()
    for p in model.transformer.wte.parameters():
        p.requires_grad_(False)
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    twin, _ = train_twin(model, data, clip=1.0)
    workers = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    split = train_split(model, data, ["transformer.h.2"], clip=1.0, workers=workers)
    assert_equal_states(split.collect_state(), twin.state_dict())
    assert torch.equal(split.collect_state()["transformer.wte.weight"], model.transformer.wte.weight)
    hosted = workers[0]._segments[split.stages[0].key]
    frozen = {id(p) for p in hosted.module.parameters() if not p.requires_grad}
    assert frozen and not frozen & {id(p) for p in hosted.optimizer.state}
    assert all(p.grad is None for p in hosted.module.parameters() if not p.requires_grad)
    trainable = split.collect_state(trainable_only=True)
    assert "transformer.wte.weight" not in trainable and "transformer.h.1.attn.c_attn.weight" in trainable


def test_lora_adapters_train_split_equal_to_unsplit_and_collect_alone():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tm.gpt2()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, config)
    data = _data()
    twin, _ = train_twin(model, data, clip=1.0)
    split = train_split(model, data, ["base_model.model.transformer.h.2"], clip=1.0)
    state = split.collect_state()
    assert_equal_states(state, twin.state_dict())
    adapters = split.collect_state(trainable_only=True)
    assert adapters and all("lora_" in k for k in adapters)
    assert len(adapters) == sum(p.requires_grad for p in model.parameters())
    # the adapters load back into the user's peft model
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(adapters, strict=False)
    assert_equal_states({k: fresh.state_dict()[k] for k in adapters}, twin.state_dict())


def test_recipe_options_are_checked_before_training():
    torch.manual_seed(0)
    model, data = tm.gpt2(layers=2), _data()
    segments = splitnn.cut(model, ["transformer.h.1"], example={"input_ids": data.features[:2]})
    split = splitnn.SplitNN(segments, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")], loss=lm_loss)
    with pytest.raises(ConfigurationError, match="clip_grad_norm must be a finite number > 0"):
        split.fit(data, clip_grad_norm=-1.0)
    with pytest.raises(ConfigurationError, match="leave pipeline=1"):
        split.fit(data, clip_grad_norm=1.0, pipeline=2)


def test_accumulation_over_worker_processes_equals_the_plain_torch_twin(tmp_path):
    """Gradient accumulation at a networked label holder: it divides each batch's loss by the number of batches
    (``loss(..., divide=)``); the weights equal a plain torch twin's, whose loss is divided by hand. (Clipping
    over worker processes: tests/client/test_remote_transformers.py.)"""
    from tests.transport.cluster import Cluster

    torch.manual_seed(0)
    segments = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()), torch.nn.Sequential(torch.nn.Linear(8, 3))]
    twin = copy.deepcopy(torch.nn.Sequential(*segments[0], *segments[1]))
    data = splitnn.Dataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3)
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    for i in range(0, 16, 8):  # batch 4, accumulate 2: one step per 8 rows, in the order fit draws them
        opt.zero_grad()
        for j in range(i, i + 8, 4):
            loss = F.cross_entropy(twin(data.features[j : j + 4]), data.labels[j : j + 4]) / 2
            loss.backward()
        opt.step()
    with Cluster(tmp_path) as cl:
        cl.start("alice")
        cl.start("bob")
        workers = cl.connect("alice", "bob")
        try:
            split = splitnn.SplitNN(segments, workers, loss="cross_entropy", optimizer="sgd:lr=0.5")
            split.fit(data, epochs=1, batch_size=4, shuffle=False, accumulate=2)
            assert_equal_states(split.collect().state_dict(), twin.state_dict())
            assert not torch.equal(twin[0].weight, segments[0][0].weight)  # it trained
        finally:
            for w in workers:
                w.close()


def _classes():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, tm.VOCAB, (N, tm.SEQ), generator=g)
    return splitnn.Dataset(ids, torch.randint(0, tm.CLASSES, (N,), generator=g))


AUTOCAST_CASES = {  # model, cut, input keyword, data, loss
    "transformer-encoder": (tm.encoder_classifier, ["encoder.layers.2"], None, _classes, F.cross_entropy),
    "gpt2": (tm.gpt2, ["transformer.h.2"], "input_ids", _data, lm_loss),
}


@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_bf16_autocast_per_party_equals_the_model_under_autocast(case):
    """Both parties run their segments under bf16 autocast: the split training (clipped by the global norm)
    equals the unsplit model run under torch.autocast (the loss outside it); weights stay float32."""
    make, at, keyword, make_data, loss = AUTOCAST_CASES[case]
    torch.manual_seed(0)
    model, data = make(), make_data()

    def run(m, x):
        out = m(**{keyword: x}) if keyword else m(x)
        return out.logits if keyword else out

    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=0.0)  # the spec's default
    for idx in epoch_batches(len(data), BATCH, seed=SEED, epoch=0):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(twin, data.features[idx])
        loss(out, data.labels[idx]).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        opt.step()
    example = {keyword: data.features[:2]} if keyword else data.features[:2]
    segments = splitnn.cut(model, at, example=example)
    workers = [splitnn.VirtualWorker("alice", autocast="bf16"), splitnn.VirtualWorker("bob", autocast="bf16")]
    split = splitnn.SplitNN(segments, workers, optimizer=f"adamw:lr={LR}", loss=loss)
    split.fit(data, epochs=1, batch_size=BATCH, seed=SEED, clip_grad_norm=1.0)
    state = split.collect_state()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert_equal_states(state, twin.state_dict())
    # what crosses is what the segment returns: here the float32 residual stream or a layer norm's output
    crossing = split.ledger.total(src="alice", dst="bob", kind="activation")
    assert crossing == (N // BATCH) * BATCH * tm.SEQ * tm.WIDTH * 4
    with pytest.raises(ConfigurationError, match=r"autocast must be one of \['bf16', 'fp16'\]"):
        splitnn.VirtualWorker("carol", autocast="int8")


def test_probing_a_graph_segment_under_autocast_leaves_no_autocast_region_open():
    """A probe runs a copy of the segment; a GraphModule's copy drops its hooks and the worker puts them back: the
    autocast pre-hook without its closing hook would leave bf16 autocast on for everything after the probe."""
    from torch import fx, nn

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    worker = splitnn.VirtualWorker("alice", autocast="bf16")
    worker.add_segment("s0", gm, None)
    shape = worker.probe("s0", (2, 4))
    assert tuple(shape) == (2, 3)
    assert not torch.is_autocast_enabled("cpu")
