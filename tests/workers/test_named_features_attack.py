"""A researcher who holds the federation token cannot get a data holder's named feature tensors out through a
segment that hands them on: real ``splitnn worker`` processes hold token ids and a padding mask (``--data``,
named features) under the data holder's defaults (no policy: closed) and under ``refuse_passthrough`` with
``accept_any_segment`` and ``release_outputs``. The named tensors reach a segment as its positional inputs,
through the same first-read checks as one tensor: no bypass."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from splitnn.data.batching import epoch_batches
from splitnn.errors import PolicyError
from splitnn.workers import BatchRef
from tests.transport.cluster import Cluster
from tests.workers.named_data import SEQ, N, padded_tokens

pytestmark = [pytest.mark.network]

HELD = ("--data", "tok=tests.workers.named_data:padded_tokens,parts=features", "--trust", "tests.workers.named_data")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    policy = root / "passthrough.toml"
    # outputs may leave (release_outputs): refuse_passthrough is all that stands between a leaking segment and the data
    policy.write_text("refuse_passthrough = true\naccept_any_segment = true\nrelease_outputs = true\n")
    with Cluster(root, lifetime=300, open_data=False) as cl:
        cl.start("closed", *HELD)
        cl.start("optin", *HELD, "--policy", str(policy))
        yield cl


class HandsOn(nn.Module):
    """Takes the named features (input_ids, attention_mask) and returns one of them unchanged."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    def forward(self, input_ids, attention_mask):
        return input_ids if self.which == "input_ids" else attention_mask


class Reduces(nn.Module):
    """An honest first segment: a weighted layer, then a ReLU (the heuristic lets it through)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(SEQ, 4)

    def forward(self, input_ids, attention_mask):
        return torch.relu(self.lin(input_ids.float() * attention_mask))


def draw(position: int = 0) -> BatchRef:
    return BatchRef("tok", epoch_batches(N, 8, seed=0)[position])


def refused(worker, rule: str, call, *args, match: str = "") -> None:
    with pytest.raises(PolicyError, match=rf"\(policy rule {rule}\){match}"):
        call(*args)
        worker.drain()
    assert worker.dataset_stats("tok").size == N  # alive, and this session still works


def test_the_holder_describes_its_named_features_without_their_contents(connect):
    stats = connect("optin").dataset_stats("tok")
    assert stats.named_features == (("input_ids", (SEQ,), "int64"), ("attention_mask", (SEQ,), "int64"))


@pytest.mark.parametrize("which", ["input_ids", "attention_mask"])
def test_a_segment_handing_on_a_named_feature_is_refused_by_refuse_passthrough(connect, which):
    w = connect("optin")
    w.add_segment("leak", fx.symbolic_trace(HandsOn(which)), None)
    refused(w, "refuse_passthrough", w.forward, "leak", draw(), match=r": it only moves values around")
    assert w.ledger.total(kind="activation") == 0


def test_a_data_holder_by_default_runs_no_segment_on_its_named_features(connect):
    w = connect("closed")
    w.add_segment("leak", fx.symbolic_trace(HandsOn("input_ids")), None)
    refused(w, "accept_segments", w.forward, "leak", draw(), match=r": whether a segment leaks its input")


def test_an_honest_segment_reads_the_named_features_as_its_inputs(connect):
    """The control: the same worker runs a segment that reduces its inputs, on the tuple of the named tensors."""
    w = connect("optin")
    seg = fx.symbolic_trace(Reduces())
    w.add_segment("ok", seg, None)
    out = w.fetch(w.forward("ok", draw()), kind="activation")
    rows = draw().indices
    features = padded_tokens().features
    assert torch.equal(out, seg(features["input_ids"][rows], features["attention_mask"][rows]))
