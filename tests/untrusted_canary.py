"""A module the tests import only by trusting it: refusing an untrusted spec must leave it unimported."""

from __future__ import annotations

from torch import nn


class Thing(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.n = n
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return self.lin(x)
