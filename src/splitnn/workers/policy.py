"""A party's policy: what it agrees to run on its data and whom it hands what.

The party's operator writes it (``splitnn worker --policy policy.toml``, or
``VirtualWorker(name, policy=WorkerPolicy(...))``); the party enforces it itself, before any
batch, never trusting the researcher to. Every refusal is a
:class:`~splitnn.errors.PolicyError` naming the rule and the offending segment (or dataset,
or peer). Without a policy, a worker behaves as it always did, except that tensors are
handed only to the parties adjacent to this one in the model (see ``peers``).

The rules (a TOML or JSON file with these keys; each optional)::

    release_outputs = false            # never hand activations to the researcher (fetch, predict)
    accept_segments = ["48e72f...", ]  # fingerprints (splitnn fingerprint); nothing else is installed
    refuse_passthrough = true          # refuse segments that would pass the data through (heuristic)
    min_reduction = 2.0                # a segment on our data must output <= 1/2 as many values as it reads
    peers = ["bob"]                    # the only parties that may receive or pull our tensors
    max_params = 1_000_000             # parameter + buffer elements of any one segment
    datasets = ["mnist-train"]         # the only datasets of ours a model may read
    psi_peers = ["lab"]                # the only parties we run private set intersection with (default: peers)
    max_psi_runs = 1                   # PSI runs each of our datasets takes part in, over the worker's life
    detect_hijack = 1.1                # SplitGuard-style probes on our gradients; stop below this score
    release_weights = true             # let trained weights leave (get_state, collect, peers); see "The gate"
    accept_any_segment = true          # run segments on our data without a pinned fingerprint
    min_batch_size = 8                 # the fewest rows of ours one batch (or a view of our data) may hold
    draw_rows = true                   # we draw each batch's rows ourselves, from a seed (the researcher's)

The gate. A worker that holds data (``splitnn worker --data ...``) releases only what its
operator released: the cut values of segments the policy accepted, and -- with
``release_weights = true`` -- the trained weights *at the end*. Its defaults are closed
(:data:`DATA_HOLDER_DEFAULTS`, applied by :meth:`WorkerPolicy.from_dict` with
``data_holder=True``): no weights, gradients or trained-state probes leave; a segment runs on
the party's data only when its fingerprint is pinned in ``accept_segments`` (or the operator
opted in with ``accept_any_segment = true``, leaving the heuristic as a best-effort extra);
batches hold at least ``min_batch_size`` distinct rows, drawn by the holder's own sampler
(:func:`splitnn.data.epoch_batches`) from the researcher's seed, never named by the researcher.
"The end" is concrete: once a segment's weights have been released, it is *frozen* -- it no
longer trains (no training forward, no step, no checkpoint or average loaded into it), and a
later read must find exactly the state that was released. The in-process default
(``WorkerPolicy()``) stays open: the researcher on their own machine holds that data anyway; the
gate is the same code with other values.

``refuse_passthrough`` and ``min_reduction`` are a *heuristic* guard for parties that do not
pin fingerprints: :func:`passthrough_reason` reads the segment's layers, and a researcher
who wants to leak the data can still find a map it does not recognise (a learned one,
even). Pinning ``accept_segments`` is the guard that holds; the heuristic is for the rest.
A segment whose fingerprint is pinned is not judged by the heuristic.

``detect_hijack`` runs :class:`~splitnn.workers.guard.HijackGuard` on every segment that reads
this party's data: now and then a fake-label batch, and a check that the gradients that come
back depend on the labels as a real task's do. When they do not (a server hijacking the
segment, FSHA), the party refuses that gradient and every later one, and writes why in its
audit log. The value is the score threshold (1.1 suits classification with balanced classes).

This module is pure: it evaluates a policy against a segment spec, shapes, a dataset name or
a peer, and raises; the engine (:class:`~splitnn.workers.VirtualWorker`) and the server call it.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from splitnn.errors import ConfigurationError, PolicyError, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib
from splitnn.wire.fingerprint import check_fingerprint
from splitnn.wire.spec import canonical_spec

__all__ = [
    "WorkerPolicy",
    "load_policy",
    "read_policy_rules",
    "passthrough_reason",
    "check_install",
    "check_reduction",
    "check_dataset",
    "check_peer",
    "check_psi",
    "check_hijack",
    "check_accepted",
    "check_release",
    "check_batch_rows",
    "DATA_HOLDER_DEFAULTS",
]

_RULES = (
    "release_outputs",
    "accept_segments",
    "refuse_passthrough",
    "min_reduction",
    "peers",
    "max_params",
    "datasets",
    "psi_peers",
    "max_psi_runs",
    "detect_hijack",
    "release_weights",
    "accept_any_segment",
    "min_batch_size",
    "draw_rows",
)

#: The defaults of a party that holds data (``splitnn worker --data``): closed; see "The gate" above.
DATA_HOLDER_DEFAULTS: Mapping[str, Any] = {
    "release_outputs": False,
    "release_weights": False,
    "accept_any_segment": False,
    "min_batch_size": 8,
    "draw_rows": True,
}


@dataclass(frozen=True)
class WorkerPolicy:
    """What a worker agrees to run on its data and to hand out; see the module docstring.

    Raw features and labels are never handed out, whatever the policy.

    Args:
        release_outputs: allow :meth:`~splitnn.workers.Worker.fetch` of activations to the
            researcher (the tutorial's low-level loop and ``predict`` need it).
        accept_segments: fingerprints of the only segments this worker installs (``None``: any).
        refuse_passthrough: refuse, before it runs on this party's data, a segment that looks
            like it passes its input through (:func:`passthrough_reason`), unless pinned.
        min_reduction: a segment that reads this party's data must output at most
            ``1 / min_reduction`` as many values per sample as it reads (``None``: no limit).
        peers: the only parties that may receive this party's tensors (``None``: the parties
            adjacent to it in the model, as the model declares them).
        max_params: the most parameter + buffer elements of one segment (``None``: the worker's
            default limit).
        datasets: the only datasets of the party's own a model may read (``None``: all).
        psi_peers: the only parties this party runs private set intersection with (``None``: those of
            ``peers``, and without that rule any party the researcher's session names as a peer).
        max_psi_runs: how many PSI runs each of the party's datasets takes part in, counted over the
            worker's life across all sessions (``None``: no limit; ``0``: no PSI at all).
        detect_hijack: run the hijack detector on data-reading segments, with this score
            threshold (``None``: off).
        release_weights: let weights (and gradients, and probes of trained state) of the segments
            hosted here leave: to the researcher (``get_state``, ``fetch_segment``, ``get_grads``)
            or to peers (``send_state``). A segment released to the researcher is frozen.
        accept_any_segment: run any installed segment on the party's data; ``False``: only those
            whose fingerprint ``accept_segments`` pins.
        min_batch_size: the fewest (distinct) rows of the party's data one batch may read, and one
            view of it (a PSI part) may hold.
        draw_rows: batches on the party's data must be drawn by this worker from a seed
            (:class:`~splitnn.workers.refs.BatchDraw`); the researcher cannot name the rows.
    """

    release_outputs: bool = True
    accept_segments: tuple[str, ...] | None = None
    refuse_passthrough: bool = False
    min_reduction: float | None = None
    peers: tuple[str, ...] | None = None
    max_params: int | None = None
    datasets: tuple[str, ...] | None = None
    psi_peers: tuple[str, ...] | None = None
    max_psi_runs: int | None = None
    detect_hijack: float | None = None
    release_weights: bool = True
    accept_any_segment: bool = True
    min_batch_size: int = 1
    draw_rows: bool = False

    def __post_init__(self) -> None:
        check = _Checker("WorkerPolicy")
        object.__setattr__(self, "release_outputs", check.boolean("release_outputs", self.release_outputs))
        for rule in ("refuse_passthrough", "release_weights", "accept_any_segment", "draw_rows"):
            object.__setattr__(self, rule, check.boolean(rule, getattr(self, rule)))
        value = self.min_batch_size
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            raise ConfigurationError(f"policy rule min_batch_size must be an integer 1..{1 << 20}, got {value!r}")
        if self.accept_segments is not None:
            try:
                accepted = tuple(
                    check_fingerprint(f, f"policy rule accept_segments[{i}]")
                    for i, f in enumerate(check.strings("accept_segments", self.accept_segments))
                )
            except SpecError as exc:
                raise ConfigurationError(str(exc)) from None
            object.__setattr__(self, "accept_segments", accepted)
        if self.min_reduction is not None:
            value = self.min_reduction
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"policy rule min_reduction must be a positive number, got {value!r}")
            object.__setattr__(self, "min_reduction", float(value))
        if self.max_params is not None:
            value = self.max_params
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"policy rule max_params must be a positive integer, got {value!r}")
        if self.max_psi_runs is not None:
            value = self.max_psi_runs
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"policy rule max_psi_runs must be an integer >= 0, got {value!r}")
        if self.detect_hijack is not None:
            value = self.detect_hijack
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"policy rule detect_hijack must be a positive number, got {value!r}")
            object.__setattr__(self, "detect_hijack", float(value))
        for rule in ("peers", "datasets", "psi_peers"):
            value = getattr(self, rule)
            if value is not None:
                object.__setattr__(self, rule, check.strings(rule, value))

    @classmethod
    def from_dict(
        cls, rules: Mapping[str, Any], *, source: str = "the policy", data_holder: bool = False
    ) -> WorkerPolicy:
        """A policy from a mapping of rule names to values; an unknown rule is an error naming it.
        ``data_holder``: the rules not given take :data:`DATA_HOLDER_DEFAULTS` (closed)."""
        if not isinstance(rules, Mapping):
            raise ConfigurationError(f"{source} must be a table of rules, got {type(rules).__name__}")
        unknown = sorted(set(rules) - set(_RULES))
        if unknown:
            raise ConfigurationError(f"{source}: unknown rule(s) {unknown}; the rules are {list(_RULES)}")
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in rules.items()}
        if data_holder:
            given = {**DATA_HOLDER_DEFAULTS, **given}
        try:
            return cls(**given)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> WorkerPolicy:
        """Read a policy file: TOML (``.toml``) or JSON (``.json``); see the module docstring."""
        return load_policy(path)

    def to_dict(self) -> dict[str, Any]:
        """The rules that differ from the defaults, as plain data (what the audit log records)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def pinned(self, fp: str | None) -> bool:
        """Whether ``fp`` is exactly one of the accepted fingerprints (False when none are pinned): all 64
        hex digits compared, never a prefix."""
        if self.accept_segments is None or not isinstance(fp, str) or len(fp) != 64:
            return False
        return any(hmac.compare_digest(fp, pinned) for pinned in self.accept_segments)

    @property
    def gated(self) -> bool:
        """Whether any rule of the gate is closed (what leaves needs checks beyond the open default)."""
        return not self.release_weights or not self.accept_any_segment or self.min_batch_size > 1 or self.draw_rows


def read_policy_rules(path: str | os.PathLike) -> dict[str, Any]:
    """The rules a policy file sets, as written (TOML for ``.toml``, else JSON); not checked yet."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"no policy file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rules = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ConfigurationError(f"policy file {path} is not valid {kind}: {exc}") from None
    if not isinstance(rules, dict):
        raise ConfigurationError(f"policy file {path} must hold a table of rules, got {type(rules).__name__}")
    return rules


def load_policy(path: str | os.PathLike, *, data_holder: bool = False) -> WorkerPolicy:
    """Read a policy file: TOML (``.toml``) or JSON (any other suffix); errors name the file and the rule.
    ``data_holder``: the rules the file does not set take the closed :data:`DATA_HOLDER_DEFAULTS`."""
    return WorkerPolicy.from_dict(read_policy_rules(path), source=f"policy file {path}", data_holder=data_holder)


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def boolean(self, rule: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"policy rule {rule} must be true or false, got {value!r}")
        return value

    def strings(self, rule: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigurationError(f"policy rule {rule} must be a list of strings, got {value!r}")
        items = tuple(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if bad:
            raise ConfigurationError(f"policy rule {rule} must be a list of non-empty strings; {bad[0]!r} is not one")
        return items


# -- the rules ---------------------------------------------------------------------------------------


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


# -- the pass-through heuristic ----------------------------------------------------------------------

#: Layers that move or copy values without computing new ones (a permutation, a reshape, padding).
_SHAPE_ONLY = {
    "Identity",
    "Flatten",
    "Unflatten",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "FeatureAlphaDropout",
    "PixelShuffle",
    "PixelUnshuffle",
    "ChannelShuffle",
    "ZeroPad1d",
    "ZeroPad2d",
    "ZeroPad3d",
    "ConstantPad1d",
    "ConstantPad2d",
    "ConstantPad3d",
    "ReflectionPad1d",
    "ReflectionPad2d",
    "ReflectionPad3d",
    "ReplicationPad1d",
    "ReplicationPad2d",
    "ReplicationPad3d",
    "CircularPad1d",
    "CircularPad2d",
    "CircularPad3d",
    "Upsample",
}
#: Element-wise or per-channel maps that can be undone (bijections): they hide nothing.
_INVERTIBLE = {
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LeakyReLU",
    "PReLU",
    "Sigmoid",
    "Tanh",
    "ELU",
    "SELU",
    "CELU",
    "Softplus",
    "Softsign",
    "LogSigmoid",
    "Softmax",
    "LogSoftmax",
}
#: Nonlinearities that lose information once values can be negative (after a weighted layer).
_CLIPPING = {"ReLU", "ReLU6", "Hardtanh", "Hardsigmoid", "Hardswish", "GELU", "SiLU", "Mish", "Threshold", "RReLU"}
#: Layers that lose information on any input: pooling.
_POOLING = {
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "LPPool1d",
    "LPPool2d",
}
_WEIGHTED = {
    "Linear",
    "Bilinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
}

# the same for functions and tensor methods in a graph segment (torch.*, torch.nn.functional.*, operator.*)
_FN_SHAPE = {
    "flatten",
    "reshape",
    "view",
    "permute",
    "transpose",
    "contiguous",
    "getitem",
    "unsqueeze",
    "squeeze",
    "cat",
    "stack",
    "clone",
    "dropout",
    "pad",
    "size",
    "getattr",
    "to",
    "float",
    "double",
    "half",
    "t",
    "flip",
    "roll",
    "chunk",
    "split",
    "expand",
    "repeat",
}
_FN_INVERTIBLE = {
    "add",
    "sub",
    "mul",
    "truediv",
    "neg",
    "pos",
    "batch_norm",
    "layer_norm",
    "group_norm",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "elu",
    "selu",
    "softplus",
    "softmax",
    "log_softmax",
    "exp",
}
_FN_CLIPPING = {"relu", "relu_", "relu6", "hardtanh", "gelu", "silu", "mish", "threshold", "hardswish", "clamp"}
_FN_POOLING = {
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "mean",
    "sum",
    "amax",
    "max",
    "min",
}
_FN_WEIGHTED = {"linear", "conv1d", "conv2d", "matmul", "mm", "bmm"}


def passthrough_reason(spec: Mapping[str, Any]) -> str | None:
    """Why segment ``spec`` looks like it passes its input through, or ``None`` when it does not.

    A heuristic over the segment's layers in order (graphs: their ops in order). It refuses a
    segment unless, after its first weighted layer (Linear, Conv...), some layer loses
    information: a clipping nonlinearity (ReLU, GELU, ...), pooling, or a weighted layer that
    narrows (fewer outputs than inputs). Pooling, or a narrowing weighted layer, counts anywhere;
    a ReLU on the raw input does not (non-negative data, like pixels, passes a ReLU unchanged).
    So it refuses: nothing but identity, flatten, reshape, permutation or padding; a first
    weighted layer at least as wide as its input followed only by invertible maps (batch norm,
    sigmoid, tanh, leaky ReLU, softmax, ...); and layers it does not know (it cannot judge them:
    pin such a segment's fingerprint instead).
    """
    try:
        layers = canonical_spec(spec)["layers"]
    except SpecError as exc:
        return f"its spec is not valid ({exc})"
    steps = list(_steps(layers))
    unknown = [name for kind, name in steps if kind == "unknown"]
    if unknown:
        return f"it holds {_names(unknown)}, which the heuristic cannot judge"
    weighted = False
    for kind, _name in steps:
        if kind in ("pool", "narrowing"):
            return None
        if kind == "clip" and weighted:
            return None
        if kind in ("weighted", "narrowing"):
            weighted = True
    names = [name for _, name in steps]
    if not steps or all(kind in ("shape", "invertible") for kind, _ in steps):
        return f"it only moves values around ({_names(names) if names else 'no layers'})"
    if not any(kind == "weighted" for kind, _ in steps):
        return f"its layers ({_names(names)}) lose nothing of non-negative data"
    return (
        f"its first weighted layer is at least as wide as its input and nothing after it loses information "
        f"({_names(names)}): an invertible map"
    )


def _names(names: Sequence[str]) -> str:
    shown = list(dict.fromkeys(names))
    return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")


def _steps(layers: Sequence[Mapping[str, Any]]) -> Iterable[tuple[str, str]]:
    for layer in layers:
        yield from _layer_steps(layer)


def _layer_steps(layer: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    if "import" in layer:
        module, _, cls = str(layer["import"]).partition(":")
        name = cls.rsplit(".", 1)[-1]
        if module.startswith("torch.nn.") and name in _SHAPE_ONLY | _INVERTIBLE | _CLIPPING | _POOLING:
            yield _kind(name), name
        else:
            yield "unknown", cls or str(layer["import"])
        return
    type_name = layer.get("type")
    if type_name == "Sequential":
        yield from _steps(layer.get("layers", []))
        return
    if type_name == "Graph":
        yield from _graph_steps(layer)
        return
    if type_name in _WEIGHTED:
        yield ("narrowing" if _narrows(layer) else "weighted"), type_name
        return
    if type_name in _SHAPE_ONLY | _INVERTIBLE | _CLIPPING | _POOLING:
        if type_name in _POOLING and not _pool_reduces(layer):
            yield "shape", type_name
            return
        yield _kind(type_name), type_name
        return
    yield "unknown", str(type_name)


def _kind(name: str) -> str:
    if name in _SHAPE_ONLY:
        return "shape"
    if name in _INVERTIBLE:
        return "invertible"
    if name in _CLIPPING:
        return "clip"
    return "pool"


def _pair(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _narrows(layer: Mapping[str, Any]) -> bool:
    """Whether a weighted layer gives fewer values than it reads (per position, for convolutions)."""
    t = layer["type"]
    if t == "Linear":
        return layer["out_features"] < layer["in_features"]
    if t == "Conv2d":
        sh, sw = _pair(layer.get("stride", 1))
        return layer["out_channels"] < layer["in_channels"] * sh * sw
    return False  # transposed convolutions and others widen, or cannot be told without shapes


def _pool_reduces(layer: Mapping[str, Any]) -> bool:
    if layer["type"] in ("MaxPool2d", "AvgPool2d"):
        k = _pair(layer.get("kernel_size"))
        stride = layer.get("stride")
        s = _pair(stride) if stride is not None else k
        return any(x > 1 for x in (*k, *s))
    return True


def _graph_steps(spec: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    modules = spec.get("modules", {})
    for node in spec.get("nodes", []):
        op = node.get("op")
        if op in ("placeholder", "output", "get_attr"):
            continue
        target = str(node.get("target", ""))
        if op == "call_module":
            sub = modules.get(target)
            yield from (_layer_steps(sub) if isinstance(sub, Mapping) else [("unknown", target)])
            continue
        name = target.rsplit(".", 1)[-1]
        if name in _FN_SHAPE:
            yield "shape", name
        elif name in _FN_INVERTIBLE:
            yield "invertible", name
        elif name in _FN_CLIPPING:
            yield "clip", name
        elif name in _FN_POOLING:
            yield "pool", name
        elif name in _FN_WEIGHTED:
            yield "weighted", name
        else:
            yield "unknown", name
