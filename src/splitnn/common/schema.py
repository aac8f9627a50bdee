"""Typed fields of a remote operation's arguments and results, each one encoder and one validating decoder.

A field turns one Python value into its wire form (a JSON value, or a blob appended to the
command's blobs) and back. Decoding checks everything a hostile peer could get wrong -- type,
range, length, list bounds, known names -- and raises :class:`~splitnn.errors.WireError` naming
the operation and the field. :class:`Key` and :class:`DatasetName` also say what the server
checks them against: the segments and datasets of the caller's session (``claim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from splitnn.common.messages import check_party_name
from splitnn.errors import ConfigurationError, WireError, WorkerError
from splitnn.transport.limits import Limits
from splitnn.wire.spec import spec_from_json, spec_to_json
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor
from splitnn.workers.refs import TensorRef

#: Largest integer a field carries (int64).
MAX_INT = 2**63 - 1
#: Longest string a field carries unless it says otherwise.
MAX_STR = 256

_MISSING = object()


class Blobs:
    """The blobs of one command or reply, read in field order while decoding."""

    def __init__(self, blobs: Sequence[bytes], limits: Limits) -> None:
        self.blobs, self.limits, self.next = blobs, limits, 0

    def take(self, what: str) -> bytes:
        if self.next >= len(self.blobs):
            raise WireError(f"command is missing its {what} blob")
        self.next += 1
        return self.blobs[self.next - 1]


class Field:
    """One named field. ``optional``: missing or null decodes to ``default``; ``claim``: what the server checks
    the decoded value against (``"segment"``, ``"dataset"``); ``keyword``: a keyword-only parameter of the
    generated client method; ``blob``: the value travels as a blob, not in the JSON."""

    blob = False
    claim: str | None = None

    def __init__(self, name: str, *, optional: bool = False, default: Any = None, keyword: bool = False) -> None:
        self.name, self.optional, self.default, self.keyword = name, optional, default, keyword

    # -- subclasses define these two ------------------------------------------------------------
    def to_wire(self, value: Any, blobs: list[bytes]) -> Any:
        return value

    def check(self, raw: Any, err: Callable[[str], WireError], blobs: Blobs) -> Any:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def encode(self, value: Any, out: dict, blobs: list[bytes]) -> None:
        wire = self.to_wire(value, blobs)
        if not self.blob:
            out[self.name] = wire

    def decode(self, where: str, source: dict, blobs: Blobs) -> Any:
        def err(text: str) -> WireError:
            return WireError(f"{where}: command argument {self.name!r} {text}")

        if self.blob:
            return self.check(None, err, blobs)
        raw = source.get(self.name, _MISSING) if isinstance(source, dict) else _MISSING
        if raw is _MISSING or raw is None:
            if self.optional:
                return self.default
            raise err("is missing")
        return self.check(raw, err, blobs)


class Str(Field):
    """A string of ``min_len..max_len`` characters, from ``chars`` or ``choices`` when given."""

    def __init__(
        self,
        name: str,
        *,
        min_len: int = 0,
        max_len: int = MAX_STR,
        chars: frozenset[str] | None = None,
        choices: Sequence[str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, **kw)
        self.min_len, self.max_len, self.chars, self.choices = min_len, max_len, chars, choices

    def check(self, raw, err, blobs):
        if not isinstance(raw, str):
            raise err(f"has the wrong type {type(raw).__name__}, not a string")
        if len(raw) > self.max_len:
            raise err(f"is too long (at most {self.max_len} characters)")
        if len(raw) < self.min_len:
            raise err(f"is too short (at least {self.min_len} characters)")
        if self.chars is not None and not set(raw) <= self.chars:
            raise err("holds characters outside [A-Za-z0-9_.-]")
        if self.choices is not None and raw not in self.choices:
            raise err(f"must be one of {list(self.choices)}, got {raw[:64]!r}")
        return raw


class Key(Str):
    """A segment key: the server checks that no other session holds it."""

    claim = "segment"

    def __init__(self, name: str = "key", **kw: Any) -> None:
        super().__init__(name, **kw)


class DatasetName(Str):
    """A dataset name: the server checks that no other session placed it."""

    claim = "dataset"

    def __init__(self, name: str = "dataset", **kw: Any) -> None:
        super().__init__(name, **kw)


class Int(Field):
    """An integer in ``lo..hi`` (a JSON boolean is not one)."""

    def __init__(self, name: str, *, lo: int = 0, hi: int = MAX_INT, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.lo, self.hi = lo, hi

    def check(self, raw, err, blobs):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise err(f"has the wrong type {type(raw).__name__}, not an integer")
        if not self.lo <= raw <= self.hi:
            raise err(f"is out of range {self.lo}..{self.hi}")
        return raw


class Float(Field):
    """A finite number in ``lo..hi``; ``positive``: above 0."""

    def __init__(
        self, name: str, *, lo: float = -math.inf, hi: float = math.inf, positive: bool = False, **kw: Any
    ) -> None:
        super().__init__(name, **kw)
        self.lo, self.hi, self.positive = lo, hi, positive

    def to_wire(self, value, blobs):
        return float(value)

    def check(self, raw, err, blobs):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise err(f"has the wrong type {type(raw).__name__}, not a number")
        if not math.isfinite(raw) or not self.lo <= raw <= self.hi or (self.positive and raw <= 0):
            raise err(f"must be a finite number{' > 0' if self.positive else ''} in {self.lo}..{self.hi}")
        return float(raw)


class Bool(Field):
    """True or false."""

    def to_wire(self, value, blobs):
        return bool(value)

    def check(self, raw, err, blobs):
        if not isinstance(raw, bool):
            raise err(f"has the wrong type {type(raw).__name__}, not a boolean")
        return raw


class ListOf(Field):
    """A list of ``min_len..max_len`` items, each checked by ``item`` (a field whose name is unused);
    ``unique``: no item twice. Decodes to a list (``as_tuple``: a tuple)."""

    def __init__(
        self,
        name: str,
        item: Field,
        *,
        min_len: int = 0,
        max_len: int,
        unique: bool = False,
        as_tuple: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(name, **kw)
        self.item, self.min_len, self.max_len, self.unique, self.as_tuple = item, min_len, max_len, unique, as_tuple
        self.claim = item.claim

    def to_wire(self, value, blobs):
        return [self.item.to_wire(v, blobs) for v in value]

    def check(self, raw, err, blobs):
        if not isinstance(raw, list):
            raise err(f"has the wrong type {type(raw).__name__}, not a list")
        if not self.min_len <= len(raw) <= self.max_len:
            raise err(f"must list {self.min_len}..{self.max_len} items, got {len(raw)}")
        out = []
        for i, v in enumerate(raw):
            out.append(self.item.check(v, lambda text, i=i: err(f"item {i} {text}"), blobs))
        if self.unique and len(set(out)) != len(out):
            raise err("lists an item twice")
        return tuple(out) if self.as_tuple else out


class Ref(Field):
    """A tensor held by a party: ``{owner, id}``. A fused in-process gradient cannot cross."""

    def to_wire(self, value, blobs):
        if value is None:
            return None
        if value.fused:
            raise WorkerError("a fused in-process gradient cannot cross the network")
        return {"owner": value.owner, "id": value.id}

    def check(self, raw, err, blobs):
        if not isinstance(raw, dict) or set(raw) != {"owner", "id"}:
            raise err("must be a tensor ref {owner, id}")
        owner, tid = raw["owner"], raw["id"]
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= MAX_INT:
            raise err("must hold a tensor id 0..2**63-1")
        try:
            return TensorRef(check_party_name(owner), tid)
        except WireError as exc:
            raise err(f"names no party: {exc}") from None


class Custom(Field):
    """A JSON value encoded by ``to_json`` and checked by ``from_json`` (which raises WireError or
    ConfigurationError; the message is prefixed with the field)."""

    def __init__(self, name: str, to_json: Callable[[Any], Any], from_json: Callable[[Any], Any], **kw: Any) -> None:
        super().__init__(name, **kw)
        self._to, self._from = to_json, from_json

    def to_wire(self, value, blobs):
        return self._to(value)

    def check(self, raw, err, blobs):
        try:
            return self._from(raw)
        except (WireError, ConfigurationError) as exc:
            raise err(str(exc)) from None


class StateBlob(Field):
    """A state dict (weights, gradients) as one safetensors blob (at most ``Limits.max_blob_bytes``)."""

    blob = True

    def to_wire(self, value, blobs):
        blobs.append(encode_state({k: v.detach() for k, v in value.items()}))

    def check(self, raw, err, blobs):
        return decode_state(blobs.take(self.name), max_bytes=blobs.limits.max_blob_bytes)


class TensorBlob(Field):
    """One tensor as a tensor frame (at most ``Limits.max_tensor_bytes``)."""

    blob = True

    def to_wire(self, value, blobs):
        blobs.append(encode_tensor(value))

    def check(self, raw, err, blobs):
        return decode_tensor(blobs.take(self.name), max_bytes=blobs.limits.max_tensor_bytes)


class Party(Field):
    """A party name (1-64 printable ASCII characters, no spaces)."""

    def check(self, raw, err, blobs):
        try:
            return check_party_name(raw)
        except WireError as exc:
            raise err(str(exc)) from None


class SpecBlob(Field):
    """A segment's layer spec as one JSON blob; only parsed here (built by whoever trusts it)."""

    blob = True

    def to_wire(self, value, blobs):
        blobs.append(spec_to_json(value).encode())

    def check(self, raw, err, blobs):
        return spec_from_json(blobs.take(self.name))
