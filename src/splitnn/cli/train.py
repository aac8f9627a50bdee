"""``splitnn train``: train a split network and report accuracy and bytes per party."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from splitnn.cli.format import human_bytes, parse_positive_ints, table
from splitnn.cli.options import add_data_options
from splitnn.cli.topologies import add_topology_arguments, describe, topology_from_args
from splitnn.errors import ConfigurationError
from splitnn.fileio import atomic_write_text
from splitnn.workers.schedules import check_pipeline_depth

HELP = "train a split network (default: the PySyft tutorial's MNIST MLP)"
DESCRIPTION = (
    "Train a split network across workers and report loss, test accuracy and "
    "the bytes each party sent. Defaults reproduce the PySyft tutorial: MNIST, "
    "784-128-640-10 in three segments on alice, bob and claire, SGD lr 0.03, "
    "batch 64, NLL loss."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn train``."""
    add_data_options(
        p,
        dataset="mnist",
        dataset_help="dataset name: mnist or fashion-mnist (default: mnist), or breast-cancer with --topology "
        "vertical (two hospitals and a lab aligned by private set intersection, binary diagnosis; "
        "docs/vertical-psi.md)",
        data_dir_help="directory holding the dataset's IDX files (default: $SPLITNN_DATA, the cache, "
        "system paths, then download)",
    )
    for flag, what in (("--epochs", "passes over the training data"), ("--batch-size", "samples per training step")):
        key = flag[2:].replace("-", "_")
        tutorial, health = _DEFAULTS["idx"][key], _DEFAULTS["breast-cancer"][key]
        p.add_argument(flag, type=int, default=None, help=f"{what} (default: {tutorial}; breast-cancer: {health})")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of every segment: SGD (default: 0.03); breast-cancer: Adam (default: 0.003)",
    )
    p.add_argument(
        "--hidden",
        default=None,
        help="hidden layer sizes, comma-separated; one segment per hidden layer plus the output "
        "segment (default: 128,640; breast-cancer: 16, the width of every hidden layer)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="NAMES",
        help="test metrics, comma-separated, from accuracy, auc, mse, mae "
        "(default: accuracy; breast-cancer: accuracy,auc)",
    )
    p.add_argument(
        "--workers",
        default="alice,bob,claire",
        help="comma-separated worker names, one per segment (repeat a name to put consecutive "
        "segments on one worker), or grpc://HOST:PORT addresses of `splitnn worker` parties (with "
        "--topology multi/splitfed/u-shape/vertical: the addresses of the parties it names, in any order)",
    )
    p.add_argument(
        "--token-file", type=Path, default=None, help="federation token for grpc:// workers (default: $SPLITNN_TOKEN)"
    )
    p.add_argument(
        "--federation",
        type=Path,
        default=None,
        metavar="FILE",
        help="a researcher's federation.toml (from `splitnn provision`): --workers names its parties, reached with "
        "the kit's token and certificates (mutual TLS); docs/deploying.md",
    )
    p.add_argument(
        "--compression",
        default=None,
        metavar="CODEC",
        help="compress what crosses each cut between parties: a codec for both directions (none, fp16, bf16, "
        "int8, topk:RATIO) or activation=CODEC,gradient=CODEC (default: none; docs/performance.md)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="K",
        help="batches in flight (default 1: lock-step). K > 1: the data holder starts the next batch before the "
        "last one's gradient is back; a batch is computed with weights of at most K-1 updates ago "
        "(docs/performance.md#schedules-and-pipelining)",
    )
    p.add_argument(
        "--weight-prediction",
        type=float,
        default=None,
        metavar="BETA",
        help="with --pipeline K > 1: run each batch on weights extrapolated to the step that applies its gradient "
        "(moving average of the updates with factor BETA in [0, 1), e.g. 0.5; default: off)",
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="standardise every input feature with the training set's mean and standard deviation",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    p.add_argument("--limit", type=int, default=None, help="train on the first N samples only")
    p.add_argument("--save", type=Path, default=None, help="save the trained model (safetensors) here")
    p.add_argument("--json", type=Path, default=None, help="write the per-epoch history as JSON here")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: plain lines only (each epoch's line, and a heartbeat line every 30 s of a long epoch); "
        "bars show only when stderr is a terminal, so redirected output never holds their \\r frames",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write TensorBoard event files and metrics.csv here: loss per batch and epoch, test metrics, learning "
        "rate, bytes per party per epoch, samples/s (`tensorboard --logdir DIR`; needs tensorboard)",
    )
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="checkpoint the job: every party writes its own checkpoint (networked parties in their --state-dir), "
        "this command a manifest in DIR (docs/failures-and-policy.md)",
    )
    p.add_argument(
        "--checkpoint-every",
        default="epoch",
        metavar="N",
        help="checkpoint every N batches as well as after every epoch (default: after every epoch)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="after a fault (a worker restarted, a connection lost), reconnect and resume from the last "
        "checkpoint up to N times per fault (default 3; with --checkpoint-dir)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the job whose manifest is in --checkpoint-dir (or start it if there is none); the run ends "
        "exactly as an uninterrupted one would",
    )
    add_topology_arguments(p)


