"""What the federated baselines share: the server's model, client placement, averaging, evaluation.

In both baselines every client is a worker that holds its shard's features
*and* labels and a whole copy of the model as one segment; the server is the
researcher (the orchestrating process), which keeps the global model. Weights
and gradients travel through the workers' ``set_state`` / ``get_state`` /
``get_grads``, so the ledger records every byte on the client <-> researcher links.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from splitnn.accounting import RESEARCHER, Ledger
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError, LabelError, ShapeMismatchError
from splitnn.split import Stage, bind_workers
from splitnn.split.fit import EpochStats, EvalResult, History, check_positive
from splitnn.workers import Worker
from splitnn.workers.averaging import weighted_average
from splitnn.workers.losses import check_loss_name, compute_loss
from splitnn.workers.refs import fresh_name

__all__ = ["CLIENT_SEED_STRIDE", "Federation", "evaluate_module", "weighted_average"]

#: Client ``k`` shuffles its shard with seed ``seed + CLIENT_SEED_STRIDE * k``, like the data holders of
#: :class:`~splitnn.training.topologies.MultiHolderSplitNN`, so all methods visit each shard in the same order.
CLIENT_SEED_STRIDE = 7919


def evaluate_module(module: nn.Module, data, *, loss: str = "nll", batch_size: int = 1000) -> EvalResult:
    """Accuracy and mean loss of a local ``module`` on ``data`` (no gradients, evaluation mode, no transfers)."""
    check_positive("batch_size", batch_size)
    if getattr(data, "named", False):
        data.feature_tensor("evaluate_module (the baselines)")
    n = len(data)
    was_training = module.training
    module.eval()
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for idx in epoch_batches(n, batch_size, shuffle=False):
                out = module(data.features[idx])
                labels = data.labels[idx]
                loss_sum += float(compute_loss(loss, out, labels)) * len(idx)
                correct += int((out.argmax(dim=1) == labels).sum())
    finally:
        module.train(was_training)
    return EvalResult(correct / n, loss_sum / n, n, {})


class Federation:
    """A global model at the researcher and one whole-model copy at each client worker.

    Subclasses (:class:`~splitnn.training.baselines.FedAvg`,
    :class:`~splitnn.training.baselines.LargeBatchSGD`) add the training rule: where ``optimizer``
    steps (:meth:`_client_optimizer`: at every client, or at the server) and how a round trains.

    Args:
        model: the global model; the server (researcher) keeps it.
        clients: one worker per client; each gets a copy of ``model`` as one segment.
        optimizer: the optimizer (factory or spec), default SGD lr 0.03.
        loss: the loss, by name.
        ledger: where transfers are recorded (default: the first client's, shared).
    """

    #: the prefix of the key under which every client holds its copy
    prefix = "federation"

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[Worker],
        *,
        optimizer: object = "sgd:lr=0.03",
        loss: str = "nll",
        ledger: Ledger | None = None,
    ) -> None:
        clients = list(clients)
        if not clients:
            raise ConfigurationError("a federation needs at least one client worker")
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"the model must be an nn.Module, got {type(model).__name__}")
        if len({c.name for c in clients}) != len(clients):
            raise ConfigurationError(f"client names must be distinct, got {[c.name for c in clients]}")
        self.model = model
        client_optimizer = self._client_optimizer(optimizer, clients)
        self.loss = check_loss_name(loss)
        self.ledger = bind_workers(clients, ledger)
        self.key = fresh_name(self.prefix)
        self.stages = [Stage(0, self.key, c) for c in clients]
        for c in clients:
            c.add_segment(self.key, copy.deepcopy(model), client_optimizer)
        # ids of the shards -> (shards, placement); holding the shards keeps their ids from being reused
        self._placed: dict[tuple[int, ...], tuple[list, list[tuple[str, int]]]] = {}

    def _client_optimizer(self, optimizer: object, clients: list[Worker]) -> object | None:
        """The optimizer each client builds over its copy (default: ``optimizer``; ``None``: none); checked
        before anything is placed."""
        return optimizer

    def _record(
        self, history: History, number: int, train_loss: float, samples: int, since: tuple, test_data: object | None
    ) -> EpochStats:
        """Append round or epoch ``number``'s stats to ``history``: its mean training loss over ``samples``
        samples, the bytes sent and seconds since ``since`` (a ledger snapshot and a ``perf_counter``), and the
        global model's test metrics when there is ``test_data``."""
        before, start = since
        stats = EpochStats(
            number, train_loss, samples, time.perf_counter() - start, self.ledger.since(before).sent_by()
        )
        if test_data is not None:
            result = self.evaluate(test_data)
            stats.test_accuracy, stats.test_loss = result.accuracy, result.loss
        history.epochs.append(stats)
        return stats

    @property
    def clients(self) -> list[Worker]:
        """The client workers, in order."""
        return [s.worker for s in self.stages]

    def parties(self) -> list[str]:
        """The clients' names and the server's (the researcher)."""
        return [c.name for c in self.clients] + [RESEARCHER]

    def place(self, shards: Sequence) -> list[tuple[str, int]]:
        """Give client ``k`` the features and labels of ``shards[k]``; return (name, size) per client.

        Checked before any training: one shard per client, the model takes the
        samples' shape, and every label is within the model's outputs.
        """
        shards = list(shards)
        cache_key = tuple(id(s) for s in shards)
        cached = self._placed.get(cache_key)
        if cached is not None and all(a is b for a, b in zip(cached[0], shards)):
            return cached[1]
        if len(shards) != len(self.stages):
            raise ConfigurationError(
                f"got {len(shards)} data shards for {len(self.stages)} clients; give exactly one shard per client"
            )
        for k, shard in enumerate(shards):
            self._check_shard(k, shard)
        placed, placement = [], len(self._placed)  # a fresh name per placement: never overwrite placed data
        for k, (stage, shard) in enumerate(zip(self.stages, shards)):
            name = f"{self.key}.client{k}.{getattr(shard, 'name', 'data')}#{placement}"
            stage.worker.add_dataset(name, features=shard.features, labels=shard.labels)
            placed.append((name, len(shard)))
        self._placed[cache_key] = (shards, placed)
        return placed

    def evaluate(self, data, *, batch_size: int = 1000) -> EvalResult:
        """Accuracy and mean loss of the global model on ``data``, at the server (no transfers)."""
        return evaluate_module(self.model, data, loss=self.loss, batch_size=batch_size)

    def _check_shard(self, k: int, shard) -> None:
        if getattr(shard, "named", False):
            shard.feature_tensor(f"the baselines (shard {k})")
        features, labels = getattr(shard, "features", None), getattr(shard, "labels", None)
        if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ConfigurationError(
                f"shard {k} must be a splitnn.data.Dataset with features and labels, got {type(shard).__name__}"
            )
        if len(features) == 0:
            raise ConfigurationError(f"shard {k} (client {self.stages[k].worker.name!r}) is empty")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(torch.zeros(2, *features.shape[1:]))
        except RuntimeError as exc:
            raise ShapeMismatchError(
                f"the model cannot take client {k}'s samples of shape {tuple(features.shape[1:])}: {exc}"
            ) from exc
        finally:
            self.model.train(was_training)
        if out.dim() == 2 and int(labels.max()) >= out.shape[1]:
            raise LabelError(
                f"shard {k} has label {int(labels.max())} but the model has only {out.shape[1]} "
                f"outputs; widen the last layer or fix the labels"
            )
