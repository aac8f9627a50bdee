"""A party's policy: what it agrees to run on its data and whom it hands what.

The party's operator writes it (``splitnn worker --policy policy.toml``, or
``VirtualWorker(name, policy=WorkerPolicy(...))``); the party enforces it itself, before any
batch, never trusting the researcher to. Every refusal is a :class:`~splitnn.errors.PolicyError`
naming the rule and the offending segment (or dataset, or peer).

- :mod:`~splitnn.workers.policy.rules`: the rules, their defaults (a data holder's gate) and the policy file;
- :mod:`~splitnn.workers.policy.checks`: the check each rule makes, called by the engine and the server;
- :mod:`~splitnn.workers.policy.passthrough`: the pass-through heuristic over a segment's layers.

The rules and the gate are explained in docs/failures-and-policy.md.
"""

from __future__ import annotations

from splitnn.workers.policy import checks, passthrough, rules
from splitnn.workers.policy.checks import *  # noqa: F403
from splitnn.workers.policy.passthrough import *  # noqa: F403
from splitnn.workers.policy.rules import *  # noqa: F403
from splitnn.workers.policy.rules import _RULES as _RULES  # (the rule names; tests read them)

__all__ = [*rules.__all__, *passthrough.__all__, *checks.__all__]
