"""Mixed precision per segment at a party (splitnn.workers.precision): the mode a segment is placed with
(``add_segment(..., autocast=)``, what a networked researcher's ``RemoteWorker(autocast=)`` asks for) overrides the
party's own (``VirtualWorker(autocast=)``); the weights stay float32; an unknown mode is refused before hosting."""

from __future__ import annotations

import pytest
import torch

from splitnn.errors import ConfigurationError
from splitnn.workers import VirtualWorker


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_a_segment_placed_with_autocast_runs_in_bf16_and_its_neighbour_in_full_precision():
    bob = VirtualWorker("bob")
    bob.add_segment("half", _linear(), None, autocast="bf16")
    bob.add_segment("full", _linear(), None)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    half, full = bob.segment("half")(x), bob.segment("full")(x)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    # the oracle: the plain layer under torch.autocast, weights untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(half, _linear()(x))
    assert bob.segment("half").weight.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # the region closed with the forward


def test_the_mode_a_segment_is_placed_with_overrides_the_partys_own():
    bob = VirtualWorker("bob", autocast="fp16")
    bob.add_segment("bf", _linear(), None, autocast="bf16")
    bob.add_segment("own", _linear(), None)
    x = torch.randn(2, 4)
    assert bob.segment("bf")(x).dtype == torch.bfloat16 and bob.segment("own")(x).dtype == torch.float16


def test_an_unknown_mode_is_refused_before_the_segment_is_hosted():
    bob = VirtualWorker("bob")
    with pytest.raises(ConfigurationError, match=r"worker 'bob': autocast must be one of \['bf16', 'fp16'\]"):
        bob.add_segment("k", _linear(), None, autocast="fp8")
    assert bob.segment_keys() == []
