"""The researcher's client coalesces pipelined commands into batch messages the worker accepts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splitnn
from splitnn.common.messages import MAX_BATCH
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def test_more_pipelined_commands_than_one_batch_holds_all_run(tmp_path):
    """MAX_BATCH + 100 commands sent without waiting: every one runs (none is refused as a malformed batch)."""
    with Cluster(tmp_path) as cl:
        cl.start("alice")
        with splitnn.connect(cl.workers["alice"].url, token=cl.token, name="alice", timeout=60) as w:
            torch.manual_seed(0)
            w.add_segment("s", nn.Linear(2, 2), "sgd:lr=0.5")
            for _ in range(MAX_BATCH + 100):
                w.zero_grad("s")
            w.drain()  # raised "malformed command batch" when one message held them all
            state = w.get_state("s")
        assert set(state) == {"weight", "bias"}
