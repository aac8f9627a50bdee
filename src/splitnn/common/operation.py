"""One remote operation's declaration: its name, argument and result fields, and what serves it.

:class:`Operation` encodes a call's arguments on the researcher's side and decodes them, checked
field by field, on the party's side; the same for its result the other way round. The table of
every operation is :mod:`splitnn.common.operations`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitnn.common.schema import Blobs, Field
from splitnn.errors import WireError
from splitnn.transport.limits import Limits


@dataclass(frozen=True)
class Operation:
    """A remote operation.

    Attributes:
        name: the command's op name on the wire.
        args: the argument fields, in the client method's parameter order.
        result: the result fields (none: the reply is empty; one: the call returns its value; several: a dict).
        serve: the engine method (:class:`~splitnn.workers.VirtualWorker`) the server calls with the decoded
            arguments as keywords, after checking their segment keys and dataset names (``Field.claim``);
            None: the server has a hand-written handler for the special work (``Commands._serve_<name>``).
        caller: the engine keyword that receives the calling party's name (e.g. ``src``).
        wait: the client waits for the answer (else the command is pipelined: sent without waiting).
        flush: a pipelined command is put on the wire at once (else it waits for the next flush).
        method: the :class:`~splitnn.client.RemoteWorker` method generated from this declaration (None: the
            client writes its own, for bookkeeping of its own, and calls :meth:`encode_args`).
        check: a check across fields of the decoded arguments (raises WireError).
        check_result: ``(value, args) -> value``: a check of a decoded result against the call's arguments.
        produces: the fields holding the ids (chosen by the client) of the tensors the operation produces: the
            server decodes them first and marks them failed if anything after fails, so that a peer waiting to
            pull one gets the error instead of waiting.
        doc: the generated method's docstring.
    """

    name: str
    args: tuple[Field, ...] = ()
    result: tuple[Field, ...] = ()
    serve: str | None = None
    caller: str | None = None
    wait: bool = True
    flush: bool = True
    method: str | None = None
    check: Callable[[dict], None] | None = None
    check_result: Callable[[Any, dict], Any] | None = None
    produces: tuple[str, ...] = ()
    doc: str = ""

    # -- arguments ---------------------------------------------------------------------------
    @functools.cached_property
    def arg_names(self) -> frozenset[str]:
        """The names of the argument fields (asked on every call: computed once)."""
        return frozenset(f.name for f in self.args)

    @functools.cached_property
    def produce_fields(self) -> tuple[Field, ...]:
        """The argument fields named in :attr:`produces`, in field order (asked on every command that produces)."""
        return tuple(f for f in self.args if f.name in self.produces)

    def encode_args(self, **values: Any) -> tuple[dict, list[bytes]]:
        """The command's JSON arguments and blobs for ``values`` (one per argument field; optional ones may be
        left out)."""
        if not self.arg_names.issuperset(values):
            raise TypeError(f"{self.name}: unknown arguments {sorted(set(values) - self.arg_names)}")
        out: dict = {}
        blobs: list[bytes] = []
        for f in self.args:
            if f.name in values:
                f.encode(values[f.name], out, blobs)
            elif not f.optional:
                raise TypeError(f"{self.name}: missing argument {f.name!r}")
        return out, blobs

    def decode_args(self, args: dict, blobs: Sequence[bytes], *, limits: Limits) -> dict[str, Any]:
        """The checked arguments of a command, by field name; WireError naming the field on anything malformed."""
        if not isinstance(args, dict):
            raise WireError(f"{self.name}: the arguments must be a JSON object")
        reader = Blobs(blobs, limits)
        decoded = {f.name: f.decode(self.name, args, reader) for f in self.args}
        if self.check is not None:
            self.check(decoded)
        return decoded

    def output_ids(self, args: dict, *, limits: Limits) -> list[int | None]:
        """The ids of the tensors a command produces (:attr:`produces`), decoded before its other arguments."""
        if not isinstance(args, dict):
            raise WireError(f"{self.name}: the arguments must be a JSON object")
        reader = Blobs((), limits)
        ids: list[int | None] = []
        for f in self.produce_fields:
            value = f.decode(self.name, args, reader)
            ids.extend(value if isinstance(value, list) else [value])
        return ids

    # -- results -----------------------------------------------------------------------------
    def encode_result(self, value: Any) -> tuple[dict, list[bytes]]:
        """A reply's JSON result and blobs: ``value`` is the single result field's value, or a mapping by name."""
        out: dict = {}
        blobs: list[bytes] = []
        if len(self.result) == 1:
            self.result[0].encode(value, out, blobs)
        else:
            for f in self.result:
                f.encode(value[f.name], out, blobs)
        return out, blobs

    def decode_result(self, result: dict, blobs: Sequence[bytes], *, limits: Limits, args: dict | None = None) -> Any:
        """The inverse of :meth:`encode_result`, checked (``args``: the call's, for :attr:`check_result`)."""
        if not self.result:
            return None
        if not isinstance(result, dict):
            raise WireError(f"{self.name}: the reply must be a JSON object")
        reader = Blobs(blobs, limits)
        decoded = {f.name: f.decode(f"{self.name} reply", result, reader) for f in self.result}
        value = decoded[self.result[0].name] if len(self.result) == 1 else decoded
        return self.check_result(value, args or {}) if self.check_result is not None else value

    # -- the generated client method ------------------------------------------------------------
    def signature(self) -> inspect.Signature:
        """The generated method's signature: ``self``, then the argument fields (keyword-only where declared)."""
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for f in self.args:
            kind = inspect.Parameter.KEYWORD_ONLY if f.keyword else inspect.Parameter.POSITIONAL_OR_KEYWORD
            default = f.default if f.optional else inspect.Parameter.empty
            params.append(inspect.Parameter(f.name, kind, default=default))
        return inspect.Signature(params)


def table(*operations: Operation) -> Mapping[str, Operation]:
    """The operations by name; each name once."""
    out: dict[str, Operation] = {}
    for op in operations:
        if op.name in out:
            raise ValueError(f"operation {op.name!r} is declared twice")
        if op.method is not None and not op.doc:
            raise ValueError(f"operation {op.name!r}: the client method it generates needs a docstring (doc=)")
        out[op.name] = op
    return out
