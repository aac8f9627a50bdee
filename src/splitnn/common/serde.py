"""Every remote operation's arguments and results, each message's two directions side by side.

The researcher's client (:mod:`splitnn.client`) encodes what a worker's server
(:mod:`splitnn.server`) decodes, and the other way round; both import this module, so the
two ends cannot drift apart (Flower's ``common/serde.py`` is the model: matching
``*_to_*`` / ``*_from_*`` pairs, each with a round-trip test in ``tests/test_serde.py``).

A command is an op name, JSON arguments and binary blobs (``wire/proto/splitnn.proto``):
``*_to_args`` / ``*_from_args`` encode and decode the arguments of a command without blobs,
``*_to_command`` / ``*_from_command`` those with blobs (``(args, blobs)``), and
``*_to_result`` / ``*_from_result`` a reply's JSON result. Blobs are tensor frames
(:mod:`splitnn.wire.tensor_codec`), safetensors state dicts (:mod:`splitnn.wire.state_codec`)
and JSON layer specs (:mod:`splitnn.wire.spec`). Decoders check everything a peer could get
wrong and raise :class:`~splitnn.errors.WireError` (:class:`~splitnn.errors.SpecError` for
specs and optimizer specs); what a decoded message may *do* at a worker (whose segment it
names, whether an index fits a dataset) is the server's to check.

A command that produces tensors names them with the ids the client chose: ``id`` (one
tensor, :func:`output_id_from_args`) or ``ids`` (one per source of a merge,
:func:`output_ids_from_args`). Tensors at other parties travel as refs
(:func:`ref_to_dict` / :func:`ref_from_dict`). Nothing here imports grpc.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from splitnn.common.messages import PROTOCOL_VERSION, check_party_name, check_session_tag
from splitnn.data.batching import BatchDraw
from splitnn.errors import ConfigurationError, WireError, WorkerError
from splitnn.transport.addresses import split_host_port
from splitnn.wire.compress import get_codec
from splitnn.wire.cut_codec import MAX_VALUES, decode_values, plain
from splitnn.wire.optim_spec import OptimizerSpec
from splitnn.wire.spec import spec_from_json, spec_to_json
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import DTYPE_CODES, decode_tensor, encode_tensor
from splitnn.workers.epoch import RUN_ID_BITS, BatchOrder, EpochPlan, EpochReport, StagePlan
from splitnn.workers.metrics import METRIC_NAMES
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef, ValueShape
from splitnn.workers.values import ProbeShape, Value, is_several

#: Largest number of sources one ``forward_merged`` may merge.
MAX_MERGE_SOURCES = 256
#: Largest number of peers one session may name.
MAX_PEERS = 256
#: The longest metric list one ``metrics`` command may ask for.
MAX_METRIC_NAMES = 16
#: Largest shape a ``probe`` may ask for: dimensions, size of one dimension, elements.
MAX_PROBE_NDIM, MAX_PROBE_DIM, MAX_PROBE_ELEMENTS = 8, 1 << 20, 1 << 26
#: Stages one epoch plan may list.
MAX_PLAN_STAGES = 255
#: Named parts one ``psi_apply`` may cut the aligned rows into.
MAX_PSI_PARTS = 64
#: The longest sample id (characters) a dataset's ids may hold on the wire.
MAX_ID_CHARS = 1024
#: dtypes by the names probes of several values use (``"float32"``, ``"int64"``, ...).
DTYPE_NAMES = {str(dt).removeprefix("torch."): dt for dt in DTYPE_CODES}
#: Most segments one ``average_states`` may average, and most it may load the average into.
MAX_AVERAGE_SEGMENTS = 1024


# ---------------------------------------------------------------------------- building blocks
def arg(args: dict, key: str, kind: type | tuple, *, optional: bool = False) -> Any:
    """Command argument ``key`` of type ``kind`` (strings <= 256 chars, ints 0..2**63-1); WireError otherwise."""
    if key not in args or args[key] is None:
        if optional:
            return None
        raise WireError(f"command argument {key!r} is missing")
    value = args[key]
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise WireError(f"command argument {key!r} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise WireError(f"command argument {key!r} has the wrong type {type(value).__name__}")
    if isinstance(value, str) and len(value) > 256:
        raise WireError(f"command argument {key!r} is too long")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**63:
        raise WireError(f"command argument {key!r} is out of range")
    return value


def blob_arg(blobs: Sequence[bytes], i: int, what: str) -> bytes:
    """Blob ``i`` of a command (``what`` names it in the error when it is missing)."""
    if i >= len(blobs):
        raise WireError(f"command is missing its {what} blob")
    return blobs[i]


def ref_to_dict(ref: TensorRef) -> dict:
    """A tensor ref as a command argument ``{owner, id}``; a fused in-process gradient cannot cross."""
    if ref.fused:
        raise WorkerError("a fused in-process gradient cannot cross the network")
    return {"owner": ref.owner, "id": ref.id}


def ref_from_dict(value: object) -> TensorRef:
    """A tensor ref ``{owner, id}`` given as an argument."""
    if not isinstance(value, dict):
        raise WireError("a tensor ref must be an object {owner, id}")
    return TensorRef(check_party_name(arg(value, "owner", str)), arg(value, "id", int))


def _optional_ref_to_dict(ref: TensorRef | None) -> dict | None:
    return ref_to_dict(ref) if ref is not None else None


def _optional_ref_from_dict(value: object) -> TensorRef | None:
    return ref_from_dict(value) if value is not None else None


def output_id_from_args(args: dict, *, optional: bool = False) -> int | None:
    """The id the researcher chose for the tensor a command produces (``id``)."""
    return arg(args, "id", int, optional=optional)


def output_ids_from_args(args: dict) -> list[int]:
    """The ids of the tensors a command produces, one per merged source (``ids``)."""
    ids = arg(args, "ids", list)
    if not 0 < len(ids) <= MAX_MERGE_SOURCES or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids
    ):
        raise WireError(f"backward_merged needs 1..{MAX_MERGE_SOURCES} tensor ids")
    return ids


def tensor_to_blob(tensor: torch.Tensor) -> bytes:
    """One tensor as a blob: a validated tensor frame (dtype, shape, raw bytes)."""
    return encode_tensor(tensor)


def tensor_from_blob(blob: bytes, *, max_bytes: int) -> torch.Tensor:
    return decode_tensor(blob, max_bytes=max_bytes)


def value_to_blob(value: Value) -> bytes:
    """A tensor as a tensor blob (:func:`tensor_to_blob`), several as one values payload
    (:mod:`splitnn.wire.cut_codec`; none of them requires a gradient at the other end)."""
    if isinstance(value, torch.Tensor):
        return tensor_to_blob(value)
    return b"".join(bytes(p) for p in plain(tuple(t.detach() if t is not None else None for t in value)).wire_parts())


def value_from_blob(blob: bytes, *, several: bool, max_bytes: int) -> Value:
    """The inverse of :func:`value_to_blob`; ``several`` says which it must be (the command's ``values``)."""
    if not several:
        return tensor_from_blob(blob, max_bytes=max_bytes)
    return decode_values(blob, 0, max_bytes=max_bytes).value


def _values_count(args: dict) -> bool:
    """Whether a command's tensor is several values (``values``: their count, 1..MAX_VALUES)."""
    count = arg(args, "values", int, optional=True)
    if count is not None and not 0 < count <= MAX_VALUES:
        raise WireError(f"'values' must count 1..{MAX_VALUES} values")
    return count is not None


def indices_to_blob(indices: torch.Tensor) -> bytes:
    """A batch's row indices as a blob: one 1-D int64 tensor."""
    return encode_tensor(indices.to(torch.int64).reshape(-1))


def indices_from_blob(blob: bytes, *, max_bytes: int) -> torch.Tensor:
    idx = decode_tensor(blob, max_bytes=max_bytes, allowed_dtypes=(torch.int64,), max_ndim=1)
    if idx.dim() != 1:
        raise WireError("batch indices must be a 1-D int64 tensor")
    return idx


def state_to_blob(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict (weights, gradients) as a blob: safetensors bytes, in the dict's key order."""
    return encode_state(dict(state))


def state_from_blob(blob: bytes, *, max_bytes: int) -> dict[str, torch.Tensor]:
    return decode_state(blob, max_bytes=max_bytes)


def segment_to_blobs(spec: dict, state: Mapping[str, torch.Tensor]) -> list[bytes]:
    """A segment as two blobs: its layer spec (JSON) and its weights (safetensors)."""
    return [spec_to_json(spec).encode(), encode_state({k: v.detach() for k, v in state.items()})]


def segment_from_blobs(blobs: Sequence[bytes], *, max_bytes: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(spec, state)`` of a segment; the spec is only parsed here (built by whoever trusts it)."""
    spec = spec_from_json(blob_arg(blobs, 0, "spec"))
    return spec, decode_state(blob_arg(blobs, 1, "state"), max_bytes=max_bytes)


def _batch_to_command(batch: BatchRef) -> tuple[dict, list[bytes]]:
    args: dict = {"dataset": batch.dataset}
    if batch.draw is not None:  # how the rows were drawn: a data holder draws them itself from it
        args["draw"] = batch.draw.to_dict()
    return args, [indices_to_blob(batch.indices)]


def draw_from_arg(value: object) -> BatchDraw:
    """A batch's :class:`~splitnn.data.batching.BatchDraw` from its wire form, or WireError."""
    if not isinstance(value, dict) or set(value) != {"seed", "epoch", "position", "batch_size", "shuffle"}:
        raise WireError("a batch draw must be an object {seed, epoch, position, batch_size, shuffle}")
    try:
        return BatchDraw(**value)
    except ConfigurationError as exc:
        raise WireError(str(exc)) from None


def _batch_from_command(args: dict, blobs: Sequence[bytes], max_bytes: int) -> BatchRef:
    name = arg(args, "dataset", str)
    draw = draw_from_arg(args["draw"]) if args.get("draw") is not None else None
    return BatchRef(name, indices_from_blob(blob_arg(blobs, 0, "indices"), max_bytes=max_bytes), draw)


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


def add_segment_to_command(
    key: str, spec: dict, state: Mapping[str, torch.Tensor], optimizer: OptimizerSpec | None, *, replace: bool
) -> tuple[dict, list[bytes]]:
    """Host a segment (its spec and weights, :func:`segment_to_blobs`) under ``key`` with ``optimizer``."""
    args = {"key": key, "optimizer": optimizer.to_dict() if optimizer is not None else None, "replace": replace}
    return args, segment_to_blobs(spec, state)


def add_segment_from_args(args: dict) -> tuple[str, OptimizerSpec | None, bool]:
    """``(key, optimizer, replace)``; the blobs are :func:`segment_from_blobs` (decoded once the key may be used)."""
    key = arg(args, "key", str)
    opt = arg(args, "optimizer", dict, optional=True)
    optimizer = OptimizerSpec.from_dict(opt) if opt is not None else None  # SpecError on insane values
    return key, optimizer, arg(args, "replace", bool, optional=True) or False


def key_to_args(key: str) -> dict:
    """The arguments of a command on one segment (``remove_segment``, ``zero_grad``, ``step``,
    ``get_grads``, ``get_state``, ``fetch_segment``)."""
    return {"key": key}


def key_from_args(args: dict) -> str:
    return arg(args, "key", str)


def add_dataset_to_command(
    name: str,
    parts: Mapping[str, torch.Tensor],
    *,
    replace: bool,
    ids: Sequence[str] | None = None,
    allow_nonfinite: bool = False,
) -> tuple[dict, list[bytes]]:
    """Hold tensors (``features`` and/or ``labels``) under ``name``: one tensor blob per part, then the
    samples' ``ids`` (for private set intersection) as one more part (:func:`ids_to_blob`); NaN or infinite
    features only with ``allow_nonfinite``."""
    blobs = [tensor_to_blob(t) for t in parts.values()]
    names = list(parts)
    if ids is not None:
        names.append("ids")
        blobs.append(ids_to_blob(ids))
    args = {"name": name, "parts": names, "replace": replace}
    if allow_nonfinite:
        args["allow_nonfinite"] = True
    return args, blobs


def add_dataset_from_args(args: dict) -> tuple[str, list[str], bool]:
    """``(name, parts, replace)``; the blobs are :func:`dataset_parts_from_blobs`; whether NaN or infinite
    features are allowed is :func:`allow_nonfinite_from_args`."""
    name = arg(args, "name", str)
    replace = arg(args, "replace", bool, optional=True) or False
    parts = arg(args, "parts", list)
    if (
        not {"features", "labels"} & set(p for p in parts if isinstance(p, str))
        or any(p not in ("features", "labels", "ids") for p in parts)
        or len(parts) != len(set(parts))
    ):
        raise WireError("'parts' must list 'features' and/or 'labels' (and optionally 'ids')")
    return name, parts, replace


def allow_nonfinite_from_args(args: dict) -> bool:
    """An ``add_dataset``'s ``allow_nonfinite`` (default False: NaN or infinite features are refused)."""
    return arg(args, "allow_nonfinite", bool, optional=True) or False


def dataset_parts_from_blobs(parts: Sequence[str], blobs: Sequence[bytes], *, max_bytes: int) -> dict:
    """The parts of an ``add_dataset``, by name (``features``, ``labels``: tensors; ``ids``: strings)."""
    return {
        p: (ids_from_blob if p == "ids" else decode_tensor)(blob_arg(blobs, i, p), max_bytes=max_bytes)
        for i, p in enumerate(parts)
    }


def ids_to_blob(ids: Sequence[str]) -> bytes:
    """A dataset's sample ids as a blob: a JSON array of strings (UTF-8)."""
    return json.dumps(list(ids), ensure_ascii=False).encode("utf-8")


def ids_from_blob(blob: bytes, *, max_bytes: int) -> list[str]:
    """The sample ids of a blob (:func:`ids_to_blob`): non-empty strings of at most :data:`MAX_ID_CHARS`;
    whether they are unique and one per row is the dataset's check."""
    if len(blob) > max_bytes:
        raise WireError(f"sample ids of {len(blob)} bytes exceed the {max_bytes}-byte limit")
    try:
        ids = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("sample ids must be a JSON array of strings") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS for i in ids):
        raise WireError(f"sample ids must be a JSON array of non-empty strings of at most {MAX_ID_CHARS} characters")
    return ids


def dataset_name_to_args(name: str) -> dict:
    """The arguments of a command on one dataset (``dataset_stats``, ``psi_size``, ``psi_cancel``)."""
    return {"name": name}


def dataset_name_from_args(args: dict) -> str:
    return arg(args, "name", str)


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
    }


def dataset_stats_from_result(d: dict) -> DatasetStats:
    """The inverse of :func:`dataset_stats_to_result` (fields a worker does not send are ``None``)."""

    def shape(v: object) -> tuple[int, ...] | None:
        return tuple(int(x) for x in v) if v is not None else None

    feature_dtype = d.get("feature_dtype") if isinstance(d, dict) else None
    if feature_dtype is not None and not (isinstance(feature_dtype, str) and feature_dtype in DTYPE_NAMES):
        raise WireError(f"dataset_stats: unknown feature dtype {feature_dtype!r}; known: {sorted(DTYPE_NAMES)}")
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
        )
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise WireError("dataset_stats: the reply must hold a dataset's name, size and shapes") from None


