"""``splitnn worker``: run one party of split learning as a gRPC server.

    splitnn worker --name bob --listen 127.0.0.1:7002 --token-file TOKEN \\
        [--tls-cert bob.pem --tls-key bob.key --tls-ca ca.pem] \\
        [--data mnist:test=/data/mnist,parts=labels,limit=500 ...] [--trust mypkg.models ...] \\
        [--device cuda:0] [--config worker.toml]

The parser of the flags, the checks of their values before the worker listens (``--data``: what it may
hold, :func:`load_data_spec`; ``--policy``, ``--trust``, the session limits, TLS names) and the server's
start. What each flag means: ``splitnn worker --help``, docs/deploying.md, docs/shared-worker.md and
docs/security.md. A worker that holds data starts closed (the gate of :mod:`splitnn.workers.policy`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitnn.cli.options import add_credential_options, config_from_args
from splitnn.errors import ConfigurationError, DataError

HELP = "run a party (segments, optimizers, local data) as a gRPC server"
DESCRIPTION = "Serve one party of split learning over gRPC until SIGINT/SIGTERM."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn worker``."""
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="read the settings from this TOML file (keys: the flags' names, e.g. token_file; paths relative to "
        "it); flags given here override it. `splitnn provision` writes one per party (docs/deploying.md)",
    )
    p.add_argument(
        "--name", default=None, help="this party's name (e.g. alice); with TLS, its certificate's name (required)"
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="HOST:PORT to listen on; port 0 picks a free port (see --address-file). Default 127.0.0.1:0",
    )
    p.add_argument(
        "--data-listen",
        default=None,
        metavar="HOST:PORT",
        help="also listen here for peer links over plain TCP (TLS with --tls-*): the same frames as over gRPC, about "
        "a third cheaper per byte; peers that learn of it from the researcher dial it (docs/networking.md)",
    )
    p.add_argument(
        "--data-advertise",
        default=None,
        metavar="HOST:PORT",
        help="the address peers should dial for --data-listen when it is not the one it listens on (NAT, proxy)",
    )
    add_credential_options(
        p,
        token="file holding the federation token (required)",
        cert="this party's certificate (PEM)",
        key="this party's private key (PEM)",
        ca="the federation CA (PEM); with it, callers must present certificates (mutual TLS)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="hold a dataset (repeatable): NAME[:SPLIT]=DIR[,parts=features|labels|both][,limit=N] (MNIST-family "
        "IDX files), NAME=table:PATH,id=COLUMN[,columns=A+B][,label=COLUMN] (CSV), or "
        "NAME=MODULE:FUNCTION[,parts=...] (a trusted function building the dataset, see --trust)",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="MODULE",
        help="let segment specs import classes, and --data call functions, from MODULE and its submodules "
        "(repeatable), e.g. mypkg.models",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where this party's segments, optimizer state and data live and compute: cpu (default), cuda, cuda:N",
    )
    p.add_argument(
        "--address-file",
        type=Path,
        default=None,
        help="write the bound HOST:PORT here once listening (atomic), for --listen ...:0",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (set the researcher's count for bit-identical results)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a peer's tensor before failing the step (default 60)",
    )
    p.add_argument(
        "--allow-outputs",
        action="store_true",
        help="let the researcher fetch this party's outputs (needed by predict and the low-level loop)",
    )
    p.add_argument(
        "--max-lifetime",
        type=float,
        default=None,
        help="shut down after this many seconds (a safety net for scripts and tests)",
    )
    p.add_argument(
        "--chunk-bytes", type=int, default=None, help="largest gRPC message payload (default 4 MiB - 64 KiB)"
    )
    p.add_argument(
        "--session-grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep a closed session's segments and datasets this long for its researcher to resume "
        "(its tensors are freed at once; default 300; 0 frees everything at once)",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="sessions kept at once, open or within their grace period (default 64); a new one evicts the "
        "oldest closed one, or is refused when all are open",
    )
    p.add_argument(
        "--max-session-memory",
        type=str,
        default=None,
        metavar="SIZE",
        help="bytes one forward of a researcher's segment may allocate, checked on meta tensors before it runs "
        "(default 1GiB; e.g. 512MiB, 4GiB, or a number of bytes)",
    )
    p.add_argument(
        "--max-sessions-per-researcher",
        type=int,
        default=None,
        metavar="N",
        help="sessions one researcher identity keeps at once (default 16), so that one researcher cannot take "
        "every slot: researchers are told apart by their certificates (mutual TLS) or their own tokens "
        "(--researcher-tokens); every holder of the federation token is one researcher",
    )
    p.add_argument(
        "--researcher-tokens",
        type=Path,
        default=None,
        metavar="FILE",
        help="researchers' own tokens, one 'NAME TOKEN' a line (# comments): each admits that researcher's calls "
        "(never a peer's) beside the federation token, and names the researcher its sessions count against",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep this party's checkpoints here (fit(..., checkpoint_dir=...) / splitnn train --checkpoint-dir), "
        "and the audit log (DIR/audit.jsonl); a restarted worker resumes from it (docs/failures-and-policy.md)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        metavar="FILE",
        help="this party's policy (TOML or JSON): accept_segments, refuse_passthrough, min_reduction, peers, "
        "max_params, release_outputs, datasets, psi_peers, max_psi_runs, detect_hijack, release_weights, "
        "accept_any_segment, min_batch_size, draw_rows, release_grad_norms; enforced before any batch. With --data "
        "the rules it does not set are closed: only pinned segments run on the data, the worker draws the rows, no "
        "weights or gradient norms leave "
        "(docs/failures-and-policy.md)",
    )
    p.add_argument(
        "--audit-log",
        type=Path,
        default=None,
        metavar="FILE",
        help="append the audit log (JSON lines: segments installed, datasets read, bytes sent, refusals, "
        "checkpoints) here (default: STATE_DIR/audit.jsonl with --state-dir, else none)",
    )
    p.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (sessions, commands, bytes per peer and kind, "
        "latencies, errors, memory; off by default; docs/deploying.md#monitoring)",
    )
    p.set_defaults(parser=p)


def load_worker_policy(path: Path | None, allow_outputs: bool, *, data_holder: bool = False):
    """The party's policy from ``--policy`` and ``--allow-outputs`` (which a policy file's
    ``release_outputs`` must not contradict); None for the server's default. ``data_holder`` (the
    worker has ``--data``): the rules the file does not set are closed (``DATA_HOLDER_DEFAULTS``)."""
    from dataclasses import replace

    from splitnn.workers.policy import load_policy, read_policy_rules

    if path is None:
        return None
    policy = load_policy(path, data_holder=data_holder)
    if "release_outputs" not in read_policy_rules(path):
        return replace(policy, release_outputs=allow_outputs)  # a server hands out no outputs unless told
    if allow_outputs and not policy.release_outputs:
        raise ConfigurationError(f"--allow-outputs contradicts release_outputs = false in --policy {path}; drop one")
    return policy


def parse_data_spec(text: str) -> tuple[str, str, str, Path, tuple[str, ...], int | None]:
    """``mnist:test=DIR,parts=labels,limit=500`` -> (key, dataset, split, dir, parts, limit)."""
    key, eq, rest = text.partition("=")
    if not eq or not key or not rest:
        raise ConfigurationError(f"--data {text!r}: write NAME[:SPLIT]=DIR[,parts=features|labels|both][,limit=N]")
    dataset, _, split = key.partition(":")
    directory, *options = rest.split(",")
    parts: tuple[str, ...] = ("features", "labels")
    limit = None
    for opt in options:
        k, _, v = opt.partition("=")
        if k == "parts" and v in ("features", "labels", "both"):
            parts = _parts(v)
        elif k == "limit" and v.isdigit() and int(v) > 0:
            limit = int(v)
        else:
            raise ConfigurationError(
                f"--data {text!r}: unknown option {opt!r}; use parts=features|labels|both or limit=N"
            )
    return key, dataset, split or "train", Path(directory), parts, limit


_CODE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def _parts(value: str) -> tuple[str, ...]:
    return ("features", "labels") if value == "both" else (value,)


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | None, flag: str, default: int) -> int:
    """``"512MiB"`` -> 536870912 (units B, KiB, MiB, GiB, TiB; none: bytes); ``default`` for None."""
    if text is None:
        return default
    t = text.strip().lower().replace(" ", "")
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits) :]
    if unit not in _SIZE_UNITS or not digits.isdigit() or len(digits) > 15 or int(digits) < 1:
        raise ConfigurationError(
            f"{flag} must be a size >= 1 like 512MiB, 2GiB or a number of bytes (units: B, KiB, MiB, GiB, TiB), "
            f"got {text!r}"
        )
    return int(digits) * _SIZE_UNITS[unit]


