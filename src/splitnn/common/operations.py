"""The table of remote operations: each declared once, here.

From a declaration (:class:`~splitnn.common.operation.Operation`) follow the researcher's call
(:class:`~splitnn.client.RemoteWorker` generates a method for it, or calls it from a method of its
own), the encoding and checked decoding of its arguments and result, and the party's dispatch
(:mod:`splitnn.server.commands` decodes, checks the segment keys and dataset names it names
belong to the caller's session, then calls the engine method ``serve``, or a hand-written handler).
Adding an operation: declare it here, give the engine its capability.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitnn.common.operation import Operation, table
from splitnn.common.schema import (
    Batch,
    Bool,
    Custom,
    DatasetName,
    DatasetParts,
    Float,
    Int,
    Key,
    ListOf,
    LossName,
    NamedIndices,
    Party,
    RawBlob,
    Ref,
    Source,
    SpecBlob,
    StateBlob,
    Str,
    TensorBlob,
    ValueBlob,
)
from splitnn.common.serde import (
    MAX_AVERAGE_SEGMENTS,
    MAX_MERGE_SOURCES,
    MAX_METRIC_NAMES,
    MAX_PEERS,
    MAX_PSI_PARTS,
    dataset_stats_from_result,
    dataset_stats_to_result,
    loss_stats_from_result,
    loss_stats_to_result,
    shape_from_json,
    shape_to_json,
)
from splitnn.errors import ConfigurationError, WireError
from splitnn.wire.compress import get_codec
from splitnn.wire.optim_spec import OptimizerSpec
from splitnn.workers.metrics import METRIC_NAMES
from splitnn.workers.precision import AUTOCAST_DTYPES

#: Characters of a checkpoint job id (16-128 of them).
JOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
#: Most steps a ``checkpoint_steps`` reply may list.
MAX_STEPS = 1 << 20
#: Most segments one checkpoint command may name.
MAX_CHECKPOINT_SEGMENTS = 1024
#: Most batches one gradient accumulation may divide a loss over.
MAX_ACCUMULATE = 1 << 16
#: Most frozen parameters one ``add_segment`` may name.
MAX_FROZEN = 1 << 16
#: Characters of a checkpoint's segment label (1-64 of them).
LABEL_CHARS = JOB_CHARS | {"."}
HEX = frozenset("0123456789abcdef")


def _codec(spec: object) -> str:
    if not isinstance(spec, str):
        raise WireError("must be a codec name")
    try:
        return get_codec(spec).spec
    except ConfigurationError as exc:
        raise WireError(str(exc)) from None


def _metric_values(values: object) -> dict[str, float]:
    if not isinstance(values, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()
    ):
        raise WireError("must map metric names to numbers")
    return {k: float(v) for k, v in values.items()}


def _metrics_asked(values: dict[str, float], args: dict) -> dict[str, float]:
    names = list(args.get("names", ()))
    if set(values) != set(names):
        raise WireError(f"malformed metrics reply: expected values for {names}")
    return {n: values[n] for n in names}


def _one_weight_per_source(args: dict) -> None:
    if len(args["weights"]) != len(args["keys"]):
        raise WireError("average_states: 'weights' must hold one finite number > 0 per source segment")


def _probe_shape(value: object):
    if not isinstance(value, dict):
        raise WireError("must be an object {shape} or {values}")
    return shape_from_json(value, "probe shape", probe=True)


def _output_shape(value: object):
    if not isinstance(value, dict):
        raise WireError("must be an object {shape} or {values}")
    return shape_from_json(value, "probe reply", probe=False)


def _optimizer(value: object) -> OptimizerSpec:
    if not isinstance(value, dict):
        raise WireError("must be an optimizer spec {name, ...}")
    return OptimizerSpec.from_dict(value)  # SpecError on insane values


def _job(name: str = "job") -> Str:
    return Str(name, min_len=16, max_len=128, chars=JOB_CHARS)


def _checkpoint_segments(segments: object) -> dict[str, str]:
    """A checkpoint's segments, label -> key (the server checks the keys are the session's)."""
    if not isinstance(segments, dict) or not 0 < len(segments) <= MAX_CHECKPOINT_SEGMENTS:
        raise WireError(f"must name 1..{MAX_CHECKPOINT_SEGMENTS} segments")
    for label, key in segments.items():
        if not 0 < len(label) <= 64 or not set(label) <= LABEL_CHARS:
            raise WireError(f"segment label {label[:70]!r} is not 1-64 characters from [A-Za-z0-9_.-]")
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise WireError(f"segment {label!r}: its key must be a string")
    return dict(segments)


def _checkpoint_note(note: object) -> dict[str, int]:
    if not isinstance(note, dict) or len(note) > 16 or not all(len(k) <= 32 for k in note):
        raise WireError("a checkpoint note holds at most 16 short names")
    for k, v in note.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise WireError(f"a checkpoint note's {k!r} must be a count")
    return dict(note)


def _digest(name: str, **kw) -> Str:
    """A sha256 digest: 64 lower-case hex digits."""
    return Str(name, min_len=64, max_len=64, chars=HEX, **kw)


_CHECKPOINT_ARGS = (
    _job(),
    Int("step"),
    Custom("segments", dict, _checkpoint_segments),
)
_CHECKPOINT_RESULT = (Int("step"), _digest("digest"), Int("bytes"))


OPERATIONS: Mapping[str, Operation] = table(
    # -- segments and steps ----------------------------------------------------------------------
    Operation("stage", (Int("sid"), RawBlob("chunk")), wait=False),
    Operation(
        "add_segment",
        (
            Str("key"),  # a new key: another session's segment of that name is its own
            Custom("optimizer", OptimizerSpec.to_dict, _optimizer, optional=True),
            Bool("replace", optional=True, default=False, keyword=True),
            # parameters the researcher froze (requires_grad False: LoRA's base, a frozen encoder): a spec
            # describes layers, not which of their parameters train
            ListOf("frozen", Str("name", min_len=1), max_len=MAX_FROZEN, unique=True, optional=True, default=()),
            # the mode the segment's forward runs in at the worker (RemoteWorker(autocast=)); null: the party's own
            # (full precision); checked before the blobs are taken
            Str("autocast", choices=tuple(AUTOCAST_DTYPES), optional=True, keyword=True),
            SpecBlob("spec", lazy=True),  # decoded once the key may be used
            StateBlob("state", lazy=True),
        ),
    ),
    Operation("remove_segment", (Key(),), wait=False),
    Operation(
        "zero_grad",
        (Key(),),
        serve="zero_grad",
        wait=False,
        flush=False,
        method="zero_grad",
        doc="Clear segment ``key``'s parameter gradients (pipelined: queued until the next flushing call).",
    ),
    Operation(
        "step",
        (Key(),),
        serve="step",
        wait=False,  # a step ends this worker's part of a training step: flushed
        method="step",
        doc="Apply segment ``key``'s optimizer step (pipelined).",
    ),
    Operation(
        "probe",
        (Key(), Custom("input_shape", shape_to_json, _probe_shape)),
        (Custom("shape", shape_to_json, _output_shape),),
        serve="probe",
        method="probe",
        doc="Segment ``key``'s output shape for an input of ``input_shape`` (nothing runs on data).",
    ),
    Operation(
        "set_codecs",
        (Key(), Custom("output", str, _codec, keyword=True), Custom("input_grad", str, _codec, keyword=True)),
        serve="set_codecs",
    ),
    Operation("fetch_segment", (Key(),), (SpecBlob("spec"), StateBlob("state"))),
    Operation(
        "put", (Int("id"), Str("kind", choices=("features",)), ValueBlob("values")), produces=("id",), wait=False
    ),
    Operation("fetch", (Ref("ref"), Str("kind")), (ValueBlob("values"),)),
    Operation("forward", (Key(), Source("src"), Bool("train"), Int("id")), produces=("id",), wait=False),
    Operation(
        "loss",
        (
            Ref("output"),
            Batch("target"),
            LossName("loss"),
            Bool("train", optional=True, default=True, keyword=True),
            Str("keep", optional=True, keyword=True),
            Int("divide", lo=1, hi=MAX_ACCUMULATE, optional=True, default=1, keyword=True),
        ),
        (Custom("stats", loss_stats_to_result, loss_stats_from_result),),
        method="loss",
        doc="The loss of ``output`` against the labels of ``target`` held at the worker, by name; kept there for "
        "the backward when ``train``. ``keep``: an evaluation whose outputs the worker keeps for its metrics; "
        "``divide``: the loss divided by this many accumulated batches.",
    ),
    Operation("backward", (Key(), Ref("grad", optional=True), Int("id", optional=True)), produces=("id",), wait=False),
    Operation(
        "forward_merged",
        (
            Key(),
            ListOf("srcs", Ref(""), min_len=1, max_len=MAX_MERGE_SOURCES),
            Str("merge"),
            Bool("train"),
            Int("id"),
        ),
        produces=("id",),
        wait=False,
    ),
    Operation(
        "backward_merged",
        (Key(), Ref("grad", optional=True), ListOf("ids", Int(""), min_len=1, max_len=MAX_MERGE_SOURCES)),
        produces=("ids",),
        wait=False,
    ),
    Operation("release", (), wait=False),
    Operation("end_session", ()),
    # -- weights -------------------------------------------------------------------------------
    Operation(
        "get_state",
        (Key(), Bool("trainable_only", optional=True, default=False, keyword=True)),
        (StateBlob("state"),),
        serve="get_state",
        method="get_state",
        doc="Segment ``key``'s state dict, in the worker's key order (recorded as weights to the researcher); "
        "``trainable_only``: its trainable parameters only (e.g. LoRA adapters).",
    ),
    Operation("set_state", (Key(), StateBlob("state")), serve="set_state", caller="src"),
    Operation("export_state", (Key(), Int("id")), produces=("id",), wait=False),
    Operation("load_state", (Key(), Ref("src")), wait=False),
    Operation(
        "get_grads",
        (Key(),),
        (StateBlob("gradients"),),
        serve="get_grads",
        method="get_grads",
        doc="Gradients of segment ``key``'s parameters (:class:`~splitnn.workers.GradientWorker`): safetensors, "
        "recorded as ``gradient`` bytes from this worker to the researcher.",
    ),
    Operation(
        "grad_norms",
        (Key(),),
        (TensorBlob("norms", dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), max_ndim=1),),
        serve="grad_norms",
        method="grad_norms",
        doc="The 2-norm of each gradient of segment ``key``'s trainable parameters (one number per tensor, never a "
        "gradient), for clipping by the global norm across parties.",
    ),
    Operation(
        "clip_grads",
        (
            Key(),
            Float("max_norm", positive=True),
            TensorBlob("total_norm", dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), max_ndim=0),
        ),
        serve="clip_grads",
        wait=False,
        flush=False,
        method="clip_grads",
        doc="Scale segment ``key``'s gradients as ``torch.nn.utils.clip_grads_with_norm_`` does for the global "
        "``total_norm`` (pipelined).",
    ),
    Operation(
        "average_states",
        (
            ListOf("keys", Key("", min_len=1), min_len=1, max_len=MAX_AVERAGE_SEGMENTS),
            ListOf("weights", Float("", positive=True), min_len=1, max_len=MAX_AVERAGE_SEGMENTS),
            ListOf("into", Key("", min_len=1), min_len=1, max_len=MAX_AVERAGE_SEGMENTS, keyword=True),
        ),
        serve="average_states",
        check=_one_weight_per_source,
    ),
    # -- datasets and metrics --------------------------------------------------------------------
    Operation(
        "add_dataset",
        (
            Str("name"),  # a new name: the server checks it is not one of the party's own datasets
            DatasetParts("parts", lazy=True),  # decoded once the name may be placed
            Bool("replace", optional=True, default=False, keyword=True),
            Bool("allow_nonfinite", optional=True, default=False, keyword=True),
        ),
    ),
    Operation(
        "dataset_stats",
        (DatasetName("name"),),
        (Custom("stats", dataset_stats_to_result, dataset_stats_from_result),),
        serve="dataset_stats",
        method="dataset_stats",
        doc="The public facts of dataset ``name`` (size, shapes, label range).",
    ),
    Operation(
        "metrics",
        (
            Str("keep", min_len=1),
            ListOf("names", Str("", choices=METRIC_NAMES), min_len=1, max_len=MAX_METRIC_NAMES, as_tuple=True),
        ),
        (Custom("values", dict, _metric_values),),
        serve="metrics",
        method="metrics",
        check_result=_metrics_asked,
        doc="Metrics over the outputs the worker kept under ``keep`` (:class:`~splitnn.workers.MetricWorker`); "
        "only the values come back.",
    ),
    # -- policy --------------------------------------------------------------------------------
    Operation("neighbours", (ListOf("names", Party(""), max_len=MAX_PEERS),), serve="declare_neighbours", wait=True),
    Operation(
        "may_release_weights",
        (Party("peer"),),
        serve="may_release_weights",
        method="may_release_weights",
        doc="Refused (PolicyError naming the rule) where this party's gate would refuse its segments' weights "
        "leaving to ``peer`` (``release_weights``, then ``peers``); moves nothing: a topology asks before training.",
    ),
    # -- checkpoints ---------------------------------------------------------------------------
    Operation(
        "checkpoint_steps",
        (_job(),),
        (ListOf("steps", Int(""), max_len=MAX_STEPS),),
        serve="checkpoint_steps",
        method="checkpoint_steps",
        check_result=lambda steps, _: sorted(steps),
        doc="The steps of ``job`` the party holds checkpoints of, in its ``--state-dir`` "
        "(:class:`~splitnn.workers.CheckpointWorker`).",
    ),
    Operation(
        "save_checkpoint",
        (*_CHECKPOINT_ARGS, Custom("note", dict, _checkpoint_note, optional=True, default={}, keyword=True)),
        _CHECKPOINT_RESULT,
    ),
    Operation(
        "load_checkpoint", (*_CHECKPOINT_ARGS, _digest("digest", optional=True, keyword=True)), _CHECKPOINT_RESULT
    ),
    # -- private set intersection ----------------------------------------------------------------
    Operation("psi_request", (Str("session"), DatasetName(), Int("id")), produces=("id",), wait=False),
    Operation("psi_reply", (DatasetName(), Ref("src"), Int("id")), produces=("id",), wait=False),
    Operation("psi_finish", (Str("session"), Ref("src")), wait=False),
    Operation("psi_apply", (DatasetName(), NamedIndices("parts", max_len=MAX_PSI_PARTS))),
    Operation(
        "psi_size",
        (DatasetName(),),
        (Int("size"),),
        serve="psi_size",
        method="psi_size",
        doc="The number of candidate rows of ``dataset`` (waits for the intersections sent before).",
    ),
    Operation("psi_cancel", (DatasetName(),), serve="psi_cancel"),
)
