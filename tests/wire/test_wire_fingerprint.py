"""Segment fingerprints: the sha256 of a canonical spec; same computation, same fingerprint."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from splitnn import cut
from splitnn.errors import SpecError
from splitnn.wire.fingerprint import check_fingerprint, fingerprint, segment_fingerprints
from splitnn.wire.spec import canonical_json, module_to_spec


def test_fingerprint_is_sha256_of_the_versioned_canonical_json():
    seg = nn.Sequential(nn.Linear(784, 128), nn.ReLU())
    text = canonical_json(module_to_spec(seg))
    assert fingerprint(seg) == hashlib.sha256(f"splitnn-segment-v1\n{text}".encode()).hexdigest()
    assert '"in_features":784' in text and '"bias":true' in text and '"names"' not in text


def test_weights_names_nesting_and_defaults_do_not_change_it():
    a = nn.Sequential(nn.Linear(784, 128), nn.ReLU())
    b = nn.Sequential(nn.Sequential(nn.Linear(784, 128)), nn.ReLU())
    torch.nn.init.zeros_(b[0][0].weight)
    whole = nn.Sequential(nn.Linear(10, 784), nn.Linear(784, 128), nn.ReLU())
    spec = {
        "type": "Sequential",
        "layers": [{"type": "Linear", "in_features": 784, "out_features": 128}, {"type": "ReLU"}],
    }
    assert fingerprint(a) == fingerprint(b) == fingerprint(whole[1:3]) == fingerprint(spec)
    assert fingerprint(nn.Linear(3, 2)) == fingerprint(nn.Sequential(nn.Linear(3, 2)))
    assert fingerprint(nn.Dropout(1)) == fingerprint(nn.Dropout(1.0))


@pytest.mark.parametrize(
    "other",
    [
        nn.Sequential(nn.Linear(784, 129), nn.ReLU()),
        nn.Sequential(nn.Linear(784, 128, bias=False), nn.ReLU()),
        nn.Sequential(nn.Linear(784, 128), nn.Tanh()),
        nn.Sequential(nn.ReLU(), nn.Linear(784, 128)),
        nn.Sequential(nn.Linear(784, 128)),
    ],
)
def test_any_change_to_what_runs_changes_it(other):
    assert fingerprint(other) != fingerprint(nn.Sequential(nn.Linear(784, 128), nn.ReLU()))


def test_graph_segments_have_fingerprints():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    segments = cut(Net(), ["b"])
    fps = segment_fingerprints(segments)
    assert len(fps) == 2 and fps[0] != fps[1] and all(len(f) == 64 for f in fps)
    assert segment_fingerprints(cut(Net(), ["b"])) == fps


def test_fingerprint_text_is_checked():
    fp = fingerprint(nn.ReLU())
    assert check_fingerprint("sha256:" + fp.upper(), "x") == fp
    for bad in ["abc", fp[:-1], 7, None, fp + "0"]:
        with pytest.raises(SpecError, match="not a segment fingerprint"):
            check_fingerprint(bad, "policy")


def test_a_module_without_a_spec_has_no_fingerprint():
    class Local(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(SpecError):
        fingerprint(Local())
