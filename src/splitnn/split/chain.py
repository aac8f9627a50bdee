"""SplitNN: a chain of segments placed on workers, trained across them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splitnn.accounting import RESEARCHER, Ledger
from splitnn.data import Dataset
from splitnn.errors import ConfigurationError
from splitnn.split.compression import CutCompression, apply_compression, check_codec_workers, parse_compression
from splitnn.split.cut import join, merge_states, sequential_of
from splitnn.split.driver import (
    backward_chain,
    check_in_process,
    check_recipe_workers,
    eval_step,
    forward_chain,
    recipe_step,
    run_in_process,
    train_step,
)
from splitnn.split.placement import ChainData
from splitnn.split.shipping import can_ship, ship_epoch
from splitnn.split.stage import (
    Slot,
    Stage,
    check_static_fit,
    declare_adjacency,
    slot_label,
)
from splitnn.split.trainable import Batches, OnBatch, Trainable
from splitnn.workers import BatchRef, LossStats, Worker
from splitnn.workers.epoch import BatchOrder
from splitnn.workers.inflight import as_prediction
from splitnn.workers.losses import Loss, check_loss_at
from splitnn.workers.metrics import check_metrics_for, label_holder_metrics
from splitnn.workers.refs import fresh_name
from splitnn.workers.schedules import check_pipeline_depth, schedule
from splitnn.workers.values import Value


def bind_workers(workers: Sequence[Worker], ledger: Ledger | None) -> Ledger:
    """Give distinct workers one shared ledger and let them reach each other by name."""
    by_name: dict[str, Worker] = {}
    for w in workers:
        if not isinstance(w, Worker):
            raise ConfigurationError(f"{w!r} is not a worker; use splitnn.VirtualWorker(name) or splitnn.connect(url)")
        if by_name.setdefault(w.name, w) is not w:
            raise ConfigurationError(f"two different workers are both named {w.name!r}; give each party a unique name")
    ledger = ledger if ledger is not None else workers[0].ledger
    for w in by_name.values():
        w.ledger = ledger
        w.connect_peers(by_name)
    return ledger


class SplitNN(Trainable):
    """A neural network cut into segments that live at different workers.

    Segment ``i`` is hosted by ``workers[i]`` (consecutive segments may share a
    worker). The first worker holds the features (the data holder), the last
    one the labels (the label holder); activations travel forward between
    workers, their gradients travel back, and each worker steps its own
    optimizer.

    Args:
        segments: the ``nn.Module`` pieces, in order (at least two): written by hand, or
            made from one model by :func:`splitnn.cut`. Where several values cross a cut,
            a segment returns a tuple and the next one takes its items as arguments.
        workers: one worker per segment.
        optimizer: for every segment, a factory ``params -> Optimizer`` (in-process
            workers), an optimizer spec such as ``"sgd:lr=0.03"``, or a list of
            either with one entry per segment. Default: SGD, lr 0.03 (the tutorial).
        loss: the label holder's loss: a name of :data:`splitnn.workers.losses.LOSS_NAMES`
            (``"nll"``, ``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"``, ``"l1"``,
            ``"smooth_l1"``) or, with an in-process label holder, a callable
            ``(output, target) -> scalar``. Labels are checked against it before training.
        ledger: where transfers are recorded; default: the first worker's ledger,
            shared with the others.
        ship_epochs: when every worker can run shipped epochs (networked workers),
            let :meth:`train_epoch` send each one plan per epoch instead of driving
            every operation (same numbers; see :mod:`splitnn.split.shipping`).
        compression: codecs for what crosses the cuts between parties (default: none):
            a codec name (``"fp16"``, ``"bf16"``, ``"int8"``, ``"topk:0.1"``) for both
            directions, a dict ``{"activation": ..., "gradient": ...}``, or per cut a list
            (one entry per cut) or a dict by cut index; see :mod:`splitnn.split.compression`.
            In-process and networked workers encode and decode the same bytes, so their
            numbers are equal, lock-step and pipelined (``fit(..., pipeline=K)``) alike; the
            ledger records the bytes sent and the raw size beside them.
        threads: in-process pipelined epochs (``fit(..., pipeline=K)``) run each party on a
            thread of its own, so parties compute at once (same numbers, unless a segment
            draws from torch's global random generator, e.g. dropout: the threads' timing then
            orders the draws).
        weight_prediction: with ``fit(..., pipeline=K)``, each stage runs a batch's forward and
            backward on its weights extrapolated to the step that will apply the gradient
            (``W + tau x D``, ``D`` a moving average of the stage's updates; see
            :mod:`splitnn.workers.inflight`), which cuts the accuracy cost of deep pipelines.
            ``True`` (factor 0.5), a factor in [0, 1), or ``None``/``False`` (the default: off).
            Lock-step training is unaffected; networked workers compute the same numbers.

    The low-level loop of the PySyft tutorial works as there::

        model.zero_grads(); out = model.forward(x); loss = F.nll_loss(out, y)
        loss.backward(); model.backward(); model.step()
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        workers: Sequence[Worker],
        *,
        optimizer: object = "sgd:lr=0.03",
        loss: Loss = "nll",
        ledger: Ledger | None = None,
        ship_epochs: bool = True,
        compression: object = None,
        threads: bool = False,
        weight_prediction: bool | float | None = None,
    ) -> None:
        segments, workers = list(segments), list(workers)
        prediction = as_prediction(weight_prediction)
        if len(segments) < 2:
            raise ConfigurationError(f"a split network needs at least 2 segments, got {len(segments)}")
        if len(workers) != len(segments):
            raise ConfigurationError(
                f"got {len(segments)} segments but {len(workers)} workers; give one worker per segment "
                f"(repeat a worker to place consecutive segments on it)"
            )
        for i, seg in enumerate(segments):
            if not isinstance(seg, nn.Module):
                raise ConfigurationError(f"segment {i} is a {type(seg).__name__}, not an nn.Module")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer] * len(segments)
        if len(optimizers) != len(segments):
            raise ConfigurationError(f"got {len(optimizers)} optimizers for {len(segments)} segments")
        #: the codecs of each cut (``compression``), checked before anything is placed
        self.compression: tuple[CutCompression, ...] = parse_compression(compression, len(segments) - 1)
        self.ledger = bind_workers(workers, ledger)
        check_static_fit(segments, [w.name for w in workers])
        self.loss = check_loss_at(loss, workers[-1])
        # random keys, not counters: two models (of one process, or of two researchers sharing a
        # worker) never pick the same key; a worker refuses to replace one silently
        model_id = fresh_name("m")
        self.stages = [Stage(i, f"{model_id}.s{i}", w) for i, w in enumerate(workers)]
        check_codec_workers(self.stages, self.compression)
        for stage, seg, opt in zip(self.stages, segments, optimizers):
            stage.worker.add_segment(stage.key, seg, opt)
        declare_adjacency((a.worker, b.worker) for a, b in zip(self.stages, self.stages[1:]))
        self._segments = segments  # for checkpoints: each segment's fingerprint
        self.optimizer_specs = optimizers  # what each segment's optimizer is (training logs read the lr)
        apply_compression(self.stages, self.compression)  # nothing to do without compression
        self.training = True
        self._data = ChainData(self.stages, self.loss, segments[0])  # the datasets placed and checked
        self.ship_epochs = ship_epochs
        self.threads = threads
        #: the moving-average factor of pipelined weight prediction (None: off)
        self.weight_prediction = prediction

    # -- who is who ---------------------------------------------------------------------
    @property
    def workers(self) -> list[Worker]:
        """The worker of each segment."""
        return [s.worker for s in self.stages]

    @property
    def data_holder(self) -> Worker:
        """The worker that holds the features (first segment)."""
        return self.stages[0].worker

    @property
    def label_holder(self) -> Worker:
        """The worker that holds the labels (last segment)."""
        return self.stages[-1].worker

    def parties(self) -> list[str]:
        """Names of the distinct workers, in chain order."""
        return list(dict.fromkeys(w.name for w in self.workers))

    def party_workers(self) -> list[Worker]:
        """The distinct workers, in chain order."""
        return list({w.name: w for w in self.workers}.values())

    def train(self, mode: bool = True) -> SplitNN:
        """Set training mode for :meth:`forward` (as ``nn.Module.train``)."""
        self.training = mode
        return self

    def eval(self) -> SplitNN:
        """Set evaluation mode for :meth:`forward`."""
        return self.train(False)

    # -- low-level loop (the tutorial's API) --------------------------------------------
    def zero_grads(self) -> None:
        """Zero every segment's gradients."""
        for stage in self.stages:
            stage.worker.zero_grad(stage.key)

    def forward(self, x: Value) -> Value:
        """Run ``x`` (given by the data holder) through the chain; return the label holder's output.

        ``x`` may be a tuple of tensors when the first segment takes several inputs.

        In training mode the output is attached to the label holder's autograd
        graph: compute a loss on it, call ``loss.backward()``, then :meth:`backward`. That
        needs a label holder in this process; with a networked one, train with :meth:`fit`
        (or :meth:`train_batch`), where the label holder computes the loss itself.
        """
        if self.training and not getattr(self.label_holder, "runs_callables", False):
            raise ConfigurationError(
                f"model.forward(x) in training mode hands the label holder's output to the researcher with its "
                f"autograd graph, which the low-level loop (model.forward(x), loss.backward(), model.backward()) "
                f"needs; label holder {self.label_holder.name!r} is a networked worker, and autograd graphs do not "
                f"cross the network. Train with model.fit(...) or model.train_batch(...) instead: the label holder "
                f"computes the loss itself. For outputs without training, call model.predict(x) (or model.eval() "
                f"before forward), with the label holder started as `splitnn worker --allow-outputs`"
            )
        ref = self.data_holder.put(x, src=RESEARCHER, kind="features")
        out = forward_chain(self.stages, ref, train=self.training)
        return self.label_holder.fetch(out, kind="output")

    __call__ = forward

    def backward(self) -> None:
        """Send the gradient at each cut back to the previous worker, which back-propagates it."""
        backward_chain(self.stages)

    def step(self) -> None:
        """Step every segment's optimizer."""
        for stage in self.stages:
            stage.worker.step(stage.key)

    # -- high-level API -------------------------------------------------------------------
    def prepare(self, data: Dataset | str) -> tuple[str, int]:
        """Place a dataset at its holders (features at the first worker, labels at the last).

        A string names a dataset the workers already hold. Shapes and label
        range are checked here, before any training. Returns (name, size).
        """
        return self._data.prepare(data)

    def train_batch(self, dataset: str, indices: torch.Tensor) -> LossStats:
        """One optimisation step on rows ``indices`` of a placed dataset."""
        return train_step(self.stages, BatchRef(dataset, indices), self.loss)

    def train_epoch(
        self, dataset: str, batches: Batches, on_batch: OnBatch, *, order: dict | None = None, pipeline: int = 1
    ) -> None:
        """Train on every batch of an epoch, calling ``on_batch`` with each batch's stats, in order.

        ``pipeline`` is the number of batches in flight (:class:`~splitnn.workers.schedules.Pipelined`:
        each stage computes a batch's forward and backward with its weights of at most
        ``pipeline - 1`` updates before; 1, the default, is lock-step). Networked workers run
        the whole epoch among themselves (one plan each; ``order``, the ``epoch_batches``
        arguments ``n, batch_size, shuffle, seed, epoch`` that made ``batches``, lets them
        compute the batches instead of receiving the indices). Otherwise, or with
        ``ship_epochs=False``, lock-step is :meth:`train_batch` per batch, and a pipelined
        epoch runs every party's actions here (in-process workers; on a thread per party with
        ``threads=True``). Either way the ledger holds the epoch's transfers when this returns.
        """
        self.check_pipeline(pipeline)
        if self._shipped():
            ship_epoch(
                self.stages,
                dataset,
                self.loss,
                batches,
                on_batch,
                order=BatchOrder(**order) if order is not None else None,
                pipeline=pipeline,
                prediction=self.weight_prediction,
            )
            return
        if pipeline == 1:
            super().train_epoch(dataset, batches, on_batch)
            return
        sched = schedule([s.worker.name for s in self.stages], len(batches), pipeline)
        run_in_process(
            self.stages,
            sched,
            dataset,
            self.loss,
            batches,
            on_batch,
            threads=self.threads,
            prediction=self.weight_prediction,
        )

    def _shipped(self) -> bool:
        """Whether :meth:`train_epoch` ships epochs to the workers (``ship_epochs``, and every worker can run one)."""
        return self.ship_epochs and can_ship(self.stages)

    def train_steps(
        self, dataset: str, batches: Sequence[torch.Tensor], *, clip_grad_norm: float | None = None
    ) -> list[LossStats]:
        """One optimisation step accumulating the gradients of ``batches`` (rows of a placed dataset), clipped
        by the global norm ``clip_grad_norm`` over every party (see :func:`~splitnn.split.driver.recipe_step`)."""
        refs = [BatchRef(dataset, idx) for idx in batches]
        return recipe_step(self.stages, refs, self.loss, clip_grad_norm=clip_grad_norm)

    def check_recipe(self) -> None:
        """Refuse, before any work, ``fit(..., accumulate=, clip_grad_norm=)`` where the workers cannot run it
        (see :func:`~splitnn.split.driver.check_recipe_workers`)."""
        check_recipe_workers(self.stages)

    def check_pipeline(self, pipeline: int) -> None:
        """Refuse, before any work, a pipeline depth this model's workers cannot run."""
        if check_pipeline_depth(pipeline) > 1 and not self._shipped():
            check_in_process(self.stages, f"pipelined training (pipeline={pipeline})")

    def eval_batch(self, dataset: str, indices: torch.Tensor, *, keep: str | None = None) -> LossStats:
        """Loss and correct count on rows ``indices`` of a placed dataset (``keep``: see :meth:`metrics`)."""
        return eval_step(self.stages, BatchRef(dataset, indices), self.loss, keep=keep)

    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics over the outputs the label holder kept during ``eval_batch(..., keep=keep)`` calls."""
        return label_holder_metrics(self.label_holder, keep, names)

    def check_metrics(self, dataset: str, names: Sequence[str]) -> None:
        """Refuse metrics a prepared dataset cannot have (e.g. AUC of labels that are not 0/1)."""
        labels, out_shape = self._data.outputs(self.prepare(dataset)[0])
        check_metrics_for(dataset, names, labels, out_shape, self.loss)

    def predict(self, x: Value) -> Value:
        """The model's outputs for ``x`` (a tensor, or a tuple for several inputs; no gradients, evaluation mode)."""
        ref = self.data_holder.put(x, src=RESEARCHER, kind="features")
        out = forward_chain(self.stages, ref, train=False)
        return self.label_holder.fetch(out, kind="output")

    def collect(self) -> nn.Module:
        """Bring every trained segment home as one module (recorded as weights).

        Segments that are ``torch.fx`` graphs (:func:`splitnn.cut` of a non-sequential
        model) come back joined into one ``GraphModule`` with the original model's
        state-dict keys; otherwise the result is an ``nn.Sequential`` of the segments'
        layers. To load the weights into your own model, see :meth:`collect_state`.
        """
        modules = [stage.worker.fetch_segment(stage.key) for stage in self.stages]
        joined = join(modules)
        return joined if joined is not None else sequential_of(modules)

    def checkpoint_segments(self) -> list[Slot]:
        """Every segment with its checkpoint label (``s0``, ``s1``, ...), worker and key."""
        return [Slot(slot_label(st.key), st.worker, st.key, seg) for st, seg in zip(self.stages, self._segments)]

    def collect_state(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Every segment's trained weights as one state dict, under the segments' own names
        (recorded as weights).

        For segments made by :func:`splitnn.cut` these are the original model's names:
        ``model.load_state_dict(split.collect_state())`` loads the training into ``model``
        (parameters its forward never uses belong to no segment: load with ``strict=False``
        if it has any). Raises :class:`ConfigurationError` when two segments use one name.

        ``trainable_only=True`` keeps the parameters that train only: with LoRA
        adapters (``peft`` applied before the cut), just the adapters, which
        ``peft.set_peft_model_state_dict`` or ``model.load_state_dict(..., strict=False)`` load.
        """
        if trainable_only:
            return merge_states(stage.worker.get_state(stage.key, trainable_only=True) for stage in self.stages)
        return merge_states(stage.worker.get_state(stage.key) for stage in self.stages)

    def __repr__(self) -> str:
        return "SplitNN(" + " -> ".join(s.label for s in self.stages) + ")"
