"""``splitnn compare``: split learning and SplitFed against FedAvg and large-batch SGD, measured per client."""

from __future__ import annotations

import argparse

from splitnn.cli.format import parse_positive_ints, table
from splitnn.cli.options import (
    add_data_options,
    add_report_options,
    check_out_dir,
    check_positive,
    config_from_args,
)
from splitnn.compare.analytic import METHODS
from splitnn.errors import ConfigurationError

HELP = "compare split learning and SplitFed with FedAvg and large-batch SGD (bytes, FLOPs, accuracy per client)"
DESCRIPTION = (
    "Train split learning (round-robin data holders), SplitFed v1 and v2 (parallel data holders, "
    "client segments averaged every local epoch), FedAvg and large-batch synchronous SGD for "
    "each client count, from the same initial weights and data shards, and report per method and "
    "client count: bytes per client (measured by the ledger and checked against the analytic "
    "model), FLOPs per client (PyTorch's FLOP counter), test accuracy and wall time. Writes "
    "results.csv, results.json and PNG plots to --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn compare``."""
    add_data_options(
        p, dataset="fashion-mnist", dataset_help="dataset name: fashion-mnist or mnist (default: fashion-mnist)"
    )
    p.add_argument(
        "--model",
        default="mlp",
        choices=("mlp", "vgg"),
        help="mlp: the tutorial's 784-128-640-10 network cut after its first layer; vgg: a VGG-style "
        "CNN of 3.6 M parameters cut after its first conv block (default: mlp)",
    )
    p.add_argument("--clients", default="1,2,4", help="comma-separated client counts (default: 1,2,4)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data, every method (default: 1)")
    p.add_argument(
        "--local-epochs",
        type=int,
        default=1,
        help="FedAvg local epochs per round; FedAvg runs epochs / local-epochs rounds (default: 1)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size (per client for large-batch SGD)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.03 mlp, 0.02 vgg)")
    p.add_argument(
        "--partition",
        default="iid",
        help='how samples are split among clients: "iid" or "dirichlet:<alpha>" (default: iid)',
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods to run (default: {','.join(METHODS)})",
    )
    p.add_argument("--limit", type=int, default=None, help="train on the first N training samples only")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test samples only")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, shards and data order")
    add_report_options(
        p,
        out="compare-results",
        out_help="directory for results.csv, results.json and the plots (created; default: compare-results)",
    )
    p.add_argument("--no-flops", action="store_true", help="do not count FLOPs (times only; a little faster)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from splitnn.compare import CommModel, CompareConfig, build_model, crossover, run_comparison
    from splitnn.compare.report import HEADER, crossover_summary, human_bytes, plot, table_rows, write_csv, write_json
    from splitnn.data import load_dataset
    from splitnn.data.batching import check_seed

    check_positive("--limit", args.limit, optional=True)
    check_positive("--test-limit", args.test_limit, optional=True)
    check_seed(args.seed, "--seed")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    clients = parse_positive_ints(args.clients, "--clients", "1,2,4")
    from splitnn.training.topologies.presets import MAX_CLIENTS

    if max(clients) > MAX_CLIENTS:
        raise ConfigurationError(
            f"--clients {max(clients)} is more than the {MAX_CLIENTS} data holders a run is built with; use at most "
            f"{MAX_CLIENTS}"
        )
    config = config_from_args(CompareConfig, args, clients=clients, methods=methods, count_flops=not args.no_flops)
    check_out_dir(args.out)
    progress = not args.no_progress
    load = dict(data_dir=args.data_dir, download=not args.no_download, progress=progress)
    train = load_dataset(args.dataset, "train", limit=args.limit, **load)
    test = load_dataset(args.dataset, "test", limit=args.test_limit, **load)
    if max(config.clients) > len(train):
        raise ConfigurationError(
            f"--clients asks for {max(config.clients)} clients but there are only {len(train)} "
            f"training samples; use fewer clients or a larger --limit"
        )
    args.out.mkdir(parents=True, exist_ok=True)

    client, server = build_model(config.model, tuple(train.features.shape[1:]), train.num_classes)
    comm = CommModel.from_segments(client, server, tuple(train.features.shape[1:]))
    k_star = crossover(
        comm, len(train), epochs=config.epochs, batch_size=config.batch_size, local_epochs=config.local_epochs
    )
    print(
        f"splitnn compare: {args.dataset}, {len(train)} train / {len(test)} test samples, model {config.model} "
        f"({sum(p.numel() for m in (client, server) for p in m.parameters()):,} parameters, "
        f"{comm.cut_bytes:,} bytes per sample at the cut), "
        f"clients {','.join(map(str, config.clients))}, {config.epochs} epoch(s), batch {config.batch_size}, "
        f"SGD lr {config.learning_rate}",
        flush=True,
    )
    when = f"from {k_star} clients on" if k_star is not None else "at no client count up to the number of samples"
    print(f"analytic model: split learning sends fewer bytes per client than FedAvg {when}", flush=True)

    def report(r) -> None:
        flag = "" if r.matches_model else "  (differs from the analytic model!)"
        tqdm.write(
            f"  {r.method:<11} {r.clients:>4} clients: {human_bytes(r.bytes_per_client)}/client, "
            f"accuracy {r.accuracy:.4f}, {r.wall_seconds:.1f} s{flag}"
        )

    results = run_comparison(config, train, test, progress=progress, on_result=report)
    print()
    print(table(HEADER, table_rows(results)))
    if "split" in config.methods and "fedavg" in config.methods:
        print(f"\ncrossover: {crossover_summary(results, k_star)[1]}")
    write_csv(results, args.out / "results.csv")
    write_json(
        results,
        args.out / "results.json",
        config=config,
        comm=comm,
        dataset=args.dataset,
        train_samples=len(train),
        test_samples=len(test),
    )
    paths = plot(
        results,
        args.out,
        config=config,
        comm=comm,
        train_samples=len(train),
        title=f"{args.dataset}, {config.model}, {len(train)} samples, {config.epochs} epoch(s)",
    )
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.json'}, " + ", ".join(str(p) for p in paths))
    mismatched = [f"{r.method}@{r.clients}" for r in results if not r.matches_model]
    if mismatched:
        print(f"warning: measured bytes differ from the analytic model for {', '.join(mismatched)}")
        return 1
    return 0
