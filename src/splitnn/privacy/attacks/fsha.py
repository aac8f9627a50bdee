"""FSHA, the feature-space hijacking attack (Pasquini et al., arXiv 2012.02670).

:class:`FSHA` is the malicious server (configured by :class:`FSHAConfig`, measured in
:class:`FSHAResult`); its docstring gives the threat model and each training step of the attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from splitnn.checks import check_amounts, check_counts
from splitnn.errors import ConfigurationError
from splitnn.workers import BatchRef

__all__ = ["FSHAConfig", "FSHA", "FSHAResult"]


@dataclass(frozen=True)
class FSHAConfig:
    """The attacker's training of pilot, decoder and discriminator.

    Attributes:
        steps: training steps the attacker drives.
        batch_size: private (and public) batch size.
        lr: Adam learning rate of the attacker's networks.
        hidden: width of their hidden layers.
        gradient_penalty: weight of the critic's gradient penalty.
        gradient_scale: factor on the crafted gradient (the attacker picks the size the data holder's
            optimizer responds to; an honest mean-loss gradient is about 1 / batch size per sample).
        nonnegative_cut: the cut's activations are non-negative (the data holder's segment ends in a
            ReLU, as the tutorial network's does), so the pilot's features are made so too.
        pilot_depth: linear layers of the pilot encoder (1 or 2); a pilot no more complex than the
            data holder's segment is one that segment can turn into.
        critic_steps: critic updates per step.
        seed: the attacker's weights and public batches.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    hidden: int = 256
    gradient_penalty: float = 10.0
    gradient_scale: float = 1.0
    nonnegative_cut: bool = True
    pilot_depth: int = 1
    critic_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pilot_depth not in (1, 2):
            raise ConfigurationError(f"FSHAConfig.pilot_depth must be 1 or 2, got {self.pilot_depth!r}")
        check_counts(self, ("steps", "batch_size", "hidden", "critic_steps"))
        check_amounts(self, ("lr", "gradient_penalty", "gradient_scale"))


@dataclass
class FSHAResult:
    """Per step: the reconstruction MSE of that step's batch; ``stopped_at``: the step the data holder refused
    (None: it never did) and ``reason``, its error message."""

    mse: list[float] = field(default_factory=list)
    stopped_at: int | None = None
    reason: str | None = None

    def final_mse(self, last: int = 10) -> float:
        """Mean MSE of the last ``last`` steps."""
        tail = self.mse[-last:]
        return sum(tail) / len(tail) if tail else math.nan


