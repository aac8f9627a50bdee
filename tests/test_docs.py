"""The documentation site: every page is in the nav, links resolve, the getting-started page runs.

The getting-started test runs the page the way a reader would: every ```python block of
``docs/getting-started.md`` in order, in one namespace, in a fresh directory, with no environment
the page does not mention (``SPLITNN_DATA`` is removed; the page's own ``export`` sets it). Markers,
written as an HTML comment on the line before a fenced block, say what happens to that block:

* ``<!-- docs-test: env -->`` before a ```bash block of ``export NAME=VALUE`` lines: the test sets
  them, ``../shared/data`` read as the shared test data (the reader's checkout has it beside it);
* ``<!-- docs-test: start-workers -->`` before a ```bash block: the test starts each
  ``splitnn worker --name NAME [--data SPEC]... [--policy FILE]`` command of the block (the files
  it writes with ``printf '...' > FILE`` written first) with
  ``tests/transport/cluster.py`` (on a free port, writing ``NAME.addr`` and ``TOKEN`` in the
  directory the Python blocks run in, which is what the block itself does), ``../shared/data``
  read as the shared test data;
* ``<!-- docs-test: run -->`` before a ```bash block: the test runs it with bash in that directory,
  ``splitnn`` being this checkout's ``python -m splitnn``;
* ``<!-- docs-test: results -->`` before a ```bash block holding one ``splitnn train`` command,
  followed by a table of per-epoch results: the test runs the command for its first epoch
  (``--epochs 1``) and checks the table's first row to the printed digits;
* ``<!-- docs-test: skip -->`` before a ```python block: the block is not run (keep these few).

Other blocks (bash, text) are not run. ``mkdocs build --strict`` (CI) checks the same links and
anchors on the built site, and the API reference; these tests need no docs extra.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import splitnn
from tests.transport.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
GETTING_STARTED = DOCS / "getting-started.md"

_FENCE = re.compile(r"(?:<!-- docs-test: (?P<marker>[\w-]+) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_MARKERS = {"env", "start-workers", "run", "results", "skip"}
QUICK_START = """\
pip install -c constraints.txt -e . && splitnn train
pip install -c constraints.txt -e ".[test]" && python -m pytest
"""


def _blocks(path: Path) -> list[tuple[str | None, str, str]]:
    """(marker, language, code) of every fenced block, in order."""
    return [(m["marker"], m["lang"], m["code"]) for m in _FENCE.finditer(path.read_text())]


def _nav_pages() -> list[str]:
    """The pages listed in mkdocs.yml's nav (paths relative to docs/), read without a YAML parser."""
    text = (REPO / "mkdocs.yml").read_text()
    nav = re.search(r"^nav:\n(.*?)^\S", text, re.M | re.S)
    assert nav, "mkdocs.yml has no nav section"
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav.group(1), re.M)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", _without_fences(path.read_text()), re.M)}


def test_every_page_is_in_the_nav():
    nav = _nav_pages()
    twice = sorted({p for p in nav if nav.count(p) > 1})
    assert not twice, f"pages listed twice in mkdocs.yml's nav: {twice}"
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    forgotten = sorted(pages - set(nav))
    assert not forgotten, f"add these pages to the nav in mkdocs.yml: {forgotten}"


