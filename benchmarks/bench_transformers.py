"""Tokens/s of a GPT-2 cut with ``splitnn.cut``, split against unsplit, in process and across worker processes.

A Hugging Face GPT-2 (``--layers`` blocks, width ``--width``, context ``--context``, vocabulary 65, random
weights) trains with AdamW and clipping at 1.0, U-shaped: the embeddings, block 0, the last block and the head
at alice (the data holder, which keeps the labels), the blocks between at bob. Each configuration runs
``--warmup`` steps, then ``--steps`` timed steps; the figure is the median step's tokens/s, and the ratio is
against the unsplit model trained by a plain PyTorch loop in this process. Configurations: unsplit; split in
process (``VirtualWorker``); split across two ``splitnn worker`` processes on 127.0.0.1 with no compression,
then ``bf16`` and ``int8`` at both cuts, both directions.

    python benchmarks/bench_transformers.py [--steps 20] [--batch 12]
"""

from __future__ import annotations

import argparse
import copy
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = gpt2(a.layers, a.width, a.context)
    n = (a.warmup + a.steps) * a.batch
    ids = torch.randint(0, VOCAB, (n, a.context + 1), generator=torch.Generator().manual_seed(1))
    data = splitnn.Dataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())

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
    print(f"GPT-2 {a.layers} layers, width {a.width}, context {a.context}, batch {a.batch}; median of {a.steps} steps")
    print(f"{'configuration':<48} {'tokens/s':>10} {'/ unsplit':>10}")
    for label, tps in rows:
        print(f"{label:<48} {tps:>10.0f} {tps / base:>10.3f}")


if __name__ == "__main__":
    main()
