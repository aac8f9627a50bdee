"""The analytic model of communication per client: split learning, SplitFed, FedAvg, large-batch SGD.

The sizes that decide it (:class:`CommModel`), the bytes each method moves per client and kind
(:func:`client_bytes`, where the formulas are), their means over clients and the client count from
which split learning sends less than FedAvg (:func:`crossover`). The ledger records exactly these bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitnn.checks import check_counts
from splitnn.errors import ConfigurationError
from splitnn.wire.tensor_codec import tensor_nbytes

__all__ = [
    "CommModel",
    "METHODS",
    "SPLITFED_METHODS",
    "iid_shard_sizes",
    "split_bytes",
    "fedavg_bytes",
    "large_batch_bytes",
    "splitfed_bytes",
    "splitfed_rounds",
    "client_bytes",
    "mean_bytes_per_client",
    "crossover",
]

#: The methods the model covers, by the names the comparison uses.
METHODS = ("split", "fedavg", "large-batch", "splitfed-v1", "splitfed-v2")

#: The SplitFed methods (the same bytes; see :func:`client_bytes`).
SPLITFED_METHODS = ("splitfed-v1", "splitfed-v2")


@dataclass(frozen=True)
class CommModel:
    """The sizes (bytes) that decide each method's communication.

    ``model_bytes`` (``W``) the whole model's state, ``grad_bytes`` (``G``) the gradient of its
    trainable parameters, ``client_bytes`` (``w``) the client-side segment's state, ``cut_bytes``
    (``c``) one sample's activation at the cut. :meth:`from_segments` measures them.
    """

    model_bytes: int
    grad_bytes: int
    client_bytes: int
    cut_bytes: int

    def __post_init__(self) -> None:
        check_counts(
            self,
            ("model_bytes", "grad_bytes", "client_bytes", "cut_bytes"),
            minimum=0,
            wording="a non-negative integer",
        )

    @classmethod
    def from_counts(cls, *, params: int, client_params: int, cut_size: int, element_size: int = 4) -> CommModel:
        """From parameter counts and the cut's size in values per sample (no buffers)."""
        return cls(params * element_size, params * element_size, client_params * element_size, cut_size * element_size)

    @classmethod
    def from_segments(cls, client: nn.Module, server: nn.Module, sample_shape: Sequence[int]) -> CommModel:
        """Measure the sizes of a client segment and a server segment for samples of ``sample_shape``."""
        was_training = client.training
        client.eval()
        try:
            with torch.no_grad():
                cut = client(torch.zeros(1, *sample_shape))
        finally:
            client.train(was_training)
        client_state, server_state = _state_bytes(client.state_dict()), _state_bytes(server.state_dict())
        grads = sum(tensor_nbytes(p) for m in (client, server) for p in m.parameters() if p.requires_grad)
        return cls(client_state + server_state, grads, client_state, tensor_nbytes(cut))


def _state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor_nbytes(t) for t in state.values())


def iid_shard_sizes(dataset_size: int, clients: int) -> list[int]:
    """Samples per client of :func:`splitnn.data.iid_shards` (the first ``D % K`` get one more)."""
    if clients < 1 or clients > dataset_size:
        raise ConfigurationError(f"cannot split {dataset_size} samples among {clients} clients")
    base, extra = divmod(dataset_size, clients)
    return [base + (1 if k < extra else 0) for k in range(clients)]


def split_bytes(m: CommModel, shard_sizes: Sequence[int], epochs: int) -> list[dict[str, int]]:
    """Bytes each split-learning client sends plus receives, by ledger kind."""
    K = len(shard_sizes)
    out = []
    for k, n in enumerate(shard_sizes):
        received = epochs - (1 if k == 0 else 0) if K > 1 else 0
        sent = epochs - (1 if k == K - 1 else 0) if K > 1 else 0
        out.append(
            {
                "activation": epochs * n * m.cut_bytes,
                "gradient": epochs * n * m.cut_bytes,
                "weights": (sent + received) * m.client_bytes,
            }
        )
    return out


def fedavg_bytes(m: CommModel, clients: int, rounds: int) -> list[dict[str, int]]:
    """Bytes each FedAvg client sends plus receives, by ledger kind."""
    return [{"weights": 2 * rounds * m.model_bytes} for _ in range(clients)]


