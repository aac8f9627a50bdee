"""nanoGPT's character-level Tiny Shakespeare on a CPU, U-shaped across two parties: the text never leaves alice.

The model is nanoGPT's GPT, written out below in plain PyTorch (no splitnn in it). ``splitnn.cut``
cuts it, through ``torch.export``, before block 1 and before the final layer norm, and
:class:`UShapedSplitNN` places the pieces: alice (the data holder) keeps the token and position
embeddings, block 0, the final layer norm, the head and the labels (the next characters); bob runs
blocks 1-3. Only hidden states cross, forward and back.

The recipe is nanoGPT's CPU recipe for ``shakespeare_char``: context 64, batch 12, 4 layers, 4 heads,
width 128, no dropout, no biases, AdamW (lr 1e-3, beta2 0.99, weight decay 0.1 on matrices only),
warmup 100 then cosine decay to 1e-4 at 2,000 iterations, gradient clipping at 1.0 (by the global
norm over both parties), batches drawn at random positions of the first 90% of the text, the
validation loss averaged over ``--eval-iters`` random batches of the last 10%. One difference:
nanoGPT ties the head's weights to the token embedding; here they are two matrices, because the
embedding and the head are two segments (a tie across a cut is refused).

    python examples/shakespeare_gpt.py                    # the full recipe (2,000 iterations)
    python examples/shakespeare_gpt.py --iters 20 --twin  # a quick look, checked against the unsplit model

With ``--twin`` the same model is also trained unsplit by a plain PyTorch loop, and the example
reports whether every loss and every weight is equal (``torch.equal``) and both speeds.

With ``--workers`` the split model also trains across two ``splitnn worker`` processes started on
127.0.0.1 (alice and bob), its segments sent as graphs of ATen operations, and is compared with the
same split in process. A networked label holder takes its loss by name, so both runs wrap the model
to return its logits as (batch, vocabulary, position) for ``"cross_entropy"``:

    python examples/shakespeare_gpt.py --iters 40 --workers --eval-iters 2 --sample 0
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import splitnn
from splitnn.training import UShapedSplitNN

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
CUT_AT = ["transformer.h.1", "transformer.ln_f"]  # alice: embeddings + block 0 | bob: blocks 1-3 | alice: norm + head


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = False


@dataclass
class Recipe:
    iters: int = 2000
    decay_iters: int = 2000  # the schedule's length (nanoGPT's lr_decay_iters), whatever --iters says
    batch_size: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    beta2: float = 0.99
    weight_decay: float = 0.1
    clip: float = 1.0

    def spec(self) -> str:
        """The optimizer as data, for every party (see splitnn.wire.OptimizerSpec)."""
        return (
            f"adamw:lr={self.lr},betas=(0.9,{self.beta2}),weight_decay={self.weight_decay},decay=matrices,"
            f"schedule=cosine,warmup={self.warmup},total={self.decay_iters},min_lr={self.min_lr}"
        )


# ----------------------------------------------------------------------------- nanoGPT's model


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(cfg.n_embd, cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = LayerNorm(cfg.n_embd, cfg.bias), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=LayerNorm(cfg.n_embd, cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new: int, temperature: float = 0.8, top_k: int = 200) -> torch.Tensor:
        for _ in range(new):
            logits = self(idx[:, -self.cfg.block_size :])[:, -1, :] / temperature
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class ClassDimFirst(nn.Module):
    """The GPT with its logits as (batch, vocabulary, position): the loss "cross_entropy", by name, reads the
    classes on dimension 1 (a networked label holder takes losses by name only)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx).transpose(1, 2)


# ----------------------------------------------------------------------------- data


