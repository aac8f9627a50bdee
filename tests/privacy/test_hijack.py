"""FSHA against a data holder whose policy runs the hijack detector: caught and refused; honest runs pass."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from splitnn.data import Dataset, load_dataset
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError, PolicyError
from splitnn.models import tutorial_mlp
from splitnn.privacy.attacks.fsha import FSHA, FSHAConfig
from splitnn.split import SplitNN
from splitnn.workers import VirtualWorker
from splitnn.workers.audit import AuditLog
from splitnn.workers.guard import HijackGuard
from splitnn.workers.policy import WorkerPolicy


@pytest.fixture(scope="module")
def fmnist_2k(fmnist_dir):
    d = load_dataset("fashion-mnist", "train", data_dir=fmnist_dir, download=False, progress=False, limit=3000)
    return Dataset(d.features[:2000], d.labels[:2000], "fmnist-private", 10), d.features[2000:]


def _victim(policy: WorkerPolicy, audit: AuditLog | None, features: torch.Tensor, seed: int) -> VirtualWorker:
    torch.manual_seed(seed)
    segment = tutorial_mlp((128, 640), in_features=784, classes=10)[0]
    alice = VirtualWorker("alice", policy=policy, audit=audit)
    alice.add_segment("bottom", segment, lambda p: torch.optim.SGD(p, lr=0.05))
    alice.add_dataset("private", features=features)
    return alice


@pytest.mark.parametrize("seed", [0, 1])
def test_fsha_is_caught_and_every_later_gradient_refused(fmnist_2k, tmp_path, seed):
    private, public = fmnist_2k
    audit = AuditLog(tmp_path / "audit.jsonl", "alice")
    alice = _victim(WorkerPolicy(detect_hijack=1.1), audit, private.features, seed)
    batches = [b for e in range(2) for b in epoch_batches(2000, 64, shuffle=True, seed=seed, epoch=e)]
    attack = FSHA(public, 128, FSHAConfig(lr=1e-3, hidden=128, gradient_scale=10, seed=seed))
    result = attack.attack(alice, "bottom", "private", batches)
    # the first verdict comes after the 50-batch warm-up; the hijacker's probe scores are 1.00 +- 0.01
    assert result.stopped_at is not None and result.stopped_at <= 50
    assert "policy rule detect_hijack" in result.reason
    with pytest.raises(PolicyError, match="policy rule detect_hijack"):
        alice.step("bottom")
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refusals = [r for r in lines if r["event"] == "refusal"]
    assert refusals and all(r["rule"] == "detect_hijack" for r in refusals)
    assert "do not depend on the labels" in refusals[0]["message"]


def test_weights_do_not_move_after_the_alarm(fmnist_2k):
    private, public = fmnist_2k
    alice = _victim(WorkerPolicy(detect_hijack=1.1), None, private.features, 0)
    batches = [b for e in range(2) for b in epoch_batches(2000, 64, shuffle=True, seed=0, epoch=e)]
    FSHA(public, 128, FSHAConfig(lr=1e-3, hidden=128, gradient_scale=10)).attack(alice, "bottom", "private", batches)
    before = {k: v.clone() for k, v in alice.get_state("bottom").items()}
    again = FSHA(public, 128, FSHAConfig(hidden=128)).attack(alice, "bottom", "private", batches[:3])
    assert again.stopped_at == 0  # refused at once
    with pytest.raises(PolicyError, match="detect_hijack"):
        alice.step("bottom")
    after = alice.get_state("bottom")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("seed", [0, 1])
def test_honest_training_raises_no_alarm(fmnist_2k, seed):
    private, _ = fmnist_2k
    torch.manual_seed(seed)
    segments = tutorial_mlp((128, 640), in_features=784, classes=10)
    alice = VirtualWorker("alice", policy=WorkerPolicy(detect_hijack=1.1))
    model = SplitNN([segments[0], nn.Sequential(*segments[1:])], [alice, VirtualWorker("bob")], optimizer="sgd:lr=0.05")
    model.fit(private, epochs=3, batch_size=64, seed=seed, progress=False)
    guard = alice._hijack_guards[model.stages[0].key]
    assert not guard.tripped
    assert len(guard.scores) >= 15 and min(guard.scores[9:]) > 1.2  # measured >= 1.3 after 50 batches


def test_probe_batches_rotate_half_the_rows_and_drop_the_gradient():
    guard = HijackGuard(threshold=1.1, every=2, warmup=0, window=1)
    a = torch.arange(8.0).reshape(4, 2).requires_grad_(True)
    sent = guard.wrap(a * 1)  # batch 1: real
    assert torch.equal(sent, a)
    sent.backward(torch.ones(4, 2))
    assert torch.equal(a.grad, torch.ones(4, 2))
    a.grad = None
    sent = guard.wrap(a * 1)  # batch 2: a probe; rows 0, 1 swapped (the first half rotated by one)
    assert torch.equal(sent.detach(), a.detach()[[1, 0, 2, 3]])
    sent.backward(torch.tensor([[3.0, 0], [3, 0], [1, 0], [1, 0]]))
    assert torch.equal(a.grad, torch.zeros(4, 2))  # not learnt from
    assert guard.scores == [3.0] and not guard.tripped


def test_detect_hijack_rule_is_checked():
    with pytest.raises(ConfigurationError, match="detect_hijack"):
        WorkerPolicy(detect_hijack=0)
    assert WorkerPolicy.from_dict({"detect_hijack": 1.2}).detect_hijack == 1.2


# -- across processes: a `splitnn worker --policy` party stops a hijacking label holder ------------------------
def test_a_networked_party_with_detect_hijack_refuses_fsha_and_audits_why(tmp_path):
    import splitnn
    from splitnn.wire.fingerprint import fingerprint
    from splitnn.workers.audit import read_audit
    from tests.privacy.fsha_party import HijackHead
    from tests.transport.cluster import Cluster

    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    policy = tmp_path / "alice-policy.toml"  # alice's operator reviewed the bottom segment and pinned it
    policy.write_text(f'detect_hijack = 1.1\naccept_segments = ["{fingerprint(bottom)}"]\n')
    data = "toy=tests.workers.task_data:toy_images,parts={}"
    with Cluster(tmp_path, lifetime=200) as cl:
        alice_flags = ("--data", data.format("features"), "--trust", "tests.workers.task_data")
        cl.start("alice", *alice_flags, "--policy", str(policy), "--audit-log", str(tmp_path / "alice.jsonl"))
        cl.start(
            "bob", "--data", data.format("labels"), "--trust", "tests.workers.task_data", "--trust", "tests.privacy"
        )
        alice, bob = (splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=60) for n in ("alice", "bob"))
        model = splitnn.SplitNN([bottom, HijackHead(16, 10)], [alice, bob], optimizer="sgd:lr=0.05")
        with pytest.raises(
            PolicyError, match=r"worker 'alice' refuses gradients for segment .* \(policy rule detect_hijack\)"
        ):
            model.fit("toy", epochs=8, batch_size=32, seed=0, progress=False)
        for w in (alice, bob):
            w.close(end_session=True)
    events = read_audit(tmp_path / "alice.jsonl")
    assert events[0]["policy"]["detect_hijack"] == 1.1
    refusals = [e for e in events if e["event"] == "refusal"]
    assert refusals and {e["rule"] for e in refusals} == {"detect_hijack"}
    assert "do not depend on the labels" in refusals[0]["message"]


def test_fsha_reconstructs_the_private_inputs_of_an_undefended_data_holder(fmnist_2k):
    """FSHA succeeds without the detector: after 300 steps its reconstructions are far closer to the private
    images than guessing the mean image (measured over seeds 0-4: 0.041-0.048 against 0.087)."""
    private, public = fmnist_2k
    torch.manual_seed(0)
    alice = VirtualWorker("alice")
    alice.add_segment(
        "bottom", tutorial_mlp((128, 640), in_features=784, classes=10)[0], lambda p: torch.optim.Adam(p, lr=1e-4)
    )
    alice.add_dataset("private", features=private.features)
    batches = [b for e in range(10) for b in epoch_batches(2000, 64, shuffle=True, seed=0, epoch=e)][:300]
    result = FSHA(public, 128, FSHAConfig(seed=0)).attack(alice, "bottom", "private", batches, private.features)
    mean_image = float(((public.mean(0, keepdim=True) - private.features) / 2).pow(2).mean())
    assert result.stopped_at is None
    assert result.final_mse() < 0.6 * mean_image
    assert sum(result.mse[:10]) / 10 > mean_image  # it starts worse than the mean image: the gain is the attack's