@pytest.mark.parametrize("page", [README, *_pages()], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    """Links to other files (and to headings of Markdown pages) from the README and every page."""
    broken = []
    for target in _LINK.findall(_without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(REPO):  # e.g. ../shared/DESIGN.md beside the repository
            continue
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        # API pages get their anchors from mkdocstrings; the strict site build checks those.
        elif anchor and dest.suffix == ".md" and dest.parent != DOCS / "api" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_anchor_rule_matches_python_markdown(tmp_path):
    """The anchor rule above matches Python-Markdown's: a heading with code and punctuation."""
    page = tmp_path / "p.md"
    page.write_text("# Over `splitnn worker` processes\n## Faults: what (then) happens?\n```\n# not a heading\n```\n")
    assert _anchors(page) == {"over-splitnn-worker-processes", "faults-what-then-happens"}


def test_readme_quick_start_is_the_two_commands():
    """The README's Quick start holds exactly the two set-up commands (the second is CI's test command)."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    first = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert first == QUICK_START
    assert QUICK_START in GETTING_STARTED.read_text()


@pytest.mark.slow
def test_readme_and_getting_started_give_the_same_suite_figures():
    """The suite's size and time, said in one sentence on both pages; the count is the one pytest collects."""
    text = [" ".join(p.read_text().split()) for p in (README, GETTING_STARTED)]
    said = [re.search(r"the whole suite: about ([\d,]+) tests \(.*?\) in about (\w+) minutes", t) for t in text]
    assert all(said) and said[0].groups() == said[1].groups(), [m.groups() if m else None for m in said]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(REPO / "tests")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    count = int(re.search(r"(\d+) tests? collected", collected.stdout)[1])
    claimed = int(said[0][1].replace(",", ""))
    assert abs(count - claimed) <= 0.05 * claimed, f"the pages say about {claimed} tests; pytest collects {count}"


def test_markers_are_known():
    for page in _pages():
        for marker in re.findall(r"<!-- docs-test: ([\w-]+) -->", page.read_text()):
            assert marker in _MARKERS, f"{page.name}: unknown docs-test marker {marker!r}; known: {sorted(_MARKERS)}"


def _worker_commands(code: str) -> list[tuple[str, list[str]]]:
    """(name, extra args) of each ``splitnn worker`` command in a bash block."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        if "splitnn worker" not in line:
            continue
        argv = shlex.split(line.rstrip().removesuffix("&"))
        argv = argv[argv.index("worker") + 1 :]
        name = argv[argv.index("--name") + 1]
        # The test's cluster writes the files the block names: the Python blocks read these.
        assert argv[argv.index("--address-file") + 1] == f"{name}.addr", line
        assert argv[argv.index("--token-file") + 1] == "TOKEN", line
        data = [x for i, a in enumerate(argv) if a == "--data" for x in ("--data", argv[i + 1])]
        if "--policy" in argv:
            data += ["--policy", argv[argv.index("--policy") + 1]]
        commands.append((name, data))
    return commands


def _written_files(code: str) -> dict[str, str]:
    """The files a bash block writes with ``printf 'TEXT' > FILE`` (TEXT with ``\\n`` escapes)."""
    return {
        m.group(2): m.group(1).replace("\\n", "\n")
        for m in re.finditer(r"^printf '([^']*)' > (\S+)", code, flags=re.MULTILINE)
    }


def _exports(code: str, shared_data: Path) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines of an env block (nothing else may be in it)."""
    found = {}
    for line in code.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"export (\w+)=(\S+)", line.strip())
        assert m, f"an env block holds only `export NAME=VALUE` lines, got {line!r}"
        found[m[1]] = m[2].replace("../shared/data", str(shared_data))
    return found


def _run_bash(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = f'splitnn() {{ "{sys.executable}" -m splitnn "$@"; }}\n{code}'
    return subprocess.run(["bash", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.network
def test_getting_started_runs(shared_data, monkeypatch, tmp_path, capsys):
    """Every Python block of the getting-started page, in order, in one namespace; its commands too."""
    monkeypatch.delenv("SPLITNN_DATA", raising=False)  # only what the page itself sets
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    after: list[dict] = []  # the namespace after each Python block that ran
    ran: list[subprocess.CompletedProcess] = []
    exported: dict[str, str] = {}
    with Cluster(tmp_path) as cluster:
        for marker, lang, code in _blocks(GETTING_STARTED):
            if marker == "env":
                assert lang == "bash"
                exported = _exports(code, shared_data)
                for name, value in exported.items():
                    monkeypatch.setenv(name, value)
            elif marker == "start-workers":
                assert lang == "bash"
                commands = _worker_commands(code)
                assert commands, "a start-workers block starts no `splitnn worker`"
                for path, text in _written_files(code).items():
                    (tmp_path / path).write_text(text)
                for name, args in commands:
                    args = [a.replace("../shared/data", str(shared_data)) for a in args]
                    args = [str(tmp_path / a) if a.endswith(".toml") else a for a in args]
                    cluster.start(name, *args)
            elif marker == "run":
                assert lang == "bash"
                done = _run_bash(code, tmp_path, dict(os.environ))
                assert done.returncode == 0, done.stdout + done.stderr
                ran.append(done)
            elif lang == "python" and marker != "skip":
                exec(compile(code, str(GETTING_STARTED), "exec"), scope)
                after.append(dict(scope))
        out = capsys.readouterr().out
    assert exported == {"SPLITNN_DATA": str(shared_data)}, "the page gives the data folder once, at the top"
    assert len(ran) == 1 and "epoch 1/1" in ran[0].stdout and "\r" not in ran[0].stdout + ran[0].stderr
    assert len(after) == 3, "the page has three Python blocks: in-process, own loop, networked"

    # In-process: 5 epochs of Fashion-MNIST; the saved model reloads with the same outputs.
    first = after[0]
    assert first["history"].final.test_accuracy >= 0.84
    assert (tmp_path / "model.safetensors").is_file()
    x = first["test"].features[:8]
    assert first["again"](x).equal(first["full"](x))

    # The low-level loop took a step.
    assert torch.isfinite(after[1]["loss"])

    # Networked: the workers are the processes, the data stayed home, the trained weights came home.
    net = after[2]
    assert not any(isinstance(w, splitnn.VirtualWorker) for w in net["workers"])
    ledger = net["model"].ledger
    assert ledger.total(kind="features") == 0 and ledger.total(kind="labels") == 0
    assert ledger.total(src="alice", dst="bob", kind="activation") > 0
    mnist = splitnn.load_dataset("mnist", "test", limit=1000)
    with torch.no_grad():
        accuracy = (net["full"](mnist.features).argmax(1) == mnist.labels).float().mean().item()
    assert accuracy > 0.8
    assert "accuracy" in out and "activation" in out


def _results_block() -> tuple[str, list[list[str]]]:
    """The command of the page's ``results`` block and the rows of the table after it."""
    text = GETTING_STARTED.read_text()
    at = text.index("<!-- docs-test: results -->")
    command = re.search(r"```bash\n(.*?)```", text[at:], re.S).group(1).strip()
    table = re.search(r"((?:^\|.*\|\n)+)", text[at:], re.M).group(1)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    return command, rows


@pytest.mark.slow
def test_getting_started_results_table_reproduces_its_first_epoch(shared_data, monkeypatch, capsys):
    """The table's command, run for one epoch with the thread count it states, prints the table's first row."""
    from splitnn.cli.main import main

    command, rows = _results_block()
    env, _, rest = command.partition(" splitnn ")
    assert env == "OMP_NUM_THREADS=1" and torch.get_num_threads() == 1  # tests/conftest.py: one thread
    monkeypatch.setenv("SPLITNN_DATA", str(shared_data))  # the page's export, at its top
    assert main([*shlex.split(rest), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    epoch, loss, acc, *sent = rows[0]
    assert epoch == "1"
    line = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    assert f"loss {loss}  test acc {acc}" in line, line
    table = next(line.split() for line in out.splitlines() if line.split()[:1] == ["1"])
    assert table[-3:] == [s.replace(",", "") for s in sent], table


def test_every_image_is_shown_by_a_page():
    pages = "".join(p.read_text() for p in [README, *_pages()])
    unused = sorted(p.name for p in (DOCS / "img").iterdir() if p.name not in pages)
    assert not unused, f"images in docs/img that no page shows (remove or reference them): {unused}"
