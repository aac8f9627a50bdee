"""Fixtures shared by the worker tests that run real ``splitnn worker`` processes."""

from __future__ import annotations

import pytest

import splitnn


@pytest.fixture
def connect(cluster):
    """``connect(name)``: a researcher's connection to the module's ``cluster`` worker ``name``; every one is
    closed (its session ended) afterwards, and every worker must still be alive."""
    opened = []

    def open_(name: str):
        w = splitnn.connect(cluster.workers[name].url, token=cluster.token, name=name, timeout=60)
        opened.append(w)
        return w

    yield open_
    for w in opened:
        w.close(end_session=True)
    for name, wp in cluster.workers.items():
        assert wp.proc.poll() is None, f"worker {name} died"  # the worker lives on