class FSHA:
    """The malicious server of FSHA.

    Threat model: the party after the cut (the server; here the label holder) is
    malicious. It drives training as usual, receives the data holder's activations
    ``z = f(x_private)`` and sends back gradients, but the gradients are not those of
    the task: they make the data holder's segment ``f`` map its inputs into the
    feature space of the attacker's own *pilot* encoder ``f~``, for which the attacker
    has trained an inverse (a decoder ``f~^-1``) on auxiliary public data. Once ``f``
    lands there, ``f~^-1(z)`` reconstructs the private inputs.

    Each training step, the attacker (all from what it legitimately sees and holds):

    1. gets the batch's activations ``z`` from the data holder (its segment's forward);
    2. sends back ``d/dz [-mean D(z)]``: the gradient that makes ``z`` look, to the
       discriminator ``D``, like pilot features (a Wasserstein GAN's generator loss);
    3. trains pilot and decoder as an auto-encoder on a public batch;
    4. trains ``D`` to tell ``f~(x_public)`` from ``z`` (WGAN critic with gradient penalty).

    The data holder follows the protocol unchanged: it back-propagates the gradient
    it received and steps its own optimizer. :class:`FSHA` speaks to the data holder's
    party only through the :class:`~splitnn.workers.Worker` protocol (``forward``,
    ``put``, ``backward``, ``step``), so the same attack runs against an in-process or
    a networked party, and meets whatever that party's policy does with the
    gradients it receives (see the ``detect_hijack`` policy rule).

    Reconstruction quality per step is the MSE (pixels on a [0, 1] scale) between
    ``f~^-1(z)`` and the batch's true inputs, which only the evaluator has.

    Args:
        public: the attacker's auxiliary public inputs (N, ...), same distribution as the private ones.
        cut_features: units of the data holder's activation at the cut (flattened).
        config: :class:`FSHAConfig`.
    """

    def __init__(self, public: torch.Tensor, cut_features: int, config: FSHAConfig | None = None) -> None:
        self.config = cfg = config or FSHAConfig()
        if public.ndim < 2 or public.shape[0] < cfg.batch_size:
            raise ConfigurationError(f"FSHA needs at least batch_size={cfg.batch_size} public inputs")
        self.public = public.detach().float()
        self.shape = tuple(public.shape[1:])
        d_in, h = int(math.prod(self.shape)), cfg.hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            last = [nn.ReLU()] if cfg.nonnegative_cut else []
            if cfg.pilot_depth == 1:
                self.pilot = nn.Sequential(nn.Flatten(), nn.Linear(d_in, cut_features), *last)
            else:
                self.pilot = nn.Sequential(
                    nn.Flatten(), nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, cut_features), *last
                )
            self.decoder = nn.Sequential(
                nn.Linear(cut_features, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d_in), nn.Tanh()
            )
            self.critic = nn.Sequential(
                nn.Linear(cut_features, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, 1)
            )
        self._ae_opt = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], lr=cfg.lr)
        self._critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr)
        self._gen = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """The attacker's reconstruction ``f~^-1(z)`` of the inputs behind activations ``z``."""
        return self.decoder(z.reshape(z.shape[0], -1).float()).reshape(z.shape[0], *self.shape)

    def hijack_gradient(self, z: torch.Tensor) -> torch.Tensor:
        """The crafted gradient for activations ``z``: ``d/dz [-mean critic(z)]``."""
        leaf = z.detach().reshape(z.shape[0], -1).float().requires_grad_(True)
        with torch.enable_grad():  # also from inside another backward pass (a party's segment)
            (g,) = torch.autograd.grad(-self.critic(leaf).mean() * self.config.gradient_scale, leaf)
        return g.reshape(z.shape).to(z.dtype)

    def train_attacker(self, z: torch.Tensor) -> None:
        """One step of the attacker's own networks: pilot + decoder on a public batch, then the critic."""
        with torch.enable_grad():  # also from inside another backward pass (a party's segment)
            self._train_attacker(z)

    def _train_attacker(self, z: torch.Tensor) -> None:
        cfg = self.config
        idx = torch.randint(0, self.public.shape[0], (cfg.batch_size,), generator=self._gen)
        xp = self.public[idx]
        self._ae_opt.zero_grad(set_to_none=True)
        rec = self.decoder(self.pilot(xp)).reshape(xp.shape)
        torch.nn.functional.mse_loss(rec, xp).backward()
        self._ae_opt.step()
        real = self.pilot(xp).detach()
        fake = z.detach().reshape(z.shape[0], -1).float()
        n = min(real.shape[0], fake.shape[0])
        real, fake = real[:n], fake[:n]
        for _ in range(cfg.critic_steps):
            self._critic_step(real, fake)

    def _critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        cfg, n = self.config, real.shape[0]
        self._critic_opt.zero_grad(set_to_none=True)
        # the critic scores pilot features high and the data holder's low
        loss = self.critic(fake).mean() - self.critic(real).mean()
        if cfg.gradient_penalty > 0:
            alpha = torch.rand(n, 1, generator=self._gen)
            mix = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            (gm,) = torch.autograd.grad(self.critic(mix).sum(), mix, create_graph=True)
            loss = loss + cfg.gradient_penalty * (gm.norm(dim=1) - 1).pow(2).mean()
        loss.backward()
        self._critic_opt.step()

    def attack(
        self,
        worker,
        key: str,
        dataset: str,
        batches: list[torch.Tensor],
        truth: torch.Tensor | None = None,
        *,
        name: str = "server",
    ) -> FSHAResult:
        """Drive the data holder's party ``worker`` (segment ``key``, its dataset ``dataset``) through ``batches``.

        ``truth`` (the private inputs, indexed like the dataset) is used only to measure the
        reconstructions. A refusal of the data holder (a :class:`~splitnn.errors.PolicyError`)
        ends the attack; the result records when and why.
        """
        from splitnn.errors import PolicyError

        result = FSHAResult()
        for step, idx in enumerate(batches):
            try:
                worker.zero_grad(key)
                ref = worker.forward(key, BatchRef(dataset, idx))
                z = worker.fetch(ref, kind="activation")
                if truth is not None:
                    rec = self.reconstruct(z)
                    x = truth[idx].reshape(rec.shape)
                    result.mse.append(float(((rec - x) / 2).pow(2).mean()))  # [-1, 1] -> [0, 1] scale
                g = self.hijack_gradient(z)
                worker.backward(key, worker.put(g, src=name, kind="gradient"))
                worker.step(key)
            except PolicyError as exc:
                result.stopped_at, result.reason = step, str(exc)
                break
            self.train_attacker(z)
        return result
