"""Tabular data at one party: a CSV file of sample ids, numeric feature columns and an optional label.

Each party of vertical split learning loads its own table. Numeric columns are
standardised with statistics the party computes on its own rows (mean and population
standard deviation per column), so no other party's data is needed; the statistics
are kept on the :class:`Table` to apply to later rows. Every bad input is refused with
an error naming the file, the row (the line number, 1 being the header) and the column.

Only CSV is read (the standard library's ``csv`` module): pandas and pyarrow are not
dependencies of splitnn.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitnn.errors import DataError

__all__ = ["Table", "load_table"]


@dataclass
class Table:
    """One party's table: ids, standardised features and/or labels.

    Attributes:
        ids: one string per row, in file order, unique.
        features: float32 ``(N, len(columns))``, standardised (``None`` without feature columns).
        labels: float32 ``(N,)`` (``None`` without a label column).
        columns: the feature columns, in order.
        mean, std: the per-column statistics the features were standardised with
            (float64; a constant column has std 1, so it becomes all zeros).
        path: the file it was read from.
    """

    ids: list[str]
    features: torch.Tensor | None
    labels: torch.Tensor | None
    columns: list[str]
    label_column: str | None
    mean: np.ndarray | None
    std: np.ndarray | None
    path: str

    def __len__(self) -> int:
        return len(self.ids)

    def parts(self) -> dict[str, object]:
        """What a worker holds of this table: ``features``, ``labels`` (those present) and ``ids``."""
        held: dict[str, object] = {"ids": self.ids}
        if self.features is not None:
            held["features"] = self.features
        if self.labels is not None:
            held["labels"] = self.labels
        return held


def load_table(
    path: str | os.PathLike[str],
    *,
    id_column: str,
    columns: Sequence[str] | None = None,
    label_column: str | None = None,
    standardize: bool = True,
) -> Table:
    """Read a CSV file with a header row into a :class:`Table`.

    Args:
        path: the CSV file (UTF-8, a byte-order mark is allowed).
        id_column: the column of sample ids (strings, non-empty, unique).
        columns: the numeric feature columns, in the order wanted; ``None``: every column
            except the id and label columns; ``[]``: none (a label-only party).
        label_column: the numeric label column (e.g. a 0/1 diagnosis), if this party holds labels.
        standardize: subtract each feature column's mean and divide by its standard deviation,
            both computed on this file's rows.

    Raises:
        DataError: the file is missing or empty, a named column is missing, a row has the
            wrong number of cells, an id is missing or repeated, a value is missing or not a
            finite number -- naming the file, the row and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: the file is empty; expected a header row naming the columns") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, row 1: cannot read the header: {exc}") from None
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DataError(f"{path}, row 1 (header): column(s) {dup} appear more than once")
        wanted = [id_column, *([label_column] if label_column is not None else [])]
        if columns is None:
            columns = [h for h in header if h not in wanted]
        columns = list(columns)
        for col in (*wanted, *columns):
            if col not in header:
                raise DataError(f"{path}, row 1 (header): no column {col!r}; the file has columns {header}")
        if label_column is not None and label_column in columns:
            raise DataError(f"{path}: column {label_column!r} is both the label and a feature column")
        if id_column in columns:
            raise DataError(f"{path}: column {id_column!r} is both the id and a feature column")
        id_at = header.index(id_column)
        feature_at = [header.index(c) for c in columns]
        label_at = header.index(label_column) if label_column is not None else None
        ids: list[str] = []
        first_row: dict[str, int] = {}
        feats: list[list[float]] = []
        labels: list[float] = []
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(f"{path}, row {line}: {len(row)} cells but the header names {len(header)} columns")
                sid = row[id_at].strip()
                if not sid:
                    raise DataError(f"{path}, row {line}, column {id_column!r}: the sample id is missing")
                if sid in first_row:
                    raise DataError(
                        f"{path}, row {line}, column {id_column!r}: id {sid!r} already appears in row "
                        f"{first_row[sid]}; every sample needs a unique id"
                    )
                first_row[sid] = line
                ids.append(sid)
                feats.append([_number(path, line, c, row[i]) for c, i in zip(columns, feature_at)])
                if label_at is not None:
                    labels.append(_number(path, line, label_column, row[label_at]))
        except csv.Error as exc:
            raise DataError(f"{path}, row {reader.line_num}: malformed CSV: {exc}") from None
    if not ids:
        raise DataError(f"{path}: no data rows after the header")
    features = mean = std = None
    if columns:
        x = np.asarray(feats, dtype=np.float64)
        if standardize:
            mean = x.mean(axis=0)
            std = x.std(axis=0)
            std[std == 0] = 1.0  # a constant column carries no information: it becomes zeros
            x = (x - mean) / std
        features = torch.from_numpy(x.astype(np.float32))
    label_tensor = torch.tensor(labels, dtype=torch.float32) if label_column is not None else None
    return Table(ids, features, label_tensor, columns, label_column, mean, std, str(path))


def _number(path: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    if not text:
        raise DataError(f"{path}, row {line}, column {column!r}: the value is missing; fill it in or drop the row")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, row {line}, column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}, row {line}, column {column!r}: {text!r} is not a finite number")
    return value