def _parse_sizes(text: str) -> list[int]:
    return list(parse_positive_ints(text, "--hidden", "128,640"))


#: Defaults of the numeric flags: the tutorial's, and the health example's (``breast-cancer``).
_DEFAULTS = {
    "idx": {"epochs": 5, "batch_size": 64, "lr": 0.03, "hidden": "128,640"},
    "breast-cancer": {"epochs": 20, "batch_size": 32, "lr": 0.003, "hidden": "16"},
}


def _fill_defaults(args: argparse.Namespace) -> None:
    defaults = _DEFAULTS["breast-cancer" if args.dataset == "breast-cancer" else "idx"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _metric_names(args: argparse.Namespace) -> list[str] | None:
    if args.metrics is None:
        return None
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not names:
        raise ConfigurationError("--metrics: give metric names, e.g. --metrics accuracy,auc")
    return names


def _test_columns(history) -> list[str]:
    """The test metrics to show: accuracy first, then the others, as fit computed them."""
    names: list[str] = []
    for e in history.epochs:
        names.extend(m for m in e.test_metrics if m not in names)
    return names


def _metric_text(stats) -> str:
    shown = stats.test_metrics or {"accuracy": stats.test_accuracy}
    return "  ".join(f"test {_SHORT.get(k, k)} {v:.4f}" for k, v in shown.items())


_SHORT = {"accuracy": "acc"}


def _compression(text: str | None, cuts: int) -> object:
    """``--compression``: a codec, or ``activation=CODEC,gradient=CODEC``; checked now, before any data is loaded."""
    from splitnn.split.compression import DIRECTIONS, parse_compression

    if text is None:
        return None
    spec: object = text.strip()
    if "=" in text:
        pairs = [p.partition("=") for p in text.split(",") if p.strip()]
        spec = {k.strip(): v.strip() for k, _, v in pairs}
        if any(not sep for _, sep, _ in pairs) or len(spec) != len(pairs) or set(spec) - set(DIRECTIONS):
            raise ConfigurationError(
                f"--compression {text!r}: give a codec (e.g. int8) or activation=CODEC,gradient=CODEC"
            )
    try:
        parse_compression(spec, cuts)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--compression: {exc}") from None
    return spec


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse counts, seeds and rates that cannot train, before any data is loaded."""
    from splitnn.data.batching import check_seed

    check_seed(args.seed, "--seed")
    if args.retries < 0:
        raise ConfigurationError(f"--retries must be >= 0 (reconnection attempts after a fault), got {args.retries}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigurationError(f"{flag} must be a positive integer, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigurationError(f"--lr must be a positive finite number, got {args.lr}")
    check_pipeline_depth(args.pipeline, "--pipeline")
    beta = args.weight_prediction
    if beta is not None and not 0 <= beta < 1:
        raise ConfigurationError(f"--weight-prediction must be in [0, 1) (e.g. 0.5), got {beta}")
    if beta is not None and args.pipeline == 1:
        raise ConfigurationError("--weight-prediction applies to pipelined training: give --pipeline K > 1 as well")


def _checkpoint_options(args: argparse.Namespace) -> dict:
    """fit's checkpoint arguments from the flags (refused before any data is loaded)."""
    if args.checkpoint_dir is None:
        if args.resume or args.checkpoint_every != "epoch":
            raise ConfigurationError("--resume and --checkpoint-every need --checkpoint-dir DIR")
        return {}
    every: str | int = args.checkpoint_every
    if every != "epoch":
        every = parse_positive_ints(every, "--checkpoint-every", "100")[0] if "," not in every else 0
        if not every:
            raise ConfigurationError(f"--checkpoint-every takes one number of batches, got {args.checkpoint_every!r}")
    return {
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": every,
        "resume": args.resume,
        "retries": args.retries,
    }


def _check_output(path: Path | None, flag: str) -> None:
    if path is not None and not path.parent.exists():
        raise ConfigurationError(f"{flag} {path}: directory {path.parent} does not exist; create it first")


def _federation_workers(args: argparse.Namespace, names: list[str] | None) -> dict | None:
    """With ``--federation``: the parties ``names`` (in order; None: all of them) connected through the
    researcher's kit; else None."""
    if args.federation is None:
        return None
    if args.token_file is not None or any(n.startswith("grpc://") for n in names or ()):
        raise ConfigurationError(
            "--federation brings the addresses, token and certificates: give --workers party names, no --token-file"
        )
    from splitnn.deploy.connect import connect_federation

    return connect_federation(args.federation, parties=list(dict.fromkeys(names)) if names is not None else None)


def _remote_workers(urls: list[str], token_file: Path | None) -> dict:
    """Connect to ``splitnn worker`` parties by address (one connection per distinct address)."""
    import os

    from splitnn import connect
    from splitnn.transport import load_token

    if not all(u.startswith("grpc://") for u in urls):
        raise ConfigurationError("--workers: give either worker names or grpc:// addresses, not a mix")
    if token_file is not None:
        token = load_token(token_file)
    elif os.environ.get("SPLITNN_TOKEN"):
        token = os.environ["SPLITNN_TOKEN"].strip()
    else:
        raise ConfigurationError("grpc:// workers need the federation token: --token-file FILE or $SPLITNN_TOKEN")
    return {u: connect(u, token=token) for u in dict.fromkeys(urls)}


def run(args: argparse.Namespace) -> int:
    from splitnn import SplitNN, VirtualWorker
    from splitnn.data import load_dataset, standardize
    from splitnn.models import tutorial_mlp

    _fill_defaults(args)
    _check_numbers(args)
    metrics = _metric_names(args)
    if args.dataset == "breast-cancer":
        if args.standardize:
            raise ConfigurationError("--standardize: the breast-cancer tables are standardised by each party already")
        if args.pipeline != 1:
            raise ConfigurationError("--pipeline: the breast-cancer example trains lock-step; leave --pipeline 1")
        return _run_health(args, metrics)
    hidden = _parse_sizes(args.hidden)
    topology = topology_from_args(args, hidden)  # None: the plain chain of --workers
    compression = _compression(args.compression, len(hidden))
    if compression is not None and topology is not None:
        raise ConfigurationError(
            f"--compression applies to the plain chain of --workers, not --topology {args.topology}"
        )
    if args.weight_prediction is not None and topology is not None:
        raise ConfigurationError(
            f"--weight-prediction applies to the plain chain of --workers, not --topology {args.topology}"
        )
    names = [n.strip() for n in args.workers.split(",") if n.strip()]
    if topology is None and len(names) != len(hidden) + 1:
        raise ConfigurationError(
            f"--workers names {len(names)} workers but --hidden {args.hidden} makes "
            f"{len(hidden) + 1} segments; give one worker per segment"
        )
    _check_output(args.save, "--save")
    _check_output(args.json, "--json")
    checkpoints = _checkpoint_options(args)
    progress = "lines" if args.no_progress else None  # None: a bar on a terminal, plain lines elsewhere
    bars = not args.no_progress and sys.stderr.isatty()  # a download's bar: only where it renders
    load = dict(data_dir=args.data_dir, download=not args.no_download, progress=bars)
    train = load_dataset(args.dataset, "train", limit=args.limit, **load)
    test = load_dataset(args.dataset, "test", **load)
    if topology is not None and topology.clients > len(train):
        raise ConfigurationError(
            f"--clients {topology.clients}: {len(train)} training samples cannot give each data holder one; "
            f"use at most --clients {len(train)}"
        )
    if args.standardize:
        train, test = standardize(train, test)

    torch.manual_seed(args.seed)
    in_features = int(torch.tensor(train.features.shape[1:]).prod())
    sizes = "-".join(str(s) for s in [in_features, *hidden, train.num_classes])
    if topology is not None:
        from splitnn.training.topologies import build_topology

        remote = _federation_workers(args, None)  # every party: the topology names the ones it uses
        if any(n.startswith("grpc://") for n in names):  # the parties by the names they answer to
            remote = {w.name: w for w in _remote_workers(names, args.token_file).values()}
        try:
            model = build_topology(topology, tuple(train.features.shape[1:]), train.num_classes, workers=remote)
        except BaseException:
            for w in (remote or {}).values():
                w.close()
            raise
        placement = describe(topology)
    else:
        segments = tutorial_mlp(hidden, in_features=in_features, classes=train.num_classes)
        federated = _federation_workers(args, names)
        if federated is not None:
            workers = federated
        elif any(n.startswith("grpc://") for n in names):
            workers = _remote_workers(names, args.token_file)
        else:
            workers = {n: VirtualWorker(n) for n in dict.fromkeys(names)}
        model = SplitNN(
            segments,
            [workers[n] for n in names],
            optimizer=f"sgd:lr={args.lr}",
            compression=compression,
            weight_prediction=args.weight_prediction,
        )
        placement = " -> ".join(names)
    codecs = f", compression {args.compression}" if compression is not None else ""
    print(
        f"splitnn train: {args.dataset}, {len(train)} train / {len(test)} test samples, "
        f"{sizes} on {placement}, batch {args.batch_size}, SGD lr {args.lr}{codecs}"
        + (f", pipeline {args.pipeline}" if args.pipeline > 1 else "")
        + (f", weight prediction {args.weight_prediction}" if args.weight_prediction is not None else "")
        + (", standardised inputs" if args.standardize else ""),
        flush=True,
    )

    parties = model.parties()

    history = model.fit(
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        test_data=test,
        seed=args.seed,
        progress=progress,
        on_epoch=_reporter(args.epochs, parties),
        metrics=metrics,
        **checkpoints,
        pipeline=args.pipeline,
        log_dir=args.log_dir,
    )
    _print_history(history, parties)
    print(f"\n{LEDGER_CAPTION}")
    print(model.ledger.format_table())
    if args.save is not None:
        from splitnn.split.persist import save_model

        sizes = None
        if topology is None:  # record where the cuts are, for `splitnn fingerprint`
            sizes = [len(s) if isinstance(s, torch.nn.Sequential) else 1 for s in segments]
        save_model(model.collect(), args.save, segments=sizes)
        print(f"\nsaved the trained model to {args.save}")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps([e.__dict__ for e in history.epochs], indent=2))
    return 0


