"""Compression at the cuts: what ``SplitNN(..., compression=...)`` accepts, checked before anything is placed.

A cut's *activation* codec encodes what its sender (the segment before the cut) sends
forward; its *gradient* codec what the segment after the cut sends back. Codecs are
those of :mod:`splitnn.wire.compress`: ``none``, ``fp16``, ``bf16``, ``int8`` (per row:
scale and zero point) and ``topk:RATIO`` (with error feedback at the sender). Accepted forms::

    compression="int8"                                    # every cut, both directions
    compression={"activation": "int8", "gradient": "fp16"}  # every cut (a missing direction: none)
    compression=["int8", {"activation": "fp16"}]          # per cut, one entry per cut
    compression={1: "int8"}                               # by cut index (the others: none)

Cut ``i`` lies between segment ``i`` and segment ``i + 1``. A cut between two segments of one
party moves nothing, so its codec has nothing to do. Only floating tensors are compressed; an
integer index or a mask crossing beside them travels as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from splitnn.errors import ConfigurationError
from splitnn.split.stage import Stage
from splitnn.wire.compress import Codec, codec_spec
from splitnn.workers.base import CodecWorker

DIRECTIONS = ("activation", "gradient")


@dataclass(frozen=True)
class CutCompression:
    """The codecs of one cut: ``activation`` forward, ``gradient`` back (codec specs, e.g. ``"int8"``)."""

    activation: str = "none"
    gradient: str = "none"

    @property
    def active(self) -> bool:
        """Whether anything is compressed at this cut."""
        return (self.activation, self.gradient) != ("none", "none")


def _codec(spec: object, where: str) -> str:
    if spec is None:
        return "none"
    if not isinstance(spec, (str, Codec)):
        raise ConfigurationError(
            f"compression {where}: a codec is a name such as 'fp16', 'int8' or 'topk:0.1', got {spec!r}"
        )
    return codec_spec(spec, f"compression {where}")


def _directions(spec: object, where: str) -> CutCompression:
    """One cut's codecs from a codec (both directions) or a dict by direction."""
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in DIRECTIONS]
        if unknown or not spec:
            raise ConfigurationError(
                f"compression {where}: a dict of directions takes the keys 'activation' and/or 'gradient', "
                f"got {sorted(map(str, spec)) or 'none'}"
            )
        return CutCompression(*(_codec(spec.get(d), f"{where} {d}") for d in DIRECTIONS))
    codec = _codec(spec, where)
    return CutCompression(codec, codec)


def parse_compression(spec: object, cuts: int) -> tuple[CutCompression, ...]:
    """Every cut's codecs (``cuts`` of them) from what ``SplitNN(..., compression=...)`` was given; a
    ConfigurationError that names the entry and the fix for anything else."""
    if spec is None or isinstance(spec, (str, Codec)):
        return (_directions(spec, "(every cut)"),) * cuts
    if isinstance(spec, Mapping) and spec and all(isinstance(k, str) for k in spec):
        return (_directions(spec, "(every cut)"),) * cuts
    if isinstance(spec, Mapping):
        bad = [k for k in spec if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < cuts]
        if bad:
            raise ConfigurationError(
                f"compression by cut takes cut indices 0..{cuts - 1} (cut i lies between segments i and i + 1) "
                f"as keys, got {bad!r}; or give 'activation'/'gradient' keys for every cut"
            )
        return tuple(_directions(spec.get(i), f"at cut {i}") for i in range(cuts))
    if isinstance(spec, Sequence):
        if len(spec) != cuts:
            raise ConfigurationError(
                f"compression per cut needs one entry per cut: this model has {cuts} cut(s), got {len(spec)} "
                "entries (or give a dict by cut index)"
            )
        return tuple(_directions(s, f"at cut {i}") for i, s in enumerate(spec))
    raise ConfigurationError(
        f"compression must be a codec name, a dict of directions, a list per cut or a dict by cut index, "
        f"got a {type(spec).__name__}"
    )


def check_codec_workers(stages: Sequence[Stage], cuts: Sequence[CutCompression]) -> None:
    """Refuse, before anything is placed, a compressed cut whose parties cannot encode."""
    for i, cut in enumerate(cuts):
        if not cut.active or stages[i].worker.name == stages[i + 1].worker.name:
            continue
        for stage in (stages[i], stages[i + 1]):
            if not isinstance(stage.worker, CodecWorker):
                raise ConfigurationError(
                    f"compression at cut {i}: worker {stage.worker.name!r} cannot compress what it sends (it has "
                    "no set_codecs); use splitnn.VirtualWorker or splitnn.connect workers, or no compression there"
                )


def apply_compression(stages: Sequence[Stage], cuts: Sequence[CutCompression]) -> None:
    """Tell each segment's worker the codecs of what that segment sends to another party."""
    for i, stage in enumerate(stages):
        out = cuts[i].activation if i < len(cuts) and _crosses(stages, i) else "none"
        grad = cuts[i - 1].gradient if i > 0 and _crosses(stages, i - 1) else "none"
        if (out, grad) != ("none", "none"):
            stage.worker.set_codecs(stage.key, output=out, input_grad=grad)


def _crosses(stages: Sequence[Stage], cut: int) -> bool:
    return stages[cut].worker.name != stages[cut + 1].worker.name
