"""The check each rule of a party's policy makes: each raises a :class:`~splitnn.errors.PolicyError`
naming the rule and what it refused.

Pure functions over a :class:`~splitnn.workers.policy.rules.WorkerPolicy` and a segment's fingerprint,
spec and shapes, a dataset name or a peer; the engine (:class:`~splitnn.workers.VirtualWorker`) and the
server call them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from splitnn.errors import PolicyError
from splitnn.workers.policy.passthrough import passthrough_reason
from splitnn.workers.policy.rules import WorkerPolicy

__all__ = [
    "check_install",
    "check_reduction",
    "check_dataset",
    "check_peer",
    "check_psi",
    "check_hijack",
    "check_accepted",
    "check_release",
    "check_grad_norms",
    "check_batch_rows",
]


def _refuse(worker: str, rule: str, what: str, reason: str) -> PolicyError:
    return PolicyError(f"worker {worker!r} refuses {what} (policy rule {rule}): {reason}")


def check_install(
    policy: WorkerPolicy, worker: str, key: str, *, fingerprint: str | None, params: int | None = None
) -> None:
    """Refuse installing segment ``key`` (``fingerprint``: its fingerprint, None when it has none)
    unless ``accept_segments`` lists it and it has at most ``max_params`` elements."""
    if policy.accept_segments is not None and not policy.pinned(fingerprint):
        reason = (
            f"its fingerprint {fingerprint} is not among the {len(policy.accept_segments)} accepted; the party's "
            f"operator may add it to accept_segments after reviewing the segment"
            if fingerprint is not None
            else "it cannot be described as a spec, so it has no fingerprint to accept"
        )
        raise _refuse(worker, "accept_segments", f"segment {key!r}", reason)
    if policy.max_params is not None and params is not None and params > policy.max_params:
        raise _refuse(
            worker,
            "max_params",
            f"segment {key!r}",
            f"it holds {params:,} parameter and buffer elements, more than the {policy.max_params:,} allowed",
        )


def check_reduction(
    policy: WorkerPolicy,
    worker: str,
    key: str,
    dataset: str,
    *,
    spec: Mapping[str, Any] | None,
    fingerprint: str | None,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
) -> None:
    """Refuse running segment ``key`` on this party's dataset ``dataset`` when it looks like it
    passes the data through (``refuse_passthrough``), or reduces it less than ``min_reduction``.
    ``in_shape`` / ``out_shape``: per sample."""
    if policy.pinned(fingerprint):
        return
    what = f"segment {key!r} on dataset {dataset!r}"
    if policy.refuse_passthrough:
        reason = passthrough_reason(spec) if spec is not None else "it cannot be described as a spec to be judged"
        if reason is not None:
            raise _refuse(
                worker,
                "refuse_passthrough",
                what,
                f"{reason}; its output would let the receiver read the data (a heuristic: pin the segment's "
                f"fingerprint in accept_segments to approve it)",
            )
    if policy.min_reduction is not None:
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        if n_out * policy.min_reduction > n_in:
            raise _refuse(
                worker,
                "min_reduction",
                what,
                f"it turns {n_in:,} values per sample into {n_out:,}, a reduction of {n_in / max(n_out, 1):.3g}x; "
                f"the policy asks for at least {policy.min_reduction:g}x",
            )


def check_hijack(worker: str, key: str, reason: str | None) -> None:
    """Refuse gradients for segment ``key`` once the hijack detector raised its alarm (``reason``)."""
    if reason is not None:
        raise _refuse(worker, "detect_hijack", f"gradients for segment {key!r}", reason)


def check_accepted(policy: WorkerPolicy, worker: str, key: str, dataset: str, *, fingerprint: str | None) -> None:
    """Refuse running segment ``key`` on this party's ``dataset`` unless its operator accepted it: its
    fingerprint is pinned in ``accept_segments``, or the policy says ``accept_any_segment = true``."""
    if policy.accept_any_segment or policy.pinned(fingerprint):
        return
    how = (
        f"pin its fingerprint {fingerprint} in accept_segments after reviewing it (`splitnn fingerprint "
        f"MODEL.safetensors` prints a saved model's)"
        if fingerprint is not None
        else "it cannot be described as a spec, so it has no fingerprint to pin"
    )
    raise _refuse(
        worker,
        "accept_segments",
        f"segment {key!r} on dataset {dataset!r}",
        f"whether a segment leaks its input cannot be decided by looking at it, so a data holder runs only the "
        f"segments its operator accepted; {how}, or set accept_any_segment = true in the policy",
    )


def check_release(policy: WorkerPolicy, worker: str, what: str) -> None:
    """Refuse handing out ``what`` (weights, gradients, state derived from this party's data) unless the
    policy says ``release_weights = true``."""
    if not policy.release_weights:
        raise _refuse(
            worker,
            "release_weights",
            what,
            "state derived from this party's data leaves only as the cut values of accepted segments; its "
            "operator may set release_weights = true to let the trained weights leave at the end",
        )


def check_grad_norms(policy: WorkerPolicy, worker: str, key: str) -> None:
    """Refuse handing the researcher the norms of segment ``key``'s gradients unless the policy says
    ``release_grad_norms = true``."""
    if not policy.release_grad_norms:
        raise _refuse(
            worker,
            "release_grad_norms",
            f"the norms of segment {key!r}'s gradients",
            "gradients are derived from this party's data, and their norms leave only when its operator allows "
            "it; train without clip_grad_norm, or the operator may set release_grad_norms = true",
        )


def check_batch_rows(policy: WorkerPolicy, worker: str, dataset: str, rows: int, distinct: int, what: str) -> None:
    """Refuse a batch (or a view) of ``rows`` rows of this party's ``dataset`` (``distinct`` of them different)
    that holds fewer than ``min_batch_size`` rows, or any row twice."""
    if distinct != rows:
        raise _refuse(
            worker,
            "min_batch_size",
            f"{what} of dataset {dataset!r}",
            f"it names a row more than once ({rows} rows, {distinct} distinct)",
        )
    if rows < policy.min_batch_size:
        hint = " (a short last batch: choose a batch size that leaves none)" if "batch" in what else ""
        raise _refuse(
            worker,
            "min_batch_size",
            f"{what} of dataset {dataset!r}",
            f"it holds {rows} rows, fewer than the {policy.min_batch_size} the policy asks for{hint}",
        )


def check_dataset(policy: WorkerPolicy, worker: str, dataset: str) -> None:
    """Refuse reading the party's own dataset ``dataset`` unless ``datasets`` allows it."""
    if policy.datasets is not None and dataset not in policy.datasets:
        raise _refuse(
            worker, "datasets", f"dataset {dataset!r}", f"models may read only {sorted(policy.datasets)} here"
        )


def check_peer(policy: WorkerPolicy, worker: str, peer: str, adjacent: Iterable[str] | None, what: str) -> None:
    """Refuse handing ``what`` to ``peer`` unless ``peers`` lists it (or, without that rule, the model
    declared ``peer`` adjacent to this party; ``adjacent`` None: the model declared nothing)."""
    if policy.peers is not None:
        if peer not in policy.peers:
            raise _refuse(
                worker, "peers", f"to hand {what} to {peer!r}", f"only {sorted(policy.peers)} may receive them"
            )
        return
    if adjacent is not None and peer not in adjacent:
        raise _refuse(
            worker,
            "peers",
            f"to hand {what} to {peer!r}",
            f"{peer!r} is not adjacent to {worker!r} in the model (its neighbours: {sorted(adjacent)})",
        )


def check_psi(
    policy: WorkerPolicy,
    worker: str,
    *,
    dataset: str | None = None,
    operator: bool = True,
    runs: int | None = None,
    peer: str | None = None,
) -> None:
    """Refuse a private set intersection (PSI) run over this party's ``dataset`` unless the party's operator
    placed it (``operator``: loaded with ``--data``, not placed by a researcher nor derived by an earlier
    intersection), ``datasets`` allows it and it took part in fewer than ``max_psi_runs`` runs (``runs``: how
    many it took part in so far; None: the run is already open); refuse a PSI message to or from ``peer``
    unless ``psi_peers`` (by default ``peers``) lists it."""
    if dataset is not None:
        what = f"private set intersection over dataset {dataset!r}"
        if not operator:
            raise _refuse(
                worker,
                "psi_operator_data",
                what,
                "the party's operator did not place it (a researcher did, or an earlier intersection derived it); "
                "PSI runs only over the datasets the operator loaded (splitnn worker --data), so that nobody can "
                "probe the other parties with ids of their choosing",
            )
        check_dataset(policy, worker, dataset)
        if runs is not None and policy.max_psi_runs is not None and runs >= policy.max_psi_runs:
            raise _refuse(
                worker,
                "max_psi_runs",
                what,
                f"it took part in {runs} PSI run(s) already, the most the party's policy allows "
                f"({policy.max_psi_runs}; the count restarts when the worker does)",
            )
    if peer is not None and peer != worker:
        rule, allowed = ("psi_peers", policy.psi_peers) if policy.psi_peers is not None else ("peers", policy.peers)
        if allowed is not None and peer not in allowed:
            default = "" if rule == "psi_peers" else " (without a psi_peers rule, the peers rule decides)"
            raise _refuse(
                worker,
                rule,
                f"private set intersection with {peer!r}",
                f"it runs PSI only with {sorted(allowed)}{default}",
            )