#: What the ledger table counts, unlike the per-epoch "sent" figures (each epoch's training only).
LEDGER_CAPTION = "every transfer of the run (training and evaluation; each epoch's 'sent' counts its training only):"


def _reporter(epochs: int, parties: list[str]):
    def report(e) -> None:
        sent = "  ".join(f"{p} {human_bytes(e.bytes_sent.get(p, 0))}" for p in parties)
        print(
            f"epoch {e.epoch}/{epochs}  loss {e.train_loss:.4f}  {_metric_text(e)}  sent: {sent}  ({e.seconds:.1f} s)",
            flush=True,
        )

    return report


def _print_history(history, parties: list[str]) -> None:
    names = _test_columns(history)
    print()
    print(
        table(
            ["epoch", "train loss", *[f"test {_SHORT.get(m, m)}" for m in names], "seconds"]
            + [f"{p} sent (B)" for p in parties],
            [
                [
                    e.epoch,
                    f"{e.train_loss:.4f}",
                    *[f"{e.test_metrics[m]:.4f}" for m in names],
                    f"{e.seconds:.1f}",
                    *[e.bytes_sent.get(p, 0) for p in parties],
                ]
                for e in history.epochs
            ],
        )
    )


def _run_health(args: argparse.Namespace, metrics: list[str] | None) -> int:
    """``--dataset breast-cancer --topology vertical``: the health example (:mod:`splitnn.experiments.health`)."""
    from splitnn.experiments.health import HOSPITALS, LAB, HealthConfig, run_vertical_health

    if args.topology != "vertical":
        raise ConfigurationError(
            "--dataset breast-cancer is vertically partitioned (two hospitals and a lab): use --topology vertical"
        )
    for flag, value, allowed in (("--clients", args.clients, (None, 2)), ("--merge", args.merge, (None, "concat"))):
        if value not in allowed:
            raise ConfigurationError(f"--dataset breast-cancer has two hospitals merged by concat; drop {flag}")
    urls = [n.strip() for n in args.workers.split(",") if n.strip()] if args.workers != "alice,bob,claire" else []
    if urls and (len(urls) != 3 or not all(u.startswith("grpc://") for u in urls)):
        raise ConfigurationError(
            "--dataset breast-cancer runs hospital_a, hospital_b and lab: in process (drop --workers), or give "
            "the three grpc:// addresses of `splitnn worker` parties holding their tables "
            "(docs/vertical-psi.md#across-worker-processes)"
        )
    if metrics is not None and metrics != ["accuracy", "auc"]:
        raise ConfigurationError("--dataset breast-cancer reports accuracy and auc; drop --metrics")
    for flag, value in (
        ("--federation", args.federation),
        ("--log-dir", args.log_dir),
        ("--save", args.save),
        ("--limit", args.limit),
        ("--data-dir", args.data_dir),
        ("--checkpoint-dir", args.checkpoint_dir),
        ("--compression", args.compression),
    ):
        if value is not None:
            raise ConfigurationError(f"{flag} does not apply to --dataset breast-cancer")
    _check_output(args.json, "--json")
    hidden = _parse_sizes(args.hidden)
    topology_from_args(args, hidden)  # refuses the flags of other topologies
    if len(set(hidden)) != 1:
        raise ConfigurationError(
            f"--dataset breast-cancer takes one hidden width (e.g. --hidden 16), got {args.hidden}"
        )
    config = HealthConfig(seed=args.seed, hidden=hidden[0], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    parties = [*HOSPITALS, LAB]
    workers = None
    if urls:  # the parties by the names they answer to; each holds its own table
        workers = {w.name: w for w in _remote_workers(urls, args.token_file).values()}
    where = (
        f"{' + '.join(HOSPITALS)} and {LAB} at {', '.join(urls)}, each holding its own table"
        if workers
        else f"{' + '.join(HOSPITALS)} (15 features each) and {LAB} (diagnosis), each holding "
        f"~{config.coverage:.0%} of the patients"
    )
    print(
        f"splitnn train: breast-cancer (scikit-learn, 569 patients), {where}; PSI aligns them; "
        f"MLP bottoms of width {config.hidden}, concat at {LAB}, bce_with_logits, Adam lr {config.lr}, "
        f"batch {config.batch_size}",
        flush=True,
    )
    try:
        # networked, the researcher holds no table: no central baseline
        report = run_vertical_health(
            config, on_epoch=_reporter(config.epochs, parties), workers=workers, central=workers is None
        )
    finally:
        for w in (workers or {}).values():
            w.close()
    psi = report.psi
    parts = ", ".join(f"{k} {v}" for k, v in psi.parts.items())
    print(f"\nprivate set intersection: {psi.size} common patients ({parts})")
    _print_history(report.history, parties)
    print()
    print(
        table(
            ["test set", "accuracy", "auc"],
            [
                ["split (PSI-aligned parties)", f"{report.test['accuracy']:.4f}", f"{report.test['auc']:.4f}"],
                *(
                    [
                        [
                            "central (joined table)",
                            f"{report.central_test['accuracy']:.4f}",
                            f"{report.central_test['auc']:.4f}",
                        ]
                    ]
                    if report.central_test
                    else []
                ),
            ],
        )
    )
    print(f"\n{LEDGER_CAPTION}")
    print(report.ledger.format_table())
    if args.json is not None:
        atomic_write_text(args.json, json.dumps([e.__dict__ for e in report.history.epochs], indent=2))
    return 0
