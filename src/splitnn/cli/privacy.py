"""``splitnn privacy``: train with defenses, attack, and print the leakage / accuracy trade-off table."""

from __future__ import annotations

import argparse

from splitnn.cli.options import add_data_options, add_report_options, check_out_dir, check_positive, config_from_args
from splitnn.errors import ConfigurationError

#: Strengths used for a defense when ``--strengths`` does not name any.
DEFAULT_STRENGTHS = {
    "nopeek": (0.5, 2.0, 5.0),
    "noise": (0.03, 0.1, 0.3),
    "label": (1.0, 3.0, 10.0),
    "dp": (1.0, 3.0, 8.0),
    "label-dp": (0.5, 1.0, 2.0),
    "marvell": (1.0, 4.0, 16.0),
    "mid": (0.1, 1.0, 10.0),
}

#: The integer options: flag, default, help (the default is appended).
INT_OPTIONS = (
    (
        "--train-size",
        10_000,
        "private training samples, from the start of the training split (0: all but the auxiliary sample)",
    ),
    ("--aux-size", 5_000, "attacker's auxiliary public sample, from the end of the training split"),
    ("--test-size", 0, "test samples (0: the whole test split)"),
    ("--victims", 1_000, "private samples whose reconstruction and distance correlation are measured"),
    ("--epochs", 3, "training epochs"),
    ("--batch-size", 64, "training batch size"),
    ("--positive-class", 0, "class that is positive in the binary label-leakage task"),
    ("--label-directions", 1, "principal directions that receive noise in the label defense"),
    ("--decoder-epochs", 30, "epochs of the attacker's decoder"),
    ("--seed", 0, "seed of weights, data order and the defenses' noise"),
    (
        "--seeds",
        1,
        "run every setting with seeds SEED..SEED+N-1; the table and privacy.json give each column's "
        "mean and 95%% interval",
    ),
    ("--fsha-steps", 500, "training steps of the FSHA attacker"),
    ("--unsplit-rounds", 50, "alternations of the UnSplit attacker"),
    ("--feature-epochs", 100, "epochs of the feature-inference generator"),
)


