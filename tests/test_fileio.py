"""Reports, histories and model files are written atomically: complete, or the old file untouched."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

from splitnn.compare.report import write_csv
from splitnn.compare.runner import RunResult
from splitnn.fileio import atomic_path, atomic_write_text
from splitnn.split.persist import load_model, save_model


def _result(method: str) -> RunResult:
    return RunResult(method, 1, [10], [10], [5], [0.1], 0.5, 1.0, 2.0, 100, 1)


class _Broken(RunResult):
    def to_dict(self):  # a failure half-way through the rows
        raise RuntimeError("disk full")


def test_a_failed_csv_write_keeps_the_previous_report(tmp_path):
    path = tmp_path / "results.csv"
    write_csv([_result("split")], path)
    before = path.read_text()
    with pytest.raises(RuntimeError, match="disk full"):
        write_csv([_result("fedavg"), _Broken("large-batch", 1, [1], [1], [1], [0.1], 0.5, 1.0, 2.0, 1, 1)], path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["results.csv"]  # no temporary file left behind


def test_atomic_path_removes_the_temporary_file_on_interrupt(tmp_path):
    path = tmp_path / "history.json"
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_text("{half")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_new_files_get_the_usual_permissions_not_the_temporary_files(tmp_path):
    umask = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a.json", "{}")
        model = save_model(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    for path in (text, model):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)
    assert load_model(model)(torch.zeros(1, 2)).shape == (1, 2)
