"""The in-process engine is a small class composing one module per capability (``splitnn.workers.engine``).

Each capability module stays small, defines its methods alone (a name defined by two capabilities would shadow
one of them silently, by the order of the bases), and sits below the class that composes it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import splitnn.workers.engine as engine
from splitnn.workers import VirtualWorker
from splitnn.workers.base import Worker

ENGINE = Path(engine.__file__).parent
VIRTUAL = ENGINE.parent / "virtual.py"


def _classes(path: Path) -> list[ast.ClassDef]:
    return [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]


def test_each_capability_module_is_small_and_the_engine_class_smaller():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ENGINE.glob("*.py")}
    assert len(sizes) >= 10 and max(sizes.values()) <= 300, sizes
    (cls,) = [c for c in _classes(VIRTUAL) if c.name == "VirtualWorker"]
    assert cls.end_lineno - cls.lineno + 1 < 150
    assert len(VIRTUAL.read_text().splitlines()) < 300


def test_no_method_is_defined_by_two_capabilities():
    seen: dict[str, str] = {}
    for base in VirtualWorker.__mro__[1:-1]:
        for name, value in vars(base).items():
            if callable(value) or isinstance(value, property):
                assert name not in seen, f"{name} is defined by both {seen[name]} and {base.__name__}"
                seen[name] = base.__name__
    own = {n for n, v in vars(VirtualWorker).items() if callable(v)}
    assert not own & set(seen), own & set(seen)


def test_the_engine_serves_the_whole_worker_protocol():
    protocol = {n for n, v in vars(Worker).items() if callable(v) and not n.startswith("_")}
    assert protocol and protocol <= {n for n in dir(VirtualWorker) if not n.startswith("_")}
    for name in protocol:  # the protocol's positional parameters in order and its keywords, so a model calls either
        want = inspect.signature(getattr(Worker, name)).parameters
        got = inspect.signature(getattr(VirtualWorker, name)).parameters
        positional = [n for n, p in want.items() if p.kind is not p.KEYWORD_ONLY]
        assert list(got)[: len(positional)] == positional and set(want) <= set(got), name


def test_capabilities_sit_below_the_engine_class():
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "splitnn.workers.virtual", f"{path.name} imports the engine class"
                assert not node.module.startswith(("splitnn.client", "splitnn.server", "splitnn.split")), path.name
