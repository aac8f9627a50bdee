"""The methods generated from the table of operations bind their arguments as Python binds them."""

from __future__ import annotations

import inspect
import threading

import pytest

from splitnn.client.calls import _method
from splitnn.common.operations import OPERATIONS

GENERATED = [op for op in OPERATIONS.values() if op.method is not None]


class _Recorder:
    """Stands in for a RemoteWorker: records what a generated method hands to ``_call``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.calls: list[tuple[str, dict]] = []

    def _call(self, op_name: str, /, **values):
        self.calls.append((op_name, values))


def _oracle(op, args, kwargs) -> dict:
    """What ``inspect`` binds (with defaults) for the call: the oracle, written without the method's fast path."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in op.args:
        kind = inspect.Parameter.KEYWORD_ONLY if f.keyword else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(f.name, kind, default=f.default if f.optional else inspect.Parameter.empty))
    bound = inspect.Signature(params).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def _shapes(op):
    """Calls of every shape: all positional, all by keyword, mixed, and with the optional ones given."""
    pos = [f.name for f in op.args if not f.keyword]
    required = [f.name for f in op.args if not f.optional]
    every = [f.name for f in op.args]
    value = {n: f"v-{n}" for n in every}
    yield tuple(value[n] for n in pos if n in required), {n: value[n] for n in required if n not in pos}
    yield (), {n: value[n] for n in required}
    yield (), dict(value)
    if len(pos) > 1:
        yield (value[pos[0]],), {n: value[n] for n in every if n != pos[0]}
    yield tuple(value[n] for n in pos), {n: value[n] for n in every if n not in pos}


@pytest.mark.parametrize("op", GENERATED, ids=lambda op: op.name)
def test_a_generated_method_passes_what_inspect_binds(op):
    method = _method(op)
    for args, kwargs in _shapes(op):
        rec = _Recorder()
        method(rec, *args, **kwargs)
        assert rec.calls == [(op.name, _oracle(op, args, kwargs))], (args, kwargs)


@pytest.mark.parametrize("op", GENERATED, ids=lambda op: op.name)
def test_a_bad_call_of_a_generated_method_is_a_type_error(op):
    method = _method(op)
    names = [f.name for f in op.args]
    pos = [f.name for f in op.args if not f.keyword]
    with pytest.raises(TypeError):
        method(_Recorder(), *range(len(pos) + 1))  # one positional argument too many
    with pytest.raises(TypeError):
        method(_Recorder(), not_an_argument=1, **{n: 1 for n in names})
    if pos:
        with pytest.raises(TypeError):
            method(_Recorder(), 1, **{pos[0]: 2})  # the first argument twice
