"""VirtualWorker: an in-process party, for experiments and tests.

It owns segments, their optimizers and its own datasets, and records every
tensor it receives from another party in the shared ledger. Tensors do not get
copied between in-process workers; the ledger counts the bytes a real transfer
would move (dtype size x elements), which is what a networked worker puts on the
wire apart from a small header.

Fused autograd. Back-propagating segment by segment costs one autograd-engine
call per cut. When both ends of a cut are in-process workers with ``fuse=True``
(the default), the receiver keeps the sender's activation attached to the
autograd graph instead of detaching it, so one ``backward`` from the loss runs
through every segment. The gradient at the cut is still recorded (when the
receiver's ``backward`` runs: it has its activation's shape and dtype) and the
arithmetic is the same kernels in the same order, so the weights are
bit-identical to the segment-by-segment ("eager") path; ``fuse=False`` gives
the eager path, whose extra autograd calls cost about 6% of the tutorial
network's step time.

Several values at a cut. A segment may return a tuple of tensors (a skip connection
spanning the cut, see :func:`splitnn.cut`); the next segment takes its items as
positional arguments, and the gradient comes back as a tuple (``None`` for values
that need none). The rules, and how the ledger counts them, are in
:mod:`splitnn.workers.values`. Fused, the gradient bytes of a tuple are counted by
hooks on the tensors that received them, so that a value whose gradient never flows
is not counted, exactly as in the eager path. Single tensors take the same code as
before (one type check more).

Compression at a cut. :meth:`VirtualWorker.set_codecs` gives a segment the codec of the
activation it sends over its output cut and of the gradient it sends back over its input
cut (``SplitNN(..., compression=...)`` sets them). The worker encodes such a value when it
produces it (:class:`~splitnn.wire.cut_codec.CutEncoder`: error feedback state stays here,
at the sender, per cut and direction), in lock-step and in-flight (pipelined) operations
alike, and stores the encoded bytes; the receiving worker
decodes them, so its numbers are those of a networked receiver decoding the same bytes, and
records the bytes actually sent beside the raw size. A cut with a codec is never fused
(what autograd would carry is not what crosses); a worker without codecs runs exactly the
code it ran before (one attribute check).

Devices. ``VirtualWorker(name, device="cuda:0")`` keeps the worker's segments, their
optimizer state and its datasets on that device and computes there (``"cpu"`` by
default). A value arriving from a peer on another device is moved to this worker's
device when it is received (``Tensor.to``: differentiable, so the fused graph spans
devices); what the worker hands to the researcher (outputs, weights, gradients, fetched
segments) comes back on the CPU. See :mod:`splitnn.workers.devices`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from splitnn.accounting import RESEARCHER, Ledger
from splitnn.data.batching import draw_rows, epoch_batches
from splitnn.errors import CheckpointError, ConfigurationError, PolicyError, SpecError, WorkerError
from splitnn.wire.compress import Codec, NoCodec, get_codec
from splitnn.wire.cut_codec import Arrived, CutEncoder, Encoded
from splitnn.wire.fingerprint import fingerprint
from splitnn.wire.spec import module_to_spec
from splitnn.workers.audit import AuditLog
from splitnn.workers.averaging import weighted_average
from splitnn.workers.base import OptimizerLike, Worker
from splitnn.workers.checkpoint import (
    held_steps,
    job_tag,
    load_party_checkpoint,
    save_party_checkpoint,
    segment_identity,
)
from splitnn.workers.checks import check_averaging, check_segment, check_sources, no_training_forward, unreachable
from splitnn.workers.devices import RESEARCHER_DEVICE, resolve_device, state_to_cpu, to_device
from splitnn.workers.guard import HijackGuard
from splitnn.workers.held import HeldData
from splitnn.workers.inflight import Drift, Flight, check_prediction, detached_input, flight_forward, take_grads
from splitnn.workers.losses import Loss, compute_loss
from splitnn.workers.merge import check_merge, merge_tensors
from splitnn.workers.metrics import KeptEvaluations, count_correct
from splitnn.workers.optimizers import build_optimizer
from splitnn.workers.policy import (
    WorkerPolicy,
    check_accepted,
    check_batch_rows,
    check_dataset,
    check_hijack,
    check_install,
    check_peer,
    check_psi,
    check_reduction,
    check_release,
)
from splitnn.workers.precision import check_autocast, install_autocast
from splitnn.workers.psi import PsiParty, PsiRuns
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef
from splitnn.workers.values import ProbeShape, Value, check_values, describe, is_several, zeros_for
from splitnn.workers.values import nbytes as value_nbytes


@dataclass
class _Hosted:
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


class VirtualWorker:
    """An in-process party, for experiments and tests.

    Tensors are not copied between in-process workers; the ledger records the bytes a real
    transfer would move. With ``fuse=True`` (the default) the activation at a cut between two
    in-process workers stays attached to the autograd graph, so one ``backward`` from the loss
    runs through every segment, with weights bit-identical to the cut-by-cut path
    (``fuse=False``, what networked workers do).

    A networked party (:mod:`splitnn.server`) runs one of these per researcher session, with
    ``fuse=False``, through the Worker protocol and a few more public methods (:meth:`segment`,
    :meth:`dataset`, :meth:`keep`, :meth:`take`, :meth:`clear`, ...).

    Args:
        name: the party's name, as it appears in the ledger.
        ledger: where transfers are recorded; a model rebinds its workers to
            its own ledger unless they already share one.
        fuse: keep autograd graphs attached across cuts between in-process
            workers (same numbers, fewer autograd calls).
        policy: what this worker runs on its data and hands out
            (:class:`~splitnn.workers.policy.WorkerPolicy`; default: no restriction but the
            model's adjacency for peers' pulls). It is enforced here, before any batch.
        state_dir: where this party keeps its checkpoints (:meth:`save_checkpoint`); ``fit(...,
            checkpoint_dir=DIR)`` gives an in-process worker without one ``DIR/parties/<name>``.
        audit: an :class:`~splitnn.workers.audit.AuditLog` recording the segments installed, the
            datasets read, policy refusals and checkpoints (default: none).
        device: where the worker's segments, optimizer state and data live and its
            computation runs (``"cpu"``, ``"cuda:0"``, ...); checked here, see
            :func:`splitnn.workers.devices.resolve_device`.
        autocast: ``"bf16"`` (or ``"fp16"``) runs the forward of every segment this party hosts under
            ``torch.autocast`` on its device (weights and optimizer state stay float32; see
            :mod:`splitnn.workers.precision`); ``None`` (default): full precision.
    """

    #: It runs in the researcher's process, so it can run a loss given as a callable and hand out outputs
    #: with their autograd graph (the low-level loop of SplitNN.forward).
    runs_callables = True

    def __init__(
        self,
        name: str,
        *,
        ledger: Ledger | None = None,
        fuse: bool = True,
        policy: WorkerPolicy | None = None,
        device: str | torch.device = "cpu",
        state_dir: str | os.PathLike | None = None,
        audit: AuditLog | None = None,
        autocast: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or name == RESEARCHER:
            raise ConfigurationError(f"worker name must be a non-empty string other than {RESEARCHER!r}, got {name!r}")
        self.name = name
        self.device = resolve_device(device, name)
        self.ledger = ledger if ledger is not None else Ledger()
        self.fuse = fuse
        self.policy = policy or WorkerPolicy()
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.audit = audit
        self._hijack_guards: dict[str, HijackGuard] = {}  # policy rule detect_hijack, per data-reading segment
        self.audit_session: str | None = None  # the session tag a networked worker writes on audit lines
        self.autocast = check_autocast(autocast, name)
        # The party's own datasets, which the policy's ``datasets`` rule guards and the audit log
        # records (None: every dataset held here; a networked session sets the party's --data ones)
        self.own_datasets: frozenset[str] | None = None
        # Parties adjacent to this one in the model (None: not declared): peers' pulls are refused
        # from anyone else unless the policy names its peers.
        self.neighbours: frozenset[str] | None = None
        self._reads: set[tuple[str, str, str]] = set()  # (segment, dataset, part) checked and recorded
        self._drawn_epoch: tuple | None = None  # ((n, batch size, shuffle, seed, epoch), its batches): draw_rows
        self._segments: dict[str, _Hosted] = {}
        self._data: dict[str, HeldData] = {}
        self._store: dict[int, tuple[torch.Tensor, str]] = {}
        self._ids = itertools.count(1)  # next() is atomic: threads sharing a worker get distinct ids
        self._peers: dict[str, Worker] = {}
        # A training loss waiting for its backward, kept by the segment whose output it was computed on
        # (so two models sharing this worker, or two threads, cannot take each other's); a loss on an
        # output no segment here produced waits under None.
        self._pending_loss: dict[str | None, torch.Tensor] = {}
        self._kept = KeptEvaluations()  # outputs kept over evaluations, for their metrics
        self._psi = PsiParty(name)
        # PSI runs each dataset took part in, for the policy's max_psi_runs (a server shares one between its sessions)
        self.psi_runs = PsiRuns()
        # datasets an intersection derived (psi_apply: the aligned rows and their parts) -> the dataset they came
        # from: the policy guards them as that dataset, and no later intersection runs over them
        self._derived: dict[str, str] = {}

    def __repr__(self) -> str:
        on = "" if self.device == RESEARCHER_DEVICE else f", device={str(self.device)!r}"
        return f"VirtualWorker({self.name!r}, segments={list(self._segments)}, datasets={list(self._data)}{on})"

    # -- placement -----------------------------------------------------------------
    def connect_peers(self, peers: Mapping[str, Worker]) -> None:
        self._peers.update({n: w for n, w in peers.items() if n != self.name})

    def add_segment(
        self, key: str, segment: nn.Module, optimizer: OptimizerLike | None, *, replace: bool = False
    ) -> None:
        check_segment(segment, key, self.name)
        if key in self._segments and not replace:
            raise ConfigurationError(
                f"worker {self.name!r} already hosts a segment {key!r}; use another key, or pass replace=True "
                f"to replace it"
            )
        segment.to(self.device)  # in place, as model.to(device); the optimizer is built on the moved parameters
        if self.autocast is not None:
            install_autocast(segment, self.device, self.autocast)
        hosted = _Hosted(segment, None, [p for p in segment.parameters() if p.requires_grad])
        self._admit(key, hosted)
        # a replaced segment is a new one: every check of a read of this party's data runs again
        self._reads = {r for r in self._reads if r[0] != key}
        hosted.optimizer = (
            build_optimizer(optimizer, hosted.params) if (optimizer is not None and hosted.params) else None
        )
        self._segments[key] = hosted

    def remove_segment(self, key: str) -> None:
        self._segments.pop(key, None)
        self._reads = {r for r in self._reads if r[0] != key}
        self._pending_loss.pop(key, None)

    def set_codecs(self, key: str, *, output: str | Codec | None = None, input_grad: str | Codec | None = None) -> None:
        """Compress what segment ``key`` sends to other parties (see :class:`~splitnn.workers.CodecWorker`):
        its output activations with ``output``, the gradient of its input with ``input_grad`` (codec names
        of :func:`splitnn.wire.compress.get_codec`; ``None`` or ``"none"``: plain). Error feedback starts afresh."""
        hosted = self._segment(key)
        hosted.send_out, hosted.send_grad = _encoder(output), _encoder(input_grad)

    def codecs(self, key: str) -> tuple[str, str]:
        """The codec names of segment ``key``'s output activation and input gradient (``"none"``: plain)."""
        hosted = self._segment(key)
        return tuple(e.spec if e is not None else "none" for e in (hosted.send_out, hosted.send_grad))

    def add_dataset(
        self,
        name: str,
        *,
        features: object = None,
        labels: object = None,
        ids: Sequence[str] | None = None,
        replace: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        """Hold ``features`` and/or ``labels`` (tensors, numpy arrays or map-style datasets) under ``name``;
        ``ids`` (one string per row) lets :mod:`splitnn.training.psi` align rows with other parties.
        A name already in use is a ConfigurationError unless ``replace``. Features holding NaN or infinite
        values are a DataError naming the row (a map-style dataset's: when its batch is read) unless
        ``allow_nonfinite``."""
        if name in self._data and not replace:
            raise ConfigurationError(
                f"worker {self.name!r} already holds a dataset {name!r}; use another name, or pass replace=True "
                f"to replace it"
            )
        held = HeldData.hold(
            name, self.name, features=features, labels=labels, ids=ids, allow_nonfinite=allow_nonfinite
        )
        self._data[name] = held.to(self.device)
        self._derived.pop(name, None)

    def dataset_stats(self, name: str) -> DatasetStats:
        data = self._dataset(name)
        if self._is_own(name):
            self._guard(check_dataset, self.policy, self.name, self._source(name))
        self._check_readable("label statistics")  # a label range has no value on the meta device
        return data.stats(name)

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

    def _probe(self, key: str, hosted: _Hosted, input_shape: ProbeShape) -> ProbeShape:
        """:meth:`probe` without the gate (the worker's own checks: the shapes stay here)."""
        clone = _probe_copy(hosted.module)
        x = self._here(zeros_for(input_shape))
        with torch.no_grad():
            if clone is not None:
                out = _call(clone.eval(), x)
            else:
                with _eval_mode(hosted.module):
                    out = _call(hosted.module, x)
        return describe(check_values(out, f"segment {key!r} at {self.name!r}"))

    # -- compute -------------------------------------------------------------------
    def put(self, tensor: Value | Arrived, *, src: str, kind: str) -> TensorRef:
        """Receive ``tensor`` from ``src`` (see :class:`Worker`); a server hands over what came off the wire as an
        :class:`~splitnn.wire.cut_codec.Arrived`, whose sent and raw bytes are recorded (a gradient tuple in which
        nothing flows is not)."""
        if type(tensor) is Arrived:
            tensor, nbytes, raw = tensor
            if src != self.name and not (type(tensor) is tuple and all(t is None for t in tensor)):
                self.ledger.record(src, self.name, kind, nbytes, raw)
            return self._keep(tensor if kind == "psi" else self._here(tensor), kind)  # PSI messages are bytes: CPU
        if not isinstance(tensor, torch.Tensor):  # several values: a model input that is a tuple
            tensor = check_values(tensor, f"the {kind} put at {self.name!r}")
        if src != self.name:
            self.ledger.record(src, self.name, kind, value_nbytes(tensor))
        return self._keep(tensor if kind == "psi" else self._here(tensor), kind)  # PSI messages are bytes: CPU

    def forward(self, key: str, source: TensorRef | BatchRef, *, train: bool = True) -> TensorRef:
        hosted = self._segment(key)
        if hosted.released and train:
            self._frozen(key)
        hosted.ran = True
        if train and hosted.training is not True:
            hosted.module.train(True)
            hosted.training = True
        if isinstance(source, BatchRef):
            x, input_kind = self._batch(source, "features"), "data"
            if (key, source.dataset, "features") not in self._reads:
                self._first_read(key, source.dataset, "features", x)
        else:
            x, input_kind = self._receive(source, "activation", train)
            if input_kind == "fused" and hosted.send_grad is not None:
                input_kind = "detached"  # the gradient crosses compressed: autograd must not carry it
        if type(x) is tuple:
            return self._forward_values(key, hosted, x, input_kind, source, train)
        if not train:
            with torch.no_grad(), _eval_mode(hosted.module):
                return self._keep(_output(hosted.module(x), key, self.name), "activation", hosted.send_out, False)
        if input_kind == "detached":
            x = x.detach().requires_grad_()
        out = hosted.module(x)
        if type(out) is not torch.Tensor:
            out = _output(out, key, self.name)
        if input_kind == "data" and self.policy.detect_hijack is not None and type(out) is torch.Tensor:
            out = self._hijack_guard(key).wrap(out)
        hosted.inp, hosted.out, hosted.input_kind = x, out, input_kind
        hosted.source = source.owner if isinstance(source, TensorRef) else self.name
        return self._keep(out, "activation", hosted.send_out)

    def loss(
        self, output: TensorRef, target: BatchRef, loss: Loss, *, train: bool = True, keep: str | None = None
    ) -> LossStats:
        out, _ = self._receive(output, "activation", train)
        if type(out) is tuple:
            raise WorkerError(f"worker {self.name!r}: the loss needs one output tensor, got {len(out)} values")
        if ("", target.dataset, "labels") not in self._reads:
            self._first_read("", target.dataset, "labels", None)
        labels = self._batch(target, "labels")
        value = compute_loss(loss, out, labels)
        if train:
            if keep is not None:
                raise WorkerError(f"worker {self.name!r}: outputs are kept for metrics in evaluation only")
            self._pending_loss[self._producer(out)] = value
            return LossStats(float(value.item()), -1, len(labels))
        if keep is not None:
            self._kept.add(keep, loss, out, labels)
        return LossStats(float(value.item()), count_correct(loss, out, labels), len(labels))

    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics ``names`` over the outputs kept under ``keep`` (see :mod:`splitnn.workers.metrics`),
        computed here, where the labels are; the kept outputs are dropped."""
        return self._kept.take(keep, self.name).compute(names)

    def backward(self, key: str, grad: TensorRef | None) -> TensorRef | None:
        hosted = self._segment(key)
        if hosted.out is None:
            raise no_training_forward(self.name, key)
        if hosted.input_kind == "merged":
            raise WorkerError(f"worker {self.name!r}: segment {key!r} ran on merged inputs; use backward_merged")
        self._check_hijack(key)
        self._backprop(hosted, grad)
        self._check_hijack(key)
        kind, inp = hosted.input_kind, hosted.inp
        hosted.inp = hosted.out = None
        if kind == "data":
            return None
        if type(inp) is tuple:
            return self._values_grad(hosted, inp, kind)
        if kind == "fused":
            # Autograd already carried the gradient across the cut; record the bytes a
            # real transfer moves (a gradient has its activation's shape and dtype).
            if hosted.source != self.name:
                self.ledger.record(self.name, hosted.source, "gradient", inp.numel() * inp.element_size())
            return TensorRef(self.name, -1, fused=True)
        if inp.grad is None:
            raise WorkerError(
                f"worker {self.name!r}: segment {key!r} got no gradient at its input; did the loss backward run?"
            )
        return self._keep(inp.grad, "gradient", hosted.send_grad)

    def forward_merged(self, key: str, sources: Sequence[TensorRef], merge: str, *, train: bool = True) -> TensorRef:
        """Run segment ``key`` on the merge of several parties' activations (see :class:`MergingWorker`)."""
        check_merge(merge)
        check_sources(list(sources), key, self.name)
        hosted = self._segment(key)
        if hosted.released and train:
            self._frozen(key)
        hosted.ran = True
        if train and hosted.training is not True:
            hosted.module.train(True)
            hosted.training = True
        received = [self._receive(ref, "activation", train) for ref in sources]
        if any(type(t) is tuple for t, _ in received):
            raise WorkerError(
                f"worker {self.name!r}: segment {key!r} merges activations, and one source sent several values; "
                "a merge takes one tensor per source"
            )
        if not train:
            with torch.no_grad(), _eval_mode(hosted.module):
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
                # Autograd carried the gradient to the sender; record what a real transfer moves.
                if sender != self.name:
                    self.ledger.record(self.name, sender, "gradient", tensor.numel() * tensor.element_size())
                refs.append(TensorRef(self.name, -1, fused=True))
            elif tensor.grad is None:
                raise WorkerError(
                    f"worker {self.name!r}: source {i} of segment {key!r} got no gradient; did the loss backward run?"
                )
            else:
                refs.append(self._keep(tensor.grad, "gradient"))
        return refs

    def zero_grad(self, key: str) -> None:
        # Same effect as optimizer.zero_grad(set_to_none=True), without its
        # profiler and hook machinery on the per-batch hot path.
        for p in self._segment(key).params:
            p.grad = None

    def step(self, key: str) -> None:
        self._check_hijack(key)
        hosted = self._segment(key)
        if hosted.released:
            self._frozen(key)
        opt = hosted.optimizer
        if opt is not None:
            opt.step()

    def grad_norms(self, key: str) -> torch.Tensor:
        """The 2-norm of each gradient of segment ``key``'s trainable parameters (those that have one, in
        order), for clipping by the global norm across parties: one number per tensor, never a gradient
        (recorded as control bytes to the researcher)."""
        grads = [p.grad for p in self._segment(key).params if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]) if grads else torch.zeros(0)
        self.ledger.record(self.name, RESEARCHER, "control", value_nbytes(norms))
        return norms.to(RESEARCHER_DEVICE)

    def clip_grads(self, key: str, max_norm: float, total_norm: torch.Tensor) -> None:
        """Scale segment ``key``'s gradients as ``torch.nn.utils.clip_grads_with_norm_`` does for the global
        ``total_norm`` (the norm over every party's gradients, from their :meth:`grad_norms`)."""
        params = [p for p in self._segment(key).params if p.grad is not None]
        self.ledger.record(RESEARCHER, self.name, "control", value_nbytes(total_norm))
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, self._here(total_norm))

    def fetch(self, ref: TensorRef, *, kind: str = "output") -> torch.Tensor:
        tensor, stored_kind = self._peek(ref)
        if type(tensor) is Encoded:  # encoded for a peer: the researcher gets what the peer would decode
            tensor = tensor.decode()
        if stored_kind in ("features", "labels", "psi", "weights"):
            raise PolicyError(f"worker {self.name!r} refuses to hand out {stored_kind} (its policy protects them)")
        if not self.policy.release_outputs:
            raise PolicyError(
                f"worker {self.name!r} refuses to hand out {stored_kind} (its policy protects them): the model's "
                f"outputs stay with it. Train and evaluate with fit / evaluate (the loss and metrics are computed "
                f"where the labels are); to let the researcher fetch outputs (predict, model.forward), start this "
                f"worker with `splitnn worker --allow-outputs` (in process: WorkerPolicy(release_outputs=True))"
            )
        del self._store[ref.id]
        self.ledger.record(self.name, RESEARCHER, kind, value_nbytes(tensor))
        # to the researcher's CPU; differentiably, so a loss computed there back-propagates into this worker
        return tensor if self.device == RESEARCHER_DEVICE else to_device(tensor, RESEARCHER_DEVICE)

    def get_state(self, key: str, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Segment ``key``'s state dict (``trainable_only``: its trainable parameters only, e.g. LoRA adapters)."""
        self._check_readable("weights")
        hosted = self._segment(key)
        self._gate(key, hosted, f"segment {key!r}'s weights and buffers", freeze=True)
        module = hosted.module
        state = module.state_dict()
        if trainable_only:
            names = {n for n, p in module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        state = state_to_cpu(state)
        self.ledger.record(self.name, RESEARCHER, "weights", _state_nbytes(state))
        return state

    def set_state(self, key: str, state: Mapping[str, torch.Tensor], *, src: str) -> None:
        hosted = self._segment(key)
        hosted.module.load_state_dict(dict(state))
        if hosted.released:  # the whole state is the sender's now: what a later read may hand out
            hosted.snapshot = _snapshot(hosted.module)
        if src != self.name:
            self.ledger.record(src, self.name, "weights", _state_nbytes(state))

    def send_state(self, key: str, dst: str, *, dst_key: str | None = None) -> None:
        """Hand segment ``key``'s weights straight to peer ``dst`` (recorded on the link self -> ``dst``)."""
        if dst != self.name:
            self.release_to_peer(key, dst)
        state = {k: v.detach().clone() for k, v in self._segment(key).module.state_dict().items()}
        if dst == self.name:
            self.set_state(dst_key or key, state, src=self.name)
            return
        peer = self._peers.get(dst)
        if peer is None:
            raise unreachable(self.name, dst)
        if not isinstance(peer, VirtualWorker):
            raise WorkerError(f"in-process worker {self.name!r} cannot send weights to non-local worker {dst!r}")
        peer.set_state(dst_key or key, state, src=self.name)

    def average_states(self, keys: Sequence[str], weights: Sequence[float], *, into: Sequence[str]) -> None:
        """Load the weighted average of segments ``keys`` into every segment of ``into`` (see
        :class:`AveragingWorker`); local, so nothing is recorded."""
        keys, weights, into = check_averaging(keys, weights, into, self.name)
        states = [self._segment(k).module.state_dict() for k in keys]  # an unknown key is named here
        targets = [self._segment(k) for k in into]
        for key, hosted in zip(into, targets):
            if hosted.released:
                self._frozen(key)
        try:
            average = weighted_average(states, weights)
        except ConfigurationError as exc:
            raise ConfigurationError(f"worker {self.name!r}: cannot average segments {keys}: {exc}") from None
        for key, hosted in zip(into, targets):  # every target checked before any is written
            target = hosted.module.state_dict()
            wrong = [
                name
                for name in {*target, *average}
                if name not in target or name not in average or target[name].shape != average[name].shape
            ]
            if wrong:
                raise ConfigurationError(
                    f"worker {self.name!r}: segment {key!r} does not have the averaged segments' tensors "
                    f"(names or shapes differ: {sorted(wrong)[:5]}); average into copies of the same network"
                )
        for hosted in targets:
            hosted.module.load_state_dict(average)  # copies into the parameters: optimizers keep them

    def get_grads(self, key: str) -> dict[str, torch.Tensor]:
        """Gradients of segment ``key``'s trainable parameters, by name (see :class:`GradientWorker`)."""
        self._check_readable("gradients")
        hosted = self._segment(key)
        self._gate(key, hosted, f"segment {key!r}'s gradients", freeze=True)
        grads = state_to_cpu(
            {
                n: (p.grad if p.grad is not None else torch.zeros_like(p))
                for n, p in hosted.module.named_parameters()
                if p.requires_grad
            }
        )
        self.ledger.record(self.name, RESEARCHER, "gradient", _state_nbytes(grads))
        return grads

    def fetch_segment(self, key: str) -> nn.Module:
        self._check_readable("weights")
        hosted = self._segment(key)
        self._gate(key, hosted, f"segment {key!r}'s weights and buffers", freeze=True)
        module = copy.deepcopy(hosted.module).to(RESEARCHER_DEVICE)
        self.ledger.record(self.name, RESEARCHER, "weights", _state_nbytes(module.state_dict()))
        return module

    def release(self) -> None:
        self._store.clear()
        self._pending_loss.clear()
        self._kept.clear()
        for hosted in list(self._segments.values()):
            hosted.inp = hosted.out = None
            hosted.inputs = hosted.sent = None
            hosted.flights.clear()

    # -- pipelined schedules: several batches in flight per segment (splitnn.workers.inflight) ----
    def forward_in_flight(self, key: str, source: TensorRef | BatchRef, batch: int, *, stash: bool) -> TensorRef:
        """Training forward of batch ``batch`` on segment ``key``, kept apart from other batches in flight;
        with ``stash``, on a copy of the current weights (a step comes before this batch's backward)."""
        hosted = self._segment(key)
        if hosted.released:
            self._frozen(key)
        hosted.ran = True
        if batch in hosted.flights:
            raise WorkerError(f"worker {self.name!r}: batch {batch} is already in flight on segment {key!r}")
        if hosted.training is not True:
            hosted.module.train(True)
            hosted.training = True
        if isinstance(source, BatchRef):
            x, inp = self._batch(source, "features"), None
            if (key, source.dataset, "features") not in self._reads:
                self._first_read(key, source.dataset, "features", x)
        else:
            x = inp = detached_input(self._receive(source, "activation", False)[0])
        predicted = hosted.drift.predicted(hosted.params, len(hosted.flights)) if stash and hosted.drift else None
        out, leaves = flight_forward(hosted.module, hosted.params, x, stash, predicted)
        out = _output(out, key, self.name)
        hosted.flights[batch] = Flight(inp, out, leaves, stash, hosted.steps)
        return self._keep(out, "activation", hosted.send_out)  # encoded now: error feedback in batch order

    def loss_in_flight(self, key: str, batch: int, output: TensorRef, target: BatchRef, loss: Loss) -> LossStats:
        """The training loss of batch ``batch``'s output of (last) segment ``key``, kept for its backward."""
        flight = self._flight(key, batch)
        self._receive(output, "activation", False)  # consumes the ref; the graph is the flight's own output
        if type(flight.out) is tuple:
            raise WorkerError(f"worker {self.name!r}: the loss needs one output tensor, got {len(flight.out)} values")
        if ("", target.dataset, "labels") not in self._reads:
            self._first_read("", target.dataset, "labels", None)
        labels = self._batch(target, "labels")
        flight.loss = compute_loss(loss, flight.out, labels)
        return LossStats(float(flight.loss.item()), -1, len(labels))

    def backward_in_flight(self, key: str, batch: int, grad: TensorRef | None) -> TensorRef | None:
        """Back-propagate batch ``batch`` through segment ``key`` (from its loss when ``grad`` is None), with
        the weights its forward used; its parameter gradients wait for :meth:`step_in_flight`. Returns a ref
        to the gradient of the segment's input (None for data)."""
        hosted = self._segment(key)
        flight = self._flight(key, batch)
        if flight.out is None:
            raise WorkerError(f"worker {self.name!r}: batch {batch} of segment {key!r} went backward already")
        if not flight.stashed:
            if flight.steps != hosted.steps:  # the schedule promised no step in between: a bug if it happens
                raise WorkerError(
                    f"worker {self.name!r}: segment {key!r} stepped while batch {batch} was in flight without "
                    "stashed weights (the schedule must stash this forward)"
                )
            for p in hosted.params:  # the live parameters' gradients belong to this batch alone
                p.grad = None
        if grad is None:
            if flight.loss is None:
                raise WorkerError(f"worker {self.name!r}: backward of batch {batch} on {key!r} without its loss")
            flight.loss.backward()
            flight.loss = None
        else:
            g, _ = self._receive(grad, "gradient", False)
            if type(g) is tuple or type(flight.out) is tuple:
                _backward_values(flight.out, g, self.name)
            else:
                flight.out.backward(g)
        flight.grads = take_grads(flight.leaves, clear=not flight.stashed)
        inp, flight.inp, flight.out = flight.inp, None, None
        if inp is None:
            return None
        if type(inp) is tuple:
            return self._keep(tuple(t.grad if t.requires_grad else None for t in inp), "gradient", hosted.send_grad)
        if inp.grad is None:
            raise WorkerError(f"worker {self.name!r}: segment {key!r} got no gradient at its input in batch {batch}")
        return self._keep(inp.grad, "gradient", hosted.send_grad)

    def step_in_flight(self, key: str, batch: int) -> None:
        """Step segment ``key``'s optimizer with batch ``batch``'s gradients (and forget the batch)."""
        hosted = self._segment(key)
        if hosted.released:
            self._frozen(key)
        flight = self._flight(key, batch)
        if flight.grads is None:
            raise WorkerError(f"worker {self.name!r}: step of batch {batch} on {key!r} before its backward")
        del hosted.flights[batch]
        if hosted.optimizer is not None:
            before = hosted.drift.before_step(hosted.params) if hosted.drift else None
            for p, g in zip(hosted.params, flight.grads):
                p.grad = g
            hosted.optimizer.step()
            for p in hosted.params:
                p.grad = None
            if before is not None:
                hosted.drift.after_step(hosted.params, before)
        hosted.steps += 1

    def start_pipelined_run(self, key: str, *, prediction: float | None = None) -> None:
        """Begin a pipelined run on segment ``key``: weight prediction with moving-average factor
        ``prediction`` (see :mod:`splitnn.workers.inflight`; None: off), its average empty."""
        check_prediction(prediction)
        self._segment(key).drift = Drift(prediction) if prediction is not None else None

    def _flight(self, key: str, batch: int) -> Flight:
        flight = self._segment(key).flights.get(batch)
        if flight is None:
            raise WorkerError(f"worker {self.name!r}: batch {batch} is not in flight on segment {key!r}")
        return flight

    # -- the engine's surface for a server ---------------------------------------------------------
    # A networked party (splitnn.server) runs one VirtualWorker per researcher session as its engine
    # and drives it through the Worker protocol above and these methods; nothing else of it.
    def segment(self, key: str) -> nn.Module:
        """The module hosted under ``key`` (WorkerError naming what this worker hosts)."""
        return self._segment(key).module

    def segment_keys(self) -> list[str]:
        """The keys of the hosted segments."""
        return list(self._segments)

    def has_segment(self, key: str) -> bool:
        return key in self._segments

    def dataset(self, name: str) -> HeldData:
        """The data held under ``name`` (WorkerError naming what this worker holds)."""
        return self._dataset(name)

    def datasets(self) -> Mapping[str, HeldData]:
        """The held datasets, by name (a read-only view)."""
        return types.MappingProxyType(self._data)

    def hold(self, datasets: Mapping[str, HeldData]) -> None:
        """Hold datasets checked elsewhere (a party's own data, shared read-only by every session)."""
        self._data.update(datasets)
        for name in datasets:
            self._derived.pop(name, None)

    def keep(self, value: Value, kind: str) -> TensorRef:
        """Store ``value`` (recorded as nothing) as a ``kind`` tensor for a peer to :meth:`take`."""
        return self._keep(value, kind)

    def take(self, tensor_id: int, taker: str | None = None) -> Value:
        """Hand stored tensor ``tensor_id`` to peer ``taker``, once (the receiver records the transfer);
        PolicyError for raw features and labels, and when the policy does not let ``taker`` have it
        (``None``: the server hands it on itself, after its own checks)."""
        return self._take(tensor_id, taker)

    def stored_kind(self, tensor_id: int) -> str | None:
        """The kind of stored tensor ``tensor_id`` (``activation``, ``gradient``, ...), None if there is none."""
        stored = self._store.get(tensor_id)
        return stored[1] if stored is not None else None

    def holds_tensors(self) -> bool:
        """Whether any intermediate tensor is stored (activations, gradients, puts)."""
        return bool(self._store)

    def clear(self) -> None:
        """Forget everything: intermediate tensors, segments with their optimizers, datasets."""
        self.release()
        self._segments.clear()
        self._data.clear()
        self._derived.clear()
        self._psi = PsiParty(self.name)  # (the runs counted stay counted)

    # -- policy (splitnn.workers.policy) ----------------------------------------------
    def declare_neighbours(self, names: Sequence[str]) -> None:
        """The parties adjacent to this one in a model (they exchange activations, gradients or weights
        with it): without a ``peers`` rule in the policy, only they may pull this party's tensors.
        A model declares them when it places its segments; declarations of several models add up."""
        self.neighbours = frozenset(self.neighbours or ()) | {n for n in names if n != self.name}

    def _hijack_guard(self, key: str) -> HijackGuard:
        """The hijack detector of data-reading segment ``key`` (policy rule ``detect_hijack``)."""
        guard = self._hijack_guards.get(key)
        if guard is None:
            guard = self._hijack_guards[key] = HijackGuard(threshold=self.policy.detect_hijack)
        return guard

    def _check_hijack(self, key: str) -> None:
        """Refuse gradients for ``key`` once its hijack detector has tripped (recorded once in the audit log)."""
        guard = self._hijack_guards.get(key)
        if guard is not None and guard.tripped:
            self._guard(check_hijack, self.name, key, guard.reason)

    def _drawn(self, ref: BatchRef, held: HeldData) -> torch.Tensor:
        """The rows of ``ref`` on this party's data, as the policy lets them be read (see :meth:`_batch`)."""
        indices = ref.indices
        if self.policy.draw_rows:
            if ref.draw is None:
                self._guard(_refuse_rows, self.name, ref.dataset)
            d, n = ref.draw, held.size
            epoch = (n, d.batch_size, d.shuffle, d.seed, d.epoch)
            cached = self._drawn_epoch  # the epoch's batches, computed once per epoch (not once per batch)
            try:
                if cached is None or cached[0] != epoch:
                    batches = epoch_batches(n, d.batch_size, shuffle=d.shuffle, seed=d.seed, epoch=d.epoch)
                    cached = self._drawn_epoch = (epoch, batches)
                indices = draw_rows(n, d, cached[1])
            except ConfigurationError as exc:
                raise WorkerError(f"worker {self.name!r}: dataset {ref.dataset!r}: {exc}") from None
            # a short last batch is refused at the epoch's first batch already, before any work
            tail = int(cached[1][-1].numel())
            self._guard(check_batch_rows, self.policy, self.name, ref.dataset, tail, tail, "the last batch")
        n = int(indices.numel())
        distinct = n if self.policy.draw_rows else int(torch.unique(indices).numel())
        self._guard(check_batch_rows, self.policy, self.name, ref.dataset, n, distinct, "a batch")
        return indices

    def _gate(self, key: str, hosted: _Hosted, what: str, *, freeze: bool = False) -> None:
        """The one gate for state derived from this party's data (weights, buffers, gradients, probes of
        trained state): refused unless the policy's ``release_weights`` allows it; under a gated policy,
        a segment released to the researcher is frozen from then on ("the end")."""
        self._guard(check_release, self.policy, self.name, what)
        if freeze and self.policy.gated:
            if hosted.released:  # an evaluation may have written a buffer since (a graph with out=): not again
                now = hosted.module.state_dict()
                if hosted.snapshot is None or any(not torch.equal(now[k], v) for k, v in hosted.snapshot.items()):
                    self._guard(_refuse_changed, self.name, key)
            else:
                hosted.released, hosted.snapshot = True, _snapshot(hosted.module)

    def release_to_peer(self, key: str, peer: str | None) -> None:
        """The gate for segment ``key``'s weights leaving to peer ``peer`` (``send_state``; a server's
        ``export_state``, whose puller is checked when it pulls: ``None``): ``release_weights``, then under a
        gated policy the ``peers`` rule (or the model's adjacency). Weights sent to a peer do not freeze the
        segment (aggregation rounds send them each round): ``release_weights`` trusts the peers with them."""
        self._gate(key, self._segment(key), f"segment {key!r}'s weights to {peer or 'a peer'!r}")
        if peer is not None and peer != self.name and self.policy.gated:
            self.check_receiver(peer, "its weights")

    def _frozen(self, key: str) -> None:
        self._guard(_refuse_frozen, self.name, key)

    def _guard(self, check, *args, **kwargs) -> None:
        """Run a policy check; record a refusal in the audit log before raising it."""
        try:
            check(*args, **kwargs)
        except PolicyError as exc:
            if self.audit is not None:
                rule = str(exc).partition("(policy rule ")[2].partition(")")[0] or "release_outputs"
                self.audit.write("refusal", session=self.audit_session, rule=rule, message=str(exc))
            raise

    def _identity(self, hosted: _Hosted) -> str | None:
        """The segment's fingerprint (None when it has no spec), computed once."""
        if hosted.identity is None:
            try:
                hosted.spec = module_to_spec(hosted.module)
                hosted.identity = fingerprint(hosted.spec)
            except SpecError:
                hosted.identity = segment_identity(hosted.module)  # "structure:...", not a fingerprint
        return None if hosted.identity.startswith("structure:") else hosted.identity

    def _admit(self, key: str, hosted: _Hosted) -> None:
        """Check a new segment against the policy (``accept_segments``, ``max_params``); record it."""
        policy = self.policy
        if policy.accept_segments is None and policy.max_params is None and self.audit is None:
            return
        fp = self._identity(hosted)
        params = sum(t.numel() for t in itertools.chain(hosted.module.parameters(), hosted.module.buffers()))
        self._guard(check_install, policy, self.name, key, fingerprint=fp, params=params)
        if self.audit is not None:
            self.audit.write(
                "segment", session=self.audit_session, segment=key, fingerprint=fp or hosted.identity, params=params
            )

    def _source(self, dataset: str) -> str:
        """The dataset that ``dataset`` was derived from by an intersection (itself when it was not)."""
        return self._derived.get(dataset, dataset)

    def _is_own(self, dataset: str) -> bool:
        return self.own_datasets is None or self._source(dataset) in self.own_datasets

    def _first_read(self, key: str, dataset: str, part: str, x: Value) -> None:
        """Before segment ``key`` first runs on this party's ``dataset`` (or its labels are first read):
        the ``datasets`` rule, then -- for features -- ``refuse_passthrough`` and ``min_reduction``
        (measured by probing with zeros of the batch's shape); then record the read."""
        if self._is_own(dataset):
            policy = self.policy
            self._guard(check_dataset, policy, self.name, self._source(dataset))
            if part == "features" and not policy.accept_any_segment:
                hosted = self._segment(key)
                self._guard(check_accepted, policy, self.name, key, dataset, fingerprint=self._identity(hosted))
            if part == "features" and (policy.refuse_passthrough or policy.min_reduction is not None):
                hosted = self._segment(key)
                fp = self._identity(hosted)
                sample = x[:1] if type(x) is not tuple else tuple(t[:1] for t in x)
                out = self._probe(key, hosted, describe(sample))
                self._guard(
                    check_reduction,
                    policy,
                    self.name,
                    key,
                    dataset,
                    spec=hosted.spec,
                    fingerprint=fp,
                    in_shape=_per_sample(describe(sample)),
                    out_shape=_per_sample(out),
                )
            if self.audit is not None:
                self.audit.write(
                    "dataset_read", session=self.audit_session, dataset=dataset, part=part, segment=key or None
                )
        self._reads.add((key, dataset, part))

    # -- checkpoints (splitnn.workers.checkpoint) ----------------------------------------
    def _checkpoint_dir(self) -> Path:
        if self.state_dir is None:
            raise CheckpointError(
                f"worker {self.name!r} keeps no checkpoints: it has no state directory (start it with "
                f"`splitnn worker --state-dir DIR`; in process, VirtualWorker(..., state_dir=DIR), which "
                f"fit(..., checkpoint_dir=DIR) gives the in-process workers that have none)"
            )
        return self.state_dir

    def _labelled(self, segments: Mapping[str, str]) -> dict[str, _Hosted]:
        return {label: self._segment(key) for label, key in segments.items()}

    def checkpoint_steps(self, job: str) -> list[int]:
        """The steps of job ``job`` this party holds checkpoints of, ascending."""
        return held_steps(self._checkpoint_dir(), job)

    def save_checkpoint(
        self, job: str, step: int, segments: Mapping[str, str], *, note: Mapping[str, object] | None = None
    ) -> dict:
        """Write this party's checkpoint of ``segments`` (label -> key) at ``step`` of job ``job``, locally
        (weights, optimizer state, random streams; see :mod:`splitnn.workers.checkpoint`).
        Returns ``{"step", "digest", "bytes"}``."""
        info = save_party_checkpoint(
            self._checkpoint_dir(), job, step, worker=self.name, segments=self._labelled(segments), note=note
        )
        if self.audit is not None:
            self.audit.write("checkpoint", session=self.audit_session, job=job_tag(job), step=step, bytes=info.nbytes)
        return info.to_dict()

    def load_checkpoint(self, job: str, step: int, segments: Mapping[str, str], *, digest: str | None = None) -> dict:
        """Load this party's checkpoint at ``step`` of job ``job`` into ``segments`` (label -> key); a
        :class:`~splitnn.errors.CheckpointError` naming what differs when it does not match them, or
        (given ``digest``) when it is not that file. Returns ``{"step", "digest", "bytes"}``."""
        for key in segments.values():
            if self._segment(key).released:
                self._frozen(key)
        info = load_party_checkpoint(
            self._checkpoint_dir(), job, step, worker=self.name, segments=self._labelled(segments), digest=digest
        )
        for hosted in self._labelled(segments).values():
            hosted.inp = hosted.out = None
        if self.audit is not None:
            self.audit.write("restore", session=self.audit_session, job=job_tag(job), step=step)
        return info.to_dict()

    # -- private set intersection (the protocol: splitnn.training.psi) --------------------
    # The policy's PSI rules (check_psi): a run takes only a dataset the party's operator placed (own_datasets;
    # in process, every dataset given with add_dataset), never one an intersection derived; at most
    # max_psi_runs runs per dataset (counted in psi_runs); messages go to and come from psi_peers only.
    def psi_admit(self, dataset: str, *, peer: str | None = None) -> None:
        """Let ``dataset`` take part in a PSI run (with ``peer``, when given) under this party's policy, or raise
        PolicyError naming the rule; the first call of a run counts it."""
        held = self._dataset(dataset)
        if held.ids is None:
            self._psi.candidates(dataset, held)  # refused (naming the fix) before a run is counted
        if peer is not None:
            self.check_psi_peer(peer)
        operator = self._is_own(dataset) and dataset not in self._derived
        self._psi.open_run(
            dataset,
            self.psi_runs,
            lambda runs: self._guard(check_psi, self.policy, self.name, dataset=dataset, operator=operator, runs=runs),
        )

    def check_psi_peer(self, peer: str) -> None:
        """Refuse (PolicyError, audited) a PSI message to or from ``peer`` unless the policy's ``psi_peers``
        (by default its ``peers``) allows that party."""
        self._guard(check_psi, self.policy, self.name, peer=peer)

    def psi_request(self, session: str, dataset: str) -> TensorRef:
        """Open PSI ``session`` as the client over ``dataset``'s candidate ids; a ref to message 1."""
        self.psi_admit(dataset)
        return self._keep(_bytes_tensor(self._psi.request(session, dataset, self._dataset(dataset))), "psi")

    def psi_reply(self, dataset: str, request: TensorRef) -> TensorRef:
        """Pull a client's request (recorded as ``psi`` bytes) and answer it as the server; a ref to the reply."""
        self.psi_admit(dataset, peer=request.owner)
        payload = self._receive_bytes(request)
        return self._keep(_bytes_tensor(self._psi.reply(dataset, self._dataset(dataset), payload)), "psi")

    def psi_finish(self, session: str, reply: TensorRef) -> None:
        """Pull the server's reply (recorded as ``psi`` bytes) and narrow the candidates of the session's dataset."""
        self.check_psi_peer(reply.owner)
        self._psi.finish(session, self._receive_bytes(reply))

    def psi_size(self, dataset: str) -> int:
        """The number of candidate rows of ``dataset`` (all that the researcher learns)."""
        return self._psi.size(dataset, self._dataset(dataset))

    def psi_apply(self, dataset: str, parts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep exactly the candidate rows of ``dataset``, in ascending id order; hold each of ``parts``
        (name -> positions in that order, each named ``f"{dataset}:PART"``) as a dataset too. They are derived
        from ``dataset``: the policy guards them as it guards ``dataset`` (a part of this party's own data holds at
        least ``min_batch_size`` distinct rows), and no later intersection takes them."""
        own = self._is_own(dataset)
        if own:
            size = self.psi_size(dataset)  # the intersection replaces the dataset: a view of it too
            self._guard(check_batch_rows, self.policy, self.name, dataset, size, size, "the intersection")
            for name, idx in (parts or {}).items():
                idx = torch.as_tensor(idx).reshape(-1)
                n, distinct = int(idx.numel()), int(torch.unique(idx).numel())
                self._guard(check_batch_rows, self.policy, self.name, dataset, n, distinct, f"part {name!r}")
        aligned = self._psi.apply(dataset, self._dataset(dataset), parts or {})
        source = self._source(dataset)
        self._data.update(aligned)
        self._derived.update(dict.fromkeys(aligned, source))
        if own and self.own_datasets is not None:
            self.own_datasets = self.own_datasets | set(parts or {})

    def psi_cancel(self, dataset: str) -> None:
        """Abandon the intersection of ``dataset`` (the held rows stay as they were)."""
        self._dataset(dataset)  # a dataset this worker does not hold is named in the error
        self._psi.cancel(dataset)

    def _receive_bytes(self, ref: TensorRef) -> bytes:
        tensor, _ = self._receive(ref, "psi", False)
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise WorkerError(f"worker {self.name!r}: a PSI message from {ref.owner!r} must be a 1-D uint8 payload")
        return tensor.numpy().tobytes()

    # -- peer transfer (in-process) ------------------------------------------------
    def _take(self, ref_id: int, taker: str | None = None, as_kind: str | None = None) -> torch.Tensor:
        """Hand a stored activation or gradient to peer ``taker`` (the peer records the bytes), if
        the policy lets ``taker`` have it (``None``: a server handing it on after its own check);
        ``as_kind``: what the taker receives it as (a PSI message or weights go out only as themselves)."""
        entry = self._store.pop(ref_id, None)
        if entry is None:
            raise WorkerError(f"worker {self.name!r} holds no tensor #{ref_id} (already consumed or released)")
        kind = entry[1]
        if kind in ("features", "labels"):
            self._store[ref_id] = entry
            raise PolicyError(f"worker {self.name!r} refuses to hand out {kind}")
        if as_kind is not None and _only_as_itself(kind, as_kind):
            self._store[ref_id] = entry
            raise WorkerError(f"worker {self.name!r}: tensor #{ref_id} is not a {as_kind}")
        if kind == "psi" and taker is not None and taker != self.name:
            try:
                self.check_psi_peer(taker)
            except PolicyError:
                self._store[ref_id] = entry
                raise
        # (the per-batch path: one set lookup when the model declared the taker adjacent)
        elif (
            taker is not None
            and taker != self.name
            and (self.policy.peers is not None or (self.neighbours is not None and taker not in self.neighbours))
        ):
            try:
                self.check_receiver(taker, f"its {kind}")
            except PolicyError:
                self._store[ref_id] = entry
                raise
        return entry[0]

    def check_receiver(self, peer: str, what: str) -> None:
        """Refuse (PolicyError, audited) handing ``what`` to ``peer`` unless the policy's ``peers`` rule,
        or without one the model's declared adjacency (:meth:`declare_neighbours`), allows it."""
        self._guard(check_peer, self.policy, self.name, peer, self.neighbours, what)

    # -- helpers -------------------------------------------------------------------
    def _producer(self, out: torch.Tensor) -> str | None:
        """The key of the segment whose last training forward gave ``out`` (None if none here did)."""
        return next((k for k, h in list(self._segments.items()) if h.out is out), None)  # (a snapshot: threads)

    def _backprop(self, hosted: _Hosted, grad: TensorRef | None) -> None:
        """Run backward through ``hosted``'s last forward, from the pending loss or a peer's gradient."""
        if grad is None:
            key = next((k for k, h in list(self._segments.items()) if h is hosted), None)
            loss = self._pending_loss.pop(key, None)
            if loss is None:
                loss = self._pending_loss.pop(None, None)
            if loss is not None:
                loss.backward()
            # else: the caller already ran backward from the output it fetched
        elif not grad.fused:
            g, _ = self._receive(grad, "gradient", False)
            if type(g) is tuple or type(hosted.out) is tuple:
                _backward_values(hosted.out, g, self.name)
            else:
                hosted.out.backward(g)

    def _forward_values(
        self, key: str, hosted: _Hosted, x: tuple, input_kind: str, source: TensorRef | BatchRef, train: bool
    ) -> TensorRef:
        """:meth:`forward` on several values (see :mod:`splitnn.workers.values`)."""
        if not train:
            with torch.no_grad(), _eval_mode(hosted.module):
                return self._keep(_output(hosted.module(*x), key, self.name), "activation", hosted.send_out, False)
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
        out = _output(hosted.module(*x), key, self.name)
        hosted.inp, hosted.out, hosted.input_kind, hosted.sent = x, out, input_kind, sent
        hosted.source = sender
        return self._keep(out, "activation", hosted.send_out)

    def _values_grad(self, hosted: _Hosted, inp: tuple, kind: str) -> TensorRef:
        """:meth:`backward`'s result for a segment that took several values."""
        if kind == "fused":
            sent, hosted.sent = hosted.sent, None
            if sent:  # one record per crossing, the bytes of every gradient that flowed
                self.ledger.record(self.name, hosted.source, "gradient", sum(sent))
            return TensorRef(self.name, -1, fused=True)
        return self._keep(tuple(t.grad if t.requires_grad else None for t in inp), "gradient", hosted.send_grad)

    def _receive(self, ref: TensorRef, kind: str, train: bool) -> tuple[torch.Tensor, str]:
        if ref.owner == self.name:
            tensor, stored_kind = self._store.pop(ref.id, (None, None))
            if tensor is None:
                raise WorkerError(f"worker {self.name!r} holds no tensor #{ref.id} (already consumed or released)")
            if _only_as_itself(stored_kind, kind):  # e.g. a PSI message run through a segment, to fetch its output
                self._store[ref.id] = (tensor, stored_kind)
                raise WorkerError(f"worker {self.name!r}: tensor #{ref.id} is not a {kind}")
            if stored_kind == "features":
                return tensor, "data"
            if type(tensor) is Encoded:  # a codec on a cut inside this worker: nothing crossed, decode only
                return tensor.decode(), "detached"
            return tensor, ("fused" if self.fuse and train else "detached")
        peer = self._peers.get(ref.owner)
        if peer is None:
            raise unreachable(self.name, ref.owner)
        if not isinstance(peer, VirtualWorker):
            raise WorkerError(f"in-process worker {self.name!r} cannot receive from non-local worker {ref.owner!r}")
        tensor = peer._take(ref.id, self.name, kind)
        if type(tensor) is Encoded:  # compressed at the sender: decode what a networked receiver would
            return self._decoded(tensor, ref.owner, kind, peer.device != self.device)
        if peer.device != self.device and kind != "psi":  # a cut between two devices (PSI messages are bytes)
            tensor = to_device(tensor, self.device)
        if type(tensor) is tuple:
            if kind != "gradient" or any(t is not None for t in tensor):
                self.ledger.record(ref.owner, self.name, kind, value_nbytes(tensor))
            fused = train and kind == "activation" and self.fuse and peer.fuse
            return tensor, ("fused" if fused else "detached")
        nbytes = tensor.numel() * tensor.element_size()
        self.ledger.record(ref.owner, self.name, kind, nbytes)
        if train and kind == "activation" and self.fuse and peer.fuse and tensor.requires_grad:
            return tensor, "fused"
        return tensor, "detached"

    def _decoded(self, encoded: Encoded, sender: str, kind: str, move: bool) -> tuple[Value, str]:
        """A value a peer encoded for this cut: decoded, recorded (sent and raw bytes), never fused."""
        value = encoded.decode()
        if move:
            value = to_device(value, self.device)
        if encoded.nbytes or any(e is not None for e in encoded.entries):  # (a gradient tuple of Nones: nothing)
            self.ledger.record(sender, self.name, kind, encoded.nbytes, encoded.raw)
        return value, "detached"

    def _here(self, value: Value) -> Value:
        """``value`` on this worker's device (as it is when it is there already)."""
        if type(value) is tuple:
            if all(t is None or t.device == self.device for t in value):
                return value
        elif value.device == self.device:
            return value
        return to_device(value, self.device)

    def _check_readable(self, what: str) -> None:
        if self.device.type == "meta":
            raise WorkerError(
                f"worker {self.name!r} computes on the 'meta' device (shapes only): it holds no {what} to hand "
                "out; give it a real device ('cpu', 'cuda:0')"
            )

    def _keep(self, tensor: Value, kind: str, encoder: CutEncoder | None = None, feedback: bool = True) -> TensorRef:
        """Store ``tensor`` for its consumer; with ``encoder`` (a codec at the cut it crosses), encoded now, in the
        order this worker produces values (error feedback without feedback in evaluation)."""
        if encoder is not None:
            tensor = encoder.encode(tensor, feedback=feedback)
        tid = next(self._ids)
        self._store[tid] = (tensor, kind)
        return TensorRef(self.name, tid)

    def _peek(self, ref: TensorRef) -> tuple[torch.Tensor, str]:
        if ref.owner != self.name or ref.id not in self._store:
            raise WorkerError(f"worker {self.name!r} holds no tensor for {ref}")
        return self._store[ref.id]

    def _segment(self, key: str) -> _Hosted:
        try:
            return self._segments[key]
        except KeyError:
            raise WorkerError(
                f"worker {self.name!r} hosts no segment {key!r} (it hosts {sorted(self._segments)})"
            ) from None

    def _dataset(self, name: str) -> HeldData:
        try:
            return self._data[name]
        except KeyError:
            raise WorkerError(
                f"worker {self.name!r} holds no dataset {name!r} (it holds {sorted(self._data)})"
            ) from None

    def _batch(self, ref: BatchRef, part: str) -> torch.Tensor:
        """The rows of ``ref``'s ``part``. On this party's own data under a gated policy, drawn here from
        ``ref.draw`` (``draw_rows``), and at least ``min_batch_size`` distinct rows."""
        held = self._dataset(ref.dataset)
        indices = ref.indices
        if self._is_own(ref.dataset) and self.policy.gated:
            indices = self._drawn(ref, held)
        rows = held.read(part, indices)
        if rows is None:
            raise WorkerError(f"worker {self.name!r} holds no {part} for dataset {ref.dataset!r}")
        return self._here(rows)  # tensors are held on the device; a map-style dataset's batch moves here


def _only_as_itself(stored: str | None, kind: str) -> bool:
    """Whether a tensor stored as ``stored`` may not be received as ``kind``: PSI messages and weights go only
    to a receiver asking for them as such, and such a receiver gets nothing else (as a server's pulls)."""
    return any((stored == k) != (kind == k) for k in ("psi", "weights"))


def _refuse_rows(worker: str, dataset: str) -> None:
    raise PolicyError(
        f"worker {worker!r} refuses a batch of rows named by the researcher on dataset {dataset!r} (policy rule "
        f"draw_rows): this party draws its batches itself; send the draw (seed, epoch, position, batch size, "
        f"shuffle) that splitnn.data.epoch_batches attaches to each batch (a run that names rows itself, such as "
        f"the shards of the multi-holder and SplitFed topologies, needs draw_rows = false in this party's policy)"
    )


def _refuse_changed(worker: str, key: str) -> None:
    raise PolicyError(
        f"worker {worker!r} refuses segment {key!r}'s state (policy rule release_weights): it was released, and "
        f"its state has changed since (a forward wrote into it); only the released state may leave"
    )


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _refuse_frozen(worker: str, key: str) -> None:
    raise PolicyError(
        f"worker {worker!r} refuses to train segment {key!r} further (policy rule release_weights): its weights "
        f"were released, which is the end of its training here (a released segment is frozen); install a new "
        f"segment to train again"
    )


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
            out = _call(clone.eval(), x)
        return describe(check_values(out, "probe"))
    except Exception:  # a layer that cannot run on meta
        return None


def _encoder(codec: str | Codec | None) -> CutEncoder | None:
    """The sender's encoder for ``codec``; None for no codec (the plain path, untouched)."""
    c = get_codec(codec)  # ConfigurationError naming an unknown codec
    return None if isinstance(c, NoCodec) else CutEncoder(c)


def _call(module: nn.Module, x: Value) -> object:
    return module(*x) if type(x) is tuple else module(x)


def _output(out: object, key: str, worker: str) -> Value:
    return out if type(out) is torch.Tensor else check_values(out, f"segment {key!r} at {worker!r}")


def _count_gradient(sent: list[int], grad: torch.Tensor) -> None:
    sent.append(grad.numel() * grad.element_size())


def _backward_values(out: Value, grad: Value, worker: str) -> None:
    """Back-propagate gradients of several values (``None``: nothing flows back for that value)."""
    outs = out if type(out) is tuple else (out,)
    grads = grad if type(grad) is tuple else (grad,)
    if len(outs) != len(grads):
        raise WorkerError(f"worker {worker!r}: got {len(grads)} gradients for a segment output of {len(outs)} values")
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration of the block, then every submodule's own mode back
    (a segment stays in training mode after an evaluation, and submodules its owner froze stay frozen)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


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
    # a GraphModule's copy drops its hooks; the worker's memory check (splitnn.wire.budget) is one, and a party's
    # autocast region is a pre-hook and a hook that must come as a pair (precision.install_autocast): keep them all
    for hooks in (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        for k, v in getattr(module, hooks).items():
            getattr(clone, hooks).setdefault(k, v)
    return clone


def _per_sample(shape: ProbeShape) -> tuple[int, ...]:
    """Values per sample of a probed shape (several values: their total)."""
    if is_several(shape):
        return (sum(math.prod(s.shape[1:]) for s in shape),)
    return tuple(shape[1:])


def _bytes_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D uint8 tensor, the form in which they wait in a worker's store for their receiver."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
