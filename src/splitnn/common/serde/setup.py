"""Set-up messages: hello, stats, peers, datasets' facts, probed shapes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from splitnn.common.messages import PROTOCOL_VERSION, check_party_name, check_session_tag
from splitnn.common.serde.blocks import (
    DTYPE_NAMES,
    MAX_PEERS,
    MAX_PROBE_DIM,
    MAX_PROBE_ELEMENTS,
    MAX_PROBE_NDIM,
    arg,
)
from splitnn.data.sources import MAX_FEATURE_NAME, MAX_FEATURE_NAMES
from splitnn.errors import WireError
from splitnn.transport.addresses import split_host_port
from splitnn.wire.cut_codec import MAX_VALUES
from splitnn.workers.refs import DatasetStats, ValueShape
from splitnn.workers.values import ProbeShape, is_several


# ------------------------------------------------------------------------------------ set-up
class Hello(NamedTuple):
    """What a worker says about itself: its party name, protocol version, its own datasets and where it
    computes (``splitnn worker --device``; informational, ``"?"`` when a worker says something odd)."""

    name: str
    protocol: int
    datasets: list[str]
    device: str = "cpu"
    #: segments the caller's session holds there (0 for a new session: the worker restarted, or it expired)
    session_segments: int = 0
    #: where its TCP data plane listens (``HOST:PORT``, or ``:PORT`` on the host the caller reached it at);
    #: None: peers reach it over gRPC
    data: str | None = None


def check_data_address(address: object, what: str, *, host_optional: bool = False) -> str:
    """A data-plane address ``HOST:PORT`` (``:PORT`` if ``host_optional``); WireError naming ``what``."""
    split_host_port(address, what, host_optional=host_optional, error=WireError)
    return address


def hello_to_result(
    name: str, datasets: Sequence[str], device: str = "cpu", session_segments: int = 0, data: str | None = None
) -> dict:
    result = {
        "name": name,
        "protocol": PROTOCOL_VERSION,
        "datasets": list(datasets),
        "device": device,
        "session_segments": session_segments,
    }
    if data is not None:
        result["data"] = data
    return result


def hello_from_result(result: dict) -> Hello:
    datasets = result.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise WireError("hello: 'datasets' must list dataset names")
    protocol = result.get("protocol")
    if not isinstance(protocol, int) or isinstance(protocol, bool):
        raise WireError("hello: 'protocol' must be an integer")
    device = result.get("device", "cpu")
    device = device if isinstance(device, str) and len(device) <= 64 else "?"
    held = result.get("session_segments", 0)
    if not isinstance(held, int) or isinstance(held, bool) or held < 0:
        raise WireError("hello: 'session_segments' must be a count")
    data = result.get("data")
    if data is not None:
        data = check_data_address(data, "hello: 'data'", host_optional=True)
    return Hello(check_party_name(result.get("name")), protocol, datasets, device, held, data)


def stats_to_result(counters: list, ledger: list) -> dict:
    """A worker's wire byte counters and ledger, as rows (the ``stats`` command)."""
    return {"counters": counters, "ledger": ledger}


def stats_from_result(result: dict) -> dict[str, list]:
    if not isinstance(result.get("counters"), list) or not isinstance(result.get("ledger"), list):
        raise WireError("stats: the reply must hold 'counters' and 'ledger' rows")
    return {"counters": result["counters"], "ledger": result["ledger"]}


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer of a session listens, the tag of the researcher's session there, and where its TCP data
    plane listens (None: it has none; its peer links go over gRPC)."""

    address: str
    tag: str
    data: str | None = None


def peers_to_args(peers: Mapping[str, PeerAddress]) -> dict:
    """The peers of a model: ``{name: {"address": HOST:PORT, "session": TAG[, "data": HOST:PORT]}}``
    (the ``peers`` command)."""
    return {
        "peers": {
            name: {"address": p.address, "session": p.tag, **({"data": p.data} if p.data else {})}
            for name, p in peers.items()
        }
    }


def peers_from_args(args: dict, *, default_tag: str) -> dict[str, PeerAddress]:
    """Every peer the command names; a missing ``session`` (or a plain ``HOST:PORT``) is ``default_tag``."""
    peers = arg(args, "peers", dict)
    if len(peers) > MAX_PEERS:
        raise WireError(f"a session may name at most {MAX_PEERS} peers, got {len(peers)}")
    found: dict[str, PeerAddress] = {}
    for peer, where in peers.items():
        check_party_name(peer)
        data = None
        if isinstance(where, dict) and set(where) <= {"address", "session", "data"}:
            address, tag = where.get("address"), where.get("session", default_tag)
            if "data" in where:
                data = check_data_address(where["data"], f"peer {peer!r}'s data-plane address")
        else:
            address, tag = where, default_tag
        if not isinstance(address, str) or ":" not in address or len(address) > 256:
            raise WireError(f"peer {peer!r} has a malformed address {address!r}")
        found[peer] = PeerAddress(address, check_session_tag(tag), data)
    return found


def dataset_stats_to_result(stats: DatasetStats) -> dict:
    """A dataset's public facts as JSON (the ``dataset_stats`` reply)."""
    return {
        "name": stats.name,
        "size": stats.size,
        "feature_shape": list(stats.feature_shape) if stats.feature_shape is not None else None,
        "num_labels": stats.num_labels,
        "label_max": stats.label_max,
        "label_min": stats.label_min,
        "label_dtype": stats.label_dtype,
        "label_shape": list(stats.label_shape) if stats.label_shape is not None else None,
        "label_integral": stats.label_integral,
        "feature_dtype": stats.feature_dtype,
        **(
            {"named_features": [[k, list(shape), dtype] for k, shape, dtype in stats.named_features]}
            if stats.named_features is not None
            else {}
        ),
    }


