"""Writing a privacy experiment out: the table (text rows, Markdown), CSV, JSON and PNG figures.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no
global backend change), so this works headless.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from splitnn.errors import ConfigurationError
from splitnn.fileio import atomic_path, atomic_write_text
from splitnn.privacy.defenses import DefenseSetting
from splitnn.privacy.experiment import PrivacyResult, PrivacyRow

__all__ = [
    "COLUMNS",
    "table_rows",
    "markdown_table",
    "write_csv",
    "write_json",
    "plot_tradeoff",
    "plot_reconstructions",
    "write_report",
]

#: (field of PrivacyRow, table header, format) in table order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("defense", "defense", "{}"),
    ("strength", "strength", "{:g}"),
    ("accuracy", "test acc", "{:.4f}"),
    ("accuracy_drop", "acc drop", "{:+.4f}"),
    ("recon_mse", "recon MSE", "{:.4f}"),
    ("recon_ssim", "recon SSIM", "{:.3f}"),
    ("recon_accuracy", "recon acc", "{:.3f}"),
    ("norm_auc", "norm AUC", "{:.3f}"),
    ("cosine_auc", "cos AUC", "{:.3f}"),
    ("binary_accuracy", "bin acc", "{:.3f}"),
    ("dcor", "dCor", "{:.3f}"),
    ("epsilon", "epsilon", "{:.2f}"),
    ("fsha_mse", "FSHA MSE", "{:.4f}"),
    ("completion_accuracy", "completion acc", "{:.3f}"),
    ("unsplit_mse", "UnSplit MSE", "{:.4f}"),
    ("unsplit_ssim", "UnSplit SSIM", "{:.3f}"),
    ("feature_mse", "feature MSE", "{:.4f}"),
)


def table_rows(result: PrivacyResult) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the trade-off table."""
    header = [h for _, h, _ in COLUMNS]
    rows = [[fmt.format(getattr(r, key)) for key, _, fmt in COLUMNS] for r in result.rows]
    return header, rows


def markdown_table(result: PrivacyResult) -> str:
    """The trade-off table as GitHub Markdown."""
    header, rows = table_rows(result)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i > 0 else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _check_dir(path: Path) -> None:
    if not path.parent.exists():
        raise ConfigurationError(f"cannot write {path}: directory {path.parent} does not exist; create it first")


def write_csv(result: PrivacyResult, path: Path) -> Path:
    """Every field of every row (full precision) as CSV."""
    path = Path(path)
    _check_dir(path)
    fields = list(PrivacyRow.__dataclass_fields__)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in result.rows:
            writer.writerow(asdict(r))
    return path


