"""The comparison's outputs: table rows, CSV, JSON and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from splitnn.accounting.units import human_bytes, si
from splitnn.compare.analytic import CommModel, crossover, mean_bytes_per_client
from splitnn.compare.runner import CompareConfig, RunResult
from splitnn.fileio import atomic_path, atomic_write_text

__all__ = [
    "HEADER",
    "table_rows",
    "markdown_table",
    "measured_crossover",
    "crossover_summary",
    "write_csv",
    "write_json",
    "plot",
    "si",
    "human_bytes",
]

#: Columns of the comparison table.
HEADER = ("method", "clients", "bytes/client", "= model", "FLOPs/client", "client s", "test acc", "wall s")

_LABELS = {
    "split": "split learning",
    "fedavg": "FedAvg",
    "large-batch": "large-batch SGD",
    "splitfed-v1": "SplitFed v1",
    "splitfed-v2": "SplitFed v2",
}
_COLORS = {
    "split": "tab:blue",
    "fedavg": "tab:orange",
    "large-batch": "tab:green",
    "splitfed-v1": "tab:purple",
    "splitfed-v2": "tab:red",
}
# v1 and v2 move the same bytes and FLOPs: distinct hollow-ish markers keep both visible where they overlap
_MARKERS = {"split": "o", "fedavg": "s", "large-batch": "^", "splitfed-v1": "D", "splitfed-v2": "x"}


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    """One row per run, in the columns of :data:`HEADER`."""
    return [
        [
            r.method,
            str(r.clients),
            human_bytes(r.bytes_per_client),
            "yes" if r.matches_model else "NO",
            si(r.flops_per_client),
            f"{r.seconds_per_client:.1f}",
            f"{r.accuracy:.4f}",
            f"{r.wall_seconds:.1f}",
        ]
        for r in results
    ]


def markdown_table(results: Sequence[RunResult]) -> str:
    """The table as GitHub markdown (for the README)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(HEADER))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def measured_crossover(results: Sequence[RunResult], against: str = "fedavg") -> int | None:
    """The smallest measured client count at which split learning sent fewer bytes per client than ``against``."""
    split = {r.clients: r.bytes_per_client for r in results if r.method == "split"}
    other = {r.clients: r.bytes_per_client for r in results if r.method == against}
    for k in sorted(set(split) & set(other)):
        if split[k] < other[k]:
            return k
    return None


def crossover_summary(results: Sequence[RunResult], k_star: int | None, against: str = "fedavg") -> tuple[bool, str]:
    """Whether the measured runs agree with the analytic crossover ``k_star`` (split learning sends
    at least as much as ``against`` below it and less from it on), and a sentence that says so."""
    split = {r.clients: r.bytes_per_client for r in results if r.method == "split"}
    other = {r.clients: r.bytes_per_client for r in results if r.method == against}
    ks = sorted(set(split) & set(other))
    if not ks:
        return True, f"no client count ran both split learning and {against}"
    more = [k for k in ks if split[k] >= other[k]]
    less = [k for k in ks if split[k] < other[k]]
    boundary = k_star if k_star is not None else max(ks) + 1
    agrees = all(k < boundary for k in more) and all(k >= boundary for k in less)
    name = _LABELS.get(against, against)
    parts = []
    if more:
        parts.append(f"at least as many bytes per client as {name} at {', '.join(map(str, more))} clients")
    if less:
        parts.append(
            f"fewer at {', '.join(map(str, less))}"
            if more
            else f"fewer bytes per client than {name} at {', '.join(map(str, less))} clients"
        )
    verdict = "consistent with" if agrees else "CONTRADICTS"
    where = f"{k_star} clients" if k_star is not None else "no client count"
    return agrees, f"split learning sent {' and '.join(parts)}: {verdict} the analytic crossover at {where}"


def write_csv(results: Sequence[RunResult], path: Path) -> None:
    """One row per run with the mean per-client figures."""
    fields = [
        "method",
        "clients",
        "bytes_per_client",
        "predicted_bytes_per_client",
        "matches_model",
        "flops_per_client",
        "seconds_per_client",
        "accuracy",
        "test_loss",
        "wall_seconds",
        "train_samples",
        "epochs",
    ]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            d = r.to_dict()
            writer.writerow({f: d[f] for f in fields})


