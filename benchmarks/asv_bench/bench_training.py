"""One epoch of the tutorial network: in process, and across three ``splitnn worker`` processes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .common import BATCH, NAMES, toy_data, trained_on_workers, tutorial_model


class InProcess:
    """SplitNN on three VirtualWorkers in this process (``fit``, lock-step)."""

    number = 1
    repeat = (5, 15, 60.0)
    warmup_time = 0.0

    def setup(self):
        import splitnn

        self.data = toy_data()
        self.model = tutorial_model([splitnn.VirtualWorker(n) for n in NAMES])
        self.model.fit(self.data, epochs=1, batch_size=BATCH, progress=False)  # data placement, warm-up

    def time_fit_epoch(self):
        self.model.fit(self.data, epochs=1, batch_size=BATCH, seed=1, progress=False)


class Networked:
    """The same epoch over three worker processes on 127.0.0.1: shipped epochs and per-op commands, with peer
    links over gRPC or over the TCP data plane (``--data-listen``)."""

    params = (["grpc", "tcp"], ["shipped", "per-op"])
    param_names = ("links", "path")
    number = 1
    repeat = (3, 9, 120.0)
    warmup_time = 0.0
    timeout = 300

    def setup(self, links, path):
        self._tmp = tempfile.TemporaryDirectory()
        self.cluster, self.workers, self.data, self.model = trained_on_workers(
            Path(self._tmp.name), tcp=links == "tcp", ship_epochs=path == "shipped"
        )

    def teardown(self, links, path):
        for w in self.workers:
            w.close()
        self.cluster.stop_all()
        self._tmp.cleanup()

    def time_fit_epoch(self, links, path):
        self.model.fit(self.data, epochs=1, batch_size=BATCH, seed=1, progress=False)
