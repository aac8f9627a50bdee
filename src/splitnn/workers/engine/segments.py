"""The segments a party hosts: installing, replacing and removing them, and probing their output shapes.

State: ``_segments``, key -> :class:`~splitnn.workers.engine.hosted.Hosted` (module, optimizer, last forward).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from splitnn.errors import ConfigurationError
from splitnn.workers.base import OptimizerLike
from splitnn.workers.checks import check_segment, held
from splitnn.workers.devices import to_device
from splitnn.workers.engine.hosted import Hosted, call_segment, eval_mode
from splitnn.workers.optimizers import build_optimizer
from splitnn.workers.precision import check_autocast, install_autocast
from splitnn.workers.values import ProbeShape, check_values, describe, zeros_for


class SegmentHost:
    """Hosting segments with their optimizers, and the probe of their output shapes."""

    def _init_segments(self) -> None:
        self._segments: dict[str, Hosted] = {}

    def add_segment(
        self,
        key: str,
        segment: nn.Module,
        optimizer: OptimizerLike | None,
        *,
        replace: bool = False,
        autocast: str | None = None,
    ) -> None:
        """Host ``segment`` under ``key`` with its optimizer. ``autocast``: the mode this segment's forward runs in
        (``"bf16"``, ``"fp16"``: what a networked researcher asks for the segments it places); ``None``: the
        party's own (:attr:`autocast`)."""
        check_segment(segment, key, self.name)
        dtype = check_autocast(autocast, self.name) if autocast is not None else self.autocast
        if key in self._segments and not replace:
            raise ConfigurationError(
                f"worker {self.name!r} already hosts a segment {key!r}; use another key, or pass replace=True "
                f"to replace it"
            )
        segment.to(self.device)  # in place, as model.to(device); the optimizer is built on the moved parameters
        if dtype is not None:
            install_autocast(segment, self.device, dtype)
        hosted = Hosted(segment, None, [p for p in segment.parameters() if p.requires_grad])
        self._admit(key, hosted)
        self._forget_reads(key)  # a replaced segment is a new one: every check of a read of this party's data again
        hosted.optimizer = (
            build_optimizer(optimizer, hosted.params) if (optimizer is not None and hosted.params) else None
        )
        self._segments[key] = hosted

    def remove_segment(self, key: str) -> None:
        self._segments.pop(key, None)
        self._forget_reads(key)
        self._pending_loss.pop(key, None)

    def segment(self, key: str) -> nn.Module:
        """The module hosted under ``key`` (WorkerError naming what this worker hosts)."""
        return self._segment(key).module

    def segment_keys(self) -> list[str]:
        """The keys of the hosted segments."""
        return list(self._segments)

    def has_segment(self, key: str) -> bool:
        return key in self._segments

    def _segment(self, key: str) -> Hosted:
        """Segment ``key``, with the weights' pass of a split backward still due run first (``Hosted.settle``): every
        engine call takes its segment here, so whatever reads, changes or runs the segment finds its gradients
        whole."""
        hosted = self._segments.get(key)  # (the per-batch path: a lookup, the error only when it misses)
        if hosted is None:
            return held(self._segments, key, self.name, "segment", "hosts")
        if hosted.weights_due is not None:
            hosted.settle()
        return hosted

    def probe(self, key: str, input_shape: ProbeShape) -> ProbeShape:
        # A copy of the module's structure sharing its parameters and buffers, in eval mode
        # and without gradients: no running-stat updates, no dropout, and no draws from the
        # random streams a layer owns (a noise defense), so probing changes no later number.
        hosted = self._segment(key)
        if hosted.ran and not self.policy.release_weights:
            # even an output's shape can depend on state derived from this party's data (a graph that slices by
            # a buffer's value): a segment that ran here is probed on the meta device, which holds no values
            shape = _meta_probe(hosted.module, input_shape)
            if shape is not None:
                return shape
            self._gate(key, hosted, f"to probe segment {key!r} (it cannot be probed on the meta device)")
        return self._probe(key, hosted, input_shape)

    def _probe(self, key: str, hosted: Hosted, input_shape: ProbeShape) -> ProbeShape:
        """:meth:`probe` without the gate (the worker's own checks: the shapes stay here)."""
        clone = _probe_copy(hosted.module)
        x = self._here(zeros_for(input_shape))
        with torch.no_grad():
            if clone is not None:
                out = call_segment(clone.eval(), x)
            else:
                with eval_mode(hosted.module):
                    out = call_segment(hosted.module, x)
        return describe(check_values(out, f"segment {key!r} at {self.name!r}"))


def _meta_probe(module: nn.Module, input_shape: ProbeShape) -> ProbeShape | None:
    """``module``'s output shape for ``input_shape``, computed on the meta device (no values: nothing of the
    module's state shows); None when it cannot run there."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if is_lazy(t):
            return None
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        clone = copy.deepcopy(module, memo)
        x = to_device(zeros_for(input_shape), torch.device("meta"))
        with torch.no_grad():
            out = call_segment(clone.eval(), x)
        return describe(check_values(out, "probe"))
    except Exception:  # a layer that cannot run on meta
        return None


def _probe_copy(module: nn.Module) -> nn.Module | None:
    """``module``'s structure sharing its parameters and buffers (no tensor is copied), or ``None``
    when it cannot or should not be copied. Python-side state (a defense's random generator) is
    copied, so running the copy leaves the original as it was. A module with lazy layers is probed
    itself: the probe is what initialises them (their sizes live on the module, not the tensors)."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    if any(is_lazy(t) for t in tensors):
        return None
    memo: dict[int, object] = {id(t): t for t in tensors}
    try:
        clone = copy.deepcopy(module, memo)
    except Exception:  # e.g. a layer holding a lock or a file: probe the module itself
        return None
    # a GraphModule's copy drops its hooks and its instance ``forward``: a party's autocast region is a pre-hook and
    # a hook that must come as a pair (precision.install_autocast), the worker's memory check (splitnn.wire.budget)
    # a GuardedForward (or a pre-hook): keep them all
    for hooks in (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        for k, v in getattr(module, hooks).items():
            getattr(clone, hooks).setdefault(k, v)
    if "forward" in module.__dict__ and "forward" not in clone.__dict__:  # (the memory check's GuardedForward)
        clone.forward = copy.deepcopy(module.__dict__["forward"], memo)  # (memo maps the module to its clone)
    return clone