def write_json(
    results: Sequence[RunResult],
    path: Path,
    *,
    config: CompareConfig,
    comm: CommModel,
    dataset: str,
    train_samples: int,
    test_samples: int,
) -> None:
    """Everything: the configuration, the sizes of the analytic model, both crossovers, every run in full."""
    k_star = crossover(comm, train_samples, **_schedule(config))
    doc = {
        "dataset": dataset,
        "train_samples": train_samples,
        "test_samples": test_samples,
        "config": asdict(config),
        "comm_model": asdict(comm),
        "analytic_crossover_vs_fedavg": k_star,
        "measured_crossover_vs_fedavg": measured_crossover(results),
        "measured_agrees_with_analytic_crossover": crossover_summary(results, k_star)[0],
        "results": [r.to_dict() for r in results],
    }
    atomic_write_text(path, json.dumps(doc, indent=2))


def plot(
    results: Sequence[RunResult],
    out_dir: Path,
    *,
    config: CompareConfig,
    comm: CommModel,
    train_samples: int,
    title: str = "",
) -> list[Path]:
    """Draw bytes per client vs clients (measured, with the analytic model dashed), client FLOPs vs
    clients, and accuracy vs bytes per client; return the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    methods = [m for m in _LABELS if any(r.method == m for r in results)]
    by_method = {m: sorted((r for r in results if r.method == m), key=lambda r: r.clients) for m in methods}
    ks = sorted({r.clients for r in results})
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    grid = list(range(1, max(ks) + 1))
    _series(ax, by_method, "clients", "bytes_per_client", label=" (measured)")
    for m in methods:
        model = [mean_bytes_per_client(m, comm, train_samples, k, **_schedule(config)) for k in grid]
        ax.plot(grid, model, "--", color=_COLORS[m], linewidth=1, label=f"{_LABELS[m]} (analytic)")
    k_star = crossover(comm, train_samples, **_schedule(config), max_clients=max(ks))
    if k_star is not None and "split" in methods and "fedavg" in methods:
        ax.axvline(k_star, color="grey", linestyle=":", linewidth=1, label=f"analytic crossover: {k_star} clients")
    _log_axes(ax, ks)
    paths.append(
        _finish(
            fig,
            ax,
            out_dir / "bytes_per_client.png",
            "bytes per client (sent + received)",
            title or "communication per client",
            legend=7,
        )
    )

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _series(ax, by_method, "clients", "flops_per_client", line="-")
    _log_axes(ax, ks)
    paths.append(
        _finish(
            fig,
            ax,
            out_dir / "flops_per_client.png",
            "FLOPs per client (forward + backward)",
            title or "computation per client",
        )
    )

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _series(ax, by_method, "bytes_per_client", "accuracy")
    for runs in by_method.values():
        for r in runs:
            ax.annotate(
                f"K={r.clients}",
                (r.bytes_per_client, r.accuracy),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    paths.append(
        _finish(
            fig,
            ax,
            out_dir / "accuracy_vs_bytes.png",
            "test accuracy",
            title or "accuracy against communication",
            xlabel="bytes per client (sent + received)",
        )
    )
    return paths


def _schedule(config: CompareConfig) -> dict[str, int]:
    """What the analytic model needs of a run's schedule."""
    return {"epochs": config.epochs, "batch_size": config.batch_size, "local_epochs": config.local_epochs}


def _series(ax, by_method: dict[str, list], x: str, y: str, *, line: str = "", label: str = "") -> None:
    """One series per method: its runs' ``y`` against their ``x`` (attribute names)."""
    for m, runs in by_method.items():
        xs, ys = [getattr(r, x) for r in runs], [getattr(r, y) for r in runs]
        ax.plot(xs, ys, line + _MARKERS[m], color=_COLORS[m], label=_LABELS[m] + label)


def _finish(fig, ax, path: Path, ylabel: str, title: str, *, xlabel: str = "clients", legend: int = 8) -> Path:
    """Label the axes, title and legend, and save the figure as ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend)
    return _save(fig, path)


def _log_axes(ax, ks: Sequence[int]) -> None:
    ax.set_yscale("log")
    if max(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
