"""``fit(..., log_dir=DIR)``: TensorBoard event files (read back with TensorBoard's own reader) and a CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import splitnn  # noqa: E402
from splitnn.errors import ConfigurationError  # noqa: E402


def _model_and_data():
    torch.manual_seed(0)
    data = splitnn.Dataset(torch.randn(40, 6), torch.randint(0, 3, (40,)), num_classes=3)
    segments = [nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1))]
    workers = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    return splitnn.SplitNN(segments, workers, optimizer="sgd:lr=0.05"), data


def test_events_and_csv_hold_what_fit_returned(tmp_path):
    model, data = _model_and_data()
    history = model.fit(data, epochs=2, batch_size=16, test_data=data, progress=False, log_dir=tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    f32 = [float(np.float32(x)) for x in history.losses()]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == list(zip([1, 2], f32))
    assert [e.value for e in events.Scalars("test/accuracy")] == [
        float(np.float32(e.test_metrics["accuracy"])) for e in history.epochs
    ]
    assert [e.value for e in events.Scalars("bytes_sent/alice")] == [40 * 5 * 4] * 2  # activations, 5 wide
    assert [e.value for e in events.Scalars("lr/0")] == [float(np.float32(0.05))] * 2
    assert all(e.value > 0 for e in events.Scalars("samples_per_second"))
    steps = events.Scalars("train/loss_step")
    assert [e.step for e in steps] == list(range(6))  # 3 batches (16, 16, 8) per epoch
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    epoch_losses = [float(r["value"]) for r in rows if r["tag"] == "train/loss"]
    assert epoch_losses == history.losses()  # the CSV keeps full precision
    step_losses = [float(r["value"]) for r in rows if r["tag"] == "train/loss_step"]
    # each epoch's loss is the sample-weighted mean of its batches' losses
    for e in range(2):
        first = step_losses[3 * e : 3 * e + 3]
        assert sum(l * n for l, n in zip(first, (16, 16, 8))) / 40 == pytest.approx(history.losses()[e], rel=1e-6)


def test_log_dir_that_is_a_file_is_refused_before_training(tmp_path):
    model, data = _model_and_data()
    bad = tmp_path / "file"
    bad.write_text("x")
    with pytest.raises(ConfigurationError, match="is a file, not a directory"):
        model.fit(data, epochs=1, progress=False, log_dir=bad)
    assert model.ledger.total(kind="activation") == 0  # no batch trained
