"""The ledger's bytes equal the exact sizes of the tensors at each cut; data stays home."""

from __future__ import annotations

import pytest
import torch

import splitnn
from splitnn.models import small_cnn, tutorial_mlp
from tests.helpers import toy_dataset

F32 = 4


def _model(segments, fuse):
    workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in ("alice", "bob", "claire")]
    return splitnn.SplitNN(segments, workers)


def _cut_shapes(segments, x):
    shapes = []
    with torch.no_grad():
        for seg in segments[:-1]:
            x = seg(x)
            shapes.append(tuple(x.shape))
    return shapes


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("build", [tutorial_mlp, small_cnn], ids=["mlp", "cnn"])
def test_one_batch_moves_exactly_the_cut_tensors(build, fuse):
    torch.manual_seed(0)
    segments = build()
    data = toy_dataset(64)
    (s0, s1) = [int(torch.tensor(s).prod()) * F32 for s in _cut_shapes(segments, data.features[:64])]
    model = _model(segments, fuse)
    name, _ = model.prepare(data)
    model.train_batch(name, torch.arange(64))
    ledger = model.ledger
    assert {(l.src, l.dst, l.kind): (l.count, l.nbytes) for l in ledger.links()} == {
        ("alice", "bob", "activation"): (1, s0),
        ("bob", "alice", "gradient"): (1, s0),
        ("bob", "claire", "activation"): (1, s1),
        ("claire", "bob", "gradient"): (1, s1),
    }


def test_no_feature_or_label_bytes_leave_their_holders_during_fit_and_evaluate():
    torch.manual_seed(0)
    model = _model(tutorial_mlp(), True)
    data = toy_dataset(100)
    model.fit(data, epochs=1, batch_size=32, progress=False)
    model.evaluate(data)
    ledger = model.ledger
    assert ledger.total(kind="features") == 0
    assert ledger.total(kind="labels") == 0
    assert ledger.total(src="researcher") == 0  # the orchestrator sends nothing but calls
    # 4 batches of training (3x32 + 4) + 1 evaluation batch of 100, at both cuts, forward.
    assert ledger.total(kind="activation", src="alice") == (100 + 100) * 128 * F32
    assert ledger.total(kind="gradient", src="bob") == 100 * 128 * F32


def test_evaluate_reports_accuracy_and_bytes_per_worker():
    torch.manual_seed(0)
    model = _model(tutorial_mlp(), True)
    data = toy_dataset(50)
    result = model.evaluate(data)
    assert result.count == 50
    expected = sum(int((model.predict(data.features[i : i + 1]).argmax(1) == data.labels[i]).item()) for i in range(50))
    assert result.accuracy == pytest.approx(expected / 50)
    assert result.bytes_sent == {"alice": 50 * 128 * F32, "bob": 50 * 640 * F32}


def test_collect_records_weight_bytes_and_round_trips_through_safetensors(tmp_path):
    from splitnn.split.persist import load_model, save_model

    torch.manual_seed(0)
    model = _model(tutorial_mlp(), True)
    full = model.collect()
    n_params = sum(p.numel() for p in full.parameters())
    assert model.ledger.total(kind="weights", dst="researcher") == n_params * F32
    path = save_model(full, tmp_path / "model.safetensors")
    again = load_model(path)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(again(x), full(x))
    assert [p for p in tmp_path.iterdir()] == [path]  # no temp file left behind


def test_u_shaped_chain_keeps_labels_and_outputs_at_the_data_holder():
    """SplitNN([s0, s1, s2], [alice, bob, alice]): alice holds features, labels and the output layer."""
    torch.manual_seed(0)
    alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    model = splitnn.SplitNN(tutorial_mlp(), [alice, bob, alice])
    model.fit(toy_dataset(64), epochs=1, batch_size=64, progress=False)
    assert {(l.src, l.dst, l.kind): l.nbytes for l in model.ledger.links()} == {
        ("alice", "bob", "activation"): 64 * 128 * F32,
        ("bob", "alice", "activation"): 64 * 640 * F32,
        ("alice", "bob", "gradient"): 64 * 640 * F32,
        ("bob", "alice", "gradient"): 64 * 128 * F32,
    }


def test_load_model_refuses_files_that_are_not_splitnn_models(tmp_path):
    from splitnn.errors import ConfigurationError
    from splitnn.split.persist import load_model

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigurationError, match="not a safetensors model file"):
        load_model(junk)
    with pytest.raises(ConfigurationError, match="no model file"):
        load_model(tmp_path / "missing.safetensors")


def test_evaluate_reports_nan_accuracy_when_the_output_is_not_a_class_score():
    from torch import nn

    torch.manual_seed(0)
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(784, 4)),
        nn.Sequential(nn.Linear(4, 10), nn.LogSoftmax(1), nn.Flatten(0)),
    ]
    model = splitnn.SplitNN(segments, [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")])
    data = toy_dataset(3)  # batches of one sample: nll_loss takes the 1-D output
    result = model.evaluate(data, batch_size=1)
    assert result.accuracy != result.accuracy  # NaN, not a negative fraction