def _shape_to_json(shape: ProbeShape) -> dict:
    """``{"shape": [...]}`` for one value, ``{"values": [{"shape": [...], "dtype": "float32"}, ...]}`` for several."""
    if is_several(shape):
        return {"values": [{"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for v in shape]}
    return {"shape": list(shape)}


def _is_dims(shape: object, *, positive: bool) -> bool:
    return isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and (0 < d <= MAX_PROBE_DIM if positive else d >= 0)
        for d in shape
    )


def _shape_from_json(d: dict, what: str, *, probe: bool) -> ProbeShape:
    """The inverse of :func:`_shape_to_json`; ``probe``: the small positive shapes a probe may ask for."""
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


def probe_to_args(key: str, shape: ProbeShape) -> dict:
    """Ask segment ``key``'s output shape for an input of ``shape`` (one shape, or one
    :class:`~splitnn.workers.ValueShape` per value when several values cross)."""
    return {"key": key, **_shape_to_json(shape)}


def probe_from_args(args: dict) -> tuple[str, ProbeShape]:
    return key_from_args(args), _shape_from_json(args, "probe shape", probe=True)


def shape_to_result(shape: ProbeShape) -> dict:
    """A probed output shape (the ``probe`` reply): one shape, or a shape and dtype per value."""
    return _shape_to_json(shape)


def shape_from_result(result: dict) -> ProbeShape:
    if not isinstance(result, dict):
        raise WireError("probe: the reply must hold a shape")
    return _shape_from_json(result, "probe reply", probe=False)


def set_codecs_to_args(key: str, output: str, input_grad: str) -> dict:
    """Compress what segment ``key`` sends: its output activations with ``output``, its input's gradient with
    ``input_grad`` (codec names, :func:`splitnn.wire.compress.get_codec`)."""
    return {"key": key, "output": output, "input_grad": input_grad}


def set_codecs_from_args(args: dict) -> tuple[str, str, str]:
    """``(key, output, input_grad)``, each codec a name :func:`~splitnn.wire.compress.get_codec` knows."""
    codecs = []
    for name in ("output", "input_grad"):
        spec = arg(args, name, str)
        try:
            codecs.append(get_codec(spec).spec)
        except ConfigurationError as exc:
            raise WireError(f"set_codecs: {name}: {exc}") from None
    return key_from_args(args), codecs[0], codecs[1]


# ----------------------------------------------------------------------------- the training step
def put_to_command(tid: int, kind: str, value: Value) -> tuple[dict, list[bytes]]:
    """Put a tensor the researcher gives (``kind``: ``features``) at the worker as tensor ``tid``; a tuple
    (a model that takes several inputs) travels as one values blob, ``values`` counting them."""
    args: dict = {"id": tid, "kind": kind}
    if not isinstance(value, torch.Tensor):
        args["values"] = len(value)
    return args, [value_to_blob(value)]


def put_from_args(args: dict) -> tuple[int, str, bool]:
    """``(tid, kind, several)``; the value is ``value_from_blob(blobs[0], several=several)`` (decoded once the
    id is announced)."""
    return output_id_from_args(args), arg(args, "kind", str), _values_count(args)


def forward_to_command(key: str, source: TensorRef | BatchRef, tid: int, *, train: bool) -> tuple[dict, list[bytes]]:
    """Run segment ``key`` on a local batch or another party's activation; the output is tensor ``tid``."""
    if isinstance(source, BatchRef):
        src, blobs = _batch_to_command(source)
    else:
        src, blobs = ref_to_dict(source), []
    return {"key": key, "train": train, "id": tid, "src": src}, blobs


def forward_from_command(
    args: dict, blobs: Sequence[bytes], *, max_bytes: int
) -> tuple[str, TensorRef | BatchRef, bool]:
    """``(key, source, train)`` (the output's id: :func:`output_id_from_args`)."""
    key, train = key_from_args(args), arg(args, "train", bool)
    src = arg(args, "src", dict)
    source = _batch_from_command(src, blobs, max_bytes) if "dataset" in src else ref_from_dict(src)
    return key, source, train


def loss_to_command(
    output: TensorRef, target: BatchRef, loss: str, *, train: bool, keep: str | None = None
) -> tuple[dict, list[bytes]]:
    """Score ``output`` against the labels of ``target``; ``keep`` names an evaluation kept for its metrics."""
    args, blobs = _batch_to_command(target)
    args.update({"output": ref_to_dict(output), "loss": loss, "train": train})
    if keep is not None:
        args["keep"] = keep
    return args, blobs


class LossCommand(NamedTuple):
    output: TensorRef
    target: BatchRef
    loss: str
    train: bool
    keep: str | None


def loss_from_command(args: dict, blobs: Sequence[bytes], *, max_bytes: int) -> LossCommand:
    output = ref_from_dict(arg(args, "output", dict))
    loss, train = arg(args, "loss", str), arg(args, "train", bool)
    keep = arg(args, "keep", str, optional=True)
    return LossCommand(output, _batch_from_command(args, blobs, max_bytes), loss, train, keep)


def loss_stats_to_result(stats: LossStats) -> dict:
    """One batch's loss, correct count and size (the ``loss`` reply)."""
    return {"loss": stats.loss, "correct": stats.correct, "count": stats.count}


def loss_stats_from_result(result: dict) -> LossStats:
    try:
        return LossStats(float(result["loss"]), int(result["correct"]), int(result["count"]))
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise WireError("loss: the reply must hold 'loss', 'correct' and 'count'") from None


def metrics_to_args(keep: str, names: Sequence[str]) -> dict:
    """Metrics ``names`` over the evaluation kept as ``keep`` (the ``metrics`` command)."""
    return {"keep": keep, "names": list(names)}


def metrics_from_args(args: dict) -> tuple[str, tuple[str, ...]]:
    """``(keep, names)`` of a ``metrics`` command; WireError on anything malformed."""
    keep, names = args.get("keep"), args.get("names")
    if not isinstance(keep, str) or not 0 < len(keep) <= 256:
        raise WireError("metrics: 'keep' must be the id of a kept evaluation")
    if (
        not isinstance(names, list)
        or not 0 < len(names) <= MAX_METRIC_NAMES
        or not all(isinstance(n, str) and n in METRIC_NAMES for n in names)
    ):
        raise WireError(f"metrics: 'names' must list 1..{MAX_METRIC_NAMES} of {METRIC_NAMES}")
    return keep, tuple(names)


def metrics_to_result(values: Mapping[str, float]) -> dict:
    """Result of the ``metrics`` command (JSON numbers; NaN travels as JSON's NaN)."""
    return {"values": {k: float(v) for k, v in values.items()}}


def metrics_from_result(result: dict, names: Sequence[str]) -> dict[str, float]:
    """The metric values of a ``metrics`` reply, checked to be exactly ``names``."""
    values = result.get("values")
    if (
        not isinstance(values, dict)
        or set(values) != set(names)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
    ):
        raise WireError(f"malformed metrics reply: expected values for {list(names)}")
    return {name: float(values[name]) for name in names}


def backward_to_args(key: str, grad: TensorRef | None, tid: int | None) -> dict:
    """Back-propagate through ``key`` from ``grad`` (None: the kept loss); the input's gradient is ``tid``
    (None: the input was local data, nothing flows back)."""
    return {"key": key, "grad": _optional_ref_to_dict(grad), "id": tid}


def backward_from_args(args: dict) -> tuple[str, TensorRef | None]:
    """``(key, grad)`` (the gradient's id, optional: :func:`output_id_from_args`)."""
    return key_from_args(args), _optional_ref_from_dict(args.get("grad"))


def forward_merged_to_args(key: str, sources: Sequence[TensorRef], merge: str, tid: int, *, train: bool) -> dict:
    """Run segment ``key`` on the merge of several parties' activations; the output is tensor ``tid``."""
    return {"key": key, "train": train, "id": tid, "merge": merge, "srcs": [ref_to_dict(s) for s in sources]}


def forward_merged_from_args(args: dict) -> tuple[str, list[TensorRef], str, bool]:
    """``(key, sources, merge, train)`` (the output's id: :func:`output_id_from_args`)."""
    key, train, merge = key_from_args(args), arg(args, "train", bool), arg(args, "merge", str)
    srcs = arg(args, "srcs", list)
    if not 0 < len(srcs) <= MAX_MERGE_SOURCES:
        raise WireError(f"forward_merged takes 1..{MAX_MERGE_SOURCES} sources, got {len(srcs)}")
    return key, [ref_from_dict(s) for s in srcs], merge, train


def backward_merged_to_args(key: str, grad: TensorRef | None, tids: Sequence[int]) -> dict:
    """Back-propagate through ``key`` and its merge; the gradient of source ``i`` is tensor ``tids[i]``."""
    return {"key": key, "grad": _optional_ref_to_dict(grad), "ids": list(tids)}


def backward_merged_from_args(args: dict) -> tuple[str, TensorRef | None]:
    """``(key, grad)`` (the gradients' ids: :func:`output_ids_from_args`)."""
    return key_from_args(args), _optional_ref_from_dict(args.get("grad"))


# --------------------------------------------------------------------------- weights and outputs
def export_state_to_args(key: str, tid: int) -> dict:
    """Snapshot segment ``key``'s weights as tensor ``tid``, for one peer to pull (``load_state``)."""
    return {"key": key, "id": tid}


def export_state_from_args(args: dict) -> str:
    """The segment key (the snapshot's id: :func:`output_id_from_args`)."""
    return key_from_args(args)


def load_state_to_args(key: str, src: TensorRef) -> dict:
    """Load the weights another party exported as ``src`` into segment ``key``."""
    return {"key": key, "src": ref_to_dict(src)}


def load_state_from_args(args: dict) -> tuple[str, TensorRef]:
    return key_from_args(args), ref_from_dict(arg(args, "src", dict))


def average_states_to_args(keys: Sequence[str], weights: Sequence[float], into: Sequence[str]) -> dict:
    """Load ``sum_k weights[k] * state(keys[k]) / sum(weights)`` into every segment of ``into`` (all hosted by
    the worker; nothing travels but these names and numbers)."""
    return {"keys": list(keys), "weights": [float(w) for w in weights], "into": list(into)}


def average_states_from_args(args: dict) -> tuple[list[str], list[float], list[str]]:
    """``(keys, weights, into)`` of an ``average_states`` command: 1..MAX_AVERAGE_SEGMENTS segment keys each,
    one finite weight > 0 per source; WireError on anything else."""

    def keys_of(field: str) -> list[str]:
        value = arg(args, field, list)
        if not 0 < len(value) <= MAX_AVERAGE_SEGMENTS or not all(
            isinstance(k, str) and 0 < len(k) <= 256 for k in value
        ):
            raise WireError(f"average_states: {field!r} must list 1..{MAX_AVERAGE_SEGMENTS} segment keys")
        return value

    keys, into, weights = keys_of("keys"), keys_of("into"), arg(args, "weights", list)
    if len(weights) != len(keys) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights
    ):
        raise WireError("average_states: 'weights' must hold one finite number > 0 per source segment")
    return keys, [float(w) for w in weights], into


def set_state_to_command(key: str, state: Mapping[str, torch.Tensor]) -> tuple[dict, list[bytes]]:
    """Load ``state`` (sent by the researcher) into segment ``key``."""
    return key_to_args(key), [state_to_blob(state)]


def set_state_from_command(args: dict, blobs: Sequence[bytes], *, max_bytes: int) -> tuple[str, dict]:
    state = state_from_blob(blob_arg(blobs, 0, "state"), max_bytes=max_bytes)
    return key_from_args(args), state


def fetch_to_args(ref: TensorRef, kind: str) -> dict:
    """Hand tensor ``ref`` to the researcher, recorded as ``kind`` (the reply: :func:`tensor_to_blob`)."""
    return {"ref": ref_to_dict(ref), "kind": kind}


def fetch_from_args(args: dict) -> tuple[TensorRef, str]:
    return ref_from_dict(arg(args, "ref", dict)), arg(args, "kind", str)


def fetch_to_result(value: Value) -> tuple[dict, list[bytes]]:
    """The fetched tensor (or tuple of them: ``values`` counts them) as the ``fetch`` reply."""
    return ({} if isinstance(value, torch.Tensor) else {"values": len(value)}), [value_to_blob(value)]


def fetch_from_result(result: dict, blobs: Sequence[bytes], *, max_bytes: int) -> Value:
    several = _values_count(result)
    return value_from_blob(blob_arg(blobs, 0, "tensor"), several=several, max_bytes=max_bytes)


# --------------------------------------------------------------------- private set intersection
# The rounds are splitnn.training.psi's; a message is a 1-D uint8 tensor that its receiver pulls from
# its sender over their peer stream (kind ``psi``), never through the researcher.
def psi_request_to_args(session: str, dataset: str, tid: int) -> dict:
    """Open PSI ``session`` as the client over ``dataset``'s candidate ids; the request is tensor ``tid``."""
    return {"session": session, "dataset": dataset, "id": tid}


def psi_request_from_args(args: dict) -> tuple[str, str]:
    """``(session, dataset)`` (the request's id: :func:`output_id_from_args`)."""
    return arg(args, "session", str), arg(args, "dataset", str)


def psi_reply_to_args(dataset: str, request: TensorRef, tid: int) -> dict:
    """Answer the client's ``request`` as the PSI server over ``dataset``'s candidate ids; the reply is tensor
    ``tid``."""
    return {"dataset": dataset, "src": ref_to_dict(request), "id": tid}


def psi_reply_from_args(args: dict) -> tuple[str, TensorRef]:
    """``(dataset, request)`` (the reply's id: :func:`output_id_from_args`)."""
    return arg(args, "dataset", str), ref_from_dict(arg(args, "src", dict))


def psi_finish_to_args(session: str, reply: TensorRef) -> dict:
    """Narrow the candidates of PSI ``session``'s dataset with the server's ``reply``."""
    return {"session": session, "src": ref_to_dict(reply)}


def psi_finish_from_args(args: dict) -> tuple[str, TensorRef]:
    return arg(args, "session", str), ref_from_dict(arg(args, "src", dict))


def psi_size_to_result(size: int) -> dict:
    """How many candidate rows a dataset has (the ``psi_size`` reply): all that the researcher learns."""
    return {"size": size}


def psi_size_from_result(result: dict) -> int:
    size = result.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise WireError("psi_size: the reply must hold a non-negative integer 'size'")
    return size


def psi_apply_to_command(dataset: str, parts: Mapping[str, torch.Tensor]) -> tuple[dict, list[bytes]]:
    """Keep the intersected rows of ``dataset``; hold each of ``parts`` (name -> positions in the aligned
    order) as a dataset too: the names in the arguments, one indices blob per part."""
    return {"dataset": dataset, "parts": list(parts)}, [indices_to_blob(idx) for idx in parts.values()]


def psi_apply_from_command(
    args: dict, blobs: Sequence[bytes], *, max_bytes: int
) -> tuple[str, dict[str, torch.Tensor]]:
    """``(dataset, parts)``; whether the positions fit the intersection is the worker's check."""
    dataset = arg(args, "dataset", str)
    names = arg(args, "parts", list)
    if (
        len(names) > MAX_PSI_PARTS
        or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names)
        or len(set(names)) != len(names)
    ):
        raise WireError(f"psi_apply: 'parts' must list at most {MAX_PSI_PARTS} distinct dataset names")
    if len(blobs) != len(names):
        raise WireError(f"psi_apply: {len(blobs)} index blobs for {len(names)} parts")
    return dataset, {n: indices_from_blob(b, max_bytes=max_bytes) for n, b in zip(names, blobs)}


