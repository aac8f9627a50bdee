"""Tokens/s and memory per party of a GPT-2 cut with ``splitnn.cut``, split against unsplit, in process and across
worker processes, and pipelined behind an emulated wide-area link.

A Hugging Face GPT-2 (``--layers`` blocks, width ``--width``, context ``--context``, vocabulary 65, random
weights) trains with AdamW and clipping at 1.0, U-shaped: the embeddings, block 0, the last block and the head
at alice (the data holder, which keeps the labels), the blocks between at bob. Each configuration runs
``--warmup`` steps, then ``--steps`` timed steps; the figure is the median step's tokens/s, and the ratio is
against the unsplit model trained by a plain PyTorch loop in this process. Configurations: unsplit; split in
process (``VirtualWorker``); split across two ``splitnn worker`` processes on 127.0.0.1 with no compression,
then ``bf16`` and ``int8`` at both cuts, both directions.

``--delay-ms D`` (default 10; 0 skips it) puts both workers behind the user-space link emulator
(:mod:`splitnn.testing.linkemu`, ``D`` ms one way on every link into a worker, researcher to worker and worker to
worker) and times whole epochs of ``--warmup`` + ``--steps`` batches (shipped epochs, ``fit(..., pipeline=K)``,
no clipping, since clipping trains lock-step) for each ``K`` of ``--pipeline`` (default ``1,4``): the median of
``--runs`` epochs' tokens/s, against the lock-step epoch (K = 1) through the same emulator, measured in the same
run.

``--no-tokens`` skips the first table. ``--memory`` (on by default; ``--no-memory`` skips it) measures peak
resident memory per party, each in fresh processes so that nothing measured before counts: the unsplit model
trained ``--warmup`` + ``--steps`` steps in a process of its own (its ``VmHWM``), then the same U-shaped split
across two fresh ``splitnn worker`` processes driven by a fresh researcher process: each worker's ``VmHWM``
(``/proc/<pid>/status``) after training and its ``VmRSS`` before the first command (what Python, torch and
splitnn take with no model), and the researcher's ``VmHWM``: one epoch of ``fit`` shipped to the workers (no
clipping), then one with ``clip_grad_norm=1.0`` (lock-step steps the researcher drives).

    python benchmarks/bench_transformers.py [--steps 20] [--batch 12] [--delay-ms 10] [--pipeline 1,4] [--runs 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import splitnn
from splitnn.testing.cluster import Cluster

VOCAB = 65


class ClassDimFirst(nn.Module):
    """GPT-2's logits as (batch, vocabulary, position), for the named loss "cross_entropy" (classes on dim 1)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits.transpose(1, 2)


def gpt2(layers: int, width: int, context: int) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=context,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        tie_word_embeddings=False,
    )
    return ClassDimFirst(transformers.GPT2LMHeadModel(cfg))


SPEC = "adamw:lr=1e-3,betas=(0.9,0.99),weight_decay=0.1,decay=matrices"


def median_tokens_per_s(step, batches: int, tokens: int, warmup: int) -> float:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, batches):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    return tokens / statistics.median(times)


def unsplit(model: nn.Module, data: splitnn.Dataset, a: argparse.Namespace) -> float:
    model = copy.deepcopy(model)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))

    def step(i: int) -> None:
        rows = slice(i * a.batch, (i + 1) * a.batch)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.features[rows]), data.labels[rows]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return median_tokens_per_s(step, a.warmup + a.steps, a.batch * a.context, a.warmup)


def split(model: nn.Module, data: splitnn.Dataset, a: argparse.Namespace, alice, bob, compression=None) -> float:
    at = ["lm.transformer.h.1", f"lm.transformer.h.{a.layers - 1}"]
    segments = splitnn.cut(copy.deepcopy(model), at, example=data.features[:2])
    net = splitnn.SplitNN(segments, [alice, bob, alice], optimizer=SPEC, loss="cross_entropy", compression=compression)
    name, _ = net.prepare(data)

    def step(i: int) -> None:
        net.train_steps(name, [torch.arange(i * a.batch, (i + 1) * a.batch)], clip_grad_norm=1.0)

    return median_tokens_per_s(step, a.warmup + a.steps, a.batch * a.context, a.warmup)


