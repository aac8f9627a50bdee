"""The report's crossover verdict and table."""

from __future__ import annotations

from splitnn.compare.report import HEADER, crossover_summary, markdown_table, measured_crossover, si
from splitnn.compare.runner import RunResult


def _run(method: str, k: int, per_client: int) -> RunResult:
    return RunResult(
        method=method,
        clients=k,
        client_bytes=[per_client] * k,
        predicted_client_bytes=[per_client] * k,
        client_flops=[10] * k,
        client_seconds=[0.5] * k,
        accuracy=0.5,
        test_loss=1.0,
        wall_seconds=2.0,
        train_samples=100,
        epochs=1,
    )


def test_crossover_verdict_agrees_only_when_the_sides_match_the_analytic_point():
    results = [
        r
        for k, split in ((1, 400), (2, 200), (4, 100), (8, 50))
        for r in (_run("split", k, split), _run("fedavg", k, 150))
    ]
    assert measured_crossover(results) == 4
    agrees, text = crossover_summary(results, 3)
    assert agrees and "1, 2 clients" in text and "fewer at 4, 8" in text and "consistent" in text
    for wrong in (2, 5, None):
        agrees, text = crossover_summary(results, wrong)
        assert not agrees and "CONTRADICTS" in text


def test_markdown_table_has_a_row_per_run():
    rows = markdown_table([_run("split", 2, 1024), _run("fedavg", 2, 3 * 2**20)]).splitlines()
    assert rows[0] == "| " + " | ".join(HEADER) + " |"
    assert len(rows) == 4 and "1.0 KiB" in rows[2] and "3.0 MiB" in rows[3] and "| yes |" in rows[2]
    assert si(1.29e12) == "1.29 T" and si(999) == "999"


def test_plots_show_every_method_run_splitfed_included(tmp_path, monkeypatch):
    from splitnn.compare import CommModel, CompareConfig, report

    legends: list[list[str]] = []
    save = report._save

    def capture(fig, path):
        legends.append([t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()])
        return save(fig, path)

    monkeypatch.setattr(report, "_save", capture)
    methods = ("split", "fedavg", "splitfed-v1", "splitfed-v2")
    results = [_run(m, k, 100 * k) for k in (1, 2, 4) for m in methods]
    config = CompareConfig(clients=(1, 2, 4), methods=methods)
    paths = report.plot(results, tmp_path, config=config, comm=CommModel(1000, 1000, 10, 4), train_samples=100)
    assert [p.name for p in paths] == ["bytes_per_client.png", "flops_per_client.png", "accuracy_vs_bytes.png"]
    bytes_legend, flops_legend, accuracy_legend = legends
    for label in ("SplitFed v1", "SplitFed v2"):
        assert f"{label} (measured)" in bytes_legend and f"{label} (analytic)" in bytes_legend
        assert label in flops_legend and label in accuracy_legend
    assert "large-batch SGD" not in flops_legend  # only the methods that ran