def large_batch_bytes(m: CommModel, shard_sizes: Sequence[int], epochs: int, batch_size: int) -> list[dict[str, int]]:
    """Bytes each large-batch SGD client sends plus receives, by ledger kind."""
    steps = [epochs * math.ceil(n / batch_size) for n in shard_sizes]
    return [{"weights": s * m.model_bytes, "gradient": s * m.grad_bytes} for s in steps]


def splitfed_rounds(shard_sizes: Sequence[int], batch_size: int, round_batches: int | None) -> tuple[list[int], int]:
    """SplitFed's rounds per epoch: in how many each client trains (``r_k``), and how many there are (``R``)."""
    if not shard_sizes or any(n < 1 for n in shard_sizes):
        raise ConfigurationError(f"every client needs at least one sample, got shard sizes {list(shard_sizes)}")
    if round_batches is not None and round_batches < 1:
        raise ConfigurationError(f"round_batches must be a positive integer or None, got {round_batches!r}")
    batches = [math.ceil(n / batch_size) for n in shard_sizes]
    size = round_batches or max(batches)
    return [math.ceil(b / size) for b in batches], math.ceil(max(batches) / size)


def splitfed_bytes(
    m: CommModel, shard_sizes: Sequence[int], epochs: int, batch_size: int, round_batches: int | None = None
) -> list[dict[str, int]]:
    """Bytes each SplitFed client (v1 or v2) sends plus receives, by ledger kind."""
    trained, rounds = splitfed_rounds(shard_sizes, batch_size, round_batches)
    many = len(shard_sizes) > 1
    return [
        {
            "activation": epochs * n * m.cut_bytes,
            "gradient": epochs * n * m.cut_bytes,
            "weights": epochs * (r + rounds) * m.client_bytes if many else 0,
        }
        for n, r in zip(shard_sizes, trained)
    ]


