"""splitnn.cut of transformers through torch.export (``example=``): Hugging Face GPT-2, BERT, ViT and Llama,
and nn.TransformerEncoder cut between its layers. Each split model trains with AdamW, in process, to exactly
the weights (and losses) of its unsplit twin, trained by a plain PyTorch loop on the original model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import splitnn
from splitnn.errors import ConfigurationError
from splitnn.training import epoch_batches
from tests.split import transformer_models as tm

pytest.importorskip("transformers")

N, BATCH, SEED = 20, 8, 5  # 20 rows in batches of 8: the last batch (4 rows) is smaller than the example's


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tm.VOCAB, (n, tm.SEQ), generator=g)


def _lm_data():
    ids = _ids(N + 1, 1)
    return splitnn.Dataset(ids[:N], torch.roll(ids[:N], -1, dims=1))


def _class_data(features):
    g = torch.Generator().manual_seed(2)
    return splitnn.Dataset(features, torch.randint(0, tm.CLASSES, (N,), generator=g))


def _pixels():
    return torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(3))


CASES = {  # model, cut points, keyword of the input (None: positional), output, data, loss on the plain output
    "gpt2": (tm.gpt2, ["transformer.h.2"], "input_ids", None, _lm_data, lm_loss),
    "gpt2-three-parties": (tm.gpt2, ["transformer.h.1", "transformer.h.3"], "input_ids", "logits", _lm_data, lm_loss),
    "bert": (tm.bert, ["bert.encoder.layer.2"], "input_ids", "logits", lambda: _class_data(_ids(N, 4)), None),
    "vit": (tm.vit, ["vit.layers.2"], "pixel_values", "logits", lambda: _class_data(_pixels()), None),
    "timm-style-vit": (tm.timm_vit, ["blocks.1", "blocks.3"], None, None, lambda: _class_data(_pixels()), None),
    "llama": (tm.llama, ["model.layers.2"], "input_ids", None, _lm_data, lm_loss),
    "transformer-encoder": (
        tm.encoder_classifier,
        ["encoder.layers.2"],
        None,
        None,
        lambda: _class_data(_ids(N, 4)),
        None,
    ),
}


def _plain(model, x, keyword):
    out = model(**{keyword: x}) if keyword else model(x)
    return out.logits if hasattr(out, "logits") else out


def train_twin(model, keyword, data, loss, epochs=2):
    """The unsplit model, trained by a plain PyTorch loop in fit's data order."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for epoch in range(epochs):
        for idx in epoch_batches(len(data), BATCH, seed=SEED, epoch=epoch):
            opt.zero_grad()
            loss(_plain(model, data.features[idx], keyword), data.labels[idx]).backward()
            opt.step()
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_cut_transformer_trains_equal_to_its_unsplit_twin(case):
    make, at, keyword, output, make_data, loss = CASES[case]
    torch.manual_seed(0)
    model = make()
    data = make_data()
    loss = loss or F.cross_entropy
    example = {keyword: data.features[:4]} if keyword else data.features[:4]
    segments = splitnn.cut(model, at, example=example, output=output)
    assert len(segments) == len(at) + 1
    for seg in segments[1:]:  # masks, positions, rotary tables and sizes are recomputed: one hidden state crosses
        assert sum(n.op == "placeholder" for n in seg.graph.nodes) == 1

    twin = train_twin(model, keyword, data, loss)

    workers = [splitnn.VirtualWorker(f"p{i}") for i in range(len(segments))]
    split = splitnn.SplitNN(
        segments, workers, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), loss=loss
    )
    split.fit(data, epochs=2, batch_size=BATCH, seed=SEED, progress=False)
    state = split.collect_state()
    want = twin.state_dict()
    used = set(want)
    assert set(state) == used  # the segments hold the model's own state-dict keys, all of them and no other
    for name in used:
        assert torch.equal(state[name], want[name]), f"{name} differs"
    # the weights load back into the user's model
    fresh = make()
    fresh.load_state_dict(state)


def test_fx_refusal_of_a_transformer_names_example_as_the_fix():
    with pytest.raises(ConfigurationError, match="pass example="):
        splitnn.cut(tm.encoder_classifier(), ["encoder.layers.2"])


def test_segments_hold_the_hidden_state_only_and_take_any_batch():
    """The causal mask and positions are recomputed after the cut; only the hidden state crosses it."""
    torch.manual_seed(0)
    model = tm.gpt2()
    ids = _ids(6, 7)
    first, second = splitnn.cut(model, ["transformer.h.2"], example={"input_ids": ids[:4]})
    hidden = first(ids)
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (6, tm.SEQ, tm.WIDTH)
    assert sum(n.op == "placeholder" for n in second.graph.nodes) == 1
    assert torch.equal(second(hidden), model(input_ids=ids).logits)


