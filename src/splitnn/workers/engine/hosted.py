"""The record a party keeps of each segment it hosts, and the small helpers that run one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from splitnn.wire.cut_codec import CutEncoder
from splitnn.workers.inflight import Drift, Flight
from splitnn.workers.values import Value, check_values


@dataclass
class Hosted:
    """One hosted segment: its module and optimizer, its last training forward, codecs, flights, release."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    params: list[torch.Tensor]
    training: bool | None = None
    inp: Value | None = None
    out: Value | None = None
    input_kind: str = "data"  # "data" | "detached" | "fused" | "merged"
    sent: list[int] | None = None  # fused tuple input: bytes of each gradient autograd sent back
    inputs: list[tuple[torch.Tensor, str, str]] | None = None  # (tensor, kind, sender) per merged source
    source: str = ""  # who sent the input
    identity: str | None = None  # fingerprint (or structure hash), computed when first needed
    spec: dict | None = None  # the segment's spec, when a policy rule needs it (None: it has none)
    send_out: CutEncoder | None = None  # codec of the activation sent over the output cut (None: plain)
    send_grad: CutEncoder | None = None  # codec of the gradient sent back over the input cut (None: plain)
    flights: dict[int, Flight] = field(default_factory=dict)  # pipelined schedules: batch -> its state here
    steps: int = 0  # optimizer steps taken by pipelined schedules (a flight without stashed weights checks it)
    drift: Drift | None = None  # weight prediction in the current pipelined run (None: off)
    released: bool = False  # its weights left a gated worker: frozen (it trains no more; see policy's gate)
    ran: bool = False  # it ran a forward here: its buffers may hold values derived from what it read
    snapshot: dict | None = None  # released: the state that left (a later read must find the same)
    weights_due: tuple | None = None  # a split backward's second pass: (output, its gradient, the parameters)
    plain: bool | None = None  # its backward may be split (plain_backward); None: not asked yet

    def forget(self) -> None:
        """Drop the last forward and every batch in flight (the weights stay)."""
        self.inp = self.out = None
        self.inputs = self.sent = None
        self.weights_due = None
        self.flights.clear()

    def settle(self) -> None:
        """Run the weights' pass of a split backward that is still due: every parameter's gradient is then what one
        backward would have left (the engine's lookup of a segment calls it, before any call on the segment)."""
        due = self.weights_due
        if due is not None:
            self.weights_due = None
            torch.autograd.backward(due[0], due[1], inputs=due[2])


#: Where the classes of a segment whose backward may be split are defined: torch's layers and traced graphs, whose
#: backward is arithmetic only (no hooks, no random draws, nothing counted).
PLAIN_MODULES = ("torch.nn.", "torch.fx.")


def plain_backward(hosted: Hosted) -> bool:
    """Whether ``hosted``'s backward may run as two passes, the input's gradient first and the weights' later
    (:meth:`~splitnn.workers.engine.steps.Steps.backward`, ``weights_later``): each pass runs the same kernels on
    the same values as one backward would, so every gradient is bit for bit the same. Not for a module of another
    library or of splitnn's own (a privacy defense draws noise, a tap records, in its backward) or with hooks; nor
    for a segment with weights in more than one layer, whose second pass would compute again every gradient between
    the input's layer and the last one with weights (a deep segment's backward would cost half as much again)."""
    hooks = nn.modules.module
    if hooks._global_backward_hooks or hooks._global_backward_pre_hooks or hooks._global_forward_hooks:
        return False
    if hosted.plain is None:
        modules = list(hosted.module.modules())
        hosted.plain = (
            all(
                type(m).__module__.startswith(PLAIN_MODULES)
                and not (m._backward_hooks or m._backward_pre_hooks or m._forward_hooks or m._forward_pre_hooks)
                for m in modules
            )
            and not any(p._backward_hooks for p in hosted.params)
            and sum(any(True for _ in m.parameters(recurse=False)) for m in modules) <= 1
        )
    return hosted.plain


def call_segment(module: nn.Module, x: Value) -> object:
    """``module`` on ``x`` (several values: as positional arguments)."""
    return module(*x) if type(x) is tuple else module(x)


def segment_output(out: object, key: str, worker: str) -> Value:
    """``out`` if it is a value that may cross a cut; else a WorkerError naming the segment."""
    return out if type(out) is torch.Tensor else check_values(out, f"segment {key!r} at {worker!r}")


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration of the block, then every submodule's own mode back
    (a segment stays in training mode after an evaluation, and submodules its owner froze stay frozen)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