# ------------------------------------------------------------------------------- shipped epochs
def epoch_plan_to_command(plan: EpochPlan) -> tuple[dict, list[bytes]]:
    """A worker's part of a training epoch (the ``run_epoch`` command): explicit batches travel as two
    blobs, every index and each batch's size."""
    args = {
        "run": plan.run_id,
        "dataset": plan.dataset,
        "loss": plan.loss,
        "stages": [{"index": s.index, "key": s.key, "prev": s.prev, "next": s.next} for s in plan.stages],
        "progress_interval": plan.progress_interval,
        "order": plan.order.to_dict() if plan.order is not None else None,
        "chain": list(plan.chain) if plan.chain is not None else None,
        "pipeline": plan.pipeline,
        "prediction": plan.prediction,
    }
    blobs: list[bytes] = []
    if plan.indices is not None:
        flat = torch.cat([i.to(torch.int64).reshape(-1) for i in plan.indices])
        sizes = torch.tensor([i.numel() for i in plan.indices], dtype=torch.int64)
        blobs = [encode_tensor(flat), encode_tensor(sizes)]
    return args, blobs


def epoch_plan_from_command(args: dict, blobs: Sequence[bytes], *, worker: str, max_bytes: int) -> EpochPlan:
    """The plan of worker ``worker``, checked for consistency (stages in order, consecutive where they
    feed each other at ``worker``); whether the worker hosts its segments and data is the server's to check."""
    run_id = args.get("run")
    if not isinstance(run_id, int) or isinstance(run_id, bool) or not 0 < run_id < 1 << RUN_ID_BITS:
        raise WireError("epoch plan: 'run' must be a small positive integer")
    dataset, loss = args.get("dataset"), args.get("loss")
    if not isinstance(dataset, str) or not 0 < len(dataset) <= 256:
        raise WireError("epoch plan: 'dataset' must be a dataset name")
    if not isinstance(loss, str):
        raise WireError("epoch plan: 'loss' must be a loss name")
    interval = args.get("progress_interval", 0.05)
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0 <= interval <= 3600:
        raise WireError("epoch plan: 'progress_interval' must be 0..3600 seconds")
    stages = _stages_from_args(args.get("stages"), worker)
    order = indices = None
    if args.get("order") is not None:
        order = BatchOrder.from_dict(args["order"])
    else:
        indices = _explicit_batches(blobs, max_bytes)
    # the chain of parties (the schedule is built from it) and the batches in flight; older plans name neither
    chain, pipeline = args.get("chain"), args.get("pipeline", 1)
    if chain is not None and (
        not isinstance(chain, list)
        or not 0 < len(chain) <= MAX_PLAN_STAGES
        or not all(isinstance(p, str) for p in chain)
    ):
        raise WireError("epoch plan: 'chain' must be a list of party names, one per stage")
    if not isinstance(pipeline, int) or isinstance(pipeline, bool):
        raise WireError("epoch plan: 'pipeline' must be an integer")
    prediction = args.get("prediction")
    if prediction is not None and (isinstance(prediction, bool) or not isinstance(prediction, (int, float))):
        raise WireError("epoch plan: 'prediction' must be a number or null")
    try:
        plan = EpochPlan(
            run_id,
            dataset,
            loss,
            stages,
            order=order,
            indices=indices,
            progress_interval=float(interval),
            chain=tuple(chain) if chain is not None else None,
            pipeline=pipeline,
            prediction=float(prediction) if prediction is not None else None,
        )
    except ConfigurationError as exc:
        raise WireError(f"epoch plan: {exc}") from None
    if plan.chain is not None and {i for i, p in enumerate(plan.chain) if p == worker} != {st.index for st in stages}:
        raise WireError(f"epoch plan: the chain gives {worker!r} other stages than the plan's")
    return plan


