"""Vertical split learning on patient data, aligned by private set intersection.

Two hospitals hold different measurements of overlapping sets of patients (15 of the 30
features of scikit-learn's breast cancer data set each, for about 90% of the patients); a
lab holds the diagnosis of about 90%. Patient ids differ per party in order and coverage.

    python examples/vertical_health.py [--seeds 5] [--epochs 20] [--out DIR]
    python examples/vertical_health.py --processes [--seeds 3]     # also over `splitnn worker` processes
    python examples/vertical_health.py --write-tables DIR [--seed 0]  # only the parties' CSV files

What happens (see ``splitnn.experiments.health`` for the code, step by step):

1. each party loads its own CSV file (ids, numeric columns standardised with its own statistics);
2. private set intersection (ECDH, openmined-psi) keeps at every party exactly the patients all
   three hold, in one order, without any party seeing another's ids; 20% of them are held out;
3. each hospital trains a small MLP bottom; the lab concatenates both activations and trains the
   top with ``bce_with_logits``; test AUC and accuracy are computed at the lab;
4. the same network trained centrally on the joined table is the baseline.

It prints, per seed, the intersection size and the test metrics of both, then the ledger of
the last run: PSI bytes and activation/gradient bytes per hospital.

``--processes`` runs every seed a second time with each party in a `splitnn worker` process of
its own on this machine (started with ``--data patients=table:PARTY.csv,id=patient_id``, so the
researcher never holds a table): the PSI messages and activations then travel between the
processes, and the run must end with the in-process run's weights (``torch.equal``), metrics
and ledger. Exactness assumes the parties compute with the same torch thread count as this
process (a kernel's reductions depend on it): the worker processes are started with this
process's ``torch.get_num_threads()``, whatever ``OMP_NUM_THREADS`` says.
It prints both runs' wall-clock times and what the researcher's own connections
carried. ``--write-tables`` writes the three CSV files for real parties and prints the commands
that serve them and train on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import splitnn
from splitnn.experiments.health import (
    DATASET,
    HOSPITALS,
    ID_COLUMN,
    LAB,
    LABEL_COLUMN,
    HealthConfig,
    HealthReport,
    run_vertical_health,
    write_breast_cancer_tables,
)

PARTIES = (*HOSPITALS, LAB)


def worker_data(party: str, path: Path) -> str:
    """The ``--data`` value with which ``party`` loads its own table."""
    return f"{DATASET}=table:{path},id={ID_COLUMN}" + (f",label={LABEL_COLUMN}" if party == LAB else "")


def write_tables(directory: Path, seed: int) -> None:
    files = write_breast_cancer_tables(directory, seed=seed)
    print(f"wrote {', '.join(str(p) for p in files.values())}\n\neach party serves its own table:")
    for port, party in enumerate(PARTIES, start=7001):
        print(
            f"  splitnn worker --name {party} --listen 0.0.0.0:{port} --token-file TOKEN "
            f"--data {worker_data(party, files[party])}"
        )
    urls = ",".join(f"grpc://HOST_{p.upper()}:{port}" for port, p in enumerate(PARTIES, start=7001))
    print(
        "\nand the researcher trains (PSI first) without holding any of them:\n"
        f"  splitnn train --dataset breast-cancer --topology vertical --seed {seed} --workers {urls} "
        "--token-file TOKEN"
    )


def over_processes(config: HealthConfig, local: HealthReport) -> HealthReport:
    """Run ``config`` with each party in a local `splitnn worker` process; check it equals ``local``."""
    from splitnn.testing.cluster import Cluster

    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp) / "workers") as cluster:
        files = write_breast_cancer_tables(tmp, seed=config.seed, coverage=config.coverage)
        for party in PARTIES:
            cluster.start(party, "--data", worker_data(party, files[party]))
        psi_wire = _psi_alone(cluster)
        workers = {p: splitnn.connect(cluster.workers[p].url, token=cluster.token, name=p) for p in PARTIES}
        try:
            report = run_vertical_health(config, workers=workers, directory=tmp)  # central: from the same files
            ledger_same = report.ledger.links() == local.ledger.links()  # (before collect adds its own records)
            same = _same_weights(report.model.collect(), local.model.collect())
            researcher = _researcher_bytes(workers.values())
        finally:
            for w in workers.values():
                w.close()
    if not (same and ledger_same and report.test == local.test and report.psi == local.psi):
        sys.exit(f"seed {config.seed}: the run over worker processes differs from the in-process run")
    print(
        f"  over worker processes: the same intersection, metrics, ledger and weights (torch.equal); "
        f"PSI {report.seconds['psi']:.2f} s (in process {local.seconds['psi']:.2f} s), training "
        f"{report.seconds['train']:.1f} s (in process {local.seconds['train']:.1f} s); the researcher's "
        f"connections: sent {_kinds(researcher, 'sent')}, received {_kinds(researcher, 'recv')}\n"
        f"  the PSI alone (a session of its own): {psi_wire}",
        flush=True,
    )
    return report


def _psi_alone(cluster) -> str:
    """One intersection in a session of its own: what the researcher's connections and the links between the
    parties carried (the wire counters of the client and of the workers: serialized messages, headers included)."""
    from splitnn.training.alignment import intersect

    workers = {p: splitnn.connect(cluster.workers[p].url, token=cluster.token, name=p) for p in PARTIES}
    try:
        intersect(DATASET, [workers[h] for h in HOSPITALS], workers[LAB], split={"train": 0.8, "test": 0.2})
        researcher = _researcher_bytes(workers.values())
        lab = {(r["peer"], r["direction"], r["kind"]): r["nbytes"] for r in workers[LAB].stats()["counters"]}
    finally:
        for w in workers.values():
            w.close()
    links = "; ".join(
        f"{h} -> {LAB} {lab.get((h, 'recv', 'psi'), 0):,} B, {LAB} -> {h} {lab.get((h, 'sent', 'psi'), 0):,} B"
        for h in HOSPITALS
    )
    return (
        f"researcher sent {_kinds(researcher, 'sent')}, received {_kinds(researcher, 'recv')}; psi frames "
        f"on the wire: {links}"
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _researcher_bytes(workers) -> dict[tuple[str, str], int]:
    """What the researcher's connections to ``workers`` carried, by (direction, kind), summed over them."""
    total: dict[tuple[str, str], int] = {}
    for w in workers:
        for t in w.counters.totals():
            total[(t.direction, t.kind)] = total.get((t.direction, t.kind), 0) + t.nbytes
    return total