def load_text(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The characters as int64 ids (first 90%: train, last 10%: validation) and the vocabulary."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.int64)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], chars


def windows(ids: torch.Tensor, count: int, block: int, generator: torch.Generator) -> splitnn.Dataset:
    """``count`` windows at random positions (nanoGPT's get_batch): features x, labels x shifted by one."""
    starts = torch.randint(len(ids) - block, (count,), generator=generator)
    x = torch.stack([ids[i : i + block] for i in starts.tolist()])
    y = torch.stack([ids[i + 1 : i + 1 + block] for i in starts.tolist()])
    return splitnn.Dataset(x, y, name="tinyshakespeare")


# ----------------------------------------------------------------------------- training


def nanogpt_lr(it: int, r: Recipe) -> float:
    """nanoGPT's get_lr, as train.py writes it (the twin's schedule)."""
    if it < r.warmup:
        return r.lr * (it + 1) / (r.warmup + 1)
    if it > r.decay_iters:
        return r.min_lr
    ratio = (it - r.warmup) / (r.decay_iters - r.warmup)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.lr - r.min_lr)


def train_unsplit(model: GPT, train: splitnn.Dataset, r: Recipe) -> tuple[list[float], float]:
    """The unsplit twin, trained by a plain PyTorch loop (nanoGPT's train.py, on one CPU): (losses, seconds)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, r.beta2))
    losses = []
    start = time.perf_counter()
    for it in range(r.iters):
        for g in opt.param_groups:
            g["lr"] = nanogpt_lr(it, r)
        rows = slice(it * r.batch_size, (it + 1) * r.batch_size)
        loss = lm_loss(model(train.features[rows]), train.labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip)
        opt.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def build_split(model: GPT, example: torch.Tensor, r: Recipe) -> UShapedSplitNN:
    head, middle, tail = splitnn.cut(model, CUT_AT, example=example)
    alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    return UShapedSplitNN(head, [middle], tail, alice, bob, optimizer=r.spec(), loss=lm_loss)


def build_named_loss_split(model: GPT, example: torch.Tensor, r: Recipe, alice, bob) -> UShapedSplitNN:
    """The same U-shape on ``ClassDimFirst(model)`` with the loss by name, on any two workers."""
    head, middle, tail = splitnn.cut(ClassDimFirst(model), [f"gpt.{c}" for c in CUT_AT], example=example)
    return UShapedSplitNN(head, [middle], tail, alice, bob, optimizer=r.spec(), loss="cross_entropy")


def compare_workers(model: GPT, train: splitnn.Dataset, r: Recipe) -> dict:
    """The split trained in process and across two worker processes (named loss both times): equal? how fast?"""
    from splitnn.testing.cluster import Cluster

    example = train.features[:2]
    start = copy.deepcopy(model)  # the segments share the model's parameters: each run gets its own copy
    local = build_named_loss_split(model, example, r, splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob"))
    local_losses, local_seconds = train_split(local, train, r)
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), lifetime=3600.0) as cluster:
        cluster.start("alice")
        cluster.start("bob")
        alice, bob = cluster.connect("alice", "bob")
        try:
            remote = build_named_loss_split(start, example, r, alice, bob)
            remote_losses, remote_seconds = train_split(remote, train, r)
            got, want = remote.collect_state(), local.collect_state()
        finally:
            alice.close()
            bob.close()
    tokens = r.iters * r.batch_size * example.shape[1]
    return {
        "workers_losses_equal": remote_losses == local_losses,
        "workers_weights_equal": set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want),
        "in_process_tokens_per_s": tokens / local_seconds,
        "workers_tokens_per_s": tokens / remote_seconds,
    }


def train_split(split: UShapedSplitNN, train: splitnn.Dataset, r: Recipe) -> tuple[list[float], float]:
    """Lock-step, one optimizer step per batch of 12 windows: (losses, seconds)."""
    name, _ = split.prepare(train)
    losses = []
    start = time.perf_counter()
    for it in range(r.iters):
        rows = torch.arange(it * r.batch_size, (it + 1) * r.batch_size)
        (stats,) = split.train_steps(name, [rows], clip_grad_norm=r.clip)
        losses.append(stats.loss)
    return losses, time.perf_counter() - start


def val_loss(split: UShapedSplitNN, val: splitnn.Dataset, batch: int) -> float:
    """Mean loss over the validation batches (nanoGPT's estimate_loss)."""
    name, n = split.prepare(val)
    values = [split.eval_batch(name, torch.arange(i, i + batch)).loss for i in range(0, n, batch)]
    return sum(values) / len(values)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="Tiny Shakespeare's input.txt")
    p.add_argument("--iters", type=int, default=2000, help="training iterations (the schedule's length)")
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--twin", action="store_true", help="also train the unsplit model and compare")
    p.add_argument("--sample", type=int, default=300, help="characters to generate at the end (0: none)")
    p.add_argument("--workers", action="store_true", help="also train across two splitnn worker processes and compare")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = Recipe(iters=args.iters)
    train_ids, val_ids, chars = load_text(args.data)
    cfg = GPTConfig(vocab_size=len(chars))
    g = torch.Generator().manual_seed(args.seed)
    train = windows(train_ids, r.iters * r.batch_size, cfg.block_size, g)
    val = windows(val_ids, args.eval_iters * r.batch_size, cfg.block_size, g)
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    twin = copy.deepcopy(model)
    model_at_start = copy.deepcopy(model)
    split = build_split(model, train.features[:2], r)
    print(split)
    losses, seconds = train_split(split, train, r)
    tokens = r.iters * r.batch_size * cfg.block_size
    result = {"losses": losses, "split_tokens_per_s": tokens / seconds}
    ledger = split.ledger  # the training steps' transfers (before validation adds its forwards)
    result["bytes_per_step"] = {
        "alice->bob (activation)": ledger.total(src="alice", dst="bob", kind="activation") // r.iters,
        "bob->alice (activation)": ledger.total(src="bob", dst="alice", kind="activation") // r.iters,
        "bob->alice (gradient)": ledger.total(src="bob", dst="alice", kind="gradient") // r.iters,
        "alice->bob (gradient)": ledger.total(src="alice", dst="bob", kind="gradient") // r.iters,
    }
    result["val_loss"] = val_loss(split, val, r.batch_size)
    print(f"iters {r.iters}: train loss {losses[-1]:.4f}, val loss {result['val_loss']:.4f}")
    print(f"split (in process): {result['split_tokens_per_s']:.0f} tokens/s")
    for link, n in result["bytes_per_step"].items():
        print(f"  bytes per step {link}: {n}")
    state = split.collect_state()
    if args.twin:
        twin_losses, twin_seconds = train_unsplit(twin, train, r)
        result["unsplit_tokens_per_s"] = tokens / twin_seconds
        result["losses_equal"] = twin_losses == losses
        want = twin.state_dict()
        result["weights_equal"] = set(want) == set(state) and all(torch.equal(state[k], want[k]) for k in want)
        ratio = result["split_tokens_per_s"] / result["unsplit_tokens_per_s"]
        print(f"unsplit: {result['unsplit_tokens_per_s']:.0f} tokens/s (split/unsplit {ratio:.3f})")
        print(f"losses equal: {result['losses_equal']}, weights equal: {result['weights_equal']}")
    if args.workers:
        result.update(compare_workers(model_at_start, train, r))
        w = result
        print(
            f"across worker processes: losses equal {w['workers_losses_equal']}, weights equal "
            f"{w['workers_weights_equal']}; {w['workers_tokens_per_s']:.0f} tokens/s against "
            f"{w['in_process_tokens_per_s']:.0f} in process (same split, loss by name)"
        )
    if args.sample:
        gen = GPT(cfg)
        gen.load_state_dict(state)
        torch.manual_seed(args.seed)
        out = gen.eval().generate(torch.zeros((1, 1), dtype=torch.long), args.sample)[0].tolist()
        result["sample"] = "".join(chars[i] for i in out)
        print("---\n" + result["sample"])
    return result


if __name__ == "__main__":
    main()