def _party(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise WireError(f"epoch plan: {what} must be a party name or null")
    return value


def _stages_from_args(raw_stages: object, me: str) -> tuple[StagePlan, ...]:
    """The plan's stages, consecutive where they feed each other at worker ``me``."""
    if not isinstance(raw_stages, list) or not 0 < len(raw_stages) <= MAX_PLAN_STAGES:
        raise WireError("epoch plan: 'stages' must be a non-empty list")
    stages: list[StagePlan] = []
    for s in raw_stages:
        if not isinstance(s, dict) or set(s) != {"index", "key", "prev", "next"}:
            raise WireError("epoch plan: each stage must be an object {index, key, prev, next}")
        index, key = s["index"], s["key"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 255:
            raise WireError("epoch plan: a stage index must be 0..254")
        if not isinstance(key, str) or not key:
            raise WireError("epoch plan: a stage key must be a string")
        st = StagePlan(index, key, _party(s["prev"], "prev"), _party(s["next"], "next"))
        if (st.prev is None) != (index == 0):
            raise WireError("epoch plan: exactly the first stage (index 0) has no previous party")
        if stages and index <= stages[-1].index:
            raise WireError("epoch plan: stage indices must increase")
        if st.prev == me and not (stages and stages[-1].index == index - 1 and stages[-1].next == me):
            raise WireError(f"epoch plan: stage {index} is fed by this worker but stage {index - 1} is not here")
        if stages and stages[-1].next == me and not (stages[-1].index == index - 1 and st.prev == me):
            raise WireError(
                f"epoch plan: stage {stages[-1].index} feeds this worker but stage "
                f"{stages[-1].index + 1} is not next here"
            )
        if stages and stages[-1].next is None:
            raise WireError("epoch plan: the last segment must be the last stage of the plan")
        stages.append(st)
    if stages[-1].next == me:
        raise WireError(f"epoch plan: stage {stages[-1].index} feeds this worker but the next stage is missing")
    return tuple(stages)


def _explicit_batches(blobs: Sequence[bytes], max_bytes: int) -> tuple[torch.Tensor, ...]:
    if len(blobs) != 2:
        raise WireError("epoch plan: give either 'order' or two blobs (all indices, batch sizes)")
    flat, sizes = (decode_tensor(b, max_bytes=max_bytes, allowed_dtypes=(torch.int64,), max_ndim=1) for b in blobs)
    if flat.dim() != 1 or sizes.dim() != 1 or not sizes.numel():
        raise WireError("epoch plan: indices and batch sizes must be non-empty 1-D int64 tensors")
    if int(sizes.min()) < 1 or int(sizes.sum()) != flat.numel():
        raise WireError("epoch plan: batch sizes must be positive and add up to the number of indices")
    return tuple(torch.split(flat, sizes.tolist()))


def losses_to_result(losses: Sequence[LossStats]) -> dict:
    """The label holder's per-batch losses of a shipped epoch (a progress reply; Python floats
    round-trip exactly through JSON)."""
    return {"loss": [s.loss for s in losses], "count": [s.count for s in losses]}


def losses_from_result(d: dict) -> list[LossStats]:
    loss, count = d.get("loss", []), d.get("count", [])
    if not (isinstance(loss, list) and isinstance(count, list) and len(loss) == len(count)):
        raise WireError("malformed progress report")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in loss) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in count
    ):
        raise WireError("malformed loss in a progress report")
    return [LossStats(float(x), -1, int(c)) for x, c in zip(loss, count)]


