"""Moved to :mod:`splitnn.experiments.health`; these names stay importable from here until ``cli/train.py``
and ``tests/workers/test_remote_psi.py`` import the new place."""

from splitnn.experiments.health import (
    DATASET,
    HOSPITALS,
    ID_COLUMN,
    LAB,
    LABEL_COLUMN,
    HealthConfig,
    HealthReport,
    run_vertical_health,
    write_breast_cancer_tables,
)

__all__ = [
    "DATASET",
    "HOSPITALS",
    "ID_COLUMN",
    "LAB",
    "LABEL_COLUMN",
    "HealthConfig",
    "HealthReport",
    "run_vertical_health",
    "write_breast_cancer_tables",
]
