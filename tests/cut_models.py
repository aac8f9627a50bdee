"""Models for the tests of splitnn.cut, importable by worker processes (``splitnn worker --trust tests.cut_models``).

Plain PyTorch as a user writes it; nothing here knows about splitnn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with BatchNorm, and a shortcut (a 1x1
    convolution + BatchNorm when the block downsamples or widens)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet for 1x12x12 inputs: stem, two stages of two blocks (the second downsamples), head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.log_softmax(self.fc(x), dim=1)


class SkipTwo(nn.Module):
    """A value made in the first part (``skip``) is used in the last: cut at ``mid`` and ``head``,
    it crosses two cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(20, 16)
        self.skip = nn.Linear(20, 16)
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.skip(x)
        h = self.mid(torch.relu(self.stem(x)))
        return F.log_softmax(self.head(h) + s[:, :10], dim=1)


class Masked(nn.Module):
    """Two inputs (features and a 0/1 mask), and an integer index crossing the cut: the mask and the
    index need no gradient, so they cross forward only."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(20, 16)
        self.table = nn.Embedding(4, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x)) * mask
        bucket = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # int64, computed before the cut
        return F.log_softmax(self.head(h + self.table(bucket)), dim=1)


class Gated(nn.Module):
    """Cut at ``mid`` and ``head``: beside the hidden activation, a mask made from the data and an integer
    index cross the first cut; neither needs a gradient, so the gradient that comes back is (g, None, None)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(20, 16)
        self.table = nn.Embedding(4, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x[:, :16] > -0.5).float()
        bucket = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        h = torch.tanh(self.enc(x))
        h = torch.relu(self.mid(h)) * mask + self.table(bucket)
        return F.log_softmax(self.head(h), dim=1)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.b(x)


class WithBranchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.branchy = Branchy()
        self.post = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.branchy(self.pre(x)))


class Tied(nn.Module):
    """The output layer reuses the input embedding's weight (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(10, 6, bias=False)
        self.mid = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.mid(self.emb(x))), self.emb.weight.t())
