"""The rules of a party's policy, their defaults and the policy file that sets them.

:class:`WorkerPolicy` holds the rules (each checked when it is made); :func:`load_policy` reads them from
a TOML or JSON file (an example there). A party that holds data starts closed
(:data:`DATA_HOLDER_DEFAULTS`, the gate); the in-process default (``WorkerPolicy()``) stays open. What
each rule refuses: :mod:`splitnn.workers.policy.checks`.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from splitnn.errors import ConfigurationError, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib
from splitnn.wire.fingerprint import check_fingerprint

__all__ = ["WorkerPolicy", "load_policy", "read_policy_rules", "DATA_HOLDER_DEFAULTS"]

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
    "release_grad_norms",
)

#: The defaults of a party that holds data (``splitnn worker --data``): closed; see "The gate" above.
DATA_HOLDER_DEFAULTS: Mapping[str, Any] = {
    "release_outputs": False,
    "release_weights": False,
    "accept_any_segment": False,
    "min_batch_size": 8,
    "draw_rows": True,
    "release_grad_norms": False,
}


@dataclass(frozen=True)
class WorkerPolicy:
    """What a worker agrees to run on its data and to hand out (a file sets them: :func:`load_policy`).

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
        release_grad_norms: let the 2-norm of each parameter gradient of the segments hosted here
            leave to the researcher (``grad_norms``: one number per tensor per batch, what clipping by
            the global norm across parties needs); ``False``: ``fit(..., clip_grad_norm=...)`` is refused.
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
    release_grad_norms: bool = True

    def __post_init__(self) -> None:
        check = _Checker("WorkerPolicy")
        object.__setattr__(self, "release_outputs", check.boolean("release_outputs", self.release_outputs))
        for rule in ("refuse_passthrough", "release_weights", "accept_any_segment", "draw_rows", "release_grad_norms"):
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
        """Read a policy file: TOML (``.toml``) or JSON (``.json``); see :func:`load_policy`."""
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
    ``data_holder``: the rules the file does not set take the closed :data:`DATA_HOLDER_DEFAULTS`.

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
        release_weights = true             # let trained weights leave (get_state, collect, peers)
        accept_any_segment = true          # run segments on our data without a pinned fingerprint
        min_batch_size = 8                 # the fewest rows of ours one batch (or a view of our data) may hold
        draw_rows = true                   # we draw each batch's rows ourselves, from a seed (the researcher's)
        release_grad_norms = true          # let one norm per gradient tensor leave (clipping by the global norm)
    """
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
