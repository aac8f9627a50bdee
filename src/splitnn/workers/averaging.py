"""Weighted averaging of state dicts: FedAvg's server step and SplitFed's aggregation.

It lives with the workers because a party averages the segments it hosts
(:meth:`~splitnn.workers.AveragingWorker.average_states`); the federated
baselines use the same arithmetic at the researcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitnn.errors import ConfigurationError


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_k (w_k / sum w) * state_k`` for every floating-point tensor.

    Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are
    taken from the first state. With one state the result equals it exactly
    (``x * 1.0 == x``), so one-client federated training is plain training.
    """
    if not states or len(states) != len(weights):
        raise ConfigurationError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ConfigurationError(f"averaging weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for k, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ConfigurationError(f"state {k} has different tensors than state 0; the clients' models differ")
        for key in keys:  # add_ would broadcast a smaller tensor silently
            a, b = states[0][key], state[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ConfigurationError(
                    f"tensor {key!r} of state {k} is {b.dtype} {tuple(b.shape)}, but {a.dtype} {tuple(a.shape)} in "
                    f"state 0; the clients' models differ"
                )
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = first * (weights[0] / total)
        for state, w in zip(states[1:], weights[1:]):
            acc.add_(state[key], alpha=w / total)
        out[key] = acc
    return out