def epoch_report_to_result(batches: int) -> dict:
    """A worker's final reply to ``run_epoch``: how many batches it ran."""
    return {"batches": batches}


def epoch_report_from_result(result: dict, worker: str) -> EpochReport:
    batches = result.get("batches", 0)
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 0:
        raise WireError("run_epoch: the final reply must count the batches run")
    return EpochReport(worker, batches)


# ------------------------------------------------------------------------------------ checkpoints
#: Most segments one checkpoint command may name.
MAX_CHECKPOINT_SEGMENTS = 1024
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CheckpointCommand(NamedTuple):
    """A party's checkpoint to write (``save_checkpoint``) or load (``load_checkpoint``): the job's id,
    the step, the segments by label (label -> key), the researcher's note (epoch, batch: numbers)
    and, to load, the sha256 the researcher's manifest records."""

    job: str
    step: int
    segments: dict[str, str]
    note: dict[str, int]
    digest: str | None = None


def checkpoint_to_args(
    job: str,
    step: int,
    segments: Mapping[str, str],
    *,
    note: Mapping[str, int] | None = None,
    digest: str | None = None,
) -> dict:
    args = {"job": job, "step": step, "segments": dict(segments), "note": dict(note or {})}
    if digest is not None:
        args["digest"] = digest
    return args


