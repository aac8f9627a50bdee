"""Fixtures shared by the networked tests: a module defines its ``cluster`` (worker processes) and ``NAMES``."""

from __future__ import annotations

import pytest


@pytest.fixture()
def remote(cluster, request):
    """The researcher's connections to the module's ``NAMES`` workers of its ``cluster``, closed after the test."""
    workers = cluster.connect(*request.module.NAMES)
    yield workers
    for w in workers:
        w.close()