def epoch_tokens_per_s(net, data: splitnn.Dataset, a: argparse.Namespace, k: int) -> float:
    """The median of ``--runs`` shipped epochs' tokens/s at pipeline depth ``k`` (one warm-up epoch first)."""
    net.fit(data, epochs=1, batch_size=a.batch, pipeline=k, progress=False)
    rates = []
    for _ in range(a.runs):
        t = time.perf_counter()
        net.fit(data, epochs=1, batch_size=a.batch, pipeline=k, progress=False)
        rates.append(len(data) * a.context / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_wan(model: nn.Module, data: splitnn.Dataset, a: argparse.Namespace) -> list[tuple[str, float]]:
    """Per K of ``--pipeline``: tokens/s of the U-shape on two worker processes behind ``--delay-ms`` one way."""
    from splitnn.testing.linkemu import ThreadedLinkEmulator

    at = ["lm.transformer.h.1", f"lm.transformer.h.{a.layers - 1}"]
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Cluster(Path(tmp), lifetime=3600.0) as cluster,
        ThreadedLinkEmulator() as emu,
    ):
        for n in ("alice", "bob"):
            cluster.start(n)
        proxies = {n: emu.add(n, cluster.workers[n].address, delay=a.delay_ms / 1000) for n in ("alice", "bob")}
        alice, bob = (
            splitnn.connect(f"grpc://{proxies[n]}", token=cluster.token, name=n, timeout=600) for n in ("alice", "bob")
        )
        try:
            for k in a.pipeline:
                segments = splitnn.cut(copy.deepcopy(model), at, example=data.features[:2])
                net = splitnn.SplitNN(segments, [alice, bob, alice], optimizer=SPEC, loss="cross_entropy")
                label = "lock-step (K=1)" if k == 1 else f"pipeline K={k}"
                rows.append((f"{label}, {a.delay_ms:g} ms one way", epoch_tokens_per_s(net, data, a, k)))
        finally:
            alice.close()
            bob.close()
    return rows


def _kib(pid: int, field: str) -> int:
    """``field`` (VmHWM, VmRSS) of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _self_peak_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, which starts afresh at exec (getrusage's ru_maxrss does not: Linux
    keeps the parent's peak across fork and execve, so a child would report the benchmark's own)."""
    return _kib(os.getpid(), "VmHWM")


