"""A segment that runs on the merge of several parties' activations (multi-holder and vertical topologies).

State: the hosted segment's ``inputs`` ((tensor, kind, sender) per source) between forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.errors import WorkerError
from splitnn.workers.checks import check_sources, no_training_forward
from splitnn.workers.engine.hosted import eval_mode
from splitnn.workers.merge import check_merge, merge_tensors
from splitnn.workers.refs import TensorRef


class Merged:
    """Forward and backward over merged inputs (see :class:`~splitnn.workers.MergingWorker`)."""

    def forward_merged(self, key: str, sources: Sequence[TensorRef], merge: str, *, train: bool = True) -> TensorRef:
        """Run segment ``key`` on the merge of several parties' activations (see :class:`MergingWorker`)."""
        check_merge(merge)
        check_sources(list(sources), key, self.name)
        hosted = self._start_forward(key, train)
        received = [self._receive(ref, "activation", train) for ref in sources]
        if any(type(t) is tuple for t, _ in received):
            raise WorkerError(
                f"worker {self.name!r}: segment {key!r} merges activations, and one source sent several values; "
                "a merge takes one tensor per source"
            )
        if not train:
            with torch.no_grad(), eval_mode(hosted.module):
                return self._keep(hosted.module(merge_tensors([t for t, _ in received], merge)), "activation")
        inputs = [
            (t.detach().requires_grad_() if kind == "detached" else t, kind, ref.owner)
            for (t, kind), ref in zip(received, sources)
        ]
        out = hosted.module(merge_tensors([t for t, _, _ in inputs], merge))
        hosted.inp, hosted.out, hosted.input_kind, hosted.inputs = None, out, "merged", inputs
        return self._keep(out, "activation")

    def backward_merged(self, key: str, grad: TensorRef | None) -> list[TensorRef]:
        """Back-propagate through segment ``key`` and its merge; one gradient ref per source, in order."""
        hosted = self._segment(key)
        if hosted.out is None or hosted.input_kind != "merged" or hosted.inputs is None:
            raise no_training_forward(self.name, key, merged=True)
        self._backprop(hosted, grad)
        inputs = hosted.inputs
        hosted.out, hosted.inputs, hosted.input_kind = None, None, "data"
        refs: list[TensorRef] = []
        for i, (tensor, kind, sender) in enumerate(inputs):
            if kind == "fused":
                refs.append(self._fused_grad(tensor, sender))  # autograd carried it; recorded as a transfer
            elif tensor.grad is None:
                raise WorkerError(
                    f"worker {self.name!r}: source {i} of segment {key!r} got no gradient; did the loss backward run?"
                )
            else:
                refs.append(self._keep(tensor.grad, "gradient"))
        return refs
