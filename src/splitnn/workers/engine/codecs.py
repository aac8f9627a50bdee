"""Compression at a segment's cuts: the codec of the activation it sends and of the gradient it sends back.

The sender encodes a value when it produces it (:class:`~splitnn.wire.cut_codec.CutEncoder`, whose error
feedback stays here, per cut and direction); the receiver decodes it. A cut with a codec is never fused.
State: each hosted segment's ``send_out`` and ``send_grad``.
"""

from __future__ import annotations

from splitnn.wire.compress import Codec, NoCodec, get_codec
from splitnn.wire.cut_codec import CutEncoder


class Codecs:
    """The codecs at the cuts of the hosted segments (see :class:`~splitnn.workers.CodecWorker`)."""

    def set_codecs(self, key: str, *, output: str | Codec | None = None, input_grad: str | Codec | None = None) -> None:
        """Compress what segment ``key`` sends to other parties (see :class:`~splitnn.workers.CodecWorker`):
        its output activations with ``output``, the gradient of its input with ``input_grad`` (codec names
        of :func:`splitnn.wire.compress.get_codec`; ``None`` or ``"none"``: plain). Error feedback starts afresh."""
        hosted = self._segment(key)
        hosted.send_out, hosted.send_grad = _encoder(output), _encoder(input_grad)

    def codecs(self, key: str) -> tuple[str, str]:
        """The codec names of segment ``key``'s output activation and input gradient (``"none"``: plain)."""
        hosted = self._segment(key)
        return tuple(e.spec if e is not None else "none" for e in (hosted.send_out, hosted.send_grad))


def _encoder(codec: str | Codec | None) -> CutEncoder | None:
    """The sender's encoder for ``codec``; None for no codec (the plain path, untouched)."""
    c = get_codec(codec)  # ConfigurationError naming an unknown codec
    return None if isinstance(c, NoCodec) else CutEncoder(c)
