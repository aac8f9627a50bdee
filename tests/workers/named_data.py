"""A dataset of named features that ``splitnn worker --data tok=tests.workers.named_data:padded_tokens --trust
tests.workers.named_data`` builds at a party: token ids and a padding mask (BERT's two keyword inputs)."""

from __future__ import annotations

import torch

from splitnn.data import Dataset

N, SEQ, VOCAB = 32, 16, 50


def padded_tokens() -> Dataset:
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    mask = (torch.arange(SEQ) < torch.randint(4, SEQ + 1, (N, 1), generator=g)).long()
    return Dataset({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (N,), generator=g), "tok")
