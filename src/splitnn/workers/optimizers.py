"""Building a segment's optimizer from a factory or a declarative spec."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.errors import ConfigurationError
from splitnn.wire.optim_spec import OptimizerSpec


def build_optimizer(optimizer: object, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Build an optimizer over ``params``.

    ``optimizer`` is a factory (``lambda p: optim.SGD(p, lr=0.03)``; in-process
    workers only) or anything :meth:`splitnn.wire.OptimizerSpec.coerce` accepts
    ("sgd:lr=0.03", a dict, an ``OptimizerSpec``).
    """
    if callable(optimizer) and not hasattr(optimizer, "build"):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigurationError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    return OptimizerSpec.coerce(optimizer).build(params)
