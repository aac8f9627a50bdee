"""Rooms by role: grpc lives only in the researcher's client and the party's server.

``splitnn.workers`` is the Worker protocol and the in-process engine, ``splitnn.client`` the
researcher's client of a remote party, ``splitnn.server`` the party's server, and
``splitnn.common`` what those two agree on. Only ``client`` and ``server`` import grpc, so
in-process split learning never loads it; nothing below them imports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import splitnn

SRC = Path(splitnn.__file__).resolve().parent
GRPC_ROLES = ("client", "server")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` gives ``x`` and ``x.y``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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
