"""What a stage is: one segment of a split network, placed on one worker."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from splitnn.common.serde import DTYPE_NAMES
from splitnn.errors import ShapeMismatchError
from splitnn.workers import DatasetStats, Worker
from splitnn.workers.refs import ValueShape
from splitnn.workers.values import ProbeShape, is_several


@dataclass(frozen=True)
class Slot:
    """A segment of a model as its checkpoint names it: ``label`` (stable across runs, e.g. ``s1``),
    hosted by ``worker`` under ``key`` (random per run); ``module`` is the segment as the researcher
    gave it (for its fingerprint)."""

    label: str
    worker: Worker
    key: str
    module: nn.Module


def slot_label(key: str) -> str:
    """A segment's label: its key without the model's random prefix (``m3f2...s1`` -> ``s1``)."""
    return key.partition(".")[2] or key


def declare_adjacency(pairs: Iterable[tuple[Worker, Worker]]) -> None:
    """Tell each worker (that takes it) which parties exchange tensors with it in this model, so its
    policy hands its tensors to them only (:meth:`~splitnn.workers.VirtualWorker.declare_neighbours`)."""
    neighbours: dict[str, tuple[Worker, set[str]]] = {}
    for a, b in pairs:
        if a.name == b.name:
            continue
        neighbours.setdefault(a.name, (a, set()))[1].add(b.name)
        neighbours.setdefault(b.name, (b, set()))[1].add(a.name)
    for worker, names in neighbours.values():
        declare = getattr(worker, "declare_neighbours", None)
        if callable(declare):
            declare(sorted(names))


@dataclass(frozen=True)
class Stage:
    """Segment ``index`` of a model, hosted by ``worker`` under ``key``."""

    index: int
    key: str
    worker: Worker

    @property
    def label(self) -> str:
        """How errors and reports name this stage: ``segment 1 (at bob)``."""
        return f"segment {self.index} (at {self.worker.name})"


def _first_in_features(module: nn.Module) -> tuple[str, int] | None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return "features", layer.in_features
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return "channels", layer.in_channels
        if not isinstance(layer, (nn.Sequential, nn.ReLU, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid)):
            return None  # something that may reshape comes first: only a probe can tell
    return None


def _last_out_features(module: nn.Module) -> tuple[str, int] | None:
    layers = [m for m in module.modules() if not isinstance(m, nn.Sequential)]
    for layer in reversed(layers):
        if isinstance(layer, nn.Linear):
            return "features", layer.out_features
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return "channels", layer.out_channels
        if not isinstance(layer, (nn.ReLU, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid, nn.LogSoftmax, nn.Softmax)):
            return None
    return None


def check_static_fit(segments: list[nn.Module], worker_names: list[str]) -> None:
    """Refuse consecutive segments whose sizes visibly disagree at a cut.

    Only catches what the layer types reveal (``Linear`` out/in features,
    ``Conv`` channels); anything else is checked by probing shapes once the
    input shape is known.
    """
    for i in range(len(segments) - 1):
        out, inp = _last_out_features(segments[i]), _first_in_features(segments[i + 1])
        if out and inp and out[0] == inp[0] and out[1] != inp[1]:
            raise ShapeMismatchError(
                f"segment {i} (at {worker_names[i]}) outputs {out[1]} {out[0]} but segment {i + 1} "
                f"(at {worker_names[i + 1]}) expects {inp[1]} input {inp[0]}; make the sizes agree at cut {i}"
            )


def feature_probe(stats: DatasetStats) -> ProbeShape:
    """How to probe a model with two rows of a dataset's features: their shape (float32), or for features
    of another dtype (token ids) one :class:`~splitnn.workers.ValueShape` naming it; named features, one
    :class:`~splitnn.workers.ValueShape` each, in order."""
    if stats.named_features is not None:
        return tuple(ValueShape((2, *shape), DTYPE_NAMES[dtype]) for _, shape, dtype in stats.named_features)
    shape = (2, *stats.feature_shape)
    if stats.feature_dtype in (None, "float32"):
        return shape
    return (ValueShape(shape, DTYPE_NAMES[stats.feature_dtype]),)


def probe_chain(stages: list[Stage], input_shape: ProbeShape) -> ProbeShape:
    """Run zeros of ``input_shape`` through every stage; name both sides of a cut that does not fit.

    Several values at a cut are described by one :class:`~splitnn.workers.ValueShape` each.
    """
    shape = input_shape
    for stage in stages:
        try:
            shape = stage.worker.probe(stage.key, shape)
        except (RuntimeError, TypeError) as exc:  # TypeError: a segment called with the wrong number of values
            if stage.index == 0:
                raise ShapeMismatchError(
                    f"{stage.label} cannot take the data's input of {format_shape(input_shape, per_sample=True)} "
                    f"(per sample): {exc}"
                ) from exc
            prev = stages[stage.index - 1]
            raise ShapeMismatchError(
                f"{prev.label} outputs {format_shape(shape)} but {stage.label} cannot take it: {exc}"
            ) from exc
    return shape


def format_shape(shape: ProbeShape, *, per_sample: bool = False) -> str:
    """``shape (2, 64)`` for one value, ``3 values: (2, 64) float32, ...`` for several."""
    if is_several(shape):
        items = ", ".join(f"{tuple(v.shape[per_sample:])} {str(v.dtype).removeprefix('torch.')}" for v in shape)
        return f"{len(shape)} values: {items}"
    return f"shape {tuple(shape[per_sample:])}"