def model_and_data(a: argparse.Namespace) -> tuple[torch.nn.Module, splitnn.Dataset]:
    """The GPT and its token windows (inputs, next tokens) for ``a``'s sizes, seeded; one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = gpt2(a.layers, a.width, a.context)
    n = (a.warmup + a.steps) * a.batch
    ids = torch.randint(0, VOCAB, (n, a.context + 1), generator=torch.Generator().manual_seed(1))
    return model, splitnn.Dataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def memory_child(a: argparse.Namespace) -> dict:
    """Run in a fresh process (``--memory-child unsplit|split|split-clip``): train one epoch, return the peaks in
    KiB."""
    model, data = model_and_data(a)
    if a.memory_child == "unsplit":
        unsplit(model, data, a)
        return {"unsplit": _self_peak_kib()}
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), lifetime=3600.0) as cluster:
        for name in ("alice", "bob"):
            cluster.start(name)
        pids = {name: cluster.workers[name].proc.pid for name in ("alice", "bob")}
        idle = {name: _kib(pid, "VmRSS") for name, pid in pids.items()}
        alice, bob = cluster.connect("alice", "bob")
        try:
            segments = splitnn.cut(
                copy.deepcopy(model), [f"lm.transformer.h.{i}" for i in (1, a.layers - 1)], example=data.features[:2]
            )
            net = splitnn.SplitNN(segments, [alice, bob, alice], optimizer=SPEC, loss="cross_entropy")
            clip = 1.0 if a.memory_child == "split-clip" else None  # clipping: lock-step steps the researcher drives
            net.fit(data, epochs=1, batch_size=a.batch, progress=False, clip_grad_norm=clip)
            peak = {name: _kib(pid, "VmHWM") for name, pid in pids.items()}
        finally:
            alice.close()
            bob.close()
    return {"idle": idle, "peak": peak, "researcher": _self_peak_kib()}


def bench_memory(a: argparse.Namespace) -> list[tuple[str, float, float | None]]:
    """Peak RSS per party (MiB), each measured in fresh processes: (label, peak MiB, MiB before any command)."""

    mib = 1024.0

    def child(kind: str) -> dict:
        argv = [sys.executable, __file__, "--memory-child", kind]
        for flag in ("steps", "warmup", "batch", "context", "layers", "width"):
            argv += [f"--{flag}", str(getattr(a, flag))]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
        return json.loads(out.strip().splitlines()[-1])

    one = child("unsplit")
    rows = [("unsplit, one process (model, data, optimizer)", one["unsplit"] / mib, None)]
    for kind, how in (("split", "fit, shipped epoch"), ("split-clip", "fit with clip_grad_norm")):
        two = child(kind)
        rows += [
            (f"{how}: researcher (model before the cut, data)", two["researcher"] / mib, None),
            (
                f"{how}: alice worker (embeddings, first and last block, head)",
                two["peak"]["alice"] / mib,
                two["idle"]["alice"] / mib,
            ),
            (f"{how}: bob worker (middle blocks)", two["peak"]["bob"] / mib, two["idle"]["bob"] / mib),
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--batch", type=int, default=12, help="rows per batch (default 12)")
    ap.add_argument("--context", type=int, default=64, help="tokens per row (default 64)")
    ap.add_argument("--layers", type=int, default=4, help="GPT-2 blocks (default 4)")
    ap.add_argument("--width", type=int, default=128, help="GPT-2 width (default 128)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay of the emulated links (0: skip)")
    ap.add_argument(
        "--pipeline",
        type=lambda t: [int(k) for k in t.split(",")],
        default=[1, 4],
        help="pipeline depths behind the emulator, comma-separated; 1 (lock-step) is the baseline (default 1,4)",
    )
    ap.add_argument("--runs", type=int, default=3, help="timed epochs per depth behind the emulator (median)")
    ap.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="peak RSS per party (fresh processes)"
    )
    ap.add_argument(
        "--tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tokens/s unsplit, split in process and on 2 worker processes (none, bf16, int8 at the cuts)",
    )
    ap.add_argument("--memory-child", choices=["unsplit", "split", "split-clip"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(a)))
        return
    if 1 not in a.pipeline:
        ap.error("--pipeline must include 1, the lock-step baseline")
    model, data = model_and_data(a)

    if a.tokens:
        rows = [("unsplit (plain PyTorch loop)", unsplit(model, data, a))]
        rows.append(
            ("split, in process", split(model, data, a, splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")))
        )
        with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), lifetime=3600.0) as cluster:
            cluster.start("alice")
            cluster.start("bob")
            for codec in (None, "bf16", "int8"):
                alice, bob = cluster.connect("alice", "bob")
                try:
                    rows.append(
                        (
                            f"split, 2 worker processes, {codec or 'no'} compression",
                            split(model, data, a, alice, bob, codec),
                        )
                    )
                finally:
                    alice.close()
                    bob.close()
        base = rows[0][1]
        print(
            f"GPT-2 {a.layers} layers, width {a.width}, context {a.context}, batch {a.batch}; median of {a.steps} steps"
        )
        print(f"{'configuration':<48} {'tokens/s':>10} {'/ unsplit':>10}")
        for label, tps in rows:
            print(f"{label:<48} {tps:>10.0f} {tps / base:>10.3f}")
    if a.delay_ms > 0:
        wan = bench_wan(model, data, a)
        lock = dict(zip(a.pipeline, (t for _, t in wan)))[1]
        print(
            f"\nbehind the link emulator, {a.delay_ms:g} ms one way; median of {a.runs} epochs of {a.steps + a.warmup}"
            f" steps (no clipping)"
        )
        print(f"{'configuration':<48} {'tokens/s':>10} {'/ K=1':>10}")
        for label, tps in wan:
            print(f"{label:<48} {tps:>10.0f} {tps / lock:>10.3f}")
    if a.memory:
        mem = bench_memory(a)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"\npeak resident memory per party (MiB), {a.steps + a.warmup} training steps; the model has {params:,}"
            " float32 parameters"
        )
        print(f"{'process':<74} {'peak':>8} {'at start':>9}")
        for label, peak, start in mem:
            print(f"{label:<74} {peak:>8.1f} {'' if start is None else f'{start:.1f}':>9}")


if __name__ == "__main__":
    main()