def client_bytes(
    method: str,
    m: CommModel,
    shard_sizes: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    local_epochs: int = 1,
    round_batches: int | None = None,
) -> list[dict[str, int]]:
    """Bytes per client, by kind, of ``method`` (one of :data:`METHODS`); ``round_batches`` is SplitFed's.

    Sizes, in bytes (:class:`CommModel`): ``W`` the whole model's state, ``G`` the
    gradient of its trainable parameters (``G = W`` without buffers), ``w`` the
    client-side segment's state, ``c`` one sample's activation at the cut (its
    gradient is as large). Client ``k`` of ``K`` holds ``n_k`` of
    the ``D`` samples (IID shards: ``n_k = D // K``, plus one for the first ``D % K``
    clients); ``E`` epochs; batch ``b``.

    * **Split learning** (vanilla, round-robin turns,
      :class:`~splitnn.training.topologies.MultiHolderSplitNN`): every epoch client
      ``k`` sends the activations of its ``n_k`` samples and receives their
      gradients, ``2 E n_k c``; and with ``K > 1`` clients the client-side weights pass from each client to the
      next after every turn (``E K - 1`` hand-offs), so client ``k`` receives them
      ``E - [k = 0]`` times and sends them ``E - [k = K-1]`` times, ``w`` bytes each.
    * **SplitFed** (v1 and v2, :class:`~splitnn.training.topologies.SplitFedSplitNN`):
      the same ``2 E n_k c`` at the cut, and with ``K > 1`` clients the client-side weights
      go to the aggregator and back once per round. Client ``k`` has ``B_k = ceil(n_k / b)``
      batches per epoch; a round is ``N`` batches of every client (``N = round_batches``, or
      ``max_k B_k``: one round per epoch), so an epoch has ``R = ceil(max_k B_k / N)`` rounds,
      of which client ``k`` trains in ``r_k = ceil(B_k / N)``. It sends its weights after each
      of those and receives the average after every round: ``E (r_k + R) w``. v1's server-side
      copies are averaged where they live, so v1 and v2 move the same bytes; the aggregator
      receives and sends exactly what the clients send and receive.
    * **FedAvg** with ``R = E / local_epochs`` rounds: ``2 R W`` (the global model
      down and the client's model up, every round).
    * **Large-batch synchronous SGD**: client ``k`` takes part in ``ceil(n_k / b)``
      steps per epoch, each the model down and a gradient up: ``E ceil(n_k / b) (W + G)``.

    So split learning's bytes per client fall like ``2 E D c / K`` while FedAvg's stay
    at ``2 R W``: split learning sends less per client once ``K`` passes about
    ``E D c / (R W)`` (:func:`crossover`). These are exactly the bytes the ledger
    records (no control messages are recorded by in-process workers; a networked
    worker's ``control`` records are left out of the comparison). Not modelled,
    because not sent during training: in the vanilla configuration the server
    holds the labels from the start (sharing them once would add ``8 n_k`` bytes
    per client, under 0.1% of one epoch's cut traffic with the bundled models).
    """
    if method == "split":
        return split_bytes(m, shard_sizes, epochs)
    if method in SPLITFED_METHODS:
        return splitfed_bytes(m, shard_sizes, epochs, batch_size, round_batches)
    if method == "fedavg":
        if epochs % local_epochs:
            raise ConfigurationError(
                f"FedAvg runs epochs / local_epochs rounds; {epochs} epochs are not a "
                f"multiple of {local_epochs} local epochs"
            )
        return fedavg_bytes(m, len(shard_sizes), epochs // local_epochs)
    if method == "large-batch":
        return large_batch_bytes(m, shard_sizes, epochs, batch_size)
    raise ConfigurationError(f"unknown method {method!r}; choose from {METHODS}")


def mean_bytes_per_client(
    method: str,
    m: CommModel,
    dataset_size: int,
    clients: int,
    *,
    epochs: int,
    batch_size: int = 64,
    local_epochs: int = 1,
    round_batches: int | None = None,
) -> float:
    """Mean bytes per client of ``method`` with ``dataset_size`` samples in IID shards over ``clients`` clients.

    Closed form (constant time in ``clients``); equal to the mean of :func:`client_bytes`
    over :func:`iid_shard_sizes`.
    """
    D, K, E = dataset_size, clients, epochs
    if K < 1 or K > D:
        raise ConfigurationError(f"cannot split {D} samples among {K} clients")
    if method == "split":
        handoffs = 2 * (E * K - 1) * m.client_bytes if K > 1 else 0
        return (2 * E * D * m.cut_bytes + handoffs) / K
    if method in SPLITFED_METHODS:
        # IID shards come in two sizes: ``extra`` of base + 1 samples, the others of base.
        base, extra = divmod(D, K)
        trained, rounds = splitfed_rounds([base + 1, base] if extra else [base], batch_size, round_batches)
        sends = extra * trained[0] + (K - extra) * trained[-1]
        averaging = E * (sends + K * rounds) * m.client_bytes if K > 1 else 0
        return (2 * E * D * m.cut_bytes + averaging) / K
    if method == "fedavg":
        return float(
            sum(client_bytes("fedavg", m, [1], epochs=E, batch_size=batch_size, local_epochs=local_epochs)[0].values())
        )
    if method == "large-batch":
        base, extra = divmod(D, K)
        steps = extra * math.ceil((base + 1) / batch_size) + (K - extra) * math.ceil(base / batch_size)
        return E * steps * (m.model_bytes + m.grad_bytes) / K
    raise ConfigurationError(f"unknown method {method!r}; choose from {METHODS}")


def crossover(
    m: CommModel,
    dataset_size: int,
    *,
    epochs: int,
    against: str = "fedavg",
    batch_size: int = 64,
    local_epochs: int = 1,
    max_clients: int | None = None,
) -> int | None:
    """The smallest client count at which split learning's mean bytes per client fall below ``against``'s.

    Scans ``K = 1 .. max_clients`` (default: the dataset size); ``None`` if
    split learning never sends less within that range.
    """
    limit = dataset_size if max_clients is None else min(max_clients, dataset_size)
    kw = dict(epochs=epochs, batch_size=batch_size, local_epochs=local_epochs)
    for k in range(1, limit + 1):
        split = mean_bytes_per_client("split", m, dataset_size, k, **kw)
        if split < mean_bytes_per_client(against, m, dataset_size, k, **kw):
            return k
    return None
