"""The defense layers: what each does to the forward values and to the gradient, against direct oracles."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from splitnn.errors import ConfigurationError, SpecError
from splitnn.privacy.defenses import (
    CutNoise,
    DefenseOptions,
    DefenseSetting,
    LabelProtection,
    NoPeek,
    apply_defense,
)
from splitnn.privacy.metrics import distance_correlation
from splitnn.wire.spec import module_to_spec, spec_to_module


def _bottom(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())


# ----------------------------------------------------------------------------- CutNoise
def test_cut_noise_identity_returns_input_and_draws_nothing():
    x = torch.randn(4, 6)
    state = torch.get_rng_state()
    layer = CutNoise()
    assert layer.is_identity and layer(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_cut_noise_clips_each_sample_to_norm_c():
    x = torch.randn(8, 1, 5, 5) * torch.tensor([0.1, 10, 0.1, 10, 0.1, 10, 0.1, 10]).view(8, 1, 1, 1)
    out = CutNoise(clip=2.0)(x)
    norms_in, norms_out = x.flatten(1).norm(dim=1), out.flatten(1).norm(dim=1)
    small = norms_in <= 2.0
    assert torch.allclose(out[small], x[small])  # below the bound: untouched
    assert torch.allclose(norms_out[~small], torch.full_like(norms_out[~small], 2.0))  # above: onto the sphere
    # direction preserved
    assert torch.allclose(out[~small].flatten(1) / 2.0, x[~small].flatten(1) / norms_in[~small, None], atol=1e-6)


def test_cut_noise_adds_gaussian_of_std_sigma_c_from_its_own_stream():
    state = torch.get_rng_state()
    layer = CutNoise(clip=3.0, sigma=0.5, seed=11)
    out = layer(torch.zeros(4000, 16))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    assert out.mean().abs() < 0.02 and out.std().item() == pytest.approx(1.5, rel=0.02)
    assert torch.equal(CutNoise(clip=3.0, sigma=0.5, seed=11)(torch.zeros(4000, 16)), out)  # seeded
    assert not torch.equal(CutNoise(clip=3.0, sigma=0.5, seed=12)(torch.zeros(4000, 16)), out)
    layer.reset_rng()
    assert torch.equal(layer(torch.zeros(4000, 16)), out)


def test_cut_noise_at_inference_switch():
    x = torch.randn(3, 4)
    on, off = CutNoise(clip=1.0, sigma=1.0), CutNoise(clip=1.0, sigma=1.0, at_inference=False)
    assert not torch.equal(on.eval()(x), x)
    assert off.eval()(x) is x
    assert not torch.equal(off.train()(x), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip=0.0), "clip"),
        (dict(clip=-1.0), "clip"),
        (dict(sigma=-0.1, clip=1.0), "sigma"),
        (dict(sigma=1.0), "finite clip"),
        (dict(clip=1.0, sigma=float("nan")), "sigma"),
        (dict(seed=-1), "seed"),
    ],
)
def test_cut_noise_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        CutNoise(**kwargs)


# ----------------------------------------------------------------------------- NoPeek
def test_nopeek_alpha_zero_is_the_inner_module():
    inner = _bottom()
    x = torch.randn(5, 1, 3, 4)
    wrapped = NoPeek(copy.deepcopy(inner), alpha=0.0)
    out_a, out_b = inner(x), wrapped(x)
    assert torch.equal(out_a, out_b) and out_b.grad_fn.name() == out_a.grad_fn.name()


def test_nopeek_gradient_is_that_of_loss_plus_alpha_dcor():
    """Oracle: autograd of (task loss + alpha * dCor(x, inner(x))) on an unwrapped copy."""
    alpha = 0.7
    wrapped, reference = NoPeek(_bottom(1), alpha=alpha), _bottom(1)
    x = torch.randn(9, 1, 3, 4)
    head = torch.randn(6)

    out = wrapped(x)
    assert torch.equal(out, reference(x))  # the forward (what is sent) is unchanged
    (out @ head).pow(2).mean().backward()
    ref_out = reference(x)
    ((ref_out @ head).pow(2).mean() + alpha * distance_correlation(x, ref_out)).backward()
    task_only = torch.autograd.grad((reference(x) @ head).pow(2).mean(), list(reference.parameters()))
    for p, q, t in zip(wrapped.inner.parameters(), reference.parameters(), task_only):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(p.grad, t)  # the penalty did change the gradient


def test_nopeek_acts_only_in_training_with_grad():
    wrapped = NoPeek(_bottom(), alpha=1.0)
    x = torch.randn(3, 1, 3, 4)
    assert wrapped(x).grad_fn.name() == "_AddDcorGradientBackward"
    assert wrapped.eval()(x).grad_fn.name() != "_AddDcorGradientBackward"
    with torch.no_grad():
        assert wrapped.train()(x).grad_fn is None


# ----------------------------------------------------------------------------- LabelProtection
def test_label_protection_strength_zero_passes_input_through():
    x = torch.randn(4, 3, requires_grad=True)
    assert LabelProtection(0.0)(x) is x


def _protected_grad(grad: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
    x = torch.zeros_like(grad, requires_grad=True)
    LabelProtection(strength, seed=seed)(x).backward(grad)
    return x.grad


def test_label_protection_noise_lies_along_the_principal_direction():
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    signs = torch.where(torch.arange(64) % 10 == 0, -3.0, 0.3)  # imbalanced: rare class, big opposite gradients
    grad = signs[:, None] * direction + 0.01 * torch.randn(64, 32, generator=g)
    state = torch.get_rng_state()
    out = _protected_grad(grad, 5.0)
    assert torch.equal(torch.get_rng_state(), state)
    noise = out - grad
    top = torch.linalg.svd(grad - grad.mean(0), full_matrices=False).Vh[0]
    residual = noise - (noise @ top)[:, None] * top  # nothing outside the principal direction
    assert residual.abs().max() < 1e-4
    rms = grad.pow(2).sum(1).mean().sqrt()
    assert (noise @ top).std().item() == pytest.approx(5.0 * rms.item(), rel=0.3)
    assert torch.equal(_protected_grad(grad, 5.0), out)  # seeded, reproducible
    assert not torch.equal(_protected_grad(grad, 5.0, seed=1), out)


def test_label_protection_hides_the_sign_the_attacks_read():
    """At strength 10 the sign along the class direction is mostly noise: about half the samples flip."""
    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    signs = torch.where(torch.arange(512) % 10 == 0, -1.0, 0.1)
    grad = signs[:, None] * direction
    out = _protected_grad(grad, 10.0)
    flipped = ((out @ direction) * signs < 0).float().mean()
    assert 0.35 < flipped < 0.65  # a sign that is right half the time carries no label


def test_label_protection_rejects_bad_settings():
    with pytest.raises(ConfigurationError, match="strength"):
        LabelProtection(-1.0)
    with pytest.raises(ConfigurationError, match="directions"):
        LabelProtection(1.0, directions=0)


# ----------------------------------------------------------------------------- placement and specs
def test_apply_defense_places_each_defense_at_its_party():
    segs = [nn.Linear(4, 3), nn.Linear(3, 2)]
    nopeek = apply_defense(segs, DefenseSetting("nopeek", 1.0))
    assert isinstance(nopeek[0], NoPeek) and nopeek[0].inner is segs[0] and nopeek[1] is segs[1]
    noise = apply_defense(segs, DefenseSetting("noise", 0.2), DefenseOptions(clip=2.5, seed=3))
    assert noise[0][0] is segs[0] and isinstance(noise[0][1], CutNoise)
    assert (noise[0][1].clip, noise[0][1].sigma, noise[0][1].seed) == (2.5, 0.2, 3)
    assert apply_defense(segs, DefenseSetting("noise", 0.0))[0][1].is_identity
    label = apply_defense(segs, DefenseSetting("label", 4.0))
    assert label[0] is segs[0] and isinstance(label[1][0], LabelProtection) and label[1][1] is segs[1]
    assert apply_defense(segs, DefenseSetting("none")) == segs


@pytest.mark.parametrize("name, strength", [("nope", 1.0), ("none", 1.0), ("label", -1.0), ("noise", math.inf)])
def test_defense_setting_validates(name, strength):
    with pytest.raises(ConfigurationError):
        DefenseSetting(name, strength)


def test_defended_segments_travel_as_specs():
    segs = [nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 2))]
    for setting in (DefenseSetting("nopeek", 0.5), DefenseSetting("noise", 0.1), DefenseSetting("label", 3.0)):
        defended = apply_defense(copy.deepcopy(segs), setting, DefenseOptions(clip=2.0, seed=5))
        for seg in defended:
            spec = module_to_spec(seg)
            rebuilt = spec_to_module(spec)
            assert module_to_spec(rebuilt) == spec
            rebuilt.load_state_dict(seg.state_dict())
            x = torch.randn(3, 1, 3, 4) if seg is defended[0] else torch.randn(3, 6)
            assert torch.equal(rebuilt.eval()(x), seg.eval()(x))  # same layers, same seeds, same noise
    assert module_to_spec(CutNoise())["clip"] is None
    with pytest.raises(SpecError, match="CutNoise"):
        spec_to_module({"type": "CutNoise", "clip": 1.0, "sigma": -2.0, "seed": 0, "at_inference": True})
    with pytest.raises(SpecError, match="LabelProtection"):
        spec_to_module({"type": "LabelProtection", "strength": 1.0, "code": "import os"})
