"""Federated averaging (FedAvg, McMahan et al. 2017) on splitnn workers.

Each round, the server (the researcher) sends the global weights to every
client (``set_state``: ``weights`` bytes researcher -> client), each client
trains its whole copy for ``local_epochs`` epochs on its own shard with its own
optimizer, sends its weights back (``get_state``: client -> researcher), and the
server replaces the global model by the average of the clients' weights,
weighted by their number of samples. Per client and round that is exactly two
copies of the model state on the wire.

Client ``k`` visits its shard in the order of :func:`~splitnn.training.epoch_batches`
with seed ``seed + 7919 k`` and epoch ``round * local_epochs + e``, so one client with
one local epoch per round trains exactly as plain centralized training with
:func:`~splitnn.training.fit`'s data order. A client's optimizer state (momentum,
Adam moments) stays at the client between rounds; only weights are averaged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from splitnn.accounting import RESEARCHER
from splitnn.data.batching import epoch_batches
from splitnn.split.driver import train_step
from splitnn.split.fit import EpochStats, History, _show_progress, check_positive
from splitnn.training.baselines.common import CLIENT_SEED_STRIDE, Federation, weighted_average
from splitnn.workers import BatchRef


class FedAvg(Federation):
    """Federated averaging over client workers.

    Each round the server (the researcher) sends the global weights to every client, each
    client trains its whole copy for ``local_epochs`` epochs on its own shard, sends its weights
    back, and the server averages them weighted by sample count: two copies of the model state
    per client and round on the wire.

    Args:
        model: the global model (kept by the server, the researcher).
        clients: one worker per client; each hosts a whole copy of ``model``.
        optimizer: each client's optimizer (factory or spec), default SGD lr 0.03.
        loss: the loss by name (``"nll"`` or ``"cross_entropy"``).
        ledger: where transfers are recorded (default: the first client's, shared).

    >>> # fed = FedAvg(model, [VirtualWorker("c0"), VirtualWorker("c1")])
    >>> # fed.fit(shards, rounds=5, local_epochs=1); fed.evaluate(test)
    """

    prefix = "fedavg"

    def fit(
        self,
        shards: Sequence,
        *,
        rounds: int = 1,
        local_epochs: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        test_data: object | None = None,
        progress: bool | None = None,
        on_round: Callable[[EpochStats], None] | None = None,
    ) -> History:
        """Train for ``rounds`` rounds of ``local_epochs`` local epochs; ``shards[k]`` is client ``k``'s data.

        Returns one :class:`~splitnn.training.EpochStats` per round (``epoch`` is
        the round number; ``train_loss`` the clients' mean training loss; test
        metrics of the averaged model when ``test_data`` is given).
        """
        check_positive("rounds", rounds)
        check_positive("local_epochs", local_epochs)
        check_positive("batch_size", batch_size)
        placed = self.place(shards)  # checks everything before any training
        total_samples = sum(n for _, n in placed)
        history = History()
        bar = tqdm(
            total=rounds * len(placed),
            desc="FedAvg",
            unit="client-round",
            leave=False,
            disable=not _show_progress(progress),
            mininterval=0.5,
        )
        try:
            for r in range(rounds):
                before, start = self.ledger.snapshot(), time.perf_counter()
                states, weights, loss_sum = [], [], 0.0
                global_state = self.model.state_dict()
                for k, (stage, (name, n)) in enumerate(zip(self.stages, placed)):
                    stage.worker.set_state(self.key, global_state, src=RESEARCHER)
                    for e in range(local_epochs):
                        batches = epoch_batches(
                            n, batch_size, seed=seed + CLIENT_SEED_STRIDE * k, epoch=r * local_epochs + e
                        )
                        for idx in batches:
                            stats = train_step([stage], BatchRef(name, idx), self.loss)
                            loss_sum += stats.loss * stats.count
                    states.append(stage.worker.get_state(self.key))
                    weights.append(n)
                    bar.update(1)
                self.model.load_state_dict(weighted_average(states, weights))
                train_loss = loss_sum / (total_samples * local_epochs)
                stats = self._record(history, r + 1, train_loss, total_samples, (before, start), test_data)
                if on_round is not None:
                    on_round(stats)
        finally:
            bar.close()
        return history
