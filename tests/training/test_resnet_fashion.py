"""examples/resnet_fashion.py as written: a ResNet cut into three parties learns Fashion-MNIST (a subset here;
the full run's figures are in docs/bring-your-own-model.md)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO


def _example():
    spec = importlib.util.spec_from_file_location("resnet_fashion", REPO / "examples" / "resnet_fashion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_split_resnet_learns_fashion_mnist(shared_data, capsys):
    data_dir = shared_data / "fashion-mnist"
    if not data_dir.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {data_dir}")
    # 10,000 training images, 2 epochs of batch 64 (the last at a tenth of the learning rate): ~0.85 in ~30 s
    argv = ["--data-dir", str(data_dir), "--limit", "10000", "--test-limit", "2000", "--epochs", "2"]
    argv += ["--batch-size", "64", "--threads", "1"]
    accuracies = _example().main(argv)
    out = capsys.readouterr().out
    assert "SplitNN(segment 0 (at alice) -> segment 1 (at bob) -> segment 2 (at claire))" in out, out
    assert len(accuracies) == 2
    assert accuracies[-1] > 0.8, out