def _job(args: dict) -> str:
    job = arg(args, "job", str)
    if not 16 <= len(job) <= 128 or not set(job) <= _LABEL_CHARS - {"."}:
        raise WireError("a checkpoint job id is 16-128 characters from [A-Za-z0-9_-]")
    return job


def checkpoint_from_args(args: dict) -> CheckpointCommand:
    segments = arg(args, "segments", dict)
    if not 0 < len(segments) <= MAX_CHECKPOINT_SEGMENTS:
        raise WireError(f"a checkpoint names 1..{MAX_CHECKPOINT_SEGMENTS} segments")
    for label, key in segments.items():
        if not 0 < len(label) <= 64 or not set(label) <= _LABEL_CHARS:
            raise WireError(f"segment label {label[:70]!r} is not 1-64 characters from [A-Za-z0-9_.-]")
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise WireError(f"segment {label!r}: its key must be a string")
    note = arg(args, "note", dict, optional=True) or {}
    if len(note) > 16 or not all(isinstance(k, str) and len(k) <= 32 for k in note):
        raise WireError("a checkpoint note holds at most 16 short names")
    for k in note:
        arg(note, k, int)
    digest = arg(args, "digest", str, optional=True)
    if digest is not None and (len(digest) != 64 or not set(digest) <= set("0123456789abcdef")):
        raise WireError("a checkpoint digest is 64 lower-case hex digits (sha256)")
    return CheckpointCommand(_job(args), arg(args, "step", int), dict(segments), dict(note), digest)