def _named_features(raw: object) -> tuple[tuple[str, tuple[int, ...], str], ...] | None:
    """The ``named_features`` of a ``dataset_stats`` reply, checked (a bounded list of [name, shape, dtype])."""
    if raw is None:
        return None
    bad = WireError(
        f"dataset_stats: named_features must be a list of 1..{MAX_FEATURE_NAMES} [name, per-sample shape, dtype] "
        f"(names of 1..{MAX_FEATURE_NAME} characters, no repeats; at most {MAX_PROBE_NDIM} dimensions; known dtypes)"
    )
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_FEATURE_NAMES:
        raise bad
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise bad
        name, shape, dtype = item
        if not (isinstance(name, str) and 0 < len(name) <= MAX_FEATURE_NAME and isinstance(dtype, str)):
            raise bad
        if dtype not in DTYPE_NAMES or not isinstance(shape, list) or len(shape) > MAX_PROBE_NDIM:
            raise bad
        if not all(type(d) is int and 0 <= d <= MAX_PROBE_DIM for d in shape):
            raise bad
        out.append((name, tuple(shape), dtype))
    if len({n for n, _, _ in out}) != len(out):
        raise bad
    return tuple(out)


def dataset_stats_from_result(d: dict) -> DatasetStats:
    """The inverse of :func:`dataset_stats_to_result` (fields a worker does not send are ``None``)."""

    def shape(v: object) -> tuple[int, ...] | None:
        return tuple(int(x) for x in v) if v is not None else None

    feature_dtype = d.get("feature_dtype") if isinstance(d, dict) else None
    if feature_dtype is not None and not (isinstance(feature_dtype, str) and feature_dtype in DTYPE_NAMES):
        raise WireError(f"dataset_stats: unknown feature dtype {feature_dtype!r}; known: {sorted(DTYPE_NAMES)}")
    named = _named_features(d.get("named_features")) if isinstance(d, dict) else None
    try:
        return DatasetStats(
            d["name"],
            int(d["size"]),
            shape(d.get("feature_shape")),
            d.get("num_labels"),
            d.get("label_max"),
            d.get("label_min"),
            d.get("label_dtype"),
            shape(d.get("label_shape")),
            d.get("label_integral"),
            feature_dtype,
            named,
        )
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise WireError("dataset_stats: the reply must hold a dataset's name, size and shapes") from None


def shape_to_json(shape: ProbeShape) -> dict:
    """``{"shape": [...]}`` for one value, ``{"values": [{"shape": [...], "dtype": "float32"}, ...]}`` for several."""
    if is_several(shape):
        return {"values": [{"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for v in shape]}
    return {"shape": list(shape)}


def _is_dims(shape: object, *, positive: bool) -> bool:
    return isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and (0 < d <= MAX_PROBE_DIM if positive else d >= 0)
        for d in shape
    )


def shape_from_json(d: dict, what: str, *, probe: bool) -> ProbeShape:
    """The inverse of :func:`shape_to_json`; ``probe``: the small positive shapes a probe may ask for."""
    if "values" not in d:
        shape = d.get("shape")
        if not _is_dims(shape, positive=probe) or (probe and not 0 < len(shape) <= MAX_PROBE_NDIM):
            raise WireError(f"{what}: {shape!r} is not a {'small positive ' if probe else ''}shape")
        if probe and math.prod(shape) > MAX_PROBE_ELEMENTS:
            raise WireError(f"{what}: shape {shape!r} has too many elements")
        return tuple(shape)
    values = d["values"]
    if not isinstance(values, list) or not 0 < len(values) <= MAX_VALUES:
        raise WireError(f"{what}: 'values' must describe 1..{MAX_VALUES} values")
    out = []
    for v in values:
        if not isinstance(v, dict) or set(v) != {"shape", "dtype"}:
            raise WireError(f"{what}: each value must be an object {{shape, dtype}}")
        shape, dtype = v["shape"], DTYPE_NAMES.get(v["dtype"]) if isinstance(v["dtype"], str) else None
        if dtype is None:
            raise WireError(f"{what}: unknown dtype {v['dtype']!r}; known: {sorted(DTYPE_NAMES)}")
        if not _is_dims(shape, positive=probe) or len(shape) > MAX_PROBE_NDIM:
            raise WireError(f"{what}: {shape!r} is not a {'small positive ' if probe else ''}shape")
        out.append(ValueShape(tuple(shape), dtype))
    if probe and sum(math.prod(v.shape) for v in out) > MAX_PROBE_ELEMENTS:
        raise WireError(f"{what}: the values have too many elements")
    return tuple(out)
