"""Typed fields of a remote operation's arguments and results, each one encoder and one validating decoder.

A field turns one Python value into its wire form (a JSON value, or a blob appended to the
command's blobs) and back. Decoding checks everything a hostile peer could get wrong -- type,
range, length, list bounds, known names -- and raises :class:`~splitnn.errors.WireError` naming
the operation and the field. :class:`Key` and :class:`DatasetName` also say what the server
checks them against: the segments and datasets of the caller's session (``claim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from splitnn.common.messages import check_party_name
from splitnn.common.serde.blocks import (
    batch_from_command,
    batch_to_command,
    ids_from_blob,
    ids_to_blob,
    indices_from_blob,
    indices_to_blob,
    value_from_blob,
    value_to_blob,
)
from splitnn.data.sources import MAX_FEATURE_NAME, MAX_FEATURE_NAMES, NamedFeatures
from splitnn.errors import ConfigurationError, WireError, WorkerError
from splitnn.transport.limits import Limits
from splitnn.wire.cut_codec import MAX_VALUES
from splitnn.wire.spec import spec_from_json, spec_to_json
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor
from splitnn.workers.losses import LOSS_NAMES
from splitnn.workers.refs import BatchRef, TensorRef

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

    def __init__(
        self, name: str, *, optional: bool = False, default: Any = None, keyword: bool = False, lazy: bool = False
    ) -> None:
        self.name, self.optional, self.default, self.keyword = name, optional, default, keyword
        self.lazy = lazy  # a blob field: decodes to a function that decodes the blob when called

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
            if self.lazy:  # taken now, decoded when the handler is ready for it (after its own checks)
                one = Blobs([blobs.take(self.name)], blobs.limits)
                return lambda: self.check(None, err, one)
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


class LossName(Str):
    """A loss by its name (:data:`~splitnn.workers.losses.LOSS_NAMES`): code does not cross the wire, so a callable
    is refused before anything is sent."""

    def to_wire(self, value, blobs):
        if not isinstance(value, str):
            raise ConfigurationError(
                f"a remote worker takes losses by name only (code does not cross the wire); give one of {LOSS_NAMES}"
            )
        return value


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
        return None if value is None else self._to(value)

    def check(self, raw, err, blobs):
        try:
            return self._from(raw)
        except WireError as exc:  # a SpecError stays one
            raise type(exc)(str(err(str(exc)))) from None
        except ConfigurationError as exc:
            raise err(str(exc)) from None


class StateBlob(Field):
    """A state dict (weights, gradients) as one safetensors blob (at most ``Limits.max_blob_bytes``)."""

    blob = True

    def to_wire(self, value, blobs):
        blobs.append(encode_state({k: v.detach() for k, v in value.items()}))

    def check(self, raw, err, blobs):
        return decode_state(blobs.take(self.name), max_bytes=blobs.limits.max_blob_bytes)


class TensorBlob(Field):
    """One tensor as a tensor frame (at most ``Limits.max_tensor_bytes``); ``dtypes``: the dtypes it may have,
    ``max_ndim``: its most dimensions (0: a scalar)."""

    blob = True

    def __init__(
        self, name: str, *, dtypes: Sequence[torch.dtype] | None = None, max_ndim: int | None = None, **kw: Any
    ) -> None:
        super().__init__(name, **kw)
        self.dtypes, self.max_ndim = dtypes, max_ndim

    def to_wire(self, value, blobs):
        blobs.append(encode_tensor(value))

    def check(self, raw, err, blobs):
        extra: dict[str, Any] = {}
        if self.dtypes is not None:
            extra["allowed_dtypes"] = tuple(self.dtypes)
        if self.max_ndim is not None:
            extra["max_ndim"] = self.max_ndim
        blob = blobs.take(self.name)
        try:
            return decode_tensor(blob, max_bytes=blobs.limits.max_tensor_bytes, **extra)
        except WireError as exc:
            raise err(str(exc)) from None


class Party(Field):
    """A party name (1-64 printable ASCII characters, no spaces)."""

    def check(self, raw, err, blobs):
        try:
            return check_party_name(raw)
        except WireError as exc:
            raise err(str(exc)) from None


class RawBlob(Field):
    """A blob as it came (its receiver checks it: a staged chunk)."""

    blob = True

    def to_wire(self, value, blobs):
        blobs.append(bytes(value))

    def check(self, raw, err, blobs):
        return blobs.take(self.name)


class SpecBlob(Field):
    """A segment's layer spec as one JSON blob; only parsed here (built by whoever trusts it)."""

    blob = True

    def to_wire(self, value, blobs):
        blobs.append(spec_to_json(value).encode())

    def check(self, raw, err, blobs):
        return spec_from_json(blobs.take(self.name))


class ValueBlob(Field):
    """A tensor, or several (a tuple: a model that takes several inputs), as one blob (at most
    ``Limits.max_tensor_bytes``); the JSON field counts the values, and is absent for one tensor."""

    def encode(self, value, out, blobs):
        blobs.append(value_to_blob(value))
        if not isinstance(value, torch.Tensor):
            out[self.name] = len(value)

    def decode(self, where, source, blobs):
        count = source.get(self.name) if isinstance(source, dict) else None
        if count is not None:
            Int(self.name, lo=1, hi=MAX_VALUES).decode(where, source, blobs)
        blob = blobs.take("tensor")
        return value_from_blob(blob, several=count is not None, max_bytes=blobs.limits.max_tensor_bytes)