def _jsonable(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


#: Per attack: who attacks whom, and what the attacker sees (printed under the table, kept in privacy.json).
THREATS = {
    "inversion": "recon MSE/SSIM/acc: the receiving party (bob) reconstructs the data holder's inputs from the "
    "activations it received, with a decoder trained on auxiliary public data and query access to her segment",
    "dcor": "dCor: model-free dependence between the data holder's inputs and the activations anyone at the cut sees",
    "label-leakage": "norm/cos AUC: the data holder (alice) infers the label holder's labels (binary task) from the "
    "gradients she received, knowing one positive per batch",
    "fsha": "FSHA MSE: a malicious label holder sends crafted gradients to hijack the data holder's segment, then "
    "decodes the activations it receives (auxiliary public data)",
    "model-completion": "completion acc: the data holder labels test samples with her own trained segment and a head "
    "fitted on 4 known labels per class",
    "unsplit": "UnSplit MSE/SSIM: the receiving party (bob), knowing the data holder's architecture but not her "
    "weights, optimises a surrogate segment and the inputs to match the activations it received (64 victims)",
    "feature-inference": "feature MSE: in a vertical twin (alice: left half of each image; bob: right half, the "
    "labels and the trained joint model), bob's generator guesses alice's half from the joint predictions (GRN)",
}

#: Columns of a row that are measurements (averaged over seeds).
MEASURED = tuple(name for name in PrivacyRow.__dataclass_fields__ if name not in ("defense", "strength"))


def _interval(values: list[float]) -> dict[str, float | int | None]:
    """Mean and 95% Student-t interval of ``values`` (NaNs left out)."""
    from scipy import stats

    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(stats.t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(xs)}


def summarize(results: Sequence[PrivacyResult]) -> list[dict]:
    """Per setting (in the first result's order): every measured column's mean and 95% interval over the results
    (one per seed)."""
    out = []
    for row in results[0].rows:
        same = [res.row(row.defense, row.strength) for res in results]
        entry: dict = {"defense": row.defense, "strength": row.strength}
        for name in MEASURED:
            entry[name] = _interval([float(getattr(r, name)) for r in same])
        out.append(entry)
    return out


def mean_result(results: Sequence[PrivacyResult]) -> PrivacyResult:
    """A result whose rows are the per-setting means over ``results`` (the first result's grids and config)."""
    first = results[0]
    rows = []
    for entry in summarize(results):
        values = {k: (math.nan if v["mean"] is None else v["mean"]) for k, v in entry.items() if isinstance(v, dict)}
        rows.append(PrivacyRow(defense=entry["defense"], strength=entry["strength"], **values))
    return PrivacyResult(
        first.config,
        rows,
        sum(r.clean_accuracy for r in results) / len(results),
        first.chance,
        first.grid_inputs,
        first.grid_reconstructions,
    )


def summary_rows(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table of :func:`summarize`: ``mean ±half-width`` per column."""
    header = [h for _, h, _ in COLUMNS]
    rows = []
    for entry in summary:
        cells = []
        for key, _, fmt in COLUMNS:
            v = entry[key]
            if not isinstance(v, dict):
                cells.append(fmt.format(v))
            elif v["mean"] is None:
                cells.append("nan")
            elif v["low"] is None:
                cells.append(fmt.format(v["mean"]))
            else:
                cells.append(f"{fmt.format(v['mean'])} ±{(v['high'] - v['low']) / 2:.3g}")
        rows.append(cells)
    return header, rows


def write_json(
    result: PrivacyResult, path: Path, *, seeds: Sequence[int] | None = None, summary: list[dict] | None = None
) -> Path:
    """Configuration, rows, reference accuracies as JSON (with ``seeds`` and their ``summary`` when given)."""
    path = Path(path)
    _check_dir(path)
    doc = {
        "config": result.config.to_dict(),
        "clean_accuracy": result.clean_accuracy,
        "chance": result.chance,
        "rows": [{k: _jsonable(v) for k, v in asdict(r).items()} for r in result.rows],
    }
    doc["threats"] = {a: THREATS[a] for a in result.config.attacks}
    if seeds is not None:
        doc["seeds"] = list(seeds)
    if summary is not None:
        doc["summary"] = summary
    atomic_write_text(path, json.dumps(doc, indent=2))
    return path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


#: Leakage axes of the trade-off figure: (title, x label, function of a row).
_LEAKAGE = (
    ("input reconstruction", "reconstruction SSIM (higher = more leakage)", lambda r: r.recon_ssim),
    ("model-free", "distance correlation (inputs, activations)", lambda r: r.dcor),
    ("label leakage", "best label-attack AUC (0.5 = none)", lambda r: max(r.norm_auc, r.cosine_auc)),
)


def plot_tradeoff(result: PrivacyResult, path: Path) -> Path:
    """Test accuracy against each leakage measure, one line per defense through its strengths."""
    path = Path(path)
    _check_dir(path)
    fig = _figure(13, 4)
    axes = fig.subplots(1, len(_LEAKAGE))
    base = [r for r in result.rows if r.defense == "none"]
    defenses = list(dict.fromkeys(r.defense for r in result.rows if r.defense != "none"))
    for ax, (title, xlabel, leak) in zip(axes, _LEAKAGE):
        for r in base:
            ax.scatter([leak(r)], [r.accuracy], color="black", marker="*", s=120, zorder=3, label="no defense")
        for name in defenses:
            rows = sorted((r for r in result.rows if r.defense == name), key=lambda r: r.strength)
            if rows[0].strength > 0:
                rows = base + rows  # every line starts from the undefended point
            xs, ys = [leak(r) for r in rows], [r.accuracy for r in rows]
            ax.plot(xs, ys, marker="o", label=name)
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{r.strength:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy vs leakage (numbers: defense strength)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_reconstructions(result: PrivacyResult, path: Path, settings: Sequence[DefenseSetting] | None = None) -> Path:
    """A grid: the victims' true inputs in the first row, each setting's reconstructions below."""
    path = Path(path)
    _check_dir(path)
    labels = [s.label for s in settings] if settings is not None else list(result.grid_reconstructions)
    missing = [lab for lab in labels if lab not in result.grid_reconstructions]
    if missing:
        raise ConfigurationError(
            f"no reconstructions for {missing}; the experiment ran {list(result.grid_reconstructions)}"
        )
    rows = [("true input", result.grid_inputs)] + [(lab, result.grid_reconstructions[lab]) for lab in labels]
    cols = result.grid_inputs.shape[0]
    fig = _figure(1.0 * cols + 1.4, 1.0 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for i, (name, images) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            img = images[j].detach().float()
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            ax.imshow(((img + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.14, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(
    result: PrivacyResult,
    out_dir: Path,
    *,
    prefix: str = "privacy",
    seeds: Sequence[int] | None = None,
    summary: list[dict] | None = None,
) -> dict[str, Path]:
    """Write CSV, JSON, the trade-off figure, one reconstruction grid per defense and one with every setting.

    ``out_dir`` is created if needed. Returns the written paths by kind. With several seeds,
    pass the :func:`mean_result` and the :func:`summarize` of the per-seed results.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigurationError(f"output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": write_csv(result, out_dir / f"{prefix}.csv"),
        "json": write_json(result, out_dir / f"{prefix}.json", seeds=seeds, summary=summary),
        "tradeoff": plot_tradeoff(result, out_dir / f"{prefix}_tradeoff.png"),
    }
    if not result.grid_reconstructions:  # the inversion attack did not run
        return paths
    paths["reconstructions"] = plot_reconstructions(result, out_dir / f"{prefix}_recon.png")
    base = [r.setting for r in result.rows if r.defense == "none"]
    for name in dict.fromkeys(r.defense for r in result.rows if r.defense != "none"):
        settings = base + sorted((r.setting for r in result.rows if r.defense == name), key=lambda s: s.strength)
        settings = list(dict.fromkeys(settings))
        paths[f"reconstructions_{name}"] = plot_reconstructions(
            result, out_dir / f"{prefix}_recon_{name}.png", settings
        )
    return paths
