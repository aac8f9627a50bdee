"""What a session keeps of the tensors it handed to a peer (:class:`splitnn.server.exports.Exports`)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import torch

from splitnn.server.exports import Exports
from splitnn.workers import VirtualWorker


def test_a_tensor_kept_for_a_re_pull_does_not_keep_its_autograd_graph_alive():
    """The served copy (for a peer whose link broke) holds the bytes, not the step's activations: once the engine
    and the caller let go of the output, the intermediate activation its graph saved is freed."""
    engine = VirtualWorker("alice")

    async def pull():
        exports = Exports("alice", engine, timeout=5.0)
        x = torch.randn(4, 3, requires_grad=True)
        hidden = x * 2
        out = hidden.sin()  # saves ``hidden`` for its backward
        exports.export(7, engine.keep(out, "activation"))
        alive = weakref.ref(hidden)
        del hidden, out
        got, again = await exports.take(7, "activation", "bob")
        assert not again and got.grad_fn is not None  # the puller gets the output as produced
        del got
        gc.collect()
        repeat, again = await exports.take(7, "activation", "bob")  # the same peer, after its link broke
        assert again and repeat.grad_fn is None
        return alive, repeat

    alive, _ = asyncio.run(pull())
    gc.collect()
    assert alive() is None  # without the detach, the served copy's graph keeps it