def checkpoint_steps_to_args(job: str) -> dict:
    """Which steps of job ``job`` a party holds checkpoints of (``checkpoint_steps``)."""
    return {"job": job}


def checkpoint_steps_from_args(args: dict) -> str:
    return _job(args)


def steps_to_result(steps: Sequence[int]) -> dict:
    return {"steps": [int(s) for s in steps]}


def steps_from_result(result: dict) -> list[int]:
    steps = result.get("steps")
    if not isinstance(steps, list) or len(steps) > 1 << 20:
        raise WireError("checkpoint_steps: the reply must list steps")
    for s in steps:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise WireError("checkpoint_steps: a step is a non-negative integer")
    return sorted(steps)


def party_checkpoint_to_result(info: Mapping[str, object]) -> dict:
    """A checkpoint a party wrote or loaded: ``{"step", "digest", "bytes"}``."""
    return {"step": info["step"], "digest": info["digest"], "bytes": info["bytes"]}


def party_checkpoint_from_result(result: dict) -> dict:
    step, nbytes = arg(result, "step", int), arg(result, "bytes", int)
    digest = arg(result, "digest", str)
    if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
        raise WireError("a checkpoint digest is 64 lower-case hex digits (sha256)")
    return {"step": step, "digest": digest, "bytes": nbytes}


# ------------------------------------------------------------------------------------ policy
def neighbours_to_args(names: Sequence[str]) -> dict:
    """The parties adjacent to this one in a model (``neighbours``): the peers its tensors may go to."""
    return {"neighbours": list(names)}


def neighbours_from_args(args: dict) -> list[str]:
    names = arg(args, "neighbours", list)
    if len(names) > MAX_PEERS:
        raise WireError(f"a model names at most {MAX_PEERS} neighbours of a party")
    return [check_party_name(n) for n in names]