def is_trusted(module: str, trust: Sequence[str]) -> bool:
    """Whether ``module`` is one of the ``trust`` prefixes or inside one (``a.b`` trusts ``a.b.c``, not ``a.bc``)."""
    return any(module == p or module.startswith(p + ".") for p in trust)


def load_data_spec(text: str, trust: Sequence[str] = ()) -> tuple[str, dict[str, object]]:
    """One ``--data`` value -> (dataset name, what this party holds: ``features``/``labels``/``ids``).

    ``--data`` (repeatable) gives the party a dataset under a name, in one of three forms:

    * ``SPEC=DIR[,parts=features|labels|both][,limit=N]`` loads an MNIST-family split with
      :func:`splitnn.data.load_dataset` from DIR (never downloading) under the name SPEC, e.g.
      ``mnist:test`` (``NAME[:SPLIT]``, split ``train`` by default);
    * ``NAME=table:PATH,id=COLUMN[,columns=A+B+C][,label=COLUMN]`` reads a CSV table with
      :func:`splitnn.data.load_table` (features standardised with this party's own statistics;
      the ids stay here, for private set intersection);
    * ``NAME=MODULE:FUNCTION[,parts=...]`` calls ``FUNCTION()`` of a module the operator trusts
      (``--trust MODULE_PREFIX``; nothing else is imported) and holds what it returns: a
      ``splitnn.data.Dataset``, ``TorchDataset`` (any map-style dataset, read in batches here),
      ``Table``, a mapping with ``features``/``labels``/``ids``, or one tensor or map-style dataset.

    ``parts`` says what this party holds: the data holder keeps the ``features``, the label
    holder the ``labels`` (default: all the source has). The researcher then trains on it by
    name: ``model.fit("mnist:test")``. Such datasets are the party's own: every researcher's
    session reads them, none may replace them. A worker that holds them starts closed (the gate of
    :mod:`splitnn.workers.policy`): only segments whose fingerprints ``--policy`` pins in
    ``accept_segments`` run on them (``splitnn fingerprint`` prints a saved model's), the worker
    draws each batch's rows itself from the researcher's seed, and no weights leave unless the
    policy says ``release_weights = true``.
    """
    key, eq, rest = text.partition("=")
    head = rest.split(",", 1)[0]
    if eq and key and rest.startswith("table:"):
        return key, _load_table_spec(text, key, rest[len("table:") :])
    if eq and key and _CODE.fullmatch(head) and not Path(head).is_dir():
        return key, _load_code_spec(text, head, rest.split(",")[1:], trust)
    key, dataset, split, directory, parts, limit = parse_data_spec(text)
    if not directory.is_dir():
        raise ConfigurationError(f"--data {text!r}: {directory} is not a directory")
    from splitnn.data import load_dataset

    data = load_dataset(dataset, split, data_dir=directory, download=False, progress=False, limit=limit)
    return key, {p: getattr(data, p) for p in parts}


