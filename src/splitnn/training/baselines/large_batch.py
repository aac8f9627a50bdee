"""Large-batch synchronous SGD on splitnn workers: :class:`LargeBatchSGD`.

Its docstring says what crosses per step and in which order each client visits its shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from splitnn.accounting import RESEARCHER
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError
from splitnn.split.driver import train_step
from splitnn.split.fit import EpochStats, History, _show_progress, check_positive
from splitnn.training.baselines.common import CLIENT_SEED_STRIDE, Federation
from splitnn.workers import BatchRef, Worker
from splitnn.workers.base import GradientWorker
from splitnn.workers.optimizers import build_optimizer


class LargeBatchSGD(Federation):
    """Synchronous data-parallel SGD over client workers.

    Each step the server (the researcher) sends the current weights to every client with a
    batch left; each computes the whole model's gradient on its batch and sends it back; the
    server averages the gradients weighted by batch size and steps its optimizer.

    Each step, the server (the researcher) sends the current weights to every
    client that takes part (``set_state``: ``weights`` bytes researcher -> client);
    each computes the gradient of the whole model's mean loss on its next batch and
    sends it back (``get_grads``: ``gradient`` bytes client -> researcher); the
    server averages the gradients weighted by batch size (the gradient of the mean
    loss over the union of the batches) and steps its optimizer. The clients hold no
    optimizer. Per client and step that is one model state down and one gradient
    up: ``2 x model size`` when every state tensor is a trainable parameter.

    Client ``k`` visits its shard in the order of :func:`~splitnn.training.epoch_batches`
    (seed ``seed + 7919 k``, as the data holders of
    :class:`~splitnn.training.topologies.MultiHolderSplitNN`); an epoch has as many steps as the largest client has
    batches, and a client whose batches are used up sits the remaining steps out
    (it sends and receives nothing then). So client ``k`` takes part in exactly
    ``ceil(n_k / batch_size)`` steps per epoch, and one client trains exactly as
    plain centralized training with :func:`~splitnn.training.fit`'s data order.

    Args:
        model: the global model; the server (researcher) keeps it and its optimizer.
        clients: one worker per client; each must be able to hand out gradients
            (:class:`~splitnn.workers.base.GradientWorker`, e.g. ``VirtualWorker``).
        optimizer: the server's optimizer (factory or spec), default SGD lr 0.03.
        loss: the loss by name.
        ledger: where transfers are recorded (default: the first client's, shared).
    """

    prefix = "largebatch"

    def _client_optimizer(self, optimizer: object, clients: list[Worker]) -> None:
        """No client steps: the server builds ``optimizer`` over the global model's parameters."""
        missing = [c.name for c in clients if not isinstance(c, GradientWorker)]
        if missing:
            raise ConfigurationError(
                f"large-batch SGD needs clients that can send gradients (get_grads); {missing} cannot"
            )
        self.optimizer = build_optimizer(optimizer, [p for p in self.model.parameters() if p.requires_grad])
        self._params = dict(self.model.named_parameters())
        return None

    def fit(
        self,
        shards: Sequence,
        *,
        epochs: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        test_data: object | None = None,
        progress: bool | None = None,
        on_epoch: Callable[[EpochStats], None] | None = None,
    ) -> History:
        """Train for ``epochs`` epochs with ``batch_size`` samples per client and step.

        ``shards[k]`` is client ``k``'s data. Returns one
        :class:`~splitnn.training.EpochStats` per epoch.
        """
        check_positive("epochs", epochs)
        check_positive("batch_size", batch_size)
        placed = self.place(shards)
        total_samples = sum(n for _, n in placed)
        history = History()
        for epoch in range(epochs):
            before, start = self.ledger.snapshot(), time.perf_counter()
            plans = [
                epoch_batches(n, batch_size, seed=seed + CLIENT_SEED_STRIDE * k, epoch=epoch)
                for k, (_, n) in enumerate(placed)
            ]
            steps = max(len(p) for p in plans)
            loss_sum = 0.0
            for s in tqdm(
                range(steps),
                desc=f"large-batch SGD epoch {epoch + 1}/{epochs}",
                unit="step",
                leave=False,
                disable=not _show_progress(progress),
                mininterval=0.5,
            ):
                parts = [(k, plan[s]) for k, plan in enumerate(plans) if s < len(plan)]
                loss_sum += self._step(parts, [name for name, _ in placed])
            stats = self._record(
                history, epoch + 1, loss_sum / total_samples, total_samples, (before, start), test_data
            )
            if on_epoch is not None:
                on_epoch(stats)
        return history

    def _step(self, parts: list[tuple[int, torch.Tensor]], names: list[str]) -> float:
        """One synchronous step over the clients in ``parts``; returns the summed loss of their samples."""
        batch_total = sum(len(idx) for _, idx in parts)
        state = self.model.state_dict()
        averaged: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        for k, idx in parts:
            stage = self.stages[k]
            stage.worker.set_state(self.key, state, src=RESEARCHER)
            stats = train_step([stage], BatchRef(names[k], idx), self.loss)  # no client optimizer: no step
            loss_sum += stats.loss * stats.count
            weight = len(idx) / batch_total
            for pname, grad in stage.worker.get_grads(self.key).items():
                if pname in averaged:
                    averaged[pname].add_(grad, alpha=weight)
                else:
                    averaged[pname] = grad * weight
        for pname, param in self._params.items():
            if param.requires_grad:
                param.grad = averaged[pname]
        self.optimizer.step()
        return loss_sum
