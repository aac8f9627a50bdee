"""load_table: one party's CSV file, standardised with its own statistics; bad input names file, row and column."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitnn.data import load_table
from splitnn.errors import DataError


def _write(tmp_path, text: str, name: str = "t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_columns_are_standardised_with_the_partys_own_statistics(tmp_path):
    path = _write(tmp_path, "patient_id,age,bmi,diagnosis\nP1,40,20.5,1\nP2,60,30.5,0\n\nP3,50,25.5,1\n")
    t = load_table(path, id_column="patient_id", label_column="diagnosis")
    assert t.ids == ["P1", "P2", "P3"] and t.columns == ["age", "bmi"] and len(t) == 3
    raw = np.array([[40, 20.5], [60, 30.5], [50, 25.5]])
    expected = (raw - raw.mean(0)) / raw.std(0)  # population std, this file's rows only
    assert torch.equal(t.features, torch.from_numpy(expected.astype(np.float32)))
    assert t.labels.tolist() == [1.0, 0.0, 1.0] and t.labels.dtype == torch.float32
    np.testing.assert_array_equal(t.mean, raw.mean(0))
    only = load_table(path, id_column="patient_id", columns=["bmi"], standardize=False)
    assert only.features.flatten().tolist() == [20.5, 30.5, 25.5] and only.labels is None
    lab = load_table(path, id_column="patient_id", columns=[], label_column="diagnosis")
    assert lab.features is None and set(lab.parts()) == {"ids", "labels"}


def test_a_constant_column_becomes_zeros(tmp_path):
    t = load_table(_write(tmp_path, "id,c,x\na,5,1\nb,5,2\n"), id_column="id")
    assert t.features[:, 0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "text, kwargs, match",
    [
        ("", {}, r"t\.csv: the file is empty"),
        ("id,x\n", {}, r"t\.csv: no data rows"),
        ("id,x\na,1\n", {"columns": ["y"]}, r"t\.csv, row 1 \(header\): no column 'y'"),
        ("id,x\na,1\nb,oops\n", {}, r"t\.csv, row 3, column 'x': 'oops' is not a number"),
        ("id,x\na,1\nb,\n", {}, r"t\.csv, row 3, column 'x': the value is missing"),
        ("id,x\na,1\n,2\n", {}, r"t\.csv, row 3, column 'id': the sample id is missing"),
        ("id,x\na,1\na,2\n", {}, r"t\.csv, row 3, column 'id': id 'a' already appears in row 2"),
        ("id,x\na,1,7\n", {}, r"t\.csv, row 2: 3 cells but the header names 2 columns"),
        ("id,x\na,nan\n", {}, r"t\.csv, row 2, column 'x': 'nan' is not a finite number"),
        ("id,x,x\na,1,2\n", {}, r"column\(s\) \['x'\] appear more than once"),
    ],
)
def test_bad_input_names_file_row_and_column(tmp_path, text, kwargs, match):
    with pytest.raises(DataError, match=match):
        load_table(_write(tmp_path, text), id_column="id", **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_table(tmp_path / "nope.csv", id_column="id")
