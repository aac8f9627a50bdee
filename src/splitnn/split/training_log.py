"""Training logs for researchers: ``fit(..., log_dir=DIR)`` writes TensorBoard event files and a CSV.

What is logged, under these TensorBoard tags (and the same ``tag`` column of ``DIR/metrics.csv``):

* ``train/loss_step`` -- each batch's mean training loss, at its global step (batches since the
  first epoch);
* ``train/loss`` -- each epoch's mean training loss (what ``fit`` returns in its history), at the
  epoch's number (1, 2, ...); ``test/loss``, ``test/<metric>`` -- the test metrics of that epoch;
* ``bytes_sent/<party>`` -- the bytes each party sent during the epoch (the ledger's);
* ``samples_per_second`` -- training samples per second of the epoch;
* ``lr/<segment>`` -- each segment's learning rate, where its optimizer is a spec (``"sgd:lr=0.03"``).

The event files are TensorBoard's own (``torch.utils.tensorboard``, which needs the ``tensorboard``
package: the ``tensorboard`` extra); ``tensorboard --logdir DIR`` shows them. The CSV
(``step,epoch,tag,value``) is for people without TensorBoard; it is flushed after every epoch.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from splitnn.errors import ConfigurationError
from splitnn.split.trainable import Trainable

CSV_NAME = "metrics.csv"


def _learning_rates(model: Trainable) -> dict[str, float]:
    from splitnn.wire.optim_spec import OptimizerSpec

    out: dict[str, float] = {}
    for i, opt in enumerate(model.optimizer_specs):
        try:
            spec = OptimizerSpec.parse(opt) if isinstance(opt, str) else opt
        except (ConfigurationError, ValueError):
            continue
        lr = getattr(spec, "lr", None)
        if isinstance(lr, (int, float)):
            out[str(i)] = float(lr)
    return out


class TrainingLog:
    """TensorBoard events and a CSV for one ``fit``; see the module docstring."""

    def __init__(self, log_dir: str | os.PathLike, model: object) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigurationError(
                "fit(..., log_dir=...) writes TensorBoard files: pip install 'splitnn[tensorboard]' (or tensorboard)"
            ) from None
        self.dir = Path(log_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigurationError(f"log_dir {self.dir} is a file, not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.dir))
        new = not (self.dir / CSV_NAME).exists()
        self._file = open(self.dir / CSV_NAME, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "epoch", "tag", "value"])
        self._lrs = _learning_rates(model)

    def _scalar(self, tag: str, value: float, step: int, epoch: int) -> None:
        if value is None or not math.isfinite(value):
            return
        self.writer.add_scalar(tag, value, step)
        self._csv.writerow([step, epoch, tag, repr(float(value))])

    def batch(self, step: int, epoch: int, loss: float) -> None:
        """One training batch's mean loss at global step ``step`` (0-based)."""
        self._scalar("train/loss_step", loss, step, epoch)

    def epoch(self, stats) -> None:
        """One epoch's :class:`~splitnn.split.fit.EpochStats` (at step = its epoch number)."""
        e = stats.epoch
        self._scalar("train/loss", stats.train_loss, e, e)
        if stats.test_loss is not None:
            self._scalar("test/loss", stats.test_loss, e, e)
        for name, value in (stats.test_metrics or {}).items():
            self._scalar(f"test/{name}", value, e, e)
        for party, nbytes in sorted(stats.bytes_sent.items()):
            self._scalar(f"bytes_sent/{party}", nbytes, e, e)
        if stats.seconds > 0:
            self._scalar("samples_per_second", stats.samples / stats.seconds, e, e)
        for key, lr in self._lrs.items():
            self._scalar(f"lr/{key}", lr, e, e)
        self.writer.flush()
        self._file.flush()

    def close(self) -> None:
        self.writer.close()
        self._file.close()
