"""The vertical health example: two hospitals, one lab, a binary diagnosis, private set intersection.

scikit-learn's breast cancer data set split the way hospitals would hold it: ``hospital_a`` holds the
first 15 features of about 90% of the patients, ``hospital_b`` the other 15 of an overlapping 90%, ``lab``
the diagnosis of about 90%, each in its own CSV file and order. :func:`run_vertical_health` loads each
table at its party, intersects them (:func:`splitnn.training.alignment.intersect`, 20% held out for test), trains
a two-bottom :class:`~splitnn.training.topologies.vertical.VerticalSplitNN` (the lab owns the top and the
labels) and, in process, the same network centrally on the joined table for comparison. Given connected
workers (``workers=``) it runs the same calls across processes.

``examples/vertical_health.py`` and ``splitnn train --dataset breast-cancer --topology vertical`` run it;
``docs/vertical-psi.md`` reports the figures.
"""

from __future__ import annotations

import copy
import csv
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitnn.accounting import Ledger
from splitnn.data import epoch_batches, load_table
from splitnn.errors import ConfigurationError
from splitnn.split.fit import EpochStats, History
from splitnn.training.alignment import PsiResult, intersect
from splitnn.training.topologies.vertical import VerticalNet, VerticalSplitNN
from splitnn.workers import VirtualWorker, Worker

HOSPITALS = ("hospital_a", "hospital_b")
LAB = "lab"
ID_COLUMN = "patient_id"
LABEL_COLUMN = "diagnosis"
DATASET = "patients"
METRICS = ("accuracy", "auc")


@dataclass(frozen=True)
class HealthConfig:
    """How to run the example. The defaults are the measured configuration of ``docs/vertical-psi.md``."""

    seed: int = 0
    coverage: float = 0.9
    test_fraction: float = 0.2
    hidden: int = 16
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.003  # Adam


@dataclass
class HealthReport:
    """What the researcher learns: sizes, per-epoch history, test metrics, the ledger; and the central baseline."""

    config: HealthConfig
    psi: PsiResult
    history: History
    test: dict[str, float]
    central_test: dict[str, float]
    ledger: Ledger
    files: dict[str, Path] = field(default_factory=dict)
    #: the trained split model (its workers still hold it: ``model.collect()`` while they are connected)
    model: VerticalSplitNN | None = None
    #: wall-clock seconds of the private set intersection (``psi``) and of training and evaluation (``train``)
    seconds: dict[str, float] = field(default_factory=dict)


def write_breast_cancer_tables(directory: str | Path, *, seed: int = 0, coverage: float = 0.9) -> dict[str, Path]:
    """Write each party's CSV file into ``directory``; return the path per party.

    Every patient gets an id (``P`` + four digits, in no particular order); each party holds
    a random ``coverage`` share of the patients, in an order of its own.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, malignant = data.data, 1 - data.target  # scikit-learn codes malignant as 0
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    rng = np.random.default_rng(seed)
    n = len(x)
    ids = [f"P{i:04d}" for i in rng.choice(10_000, size=n, replace=False)]
    half = x.shape[1] // 2
    columns = {HOSPITALS[0]: list(range(half)), HOSPITALS[1]: list(range(half, x.shape[1]))}
    directory = Path(directory)
    paths = {}
    for party in (*HOSPITALS, LAB):
        rows = rng.choice(n, size=round(coverage * n), replace=False)  # this party's patients, its own order
        path = directory / f"{party}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            if party == LAB:
                w.writerow([ID_COLUMN, LABEL_COLUMN])
                w.writerows([ids[r], int(malignant[r])] for r in rows)
            else:
                cols = columns[party]
                w.writerow([ID_COLUMN, *(names[c] for c in cols)])
                w.writerows([ids[r], *(repr(float(x[r, c])) for c in cols)] for r in rows)
        paths[party] = path
    return paths


def table_paths(directory: str | Path) -> dict[str, Path]:
    """Where :func:`write_breast_cancer_tables` puts each party's file in ``directory``."""
    return {party: Path(directory) / f"{party}.csv" for party in (*HOSPITALS, LAB)}


def load_parties(files: Mapping[str, Path]) -> dict[str, VirtualWorker]:
    """In-process parties, each holding its own table as :data:`DATASET` (standardised with its own
    statistics, ids included) -- what ``splitnn worker --data patients=table:FILE,id=patient_id`` does."""
    workers = {name: VirtualWorker(name) for name in (*HOSPITALS, LAB)}
    for party in HOSPITALS:
        table = load_table(files[party], id_column=ID_COLUMN)
        workers[party].add_dataset(DATASET, features=table.features, ids=table.ids)
    lab = load_table(files[LAB], id_column=ID_COLUMN, columns=[], label_column=LABEL_COLUMN)
    workers[LAB].add_dataset(DATASET, labels=lab.labels, ids=lab.ids)
    return workers