def test_tied_weights_across_a_cut_are_refused_naming_the_parameter():
    with pytest.raises(ConfigurationError, match=r"lm_head.weight.*tied weights|tied weights"):
        splitnn.cut(tm.gpt2(tie=True), ["transformer.h.2"], example={"input_ids": _ids(4, 0)})


def test_output_must_name_a_tensor_of_the_model_output():
    with pytest.raises(ConfigurationError, match=r"has no output 'logit'.*\['logits'\]"):
        splitnn.cut(tm.gpt2(), ["transformer.h.2"], example={"input_ids": _ids(4, 0)}, output="logit")
    with pytest.raises(ConfigurationError, match="give example= too"):
        splitnn.cut(tm.gpt2(), ["transformer.h.2"], output="logits")


def test_an_example_of_one_row_is_refused():
    with pytest.raises(ConfigurationError, match="batch of 2 or more rows"):
        splitnn.cut(tm.gpt2(), ["transformer.h.2"], example={"input_ids": _ids(1, 0)})


class _Branchy(torch.nn.Module):
    def forward(self, h):
        if h.sum() > 0:  # a Python branch on a tensor's value: neither fx nor export can trace it
            h = h * 2
        return h


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gate, self.b = torch.nn.Linear(4, 4), _Branchy(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


def test_a_model_export_cannot_trace_is_refused_with_the_fix():
    # the message names the line and the module it ran for, and the fix
    match = r"torch.export cannot trace it.* in forward of module 'gate' \(_Branchy\): `if h.sum\(\) > 0:.*Fix: "
    with pytest.raises(ConfigurationError, match=match):
        splitnn.cut(_DataDependent(), ["b"], example=torch.randn(4, 4))


def test_token_ids_are_features():
    ids = _ids(4, 0)
    data = splitnn.Dataset(ids, ids[:, 0])
    assert data.features.dtype == torch.int64
    with pytest.raises(splitnn.errors.DataError, match="float32 \\(or int64 token ids\\)"):
        splitnn.Dataset(ids.int(), ids[:, 0])


def test_bert_with_a_padding_mask_trains_through_the_low_level_loop_equal_to_its_twin():
    """Two keyword inputs (input_ids, attention_mask) become the first segment's two inputs; the mask, being
    data, crosses the cut forward (it needs no gradient) and every step equals the unsplit model's."""
    torch.manual_seed(0)
    model = tm.bert()
    ids = _ids(8, 9)
    mask = torch.ones_like(ids)
    mask[:4, 10:] = 0  # the first four rows are padded
    labels = torch.randint(0, tm.CLASSES, (8,), generator=torch.Generator().manual_seed(1))
    segments = splitnn.cut(model, ["bert.encoder.layer.2"], example={"input_ids": ids, "attention_mask": mask})
    twin = copy.deepcopy(model)
    make = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    split = splitnn.SplitNN(segments, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")], optimizer=make)
    opt = make(twin.parameters())
    for step in range(3):
        rows = torch.arange(step, step + 6) % 8
        split.zero_grads()
        out = split.forward((ids[rows], mask[rows]))
        loss = F.cross_entropy(out, labels[rows])
        loss.backward()
        split.backward()
        split.step()
        opt.zero_grad()
        want = F.cross_entropy(twin(input_ids=ids[rows], attention_mask=mask[rows]).logits, labels[rows])
        want.backward()
        opt.step()
        assert torch.equal(loss, want)
    state = split.collect_state()
    for name, value in state.items():
        assert torch.equal(value, twin.state_dict()[name]), name
    # the padding mattered: without the mask the model computes something else
    assert not torch.equal(split.predict((ids, mask)), split.predict((ids, torch.ones_like(mask))))


NAMED_ADAMW = "adamw:lr=1e-2,weight_decay=0.1"


def _padded_bert_data(n, seed):
    """BERT's two keyword inputs as one Dataset of named features: token ids and a padding mask (some rows
    padded after a random length), class labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tm.VOCAB, (n, tm.SEQ), generator=g)
    lengths = torch.randint(4, tm.SEQ + 1, (n,), generator=g)
    mask = (torch.arange(tm.SEQ) < lengths[:, None]).long()
    labels = torch.randint(0, tm.CLASSES, (n,), generator=g)
    return splitnn.Dataset({"input_ids": ids, "attention_mask": mask}, labels)


def train_padded_bert_twin(model, data, *, epochs, batch, seed, lr):
    """The unsplit BERT trained by a plain loop: torch.optim.AdamW, F.cross_entropy on
    twin(input_ids=..., attention_mask=...) in fit's batch order (epoch_batches); returns (epoch losses as fit
    averages them, state dict)."""
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=0.1)  # what NAMED_ADAMW names
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for idx in epoch_batches(len(data), batch, seed=seed, epoch=epoch):
            opt.zero_grad()
            out = twin(input_ids=data.features["input_ids"][idx], attention_mask=data.features["attention_mask"][idx])
            loss = F.cross_entropy(out.logits, data.labels[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(data))
    return losses, twin.state_dict()


def test_bert_with_a_padding_mask_trains_with_fit_on_named_features_equal_to_its_twin():
    """splitnn.Dataset(features={"input_ids": ..., "attention_mask": ...}) trains with splitnn.fit: the two named
    tensors reach the first segment in the mapping's order (the example's keys); losses and weights equal the
    unsplit model called with keywords, and evaluation and prediction take the named features too."""
    torch.manual_seed(0)
    model, data = tm.bert(), _padded_bert_data(N, 11)
    segments = splitnn.cut(model, ["bert.encoder.layer.2"], example={k: v[:2] for k, v in data.features.items()})
    split = splitnn.SplitNN(
        segments, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")], optimizer=NAMED_ADAMW, loss="cross_entropy"
    )
    history = splitnn.fit(split, data, epochs=2, batch_size=BATCH, seed=SEED, progress=False)
    want_losses, want_state = train_padded_bert_twin(model, data, epochs=2, batch=BATCH, seed=SEED, lr=1e-2)
    assert history.losses() == want_losses
    state = split.collect_state()
    assert list(state) == list(want_state)
    for name, value in state.items():
        assert torch.equal(value, want_state[name]), name
    twin = copy.deepcopy(model)
    twin.load_state_dict(want_state)
    with torch.no_grad():
        logits = twin(**data.features).logits
    assert torch.equal(split.predict(tuple(data.features.values())), logits)
    result = splitnn.evaluate(split, data)
    assert result.loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-6)
    assert result.accuracy == int((logits.argmax(1) == data.labels).sum()) / len(data)


def test_named_features_in_another_order_than_the_example_are_refused_naming_both():
    """The names must be the first segment's input names, in order: swapped features would feed the mask as ids."""
    torch.manual_seed(0)
    data = _padded_bert_data(8, 12)
    swapped = splitnn.Dataset(
        {"attention_mask": data.features["attention_mask"], "input_ids": data.features["input_ids"]}, data.labels
    )
    segments = splitnn.cut(tm.bert(), ["bert.encoder.layer.2"], example={k: v[:2] for k, v in data.features.items()})
    split = splitnn.SplitNN(segments, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")], loss="cross_entropy")
    with pytest.raises(ConfigurationError, match=r"\(attention_mask, input_ids\).*takes \(input_ids, attention_mask\)"):
        splitnn.fit(split, swapped, epochs=1, batch_size=4, progress=False)
    assert split.data_holder.datasets() == {}  # refused before anything was placed


class _FilledMask(torch.nn.Module):
    """A mask made from constants, then written into in place from the data: it must cross, not be recomputed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        mask = torch.ones(4)
        mask[0] = x[0, 0]  # an in-place write of data into a tensor built from constants
        h = self.a(x)
        return self.b(h) * mask


def test_a_constant_tensor_written_with_data_crosses_the_cut_instead_of_being_recomputed():
    torch.manual_seed(0)
    model = _FilledMask()
    x = torch.randn(6, 4)
    first, second = splitnn.cut(model, ["b"], example=x[:3])
    values = first(x)
    assert torch.equal(second(*values) if isinstance(values, tuple) else second(values), model(x))


class _FixedBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        mask = torch.ones(int(x.shape[0]), 4)  # int() of a size: export fixes the batch at the example's
        return self.b(self.a(x)) * mask


def test_a_model_whose_export_fixes_the_batch_size_is_refused():
    match = r"torch.export fixed the batch size at the example's 3 rows.*on 4 rows its graph failed.*Fix: create"
    with pytest.raises(ConfigurationError, match=match):
        splitnn.cut(_FixedBatch(), ["b"], example=torch.randn(3, 4))


@pytest.mark.parametrize(
    "make, at", [(tm.gpt2, ["transformer.h.2"]), (tm.llama, ["model.layers.2"]), (tm.bert, ["bert.encoder.layer.2"])]
)
def test_segments_make_their_tensors_on_the_device_of_their_input(make, at):
    """Export writes the device it traced on into ``arange``/``to`` calls; each segment reads its input's device
    instead, so it runs on the device its party computes on. Meta tensors stand in for an accelerator: with the
    traced CPU device left in, a position table made on the CPU meets meta activations and the segment fails."""
    torch.manual_seed(0)
    ids = _ids(4, 9)
    segments = splitnn.cut(make(), at, example={"input_ids": ids[:2]}, output="logits")
    x = ids.to("meta")
    for seg in segments:
        assert not [n for n in seg.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)]
        x = seg.to("meta")(x)
    assert x.device.type == "meta" and x.shape[0] == 4