HELP = "measure what leaks at the cut, with and without defenses"
DESCRIPTION = (
    "Train the tutorial network (cut after the data holder's segment) without a defense and with "
    "each defense at each strength, run the attacks (--attack: decoder and UnSplit input reconstruction by "
    "the receiving party, label inference from gradients and model completion by the data holder, distance "
    "correlation, FSHA by a malicious label holder, GRN feature inference in a vertical twin), print one "
    "table and write CSV, JSON and PNG figures."
)
EPILOG = (
    "Strength units: nopeek = alpha (weight of dCor in the data holder's loss); noise = sigma (noise std "
    "per coordinate in units of --clip); label = noise std along the gradients' principal direction in "
    "units of their RMS norm. Example: splitnn privacy --dataset fashion-mnist --defense nopeek,noise,label "
    "--strengths nopeek=0.5,2,5 --strengths noise=0.03,0.1,0.3 --strengths label=1,3,10"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn privacy``."""
    add_data_options(p, dataset="fashion-mnist", dataset_help="dataset name (default: fashion-mnist)")
    p.add_argument(
        "--defense",
        action="append",
        default=None,
        metavar="NAMES",
        help="comma-separated defenses among none,nopeek,noise,label,dp,label-dp,marvell,mid (repeatable; "
        "default: all). dp: DP-SGD at the data holder, strength = target epsilon at --delta; label-dp: "
        "randomized response, strength = epsilon; marvell: noise power budget; mid: KL weight lambda",
    )
    p.add_argument(
        "--strengths",
        action="append",
        default=None,
        metavar="LIST",
        help="comma-separated strengths for every defense (e.g. 0,0.1,1), or for one defense as "
        "NAME=LIST (repeatable); defaults per defense: "
        + "; ".join(f"{k} {','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_STRENGTHS.items()),
    )
    for flag, default, text in INT_OPTIONS:
        p.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of every segment (default 0.05)")
    p.add_argument("--hidden", default="128,640", help="hidden layer sizes of the MLP, comma-separated")
    p.add_argument(
        "--workers",
        default="alice,bob,bob",
        help="one worker name per segment; the first party's segments end at the cut, the last party "
        "holds the labels (default alice,bob,bob: the cut after the first layer)",
    )
    p.add_argument("--clip", type=float, default=4.0, help="per-sample activation norm bound C of the noise defense")
    p.add_argument(
        "--attack",
        action="append",
        default=None,
        metavar="NAMES",
        help="comma-separated attacks among inversion,label-leakage,dcor,fsha,model-completion,unsplit,"
        "feature-inference (repeatable; default: all)",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the dp defense's budget (default 1e-5)")
    p.add_argument(
        "--dp-clip", type=float, default=1.0, help="per-example gradient norm bound of the dp defense (default 1)"
    )
    add_report_options(
        p,
        out="privacy-report",
        out_help="directory for privacy.csv, privacy.json and the PNGs (created; default ./privacy-report)",
    )


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigurationError(f"{flag} must be comma-separated numbers like 0,0.1,1, got {text!r}") from None
    if not values:
        raise ConfigurationError(f"{flag} names no strength")
    return values


def parse_settings(defense_args: list[str] | None, strength_args: list[str] | None) -> list:
    """The defense settings named by ``--defense`` and ``--strengths`` (baseline excluded)."""
    from splitnn.privacy.defenses import DEFENSE_NAMES, DefenseSetting

    default = [",".join(DEFAULT_STRENGTHS)]
    names = [n.strip() for arg in (defense_args or default) for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFENSE_NAMES]
    if unknown:
        raise ConfigurationError(f"--defense: unknown defense {unknown[0]!r}; choose among {', '.join(DEFENSE_NAMES)}")
    shared: list[float] | None = None
    per: dict[str, list[float]] = {}
    for arg in strength_args or []:
        if "=" in arg:
            name, _, values = arg.partition("=")
            name = name.strip()
            if name not in DEFENSE_NAMES or name == "none":
                raise ConfigurationError(
                    f"--strengths {arg!r}: {name!r} is not a defense with a strength ({', '.join(DEFAULT_STRENGTHS)})"
                )
            per[name] = _floats(values, f"--strengths {name}=")
        else:
            shared = _floats(arg, "--strengths")
    for name in per:
        if name not in names:
            raise ConfigurationError(f"--strengths names {name!r} but --defense does not include it")
    settings = []
    for name in dict.fromkeys(names):
        if name == "none":
            continue
        for s in per.get(name, shared if shared is not None else DEFAULT_STRENGTHS[name]):
            settings.append(DefenseSetting(name, s))  # validates the strength
    return list(dict.fromkeys(settings))


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigurationError(f"--hidden must be comma-separated integers like 128,640, got {text!r}") from None
    return sizes


def parse_attacks(attack_args: list[str] | None) -> tuple[str, ...]:
    """The attacks named by ``--attack`` (default: all)."""
    from splitnn.privacy.experiment import ATTACK_NAMES

    names = [n.strip() for arg in (attack_args or [",".join(ATTACK_NAMES)]) for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACK_NAMES]
    if unknown or not names:
        raise ConfigurationError(
            f"--attack: unknown or no attack {unknown[:1] or names}; choose among {', '.join(ATTACK_NAMES)}"
        )
    return tuple(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from splitnn.cli.format import table
    from splitnn.data.batching import check_seed
    from splitnn.privacy.attacks.inversion import InversionConfig
    from splitnn.privacy.experiment import PrivacyConfig, load_privacy_data, run_privacy_experiment
    from splitnn.privacy.report import THREATS, mean_result, summarize, summary_rows, table_rows, write_report

    check_seed(args.seed, "--seed")
    settings = parse_settings(args.defense, args.strengths)
    attacks = parse_attacks(args.attack)
    check_positive("--seeds", args.seeds, optional=True)
    for flag, value in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        if value < 0:
            raise ConfigurationError(f"{flag} must be >= 0 (0: all), got {value}")
    config = config_from_args(
        PrivacyConfig,
        args,
        download=not args.no_download,
        train_size=args.train_size or None,
        test_size=args.test_size or None,
        hidden=_sizes(args.hidden),
        workers=tuple(n.strip() for n in args.workers.split(",") if n.strip()),
        attacks=attacks,
        inversion=InversionConfig(epochs=args.decoder_epochs, seed=args.seed),
        progress=not args.no_progress,
    )
    check_out_dir(args.out)
    data = load_privacy_data(config)  # every size and name is checked before training starts
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"splitnn privacy: {config.dataset}, {len(data.private)} private / {len(data.aux)} auxiliary / "
        f"{len(data.test)} test samples, MLP {'-'.join(map(str, config.hidden))} on {' -> '.join(config.workers)}, "
        f"{config.epochs} epochs; label attacks on class {config.positive_class} vs rest; "
        f"{len(settings) + 1} settings; attacks {', '.join(attacks)}; seeds {args.seed}..{args.seed + args.seeds - 1}",
        flush=True,
    )
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = [
        run_privacy_experiment(
            dataclasses.replace(config, seed=s, inversion=dataclasses.replace(config.inversion, seed=s)),
            settings,
            data=data,
        )
        for s in seeds
    ]
    summary = summarize(results) if len(results) > 1 else None
    result = mean_result(results) if len(results) > 1 else results[0]
    header, rows = summary_rows(summary) if summary is not None else table_rows(result)
    print()
    print(table(header, rows))
    print()
    print(
        f"reference classifier on the victims' true inputs: {result.clean_accuracy:.3f} (chance {result.chance:.3f}); "
        f"recon acc is the same classifier on the reconstructions"
    )
    if summary is not None:
        print(f"mean ±half-width of the 95% interval over {len(seeds)} seeds")
    for name in attacks:
        print(f"- {THREATS[name]}")
    paths = write_report(result, args.out, seeds=seeds, summary=summary)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
