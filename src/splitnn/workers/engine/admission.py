"""What a party checks before a segment is installed and before it first reads the party's data.

Policy rules ``accept_segments`` and ``max_params`` (at install), ``datasets``, ``accept_any_segment``,
``refuse_passthrough`` and ``min_reduction`` (at a segment's first read of a dataset). State: ``_reads``, the
(segment, dataset, part) reads already checked and recorded.
"""

from __future__ import annotations

import itertools
import math

import torch

from splitnn.errors import SpecError
from splitnn.wire.fingerprint import fingerprint
from splitnn.wire.spec import module_to_spec
from splitnn.workers.checkpoint import segment_identity
from splitnn.workers.engine.hosted import Hosted
from splitnn.workers.policy import check_accepted, check_dataset, check_install, check_reduction
from splitnn.workers.refs import BatchRef
from splitnn.workers.values import ProbeShape, Value, describe, is_several


class Admission:
    """The policy's checks of segments installed here and of their first read of each dataset."""

    def _init_admission(self) -> None:
        self._reads: set[tuple[str, str, str]] = set()  # (segment, dataset, part) checked and recorded

    def _forget_reads(self, key: str) -> None:
        """Segment ``key`` was replaced or removed: every check of its reads runs again."""
        self._reads = {r for r in self._reads if r[0] != key}

    def _admit(self, key: str, hosted: Hosted) -> None:
        """Check a new segment against the policy (``accept_segments``, ``max_params``); record it."""
        policy = self.policy
        if policy.accept_segments is None and policy.max_params is None and self.audit is None:
            return
        fp = self._identity(hosted)
        params = sum(t.numel() for t in itertools.chain(hosted.module.parameters(), hosted.module.buffers()))
        self._guard(check_install, policy, self.name, key, fingerprint=fp, params=params)
        if self.audit is not None:
            self.audit.write(
                "segment", session=self.audit_session, segment=key, fingerprint=fp or hosted.identity, params=params
            )

    def _identity(self, hosted: Hosted) -> str | None:
        """The segment's fingerprint (None when it has no spec), computed once."""
        if hosted.identity is None:
            try:
                hosted.spec = module_to_spec(hosted.module)
                hosted.identity = fingerprint(hosted.spec)
            except SpecError:
                hosted.identity = segment_identity(hosted.module)  # "structure:...", not a fingerprint
        return None if hosted.identity.startswith("structure:") else hosted.identity

    def _features(self, key: str, ref: BatchRef) -> Value:
        """The features of batch ``ref`` for segment ``key``, its first read of the dataset checked."""
        x = self._batch(ref, "features")
        if (key, ref.dataset, "features") not in self._reads:
            self._first_read(key, ref.dataset, "features", x)
        return x

    def _labels(self, ref: BatchRef) -> torch.Tensor:
        """The labels of batch ``ref`` for a loss, the first read of the dataset's labels checked."""
        if ("", ref.dataset, "labels") not in self._reads:
            self._first_read("", ref.dataset, "labels", None)
        return self._batch(ref, "labels")

    def _first_read(self, key: str, dataset: str, part: str, x: Value | None) -> None:
        """Before segment ``key`` first runs on this party's ``dataset`` (or its labels are first read):
        the ``datasets`` rule, then -- for features -- ``refuse_passthrough`` and ``min_reduction``
        (measured by probing with zeros of the batch's shape); then record the read."""
        if self._is_own(dataset):
            policy = self.policy
            self._guard(check_dataset, policy, self.name, self._source(dataset))
            if part == "features" and not policy.accept_any_segment:
                hosted = self._segment(key)
                self._guard(check_accepted, policy, self.name, key, dataset, fingerprint=self._identity(hosted))
            if part == "features" and (policy.refuse_passthrough or policy.min_reduction is not None):
                hosted = self._segment(key)
                fp = self._identity(hosted)
                sample = x[:1] if type(x) is not tuple else tuple(t[:1] for t in x)
                out = self._probe(key, hosted, describe(sample))
                self._guard(
                    check_reduction,
                    policy,
                    self.name,
                    key,
                    dataset,
                    spec=hosted.spec,
                    fingerprint=fp,
                    in_shape=_per_sample(describe(sample)),
                    out_shape=_per_sample(out),
                )
            if self.audit is not None:
                self.audit.write(
                    "dataset_read", session=self.audit_session, dataset=dataset, part=part, segment=key or None
                )
        self._reads.add((key, dataset, part))


def _per_sample(shape: ProbeShape) -> tuple[int, ...]:
    """Values per sample of a probed shape (several values: their total)."""
    if is_several(shape):
        return (sum(math.prod(s.shape[1:]) for s in shape),)
    return tuple(shape[1:])
