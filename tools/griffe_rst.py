"""Griffe extension for the docs site: render splitnn's reST-flavoured docstrings as Markdown.

The docstrings use Google sections (``Args:``, ``Returns:``) with Sphinx habits in the prose:
roles such as :class:`~splitnn.accounting.Ledger`, literal blocks introduced by ``::`` and
doctest lines (``>>>``). mkdocstrings renders Markdown, where a role would show as raw text and
``>>>`` as a nested quote. This extension rewrites each docstring when the site is built (the
source is not touched):

* a role becomes an optional cross-reference: a link when the target is rendered on the site,
  plain code otherwise (no warning either way);
* ``text::`` + an indented block becomes ``text:`` + a fenced ``python`` block;
* a run of doctest lines becomes a fenced ``pycon`` block.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`<>]+?)`")


def _role_to_autoref(obj: griffe.Object, match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    call = "()" if target.endswith("()") else ""
    target = target.removesuffix("()")
    title = (target.rsplit(".", 1)[-1] if short else target) + call
    identifier = _resolve(obj, target)
    return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as written in ``obj``'s docstring (relative names are the module's)."""
    if target.startswith("splitnn"):
        return target
    head = target.split(".", 1)[0]
    scope: Any = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        member = scope.members.get(head) if hasattr(scope, "members") else None
        if member is not None:
            path = member.target_path if member.is_alias else member.path
            return path + target[len(head) :]
        scope = scope.parent
    return target


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i, in_fence = 0, False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].strip())
                i += 1
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        if not in_fence and stripped.endswith("::") and not stripped.startswith(".."):
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            body_indent = len(lines[j]) - len(lines[j].lstrip()) if j < len(lines) else 0
            if j < len(lines) and body_indent > indent:
                head = line.rstrip()[:-1].rstrip()
                if head.strip() == ":":
                    head = ""
                if head:
                    out.append(head if head.endswith(":") else head + ":")
                block = []
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) >= body_indent):
                    block.append(lines[k][body_indent:])
                    k += 1
                while block and not block[-1].strip():
                    block.pop()
                pad = " " * indent
                out += ["", f"{pad}```python", *(pad + b if b else "" for b in block), f"{pad}```", ""]
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite Sphinx roles, ``::`` literal blocks and doctest lines of every docstring as Markdown."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _fence_blocks(obj.docstring.value)
        obj.docstring.value = _ROLE.sub(lambda m: _role_to_autoref(obj, m), text)
