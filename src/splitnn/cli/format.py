"""Plain-text formatting shared by the commands' reports."""

from __future__ import annotations

from collections.abc import Sequence

from splitnn.accounting.units import human_bytes, si
from splitnn.errors import ConfigurationError

__all__ = ["human_bytes", "si", "table", "parse_positive_ints"]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left/right aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append(
            "  ".join(c.rjust(w) if numeric[i] and j else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def parse_positive_ints(text: str, flag: str, example: str) -> tuple[int, ...]:
    """``"128,640"`` -> ``(128, 640)``; a :class:`ConfigurationError` naming ``flag`` for anything else
    (not integers, none given, or one below 1)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigurationError(f"{flag} must be comma-separated integers like {example}, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigurationError(f"{flag} needs positive integers like {example}, got {text!r}")
    return values