class Batch(Field):
    """Rows of a dataset: ``{dataset[, draw]}`` and one blob of row indices (1-D int64, at most
    ``Limits.max_blob_bytes``). The server checks that the dataset is the session's and the indices fit it."""

    claim = "batch"

    def encode(self, value, out, blobs):
        args, extra = batch_to_command(value)
        out[self.name] = args
        blobs.extend(extra)

    def check(self, raw, err, blobs):
        if not isinstance(raw, dict):
            raise err("must be a batch {dataset[, draw]}")
        return batch_from_command(raw, [blobs.take("indices")], blobs.limits.max_blob_bytes)


class Source(Field):
    """What a segment runs on: a batch of a local dataset (:class:`Batch`) or another party's tensor (:class:`Ref`)."""

    claim = "batch"

    def encode(self, value, out, blobs):
        if isinstance(value, BatchRef):
            Batch(self.name).encode(value, out, blobs)
        else:
            out[self.name] = Ref(self.name).to_wire(value, blobs)

    def check(self, raw, err, blobs):
        if isinstance(raw, dict) and "dataset" in raw:
            return Batch(self.name).check(raw, err, blobs)
        return Ref(self.name).check(raw, err, blobs)


class NamedIndices(Field):
    """Named row positions: the names in the JSON (distinct, 1-256 characters, at most ``max_len``), one
    indices blob per name, in order (1-D int64, at most ``Limits.max_blob_bytes`` each)."""

    def __init__(self, name: str, *, max_len: int, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.max_len = max_len

    def to_wire(self, value, blobs):
        blobs.extend(indices_to_blob(idx) for idx in value.values())
        return list(value)

    def check(self, raw, err, blobs):
        if (
            not isinstance(raw, list)
            or len(raw) > self.max_len
            or not all(isinstance(n, str) and 0 < len(n) <= MAX_STR for n in raw)
            or len(set(raw)) != len(raw)
        ):
            raise err(f"must list at most {self.max_len} distinct names")
        return {
            n: indices_from_blob(blobs.take(f"{n[:64]!r} indices"), max_bytes=blobs.limits.max_blob_bytes) for n in raw
        }


class DatasetParts(Field):
    """A dataset's parts: ``features`` and/or ``labels`` (tensors), and optionally ``ids`` (sample ids, for private
    set intersection); the names in the JSON, one blob per part in order (at most ``Limits.max_blob_bytes``
    each). Named features (:class:`~splitnn.data.sources.NamedFeatures`, a model's keyword inputs) travel as
    ``{"features": [NAME, ...]}`` in the list and one tensor blob per name, in order (1..``MAX_FEATURE_NAMES``
    names of 1..``MAX_FEATURE_NAME`` characters, no repeats); each decodes to a tensor (dtype, shape, bytes;
    never pickle). With ``lazy``, decodes to a function that decodes the blobs when called."""

    KINDS = ("features", "labels", "ids")

    def to_wire(self, value, blobs):
        listed: list = []
        for p, v in value.items():
            if p == "features" and isinstance(v, Mapping):
                blobs.extend(encode_tensor(t) for t in v.values())
                listed.append({"features": list(v)})
            else:
                blobs.append(ids_to_blob(v) if p == "ids" else encode_tensor(v))
                listed.append(p)
        return listed

    def check(self, raw, err, blobs):
        if not isinstance(raw, list) or len(raw) > len(self.KINDS):
            raise err("must list 'features' and/or 'labels' (and optionally 'ids')")
        kinds = [self._kind(p, err) for p in raw]
        if not {"features", "labels"} & set(kinds) or len(set(kinds)) != len(kinds):
            raise err("must list 'features' and/or 'labels' (and optionally 'ids'), each once")
        taken = []
        for p in raw:
            if isinstance(p, dict):
                taken.append(("features", [(n, blobs.take(f"feature {n!r}")) for n in p["features"]]))
            else:
                taken.append((p, blobs.take(p)))
        limit = blobs.limits.max_blob_bytes

        def one(what: str, blob: bytes, decode: Callable) -> Any:
            try:
                return decode(blob, max_bytes=limit)
            except WireError as exc:
                raise err(f"{what}: {exc}") from None

        def decoded() -> dict:
            out: dict = {}
            for p, b in taken:
                if isinstance(b, list):
                    out[p] = NamedFeatures((n, one(f"feature {n!r}", blob, decode_tensor)) for n, blob in b)
                else:
                    out[p] = one(p, b, ids_from_blob if p == "ids" else decode_tensor)
            return out

        return decoded if self.lazy else decoded()

    @staticmethod
    def _kind(p: object, err: Callable[[str], WireError]) -> str:
        """The part an entry of the list names; named features checked (count, names, repeats)."""
        if isinstance(p, str) and p in DatasetParts.KINDS:
            return p
        names = p.get("features") if isinstance(p, dict) and len(p) == 1 else None
        if not isinstance(names, list) or not 0 < len(names) <= MAX_FEATURE_NAMES:
            raise err(
                f"must list 'features' and/or 'labels' (and optionally 'ids'); named features as "
                f"{{'features': [1..{MAX_FEATURE_NAMES} names]}}"
            )
        for n in names:
            if not isinstance(n, str) or not 0 < len(n) <= MAX_FEATURE_NAME:
                raise err(f"names a feature {str(n)[:40]!r}; a name is a string of 1..{MAX_FEATURE_NAME} characters")
        if len(set(names)) != len(names):
            raise err("names a feature twice")
        return "features"
