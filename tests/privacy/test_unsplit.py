"""UnSplit (black-box inversion): it must beat the mean-image guess on a small conv bottom, and noise at the cut
must undo that."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitnn.data import load_dataset
from splitnn.errors import ConfigurationError, ShapeMismatchError
from splitnn.models import small_cnn
from splitnn.privacy.attacks.unsplit import UnSplit, UnSplitConfig, total_variation
from splitnn.privacy.defenses import CutNoise
from splitnn.privacy.metrics import mse, ssim

FAST = UnSplitConfig(rounds=30)


@pytest.fixture(scope="module")
def trained_bottom(shared_data):
    """small_cnn's first segment (conv 3x3, ReLU, maxpool) after one epoch on 1,500 MNIST digits; 8 victims."""
    d = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, progress=False, limit=1600)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        segments = small_cnn()
        model = nn.Sequential(*segments)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for idx in torch.randperm(1500).split(64):
            opt.zero_grad()
            F.nll_loss(model(d.features[idx]), d.labels[idx]).backward()
            opt.step()
    return segments[0].eval(), d.features[1500:1508], d.features[:1500].mean(dim=0, keepdim=True)


def _quality(rec: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    rec01, true01 = (rec + 1) / 2, (truth + 1) / 2
    return mse(rec01, true01), float(ssim(rec01, true01, data_range=1.0))


def _architecture() -> nn.Module:
    return small_cnn()[0]  # the attacker knows the layers, not the weights


def test_unsplit_beats_the_mean_image_and_noise_stops_it(trained_bottom):
    bottom, victims, mean_image = trained_bottom
    with torch.no_grad():
        acts = bottom(victims)
    base_mse, base_ssim = _quality(mean_image.expand_as(victims), victims)
    result = UnSplit(_architecture, FAST).attack(acts, (1, 28, 28))
    rec_mse, rec_ssim = _quality(result.reconstructions, victims)
    # measured: MSE 0.023 / SSIM 0.53 against the mean image's 0.052 / 0.14; with noise 0.13 / 0.10
    assert rec_mse < 0.7 * base_mse, (rec_mse, base_mse)
    assert rec_ssim > base_ssim + 0.2, (rec_ssim, base_ssim)
    assert result.activation_loss[-1] < result.activation_loss[0]
    assert result.reconstructions.min() >= -1 and result.reconstructions.max() <= 1  # clamped to the data range

    # noise at the cut (sigma 0.03 of the mean activation norm) leaves UnSplit worse than the mean image
    clip = float(acts.flatten(1).norm(dim=1).mean())
    with torch.no_grad():
        noisy = CutNoise(clip, 0.03, seed=0)(acts)
    noisy_mse, noisy_ssim = _quality(UnSplit(_architecture, FAST).attack(noisy, (1, 28, 28)).reconstructions, victims)
    assert noisy_mse > base_mse and noisy_mse > 2 * rec_mse, (noisy_mse, rec_mse, base_mse)
    assert noisy_ssim < rec_ssim - 0.2, (noisy_ssim, rec_ssim)


def test_unsplit_leaves_the_global_rng_alone_and_is_reproducible(trained_bottom):
    bottom, victims, _ = trained_bottom
    with torch.no_grad():
        acts = bottom(victims[:2])
    cfg = UnSplitConfig(rounds=2, input_steps=3, model_steps=3)
    state = torch.get_rng_state()
    a = UnSplit(_architecture, cfg).attack(acts, (1, 28, 28))
    assert torch.equal(torch.get_rng_state(), state)
    b = UnSplit(_architecture, cfg).attack(acts, (1, 28, 28))
    assert torch.equal(a.reconstructions, b.reconstructions)


def test_total_variation_by_hand():
    x = torch.tensor([[[0.0, 1.0], [3.0, 1.0]]])
    # vertical |3-0|, |1-1| -> mean 1.5; horizontal |1-0|, |1-3| -> mean 1.5
    assert float(total_variation(x)) == 3.0


def test_unsplit_refuses_bad_settings():
    with pytest.raises(ConfigurationError, match="rounds"):
        UnSplitConfig(rounds=0)
    with pytest.raises(ConfigurationError, match="tv_weight"):
        UnSplitConfig(tv_weight=-1.0)
    with pytest.raises(ConfigurationError, match="value_range"):
        UnSplitConfig(value_range=(1.0, -1.0))
    with pytest.raises(ConfigurationError, match="init"):
        UnSplitConfig(init=2.0)
    with pytest.raises(ConfigurationError, match="architecture"):
        UnSplit(nn.Linear(2, 2)(torch.zeros(2)))  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match="architecture"):
        UnSplit(_architecture, FAST).attack(torch.zeros(2, 5), (1, 28, 28))


def test_experiment_runs_unsplit_and_feature_inference_where_they_apply(fmnist_dir):
    """The experiment's columns: finite for the attacks asked for, NaN for the others and for feature
    inference under a label holder's defense (the vertical twin carries only data holder defenses)."""
    import math

    from splitnn.privacy import DefenseSetting, PrivacyConfig, run_privacy_experiment

    config = PrivacyConfig(
        data_dir=fmnist_dir,
        download=False,
        train_size=300,
        aux_size=200,
        test_size=100,
        victims=70,
        epochs=1,
        attacks=("unsplit", "feature-inference"),
        unsplit_rounds=2,
        feature_epochs=1,
    )
    result = run_privacy_experiment(config, [DefenseSetting("noise", 0.1), DefenseSetting("mid", 1.0)])
    for row in result.rows:
        assert 0 < row.unsplit_mse < 1 and -1 <= row.unsplit_ssim <= 1
        assert math.isnan(row.recon_mse) and math.isnan(row.norm_auc)
    assert 0 < result.row("none").feature_mse < 1 and 0 < result.row("noise", 0.1).feature_mse < 1
    assert math.isnan(result.row("mid", 1.0).feature_mse)