def health_model(parts: Sequence[int], hidden: int) -> tuple[list[nn.Module], nn.Module]:
    """Bottoms ``Linear(part, hidden), ReLU`` per hospital; the lab's top ``Linear(2 hidden, hidden), ReLU,
    Linear(hidden, 1)``: one logit per patient."""
    bottoms: list[nn.Module] = [nn.Sequential(nn.Linear(p, hidden), nn.ReLU()) for p in parts]
    top = nn.Sequential(nn.Linear(hidden * len(parts), hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return bottoms, top


def run_vertical_health(
    config: HealthConfig = HealthConfig(),
    *,
    directory: str | Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    central: bool = True,
    workers: Mapping[str, Worker] | None = None,
) -> HealthReport:
    """Run the example end to end (see the module docstring).

    Args:
        config: seed, coverage, model and training settings.
        directory: where the parties' tables are written (default: a temporary directory); with
            ``workers``, where the tables they loaded are, for the central baseline.
        on_epoch: called with each epoch's statistics.
        central: also train the central baseline on the joined table.
        workers: the parties by name (``hospital_a``, ``hospital_b``, ``lab``), e.g. ``splitnn.connect``
            workers, each already holding its own table as ``patients`` with ids
            (``splitnn worker --data patients=table:hospital_a.csv,id=patient_id``; the lab's with
            ``label=diagnosis``). Default: in-process parties loading the tables written to ``directory``.
    """
    if workers is not None:
        missing = sorted({*HOSPITALS, LAB} - set(workers))
        if missing:
            raise ConfigurationError(
                f"the health example needs the parties {[*HOSPITALS, LAB]}; no worker is named {missing} "
                f"(start them as `splitnn worker --name NAME --data {DATASET}=table:NAME.csv,id={ID_COLUMN}`)"
            )
        if central and directory is None:
            raise ConfigurationError(
                "the central baseline needs the tables the workers loaded: give directory=, or central=False"
            )
    with tempfile.TemporaryDirectory() as tmp:
        if workers is None:
            files = write_breast_cancer_tables(directory or tmp, seed=config.seed, coverage=config.coverage)
            # 1. each party loads its own table (standardised with its own statistics) and holds it, ids included
            workers = load_parties(files)
        else:
            files = table_paths(directory) if directory is not None else {}  # 1. done by the parties themselves
        hospitals, lab = [workers[h] for h in HOSPITALS], workers[LAB]

        # 2. private set intersection: every party keeps the common patients, in one order; 20% held out
        split = {"train": 1 - config.test_fraction, "test": config.test_fraction}
        start = time.perf_counter()
        psi = intersect(DATASET, hospitals, lab, split=split, seed=config.seed)
        seconds = {"psi": time.perf_counter() - start}
        start = time.perf_counter()

        # 3. the split network: an MLP bottom per hospital, the lab merges (concat) and owns the top
        torch.manual_seed(config.seed)
        widths = [h.dataset_stats(DATASET).feature_shape[0] for h in hospitals]
        bottoms, top = health_model(widths, config.hidden)
        initial = copy.deepcopy((bottoms, top))
        model = VerticalSplitNN(
            bottoms, hospitals, [top], lab, merge="concat", loss="bce_with_logits", optimizer=f"adam:lr={config.lr}"
        )
        train, test = f"{DATASET}:train", f"{DATASET}:test"
        history = model.fit(
            train,
            epochs=config.epochs,
            batch_size=config.batch_size,
            test_data=test,
            metrics=METRICS,
            seed=config.seed,
            progress=False,
            on_epoch=on_epoch,
        )
        result = model.evaluate(test, metrics=METRICS)
        seconds["train"] = time.perf_counter() - start
        central_test = _train_centrally(files, initial, config, psi) if central else {}
        return HealthReport(config, psi, history, result.metrics, central_test, model.ledger, files, model, seconds)


def _train_centrally(
    files: dict[str, Path], initial: tuple[list[nn.Module], nn.Module], config: HealthConfig, psi: PsiResult
) -> dict[str, float]:
    """The same network from the same weights, trained on the joined table by one party with plain PyTorch.

    The join (by id, over the common patients, in ascending id order: the order PSI gives) is
    standardised with statistics of the joined rows; train/test are the same patients as in the
    split run (the same seeded permutation of the same order), batches the same ``epoch_batches``.
    """
    from sklearn.metrics import roc_auc_score

    tables = [load_table(files[h], id_column=ID_COLUMN, standardize=False) for h in HOSPITALS]
    lab = load_table(files[LAB], id_column=ID_COLUMN, columns=[], label_column=LABEL_COLUMN)
    common = sorted(set(lab.ids).intersection(*(t.ids for t in tables)))
    assert len(common) == psi.size

    def rows(table) -> torch.Tensor:
        at = {sid: i for i, sid in enumerate(table.ids)}
        return torch.tensor([at[sid] for sid in common])

    x = torch.cat([t.features[rows(t)].double() for t in tables], dim=1)
    x = ((x - x.mean(0)) / x.std(0, unbiased=False)).float()
    y = lab.labels[rows(lab)]
    perm = torch.randperm(psi.size, generator=torch.Generator().manual_seed(config.seed))
    n_train = psi.parts[f"{DATASET}:train"]
    train_idx, test_idx = perm[:n_train].sort().values, perm[n_train:].sort().values
    bottoms, top = copy.deepcopy(initial)
    widths = [t.features.shape[1] for t in tables]
    net = VerticalNet(bottoms, top, "concat", columns=torch.arange(sum(widths)).split(widths))
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    xt, yt = x[train_idx], y[train_idx]
    for epoch in range(config.epochs):
        for idx in epoch_batches(len(train_idx), config.batch_size, seed=config.seed, epoch=epoch):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(net(xt[idx]), yt[idx].view(-1, 1)).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        logits = net(x[test_idx]).flatten()
    y_test = y[test_idx]
    return {
        "accuracy": float(((logits > 0).float() == y_test).float().mean()),
        "auc": float(roc_auc_score(y_test.numpy(), logits.double().numpy())),
    }
