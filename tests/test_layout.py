"""Rooms by role: grpc lives only in the researcher's client and the party's server.

``splitnn.workers`` is the Worker protocol and the in-process engine, ``splitnn.client`` the
researcher's client of a remote party, ``splitnn.server`` the party's server, and
``splitnn.common`` what those two agree on. Only ``client`` and ``server`` import grpc, so
in-process split learning never loads it; nothing below them imports them.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import splitnn

SRC = Path(splitnn.__file__).resolve().parent
GRPC_ROLES = ("client", "server")


@functools.cache
def _tree(path: Path) -> ast.Module:
    """``path``'s syntax tree, parsed once for every check of this module."""
    return ast.parse(path.read_text(), str(path))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` gives ``x`` and ``x.y``)."""
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, set[str]]:
    """Source path relative to the package (``client/remote.py``) -> the modules it imports."""
    return {p.relative_to(SRC).as_posix(): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_importing_the_in_process_packages_does_not_load_grpc():
    code = (
        "import sys\n"
        "import splitnn, splitnn.workers, splitnn.split, splitnn.training, splitnn.data, splitnn.wire\n"
        "import splitnn.common.serde, splitnn.common.messages, splitnn.transport.frames\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_connect_loads_the_client_when_used():
    code = (
        "import sys, splitnn\n"
        "before = 'grpc' in sys.modules\n"
        "from splitnn import connect\n"
        "import splitnn.client\n"
        "print(before, 'grpc' in sys.modules, connect is splitnn.client.connect, 'connect' in dir(splitnn))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True", "True"]


def test_only_client_and_server_import_grpc():
    offenders = sorted(
        path
        for path, names in _modules().items()
        if any(n == "grpc" or n.startswith("grpc.") for n in names) and path.split("/")[0] not in GRPC_ROLES
    )
    assert offenders == []
    # the rule has teeth: the roles do import it
    assert any("grpc" in names for path, names in _modules().items() if path.startswith("client/"))
    assert any("grpc" in names for path, names in _modules().items() if path.startswith("server/"))


def test_imports_point_down_from_the_roles():
    modules = _modules()
    below = ("workers/", "common/", "transport/", "wire/", "split/", "training/", "data/", "accounting/")
    for path, names in modules.items():
        roles = {n.split(".")[1] for n in names if n.startswith(("splitnn.client", "splitnn.server"))}
        if path.startswith(below):
            assert not roles, f"{path} imports {roles}: nothing below the roles imports them"
        if path.startswith("client/"):
            assert "server" not in roles, f"{path}: the researcher's client never imports the server"
    # a worker dialling its peers is a gRPC client: the server uses the client's channels, nothing else
    server = [names for path, names in modules.items() if path.startswith("server/")]
    from_server = {n for names in server for n in names if n.startswith("splitnn.client")}
    assert from_server <= {"splitnn.client.channels", "splitnn.client.channels.open_channel"}


# ------------------------------------------------------------------ the layers of docs/design.md
#: Top-level rooms from the bottom up; a module imports only rooms of lower layers (and its own room).
LAYERS = (
    {"errors", "fileio"},
    {"checks"},
    {"accounting", "wire", "data", "models"},
    {"transport"},
    {"workers"},
    {"common"},
    {"split"},
    {"training", "syft"},
    {"privacy", "compare", "experiments"},
    {"client"},
    {"server", "deploy", "testing"},
    {"cli"},
)
TOP_LEVEL = {"__init__", "__main__", "py"}


def _room(path: str) -> str:
    first = path.split("/")[0]
    return first[:-3] if first.endswith(".py") else first


def _layer(room: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room in rooms)


def test_every_room_has_a_layer():
    rooms = {_room(path) for path in _modules()} - TOP_LEVEL
    assert rooms <= set().union(*LAYERS), f"rooms without a layer: {sorted(rooms - set().union(*LAYERS))}"


def test_imports_point_down_the_layers():
    offenders = []
    for path, names in _modules().items():
        room = _room(path)
        if room in TOP_LEVEL:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "splitnn" or len(parts) < 2 or parts[1] == room or parts[1] in TOP_LEVEL:
                continue
            if parts[1] in set().union(*LAYERS) and _layer(parts[1]) >= _layer(room):
                offenders.append(f"{path} imports {name}")
    assert offenders == []
    # the rule has teeth: the layers are used in both directions' worth of imports
    assert any("splitnn.workers" in names for path, names in _modules().items() if path.startswith("split/"))


# ------------------------------------------------------------------ rooms stay small
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 320  # "about 300": a class that needs more is two concepts


def test_no_module_over_600_lines():
    big = {
        p.relative_to(SRC).as_posix(): n
        for p in SRC.rglob("*.py")
        if not p.name.endswith("_pb2.py") and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}


def test_no_class_over_about_300_lines():
    big = {}
    for p in SRC.rglob("*.py"):
        if p.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big[f"{p.relative_to(SRC).as_posix()}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert big == {}


def test_no_getattr_probing_of_a_model():
    """A trainable model's optional methods are the Trainable base class's defaults, not getattr probes."""
    probes = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(_tree(p)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and node.args
                and ast.unparse(node.args[0]) in ("model", "self.model")
            ):
                probes.append(f"{p.relative_to(SRC).as_posix()}:{node.lineno}")
    assert probes == []


# ------------------------------------------------------------------ tests mirror the package
TESTS = Path(__file__).resolve().parent


def test_tests_mirror_the_package():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "py"}
    test_dirs = {p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert test_dirs <= packages, f"test folders naming no package: {sorted(test_dirs - packages)}"
    assert packages <= test_dirs, f"packages without a test folder: {sorted(packages - test_dirs)}"