def _load_table_spec(text: str, key: str, rest: str) -> dict[str, object]:
    from splitnn.data import load_table

    path, *options = rest.split(",")
    kwargs: dict[str, object] = {}
    for opt in options:
        k, _, v = opt.partition("=")
        if k == "id" and v:
            kwargs["id_column"] = v
        elif k == "columns" and v:
            kwargs["columns"] = v.split("+")
        elif k == "label" and v:
            kwargs["label_column"] = v
        else:
            raise ConfigurationError(
                f"--data {text!r}: unknown option {opt!r}; use id=COLUMN, columns=A+B+C, label=COLUMN"
            )
    if not path or "id_column" not in kwargs:
        raise ConfigurationError(f"--data {text!r}: write NAME=table:PATH,id=COLUMN[,columns=A+B][,label=COLUMN]")
    return load_table(path, **kwargs).parts()


def _load_code_spec(text: str, target: str, options: list[str], trust: Sequence[str]) -> dict[str, object]:
    """Build a dataset by calling a trusted ``module:function``; see :func:`load_data_spec`."""
    module, _, function = target.partition(":")
    parts: tuple[str, ...] | None = None
    for opt in options:
        k, _, v = opt.partition("=")
        if k == "parts" and v in ("features", "labels", "both"):
            parts = _parts(v)
        else:
            raise ConfigurationError(f"--data {text!r}: unknown option {opt!r}; use parts=features|labels|both")
    if not is_trusted(module, trust):
        raise ConfigurationError(
            f"--data {text!r}: module {module!r} is not trusted; this worker runs code only from modules its "
            f"operator allows: add --trust {module} (or a prefix of it) if you trust it"
        )
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"--data {text!r}: cannot load {target}: {exc}") from None
    try:
        made = fn()
    except Exception as exc:
        raise ConfigurationError(f"--data {text!r}: {target}() failed: {type(exc).__name__}: {exc}") from exc
    held = _held_parts(made, text, target)
    if parts is not None:
        missing = [p for p in parts if p not in held]
        if missing:
            raise ConfigurationError(f"--data {text!r}: {target}() gave no {' or '.join(missing)}")
        held = {k: v for k, v in held.items() if k in parts or k == "ids"}
    return held