def _kinds(counters: dict[tuple[str, str], int], direction: str) -> str:
    return ", ".join(f"{n:,} B {kind}" for (d, kind), n in sorted(counters.items()) if d == direction)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="runs with seeds 0..N-1 (default 5)")
    p.add_argument(
        "--epochs",
        type=int,
        default=HealthConfig.epochs,
        help=f"passes over the training set (default {HealthConfig.epochs})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=HealthConfig.lr,
        help=f"Adam learning rate of every party (default {HealthConfig.lr})",
    )
    p.add_argument("--out", type=Path, default=None, help="write the parties' CSV files here (default: a temp dir)")
    p.add_argument(
        "--processes",
        action="store_true",
        help="also run each seed over three local `splitnn worker` processes and check it equals the in-process run",
    )
    p.add_argument("--write-tables", type=Path, default=None, metavar="DIR", help="only write the CSV files into DIR")
    p.add_argument("--seed", type=int, default=0, help="the seed of --write-tables")
    args = p.parse_args()
    if args.write_tables is not None:
        args.write_tables.mkdir(parents=True, exist_ok=True)
        write_tables(args.write_tables, args.seed)
        return
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for seed in range(args.seeds):
        config = HealthConfig(seed=seed, epochs=args.epochs, lr=args.lr)
        report = run_vertical_health(config, directory=args.out)
        rows.append((seed, report, report.ledger.format_table()))
        print(
            f"seed {seed}: {report.psi.size} common patients "
            f"(train {report.psi.parts['patients:train']}, test {report.psi.parts['patients:test']})  "
            f"split: AUC {report.test['auc']:.4f} acc {report.test['accuracy']:.4f}  "
            f"central: AUC {report.central_test['auc']:.4f} acc {report.central_test['accuracy']:.4f}",
            flush=True,
        )
        if args.processes:
            over_processes(config, report)
    aucs = [r.test["auc"] for _, r, _ in rows]
    gaps = [abs(r.test["auc"] - r.central_test["auc"]) for _, r, _ in rows]
    print(
        f"\ntest AUC over {len(rows)} seeds: mean {statistics.mean(aucs):.4f}, min {min(aucs):.4f}; "
        f"largest |split - central| {max(gaps):.4f}"
    )
    print(f"\nledger of seed {rows[-1][0]}:")
    print(rows[-1][2])


if __name__ == "__main__":
    main()
