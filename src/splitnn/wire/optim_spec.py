"""Declarative optimizer specs: which optimizer a worker builds for its segment, as data.

An :class:`OptimizerSpec` travels as a small JSON object (``to_dict``/``from_dict``) or a
short string such as ``"sgd:lr=0.03,momentum=0.9"``, never as code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from splitnn.errors import SpecError

__all__ = ["OptimizerSpec", "KNOWN_OPTIMIZERS", "DECAY_RULES", "SCHEDULES"]

#: Optimizer names :class:`OptimizerSpec` can build.
KNOWN_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
#: Which parameters ``weight_decay`` applies to: all, or only matrices and embeddings (``dim >= 2``: no decay
#: on biases and norms, as nanoGPT and the Hugging Face Trainer do).
DECAY_RULES: tuple[str, ...] = ("all", "matrices")
#: Learning-rate schedules after the warmup: constant, cosine or linear decay to ``min_lr`` at step ``total``.
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
#: The most steps a schedule may count (warmup, total).
MAX_SCHEDULE_STEPS = 10**9
#: The optimizer's first parameter group keeps the steps taken under this key (saved with its state_dict).
STEP_KEY = "splitnn_step"
_MAX_TEXT = 1000
#: The largest learning rate a spec may ask for (a worker builds what a researcher sends: a value far
#: outside any sane training, like 1e308, is refused instead of turning the weights into inf/nan).
MAX_LR = 10.0
#: The largest weight decay and eps a spec may ask for.
MAX_WEIGHT_DECAY = 1.0
MAX_EPS = 1.0


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(f"optimizer option {name!r} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise SpecError(f"optimizer option {name!r} must be finite, got {v!r}")
    return f


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer to build and its hyper-parameters.

    ``momentum`` applies to ``sgd`` only; ``betas`` and ``eps`` to ``adam``/``adamw``.
    ``weight_decay`` applies to all (note: 0.0 here also for ``adamw``, whose PyTorch
    default is 0.01). Invalid values raise :class:`SpecError` at construction.

    Accepted values (finite numbers; anything else is refused -- by a worker, before it
    builds anything -- because a researcher's spec must not be able to wreck a shared party):

    - ``lr``: 0 < lr <= 10
    - ``momentum``: 0 <= momentum < 1
    - ``weight_decay``: 0 <= weight_decay <= 1
    - ``betas``: each in [0, 1)
    - ``eps``: 0 < eps <= 1
    - ``decay``: ``"all"`` or ``"matrices"`` (weight decay on parameters with ``dim >= 2`` only)
    - ``schedule``: ``"constant"``, ``"cosine"`` or ``"linear"``; ``warmup`` and ``total`` steps
      (integers, 0 <= warmup < total <= 1e9 for a decay) and ``min_lr`` (0 <= min_lr <= lr)

    The learning rate of step ``it`` (0, 1, ... counted per optimizer step, i.e. per batch) is
    nanoGPT's ``get_lr(it)``: ``lr * (it + 1) / (warmup + 1)`` during the warmup, then the decay
    from ``lr`` to ``min_lr`` at step ``total`` (cosine: ``min_lr + 0.5 * (1 + cos(pi * r)) *
    (lr - min_lr)``, ``r = (it - warmup) / (total - warmup)``; linear: ``lr - r * (lr - min_lr)``),
    and ``min_lr`` after it. See :meth:`lr_at`. The count is kept in the optimizer's state dict, so
    a checkpointed optimizer resumes its schedule.
    """

    name: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decay: str = "all"
    schedule: str = "constant"
    warmup: int = 0
    total: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        name = self.name.lower() if isinstance(self.name, str) else self.name
        if name not in KNOWN_OPTIMIZERS:
            raise SpecError(f"unknown optimizer {self.name!r}; known optimizers: {', '.join(KNOWN_OPTIMIZERS)}")
        lr = _number("lr", self.lr)
        if lr <= 0:
            raise SpecError(f"optimizer option 'lr' must be > 0, got {self.lr!r}")
        if lr > MAX_LR:
            raise SpecError(f"optimizer option 'lr' must be at most {MAX_LR:g}, got {self.lr!r}")
        momentum = _number("momentum", self.momentum)
        if not 0 <= momentum < 1:
            raise SpecError(f"optimizer option 'momentum' must lie in [0, 1), got {self.momentum!r}")
        if momentum != 0 and name != "sgd":
            raise SpecError(f"optimizer option 'momentum' applies to sgd only; {name} uses 'betas'")
        weight_decay = _number("weight_decay", self.weight_decay)
        if not 0 <= weight_decay <= MAX_WEIGHT_DECAY:
            raise SpecError(
                f"optimizer option 'weight_decay' must lie in [0, {MAX_WEIGHT_DECAY:g}], got {self.weight_decay!r}"
            )
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable):
            raise SpecError(f"optimizer option 'betas' must be two numbers, got {betas!r}")
        betas = tuple(betas)
        if len(betas) != 2:
            raise SpecError(f"optimizer option 'betas' must be two numbers, got {self.betas!r}")
        betas = (_number("betas", betas[0]), _number("betas", betas[1]))
        if not all(0.0 <= b < 1.0 for b in betas):
            raise SpecError(f"optimizer option 'betas' must lie in [0, 1), got {self.betas!r}")
        eps = _number("eps", self.eps)
        if not 0 < eps <= MAX_EPS:
            raise SpecError(f"optimizer option 'eps' must lie in (0, {MAX_EPS:g}], got {self.eps!r}")
        if self.decay not in DECAY_RULES:
            raise SpecError(f"optimizer option 'decay' must be one of {', '.join(DECAY_RULES)}, got {self.decay!r}")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"optimizer option 'schedule' must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        warmup, total = _steps("warmup", self.warmup), _steps("total", self.total)
        if self.schedule != "constant" and not warmup < total:
            raise SpecError(
                f"a {self.schedule} schedule decays from step 'warmup' to step 'total': give total > warmup, "
                f"got warmup={warmup}, total={total}"
            )
        min_lr = _number("min_lr", self.min_lr)
        if not 0 <= min_lr <= lr:
            raise SpecError(f"optimizer option 'min_lr' must lie in [0, lr], got {self.min_lr!r}")
        for field_name, value in (
            ("warmup", warmup),
            ("total", total),
            ("min_lr", min_lr),
            ("name", name),
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("betas", betas),
            ("eps", eps),
        ):
            object.__setattr__(self, field_name, value)

    def build(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
        """Build the optimizer over ``params`` (parameters or parameter groups).

        With ``decay="matrices"`` and parameters (not groups), the parameters form two groups: those
        with ``dim >= 2`` decayed by ``weight_decay``, the others (biases, norms) not decayed. A schedule
        other than a constant one without warmup sets every group's learning rate before each step."""
        params = list(params)
        if self.decay == "matrices" and params and isinstance(params[0], torch.Tensor):
            params = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            params = [g for g in params if g["params"]]
        if self.name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
            opt = cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        if self.schedule != "constant" or self.warmup:
            opt.param_groups[0][STEP_KEY] = 0
            opt.register_step_pre_hook(self._set_lr)
        return opt

    def lr_at(self, it: int) -> float:
        """The learning rate of step ``it`` (0-based), nanoGPT's ``get_lr``; see the class docstring."""
        if it < self.warmup:
            return self.lr * (it + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return self.lr
        if it > self.total:
            return self.min_lr
        ratio = (it - self.warmup) / (self.total - self.warmup)
        if self.schedule == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
            return self.min_lr + coeff * (self.lr - self.min_lr)
        return self.lr - ratio * (self.lr - self.min_lr)

    def _set_lr(self, opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        it = opt.param_groups[0].get(STEP_KEY, 0)
        lr = self.lr_at(int(it))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.param_groups[0][STEP_KEY] = int(it) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, accepted by :meth:`from_dict`. The decay rule and the schedule are written
        only when they differ from their defaults, so that a spec without them reads as before (its
        fingerprint, and a worker of an earlier version, see the same object)."""
        d = {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "betas": list(self.betas),
            "eps": self.eps,
        }
        for key in _RECIPE_FIELDS:
            if getattr(self, key) != _RECIPE_DEFAULTS[key]:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimizerSpec:
        """Build from a dict; missing keys take their defaults, unknown keys raise :class:`SpecError`."""
        if not isinstance(d, Mapping):
            raise SpecError(f"optimizer spec must be an object, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in allowed]
        if unknown:
            raise SpecError(f"unknown optimizer option {unknown[0]!r}; accepted: {', '.join(allowed)}")
        return cls(**dict(d))

    @classmethod
    def parse(cls, text: str) -> OptimizerSpec:
        """Parse ``"name"`` or ``"name:key=value,..."``, e.g. ``"adam:lr=1e-3,betas=(0.9,0.99)"``."""
        if not isinstance(text, str) or len(text) > _MAX_TEXT:
            raise SpecError(f"optimizer string must be a str of at most {_MAX_TEXT} characters")
        name, _, rest = text.strip().partition(":")
        opts: dict[str, Any] = {"name": name.strip()}
        for item in _split_top_level(rest):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise SpecError(f"cannot parse optimizer option {item.strip()!r} in {text!r}; write key=value")
            if key in opts:
                raise SpecError(f"optimizer option {key!r} given twice in {text!r}")
            opts[key] = _parse_value(key, value.strip())
        return cls.from_dict(opts)

    @classmethod
    def coerce(cls, x: OptimizerSpec | Mapping[str, Any] | str | None) -> OptimizerSpec:
        """Turn an OptimizerSpec, a dict, a string (see :meth:`parse`) or None (defaults) into an OptimizerSpec."""
        if x is None:
            return cls()
        if isinstance(x, OptimizerSpec):
            return x
        if isinstance(x, str):
            return cls.parse(x)
        if isinstance(x, Mapping):
            return cls.from_dict(x)
        raise SpecError(
            f"cannot make an optimizer spec from {type(x).__name__}; give an OptimizerSpec, "
            "a dict or a string like 'sgd:lr=0.03,momentum=0.9'"
        )

    def __str__(self) -> str:
        """Short form accepted by :meth:`parse`; lists only options that differ from the defaults."""
        default = OptimizerSpec(name=self.name)
        opts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value != getattr(default, f.name):
                text = f"({value[0]!r},{value[1]!r})" if f.name == "betas" else str(value)
                opts.append(f"{f.name}={text}")
        return self.name + (":" + ",".join(opts) if opts else "")


_RECIPE_FIELDS = ("decay", "schedule", "warmup", "total", "min_lr")
_RECIPE_DEFAULTS = {"decay": "all", "schedule": "constant", "warmup": 0, "total": 0, "min_lr": 0.0}


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses or brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s for s in items if s.strip()]


def _parse_value(key: str, value: str) -> Any:
    if key == "betas":
        inner = value.strip()
        if inner[:1] in "([" and inner[-1:] in ")]":
            inner = inner[1:-1]
        parts = [p for p in inner.replace("/", ",").split(",") if p.strip()]
        return tuple(_parse_number(key, p) for p in parts)
    return value if key in ("name", "decay", "schedule") else _parse_number(key, value)


def _steps(name: str, v: Any) -> int:
    """A step count of a schedule: a whole number in [0, MAX_SCHEDULE_STEPS]."""
    f = _number(name, v)
    if f != int(f) or not 0 <= f <= MAX_SCHEDULE_STEPS:
        raise SpecError(f"optimizer option {name!r} must be a whole number of steps in [0, 1e9], got {v!r}")
    return int(f)


def _parse_number(key: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise SpecError(f"optimizer option {key!r} must be a number, got {text.strip()!r}") from None