def _held_parts(made: object, text: str, target: str) -> dict[str, object]:
    import torch

    from splitnn.data import Dataset, Table, TorchDataset

    if isinstance(made, Table):
        return made.parts()
    if isinstance(made, TorchDataset):
        features, labels = made.parts()
        return {"features": features, "labels": labels}
    if isinstance(made, Dataset):
        return {"features": made.features, "labels": made.labels}
    if isinstance(made, Mapping):
        extra = sorted(set(made) - {"features", "labels", "ids"})
        if extra or not ({"features", "labels"} & set(made)):
            raise ConfigurationError(
                f"--data {text!r}: {target}() returned a mapping with keys {sorted(made)}; use 'features', "
                f"'labels' and optionally 'ids'"
            )
        return dict(made)
    if isinstance(made, torch.Tensor) or (hasattr(made, "__getitem__") and hasattr(made, "__len__")):
        return {"features": made}
    raise ConfigurationError(
        f"--data {text!r}: {target}() returned a {type(made).__name__}; return a splitnn.data.Dataset, "
        f"TorchDataset or Table, a mapping of features/labels/ids, or a tensor or map-style dataset"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from splitnn.cli.worker_config import apply_worker_config, check_worker_identity
    from splitnn.errors import SpecError
    from splitnn.server.server import ServeConfig, serve
    from splitnn.server.sessions import DEFAULT_GRACE, DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_RESEARCHER
    from splitnn.server.tcp_plane import check_data_plane
    from splitnn.transport import Limits, TLSConfig, load_token
    from splitnn.transport.security import load_researcher_tokens
    from splitnn.wire.budget import DEFAULT_MAX_SESSION_MEMORY
    from splitnn.wire.trust import Trust
    from splitnn.workers.devices import resolve_device
    from splitnn.workers.policy import WorkerPolicy

    if getattr(args, "parser", None) is not None:
        apply_worker_config(args, args.parser)
    for flag, value in (("--name", args.name), ("--token-file", args.token_file)):
        if value is None:
            raise ConfigurationError(f"splitnn worker needs {flag} (on the command line or in --config)")
    grace = DEFAULT_GRACE if args.session_grace is None else args.session_grace
    if not 0 <= grace < float("inf"):
        raise ConfigurationError(f"--session-grace must be a number of seconds >= 0, got {args.session_grace}")
    max_sessions = DEFAULT_MAX_SESSIONS if args.max_sessions is None else args.max_sessions
    if max_sessions < 1:
        raise ConfigurationError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    max_memory = parse_size(args.max_session_memory, "--max-session-memory", DEFAULT_MAX_SESSION_MEMORY)
    per_researcher = args.max_sessions_per_researcher
    per_researcher = DEFAULT_MAX_SESSIONS_PER_RESEARCHER if per_researcher is None else per_researcher
    if per_researcher < 1:
        raise ConfigurationError(f"--max-sessions-per-researcher must be >= 1, got {per_researcher}")
    if args.max_lifetime is not None and not args.max_lifetime > 0:
        raise ConfigurationError(f"--max-lifetime must be a positive number of seconds, got {args.max_lifetime}")
    check_data_plane(args.data_listen, args.data_advertise)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigurationError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, args.name)  # before loading data or listening
    token = load_token(args.token_file)
    researcher_tokens = load_researcher_tokens(args.researcher_tokens) if args.researcher_tokens else {}
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key):
            raise ConfigurationError("TLS needs both --tls-cert and --tls-key (and --tls-ca for mutual TLS)")
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
        check_worker_identity(tls, args.name)  # a certificate made for another party: refused before listening
    if args.address_file is not None and not args.address_file.parent.is_dir():
        raise ConfigurationError(f"--address-file {args.address_file}: directory does not exist")
    try:
        trust = Trust(args.trust)
    except SpecError as exc:
        raise ConfigurationError(f"--trust: {exc}") from None
    datasets = {}
    for text in args.data:
        key, held = load_data_spec(text, trust.modules)
        try:  # checked here, so a bad dataset stops the worker before it listens
            from splitnn.workers.held import HeldData

            HeldData.hold(key, args.name, **held)
        except DataError as exc:
            raise ConfigurationError(f"--data {text!r}: {exc}") from None
        datasets[key] = held
    limits = Limits(chunk_bytes=args.chunk_bytes) if args.chunk_bytes is not None else Limits()
    policy = load_worker_policy(args.policy, args.allow_outputs, data_holder=bool(datasets))  # before listening
    for flag, path in (("--state-dir", args.state_dir), ("--audit-log", args.audit_log)):
        where = path if flag == "--state-dir" else (path.parent if path is not None else None)
        if where is not None and where.exists() and not where.is_dir():
            raise ConfigurationError(f"{flag} {path}: {where} is not a directory")
    config = config_from_args(  # name, listen, peer_timeout, max_lifetime, data_listen, ...: as the flags say
        ServeConfig,
        args,
        token=token,
        tls=tls,
        limits=limits,
        release_outputs=args.allow_outputs,
        address_file=str(args.address_file) if args.address_file else None,
        datasets=datasets,
        trust=trust.modules,
        policy=policy,
        state_dir=str(args.state_dir) if args.state_dir is not None else None,
        audit_log=str(args.audit_log) if args.audit_log is not None else None,
        session_grace=grace,
        max_sessions=max_sessions,
        max_session_memory=max_memory,
        max_sessions_per_researcher=per_researcher,
        researcher_tokens=researcher_tokens,
        device=str(device),
    )

    def ready(address: str) -> None:
        held = ", ".join(f"{k} ({'+'.join(p for p in v if p != 'ids')})" for k, v in datasets.items()) or "no datasets"
        gate = policy if policy is not None else WorkerPolicy.from_dict({}, data_holder=True)
        closed = [
            what
            for what, on in (
                ("pinned segments only", not gate.accept_any_segment),
                ("rows drawn here", gate.draw_rows),
                ("no weights leave", not gate.release_weights),
                ("no gradient norms leave", not gate.release_grad_norms),
            )
            if on
        ]
        if datasets and closed:
            held += f"; gate: {', '.join(closed)}"
        print(
            f"splitnn worker {args.name} listening on {address} (pid {os.getpid()}; {held}; device {device})",
            flush=True,
        )

    asyncio.run(serve(config, on_ready=ready))
    print(f"splitnn worker {args.name}: stopped", file=sys.stderr, flush=True)
    # Everything is closed. What is left is the interpreter's own shutdown, whose last garbage collection walks
    # every object torch's import made (seconds on a busy machine, while the worker looks gone): exempt them.
    gc.freeze()
    return 0
