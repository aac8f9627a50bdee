"""A segment's training and evaluation step: forward, backward, zeroing, clipping and stepping its optimizer.

Fused autograd: when both ends of a cut are in-process workers with ``fuse=True``, the receiver keeps the
sender's activation attached to the autograd graph, so one ``backward`` from the loss runs through every
segment; the gradient at the cut is still recorded (when the receiver's ``backward`` runs) and the weights are
bit-identical to the eager path (``fuse=False``, whose extra autograd calls cost about 6% of the tutorial
network's step time). Several values at a cut follow :mod:`splitnn.workers.values`.
State: each hosted segment's last training forward (``inp``, ``out``, ``input_kind``, ``source``, ``sent``).
"""

from __future__ import annotations

import functools

import torch

from splitnn.accounting import RESEARCHER
from splitnn.errors import WorkerError
from splitnn.wire.tensor_codec import tensor_nbytes
from splitnn.workers.checks import no_input_gradient, no_training_forward
from splitnn.workers.devices import RESEARCHER_DEVICE
from splitnn.workers.engine.hosted import Hosted, eval_mode, plain_backward, segment_output
from splitnn.workers.refs import BatchRef, TensorRef
from splitnn.workers.values import Value, nbytes


class Steps:
    """Forward, backward and step of the hosted segments, one batch at a time."""

    def forward(self, key: str, source: TensorRef | BatchRef, *, train: bool = True) -> TensorRef:
        hosted = self._start_forward(key, train)
        if isinstance(source, BatchRef):
            x, input_kind = self._features(key, source), "data"
        else:
            x, input_kind = self._receive(source, "activation", train)
            if input_kind == "fused" and hosted.send_grad is not None:
                input_kind = "detached"  # the gradient crosses compressed: autograd must not carry it
        if type(x) is tuple:
            return self._forward_values(key, hosted, x, input_kind, source, train)
        if not train:
            with torch.no_grad(), eval_mode(hosted.module):
                return self._keep(
                    segment_output(hosted.module(x), key, self.name), "activation", hosted.send_out, False
                )
        if input_kind == "detached":
            x = x.detach().requires_grad_()
        out = hosted.module(x)
        if type(out) is not torch.Tensor:
            out = segment_output(out, key, self.name)
        if input_kind == "data" and self.policy.detect_hijack is not None and type(out) is torch.Tensor:
            out = self._hijack_guard(key).wrap(out)
        hosted.inp, hosted.out, hosted.input_kind = x, out, input_kind
        hosted.source = source.owner if isinstance(source, TensorRef) else self.name
        return self._keep(out, "activation", hosted.send_out)

    def backward(self, key: str, grad: TensorRef | None, *, weights_later: bool = False) -> TensorRef | None:
        """Back-propagate segment ``key``'s last training forward from ``grad`` (None: from its loss); the gradient
        of its input, for the party that sent it. ``weights_later``: where the segment allows it (a peer's tensor
        in, one tensor out, :func:`plain_backward`), compute that gradient alone now and the weights' gradients
        when they are next needed (:meth:`Hosted.settle`: at ``step`` at the latest), so that the sender waiting for
        it gets it sooner. The gradients are the same either way."""
        hosted = self._segment(key)
        if hosted.out is None:
            raise no_training_forward(self.name, key)
        if hosted.input_kind == "merged":
            raise WorkerError(f"worker {self.name!r}: segment {key!r} ran on merged inputs; use backward_merged")
        guarded = key in self._hijack_guards  # (rule detect_hijack: most segments have no detector)
        if guarded:
            self._check_hijack(key)
        elif (
            weights_later
            and hosted.input_kind == "detached"
            and type(hosted.out) is torch.Tensor
            and type(hosted.inp) is torch.Tensor
            and hosted.inp.requires_grad
            and plain_backward(hosted)
        ):
            if grad is not None:
                return self._input_grad_first(key, hosted, hosted.out, self._receive(grad, "gradient", False)[0])
            loss = self._pending(hosted)
            if loss is not None:  # (else the caller ran backward already, from the output it fetched)
                return self._input_grad_first(key, hosted, loss, None)
        self._backprop(hosted, grad)
        if guarded:
            self._check_hijack(key)
        kind, inp = hosted.input_kind, hosted.inp
        hosted.inp = hosted.out = None
        if kind == "data":
            return None
        if type(inp) is tuple:
            return self._values_grad(hosted, inp, kind)
        if kind == "fused":
            return self._fused_grad(inp, hosted.source)
        if inp.grad is None:
            raise no_input_gradient(self.name, key)
        return self._keep(inp.grad, "gradient", hosted.send_grad)

    def _input_grad_first(self, key: str, hosted: Hosted, root: torch.Tensor, g: Value | None) -> TensorRef:
        """:meth:`backward`'s first pass, from ``root`` (the output, with its gradient ``g``, or the loss) to the
        input alone; the second, to the weights, is left due."""
        if type(g) is tuple:
            raise WorkerError(f"worker {self.name!r}: got {len(g)} gradients for a segment output of 1 value")
        inp = hosted.inp
        params = [p for p in hosted.params if p.requires_grad]
        (g_in,) = torch.autograd.grad(root, inp, g, retain_graph=bool(params), allow_unused=True)
        hosted.inp = hosted.out = None
        hosted.weights_due = (root, g, params) if params else None
        if g_in is None:
            raise no_input_gradient(self.name, key)
        return self._keep(g_in, "gradient", hosted.send_grad)

    def zero_grad(self, key: str) -> None:
        # Same effect as optimizer.zero_grad(set_to_none=True), without its
        # profiler and hook machinery on the per-batch hot path.
        for p in self._segment(key).params:
            p.grad = None

    def step(self, key: str) -> None:
        if key in self._hijack_guards:
            self._check_hijack(key)
        opt = self._trainable(key).optimizer
        if opt is not None:
            opt.step()

    def grad_norms(self, key: str) -> torch.Tensor:
        """The 2-norm of each gradient of segment ``key``'s trainable parameters (those that have one, in
        order), for clipping by the global norm across parties: one number per tensor, never a gradient
        (recorded as control bytes to the researcher). Refused unless the policy's ``release_grad_norms``."""
        self.release_grad_norms(key)
        grads = [p.grad for p in self._segment(key).params if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]) if grads else torch.zeros(0)
        self.ledger.record(self.name, RESEARCHER, "control", nbytes(norms))
        return norms.to(RESEARCHER_DEVICE)

    def clip_grads(self, key: str, max_norm: float, total_norm: torch.Tensor) -> None:
        """Scale segment ``key``'s gradients as ``torch.nn.utils.clip_grads_with_norm_`` does for the global
        ``total_norm`` (the norm over every party's gradients, from their :meth:`grad_norms`)."""
        params = [p for p in self._segment(key).params if p.grad is not None]
        self.ledger.record(RESEARCHER, self.name, "control", nbytes(total_norm))
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, self._here(total_norm))

    def _start_forward(self, key: str, train: bool) -> Hosted:
        """Segment ``key`` about to run a forward (refused for training once released), in training mode to train."""
        hosted = self._trainable(key, train)
        hosted.ran = True
        if train and hosted.training is not True:
            hosted.module.train(True)
            hosted.training = True
        return hosted

    def _fused_grad(self, inp: torch.Tensor, sender: str) -> TensorRef:
        """Autograd already carried the gradient of ``inp`` across the cut; record the bytes a real transfer
        moves (a gradient has its activation's shape and dtype)."""
        if sender != self.name:
            self.ledger.record(self.name, sender, "gradient", tensor_nbytes(inp))
        return TensorRef(self.name, -1, fused=True)

    def _backprop(self, hosted: Hosted, grad: TensorRef | None) -> None:
        """Run backward through ``hosted``'s last forward, from the pending loss or a peer's gradient."""
        if grad is None:
            loss = self._pending(hosted)
            if loss is not None:
                loss.backward()
            # else: the caller already ran backward from the output it fetched
        elif not grad.fused:
            g, _ = self._receive(grad, "gradient", False)
            if type(g) is tuple or type(hosted.out) is tuple:
                backward_values(hosted.out, g, self.name)
            else:
                hosted.out.backward(g)

    def _forward_values(
        self, key: str, hosted: Hosted, x: tuple, input_kind: str, source: TensorRef | BatchRef, train: bool
    ) -> TensorRef:
        """:meth:`forward` on several values (see :mod:`splitnn.workers.values`)."""
        if not train:
            with torch.no_grad(), eval_mode(hosted.module):
                return self._keep(
                    segment_output(hosted.module(*x), key, self.name), "activation", hosted.send_out, False
                )
        sender = source.owner if isinstance(source, TensorRef) else self.name
        sent = None
        if input_kind == "detached":
            # a value crosses back only if it needs a gradient at the sender
            x = tuple(t.detach().requires_grad_(t.requires_grad) for t in x)
        elif input_kind == "fused" and sender != self.name:
            sent = []  # what autograd carries back across this cut, counted as it flows
            for t in x:
                if t.requires_grad:
                    t.register_hook(functools.partial(_count_gradient, sent))
        out = segment_output(hosted.module(*x), key, self.name)
        hosted.inp, hosted.out, hosted.input_kind, hosted.sent = x, out, input_kind, sent
        hosted.source = sender
        return self._keep(out, "activation", hosted.send_out)

    def _values_grad(self, hosted: Hosted, inp: tuple, kind: str) -> TensorRef:
        """:meth:`backward`'s result for a segment that took several values."""
        if kind == "fused":
            sent, hosted.sent = hosted.sent, None
            if sent:  # one record per crossing, the bytes of every gradient that flowed
                self.ledger.record(self.name, hosted.source, "gradient", sum(sent))
            return TensorRef(self.name, -1, fused=True)
        return self._keep(tuple(t.grad if t.requires_grad else None for t in inp), "gradient", hosted.send_grad)


def _count_gradient(sent: list[int], grad: torch.Tensor) -> None:
    sent.append(tensor_nbytes(grad))


def backward_values(out: Value, grad: Value, worker: str) -> None:
    """Back-propagate gradients of several values (``None``: nothing flows back for that value)."""
    outs = out if type(out) is tuple else (out,)
    grads = grad if type(grad) is tuple else (grad,)
    if len(outs) != len(grads):
        raise WorkerError(f"worker {worker!r}: got {len(grads)} gradients for a segment output of {len(outs)} values")
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
