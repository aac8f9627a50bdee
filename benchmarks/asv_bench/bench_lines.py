"""Python lines per batch over three worker processes: a count, not a timing, so a change shows on a busy machine."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .common import BATCHES, NAMES, trained_on_workers

BENCHMARKS = Path(__file__).resolve().parents[1]  # benchmarks/: bench_lines.py and line_counts/


class Lines:
    """One epoch of the tutorial network over three ``splitnn worker`` processes (gRPC peer links), shipped or
    per-op, with every worker counting the Python lines it runs (``benchmarks/line_counts``): the lines per batch
    of the three workers together. asv records it per commit as it records a time; ``asv continuous --factor
    1.1`` flags a change that runs 10% more."""

    params = (["shipped", "per-op"],)
    param_names = ("path",)
    number = 1
    repeat = 1
    timeout = 600

    def setup(self, path):
        self._tmp = tempfile.TemporaryDirectory()
        self.out = Path(self._tmp.name)
        env = {"PYTHONPATH": str(BENCHMARKS / "line_counts"), "SPLITNN_LINE_COUNTS": str(self.out)}
        self.cluster, self.workers, self.data, self.model = trained_on_workers(
            self.out / "cluster", ship_epochs=path == "shipped", env=env
        )

    def teardown(self, path):
        for w in self.workers:
            w.close()
        self.cluster.stop_all()
        self._tmp.cleanup()

    def track_worker_lines_per_batch(self, path):
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        from bench_lines import count_lines, per_batch

        pids = {n: self.cluster.workers[n].proc.pid for n in NAMES}
        rows = count_lines(self.model, self.data, pids, self.out, epochs=2)
        lines = per_batch(rows, 2 * BATCHES)
        return round(sum(lines[n]["all"] for n in NAMES))

    track_worker_lines_per_batch.unit = "lines"
