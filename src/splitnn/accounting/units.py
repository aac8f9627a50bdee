"""Human-readable byte and FLOP counts for reports."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary prefixes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def si(value: float, unit: str = "") -> str:
    """``5.42e9 -> '5.42 G'`` (SI prefixes)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()
