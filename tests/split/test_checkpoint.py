"""Checkpoints at every party and resuming: an interrupted-and-resumed run equals an uninterrupted one.

The oracle is the uninterrupted run of the same model (same seed, same data order): after a
crash at a random batch and a resume in a fresh model (other workers, another global random
state), every weight is ``torch.equal``, and the history and ledger match too.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import splitnn
from splitnn.errors import CheckpointError, ConfigurationError
from splitnn.privacy.defenses.noise import CutNoise
from splitnn.split.manifest import MANIFEST_NAME
from splitnn.training import MultiHolderSplitNN, VerticalSplitNN
from tests.helpers import assert_same_weights, toy_dataset

W = splitnn.VirtualWorker


class Crash(Exception):
    """Stands for the researcher's process dying mid-training."""


def crash_at(model, batch: int) -> None:
    """Make ``model`` raise Crash when asked to train its ``batch``-th batch (1-based) of this fit."""
    calls = [0]
    train = model.train_batch

    def train_batch(*args, **kwargs):
        calls[0] += 1
        if calls[0] == batch:
            raise Crash
        return train(*args, **kwargs)

    model.train_batch = train_batch


def chain(optimizer: str, *, noise: bool = False, names=("alice", "bob", "claire")) -> splitnn.SplitNN:
    torch.manual_seed(1)
    first = [nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.25)]
    if noise:
        first.append(CutNoise(clip=5.0, sigma=0.3, seed=3))
    segments = [
        nn.Sequential(*first),
        nn.Sequential(nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 5), nn.LogSoftmax(dim=1)),
    ]
    return splitnn.SplitNN(segments, [W(n) for n in names], optimizer=optimizer)


DATA = toy_dataset(150, shape=(1, 8, 8), classes=5)
TEST = toy_dataset(40, shape=(1, 8, 8), classes=5, seed=1)
FIT = dict(epochs=3, batch_size=16, seed=4, progress=False)


def resumed_equals_uninterrupted(build, tmp_path, *, crash: int, every, data=DATA, test=None) -> None:
    torch.manual_seed(11)
    reference = build()
    ref_history = reference.fit(data, test_data=test, **FIT)

    torch.manual_seed(11)
    first = build()
    crash_at(first, crash)
    with pytest.raises(Crash):
        first.fit(data, test_data=test, checkpoint_dir=tmp_path, checkpoint_every=every, **FIT)

    torch.manual_seed(12345)  # another global random state: the parties' checkpoints must put theirs back
    second = build()
    history = second.fit(data, test_data=test, checkpoint_dir=tmp_path, checkpoint_every=every, resume=True, **FIT)

    assert_same_weights(second.collect(), reference.collect())
    assert history.losses() == ref_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in ref_history.epochs]
    if test is not None:
        assert [e.test_loss for e in history.epochs] == [e.test_loss for e in ref_history.epochs]
    strip = [(l.src, l.dst, l.kind, l.count, l.nbytes) for l in second.ledger.links() if l.kind != "weights"]
    assert strip == [(l.src, l.dst, l.kind, l.count, l.nbytes) for l in reference.ledger.links() if l.kind != "weights"]


@pytest.mark.parametrize("optimizer", ["sgd:lr=0.05,momentum=0.9", "adam:lr=0.01"], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("crash,every", [(17, 4), (23, "epoch"), (3, 5)])
def test_chain_resumes_exactly(optimizer, crash, every, tmp_path):
    resumed_equals_uninterrupted(lambda: chain(optimizer), tmp_path, crash=crash, every=every, test=TEST)


def test_noise_defense_stream_and_dropout_resume_exactly(tmp_path):
    # a CutNoise layer draws from its own generator, dropout from the global one: both come back
    resumed_equals_uninterrupted(lambda: chain("sgd:lr=0.05,momentum=0.9", noise=True), tmp_path, crash=20, every=3)


def test_multi_holder_resumes_exactly(tmp_path):
    def build():
        torch.manual_seed(2)
        bottom = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU())
        top = [nn.Sequential(nn.Linear(20, 5), nn.LogSoftmax(dim=1))]
        return MultiHolderSplitNN(
            bottom, top, [W("a1"), W("a2"), W("a3")], W("bob"), turn_batches=2, optimizer="adam:lr=0.01"
        )

    resumed_equals_uninterrupted(build, tmp_path, crash=14, every=4)


def test_multi_holder_with_a_weight_store_resumes_exactly(tmp_path):
    def build():
        torch.manual_seed(2)
        bottom = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU())
        top = [nn.Sequential(nn.Linear(20, 5), nn.LogSoftmax(dim=1))]
        return MultiHolderSplitNN(
            bottom,
            top,
            [W("a1"), W("a2")],
            W("bob"),
            handoff="central",
            turn_batches=3,
            optimizer="sgd:lr=0.1,momentum=0.5",
        )

    resumed_equals_uninterrupted(build, tmp_path, crash=11, every=2)


def test_vertical_resumes_exactly(tmp_path):
    def build():
        torch.manual_seed(3)
        bottoms = [nn.Sequential(nn.Linear(32, 12), nn.ReLU()), nn.Sequential(nn.Linear(32, 12), nn.ReLU())]
        top = [nn.Sequential(nn.Linear(24, 5), nn.LogSoftmax(dim=1))]
        return VerticalSplitNN(bottoms, [W("h1"), W("h2")], top, W("lab"), optimizer="adam:lr=0.01")

    resumed_equals_uninterrupted(build, tmp_path, crash=9, every=3)


def test_resume_without_a_manifest_starts_the_job(tmp_path):
    torch.manual_seed(11)
    reference = chain("adam:lr=0.01")
    reference.fit(DATA, **FIT)
    torch.manual_seed(11)
    model = chain("adam:lr=0.01")
    model.fit(DATA, checkpoint_dir=tmp_path / "new", resume=True, **FIT)
    assert_same_weights(model.collect(), reference.collect())


def test_a_finished_job_resumed_trains_nothing_more(tmp_path):
    torch.manual_seed(11)
    model = chain("adam:lr=0.01")
    history = model.fit(DATA, checkpoint_dir=tmp_path, **FIT)
    again = chain("adam:lr=0.01")
    crash_at(again, 1)  # any batch would crash
    resumed = again.fit(DATA, checkpoint_dir=tmp_path, resume=True, **FIT)
    assert resumed.losses() == history.losses()
    assert_same_weights(again.collect(), model.collect())


def test_each_party_writes_its_own_safetensors_and_the_researcher_a_manifest(tmp_path):
    torch.manual_seed(11)
    model = chain("sgd:lr=0.05,momentum=0.9")
    model.fit(DATA, checkpoint_dir=tmp_path, checkpoint_every=4, **FIT)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["step"] == 30 and manifest["position"]["epoch"] == 3
    assert list(manifest["parties"]) == ["alice", "bob", "claire"]
    assert manifest["data"]["size"] == 150 and len(manifest["data"]["digest"]) == 64
    for party, held in manifest["parties"].items():
        files = sorted((tmp_path / "parties" / party).rglob("step-*.safetensors"))
        assert [f.name for f in files] == ["step-28.safetensors", "step-30.safetensors"]  # the newest two
        with safe_open(str(files[-1]), framework="pt") as f:  # plain safetensors: tensors and JSON, no pickle
            keys = list(f.keys())
            meta = json.loads(f.metadata()["splitnn.checkpoint"])
        assert meta["worker"] == party and meta["step"] == held["step"] == 30
        assert any(k.startswith("w/") for k in keys) and "r/global" in keys
        assert any(k.startswith("o/") for k in keys)  # momentum buffers
    assert not list(tmp_path.rglob("*.tmp*"))


# -- refusals ------------------------------------------------------------------------------------------
@pytest.fixture
def interrupted(tmp_path):
    torch.manual_seed(11)
    model = chain("sgd:lr=0.05,momentum=0.9")
    crash_at(model, 13)
    with pytest.raises(Crash):
        model.fit(DATA, checkpoint_dir=tmp_path, checkpoint_every=4, **FIT)
    return tmp_path


def test_a_different_model_is_refused(interrupted):
    torch.manual_seed(1)
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.Tanh()),
        nn.Sequential(nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 5), nn.LogSoftmax(dim=1)),
    ]
    model = splitnn.SplitNN(segments, [W("alice"), W("bob"), W("claire")], optimizer="sgd:lr=0.05,momentum=0.9")
    with pytest.raises(CheckpointError, match=r"segment s0 at 'alice' differs"):
        model.fit(DATA, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)


def test_different_parties_are_refused(interrupted):
    model = chain("sgd:lr=0.05,momentum=0.9", names=("alice", "bob", "dave"))
    with pytest.raises(CheckpointError, match=r"parties \['alice', 'bob', 'claire'\].*\['alice', 'bob', 'dave'\]"):
        model.fit(DATA, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)


def test_different_data_is_refused(interrupted):
    other = copy.deepcopy(DATA)
    other.features[0, 0, 0, 0] += 1
    with pytest.raises(CheckpointError, match=r"other data: content \(sha256\)"):
        chain("sgd:lr=0.05,momentum=0.9").fit(other, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)
    with pytest.raises(CheckpointError, match=r"other data: samples 150 .* 140"):
        chain("sgd:lr=0.05,momentum=0.9").fit(
            toy_dataset(140, shape=(1, 8, 8), classes=5), checkpoint_dir=interrupted, resume=True, **FIT
        )


def test_a_different_data_order_is_refused(interrupted):
    with pytest.raises(CheckpointError, match=r"batch_size=16.*batch_size=32"):
        chain("sgd:lr=0.05,momentum=0.9").fit(
            DATA, checkpoint_dir=interrupted, resume=True, **{**FIT, "batch_size": 32}
        )
    with pytest.raises(CheckpointError, match=r"seed=4.*seed=5"):
        chain("sgd:lr=0.05,momentum=0.9").fit(DATA, checkpoint_dir=interrupted, resume=True, **{**FIT, "seed": 5})


def test_different_optimizer_settings_are_refused_by_the_party(interrupted):
    with pytest.raises(CheckpointError, match=r"'alice': segment s0's optimizer had lr=0.05 .* lr=0.1"):
        chain("sgd:lr=0.1,momentum=0.9").fit(DATA, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)
    with pytest.raises(CheckpointError, match=r"optimizer was SGD in the checkpoint and is Adam now"):
        chain("adam:lr=0.05").fit(DATA, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)


def test_parties_holding_different_steps_are_refused(interrupted):
    manifest = json.loads((interrupted / MANIFEST_NAME).read_text())
    step = manifest["step"]
    (newest,) = (interrupted / "parties" / "bob").rglob(f"step-{step}.safetensors")
    newest.unlink()  # bob lost his newest checkpoint (a restored backup, another state directory...)
    model = chain("sgd:lr=0.05,momentum=0.9")
    with pytest.raises(CheckpointError, match=rf"different steps .*bob \[\d+\].* step {step}, which \['bob'\]"):
        model.fit(DATA, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)


def test_a_checkpoint_replaced_by_another_runs_is_refused_before_anything_loads(interrupted):
    manifest = json.loads((interrupted / MANIFEST_NAME).read_text())
    manifest["parties"]["claire"]["digest"] = "0" * 64
    (interrupted / MANIFEST_NAME).write_text(json.dumps(manifest))
    model = chain("sgd:lr=0.05,momentum=0.9")
    with pytest.raises(CheckpointError, match=r"'claire': its checkpoint of step 12 is not the one"):
        model.fit(DATA, checkpoint_dir=interrupted, checkpoint_every=4, resume=True, **FIT)


def test_starting_over_an_existing_job_is_refused(interrupted):
    with pytest.raises(CheckpointError, match=r"pass resume=True .* or choose another checkpoint directory"):
        chain("sgd:lr=0.05,momentum=0.9").fit(DATA, checkpoint_dir=interrupted, **FIT)


def test_bad_arguments_are_refused_before_training(tmp_path):
    model = chain("sgd:lr=0.05")
    with pytest.raises(ConfigurationError, match="checkpoint_every"):
        model.fit(DATA, checkpoint_dir=tmp_path, checkpoint_every=0, **FIT)
    with pytest.raises(ConfigurationError, match="give checkpoint_dir"):
        model.fit(DATA, resume=True, **FIT)
    assert not (tmp_path / MANIFEST_NAME).exists()


# -- recovering from a fault (the networked tests kill real worker processes) -----------------------------
class FlakyWorker(splitnn.VirtualWorker):
    """An in-process party whose connection breaks once, at its ``fail_at``-th forward; ``reconnect`` works."""

    def __init__(self, name: str, fail_at: int | None = None, *, down_for: int = 0) -> None:
        super().__init__(name)
        self.fail_at, self.down_for, self.forwards, self.reconnects = fail_at, down_for, 0, 0

    def forward(self, key, source, *, train=True):
        self.forwards += 1
        if train and self.forwards == self.fail_at:
            raise splitnn.WorkerUnreachableError(f"worker {self.name!r}: connection lost (a test fault)")
        return super().forward(key, source, train=train)

    def reconnect(self) -> bool:
        self.reconnects += 1
        if self.reconnects <= self.down_for:
            raise splitnn.WorkerUnreachableError(f"cannot connect to worker {self.name!r} (still down)")
        return True


def flaky_chain(fail_at=None, down_for=0):
    torch.manual_seed(1)
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.25)),
        nn.Sequential(nn.Linear(24, 5), nn.LogSoftmax(dim=1)),
    ]
    return splitnn.SplitNN(
        segments, [W("alice"), FlakyWorker("bob", fail_at, down_for=down_for)], optimizer="adam:lr=0.01"
    )


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr("splitnn.split.fit.RETRY_WAIT", 0.0)


def test_a_fault_is_survived_by_resuming_from_the_last_checkpoint(tmp_path, fast_retries):
    torch.manual_seed(11)
    reference = flaky_chain()
    ref_history = reference.fit(DATA, **FIT)
    torch.manual_seed(11)
    model = flaky_chain(fail_at=17, down_for=2)  # unreachable for two attempts, then back
    history = model.fit(DATA, checkpoint_dir=tmp_path, checkpoint_every=4, retries=3, **FIT)
    assert model.stages[1].worker.reconnects == 3
    assert_same_weights(model.collect(), reference.collect())
    assert history.losses() == ref_history.losses()


def test_without_checkpoints_or_with_too_few_retries_the_fault_is_raised(tmp_path, fast_retries):
    with pytest.raises(splitnn.WorkerUnreachableError, match="without checkpoints there is nothing to resume"):
        flaky_chain(fail_at=5).fit(DATA, **FIT)
    with pytest.raises(splitnn.WorkerUnreachableError, match="gave up after 2 attempts.*still down"):
        flaky_chain(fail_at=5, down_for=5).fit(DATA, checkpoint_dir=tmp_path, retries=2, **FIT)
    with pytest.raises(splitnn.WorkerUnreachableError, match="a test fault"):
        flaky_chain(fail_at=5).fit(DATA, checkpoint_dir=tmp_path / "b", retries=0, **FIT)


def _relu_chain(**options):
    """A builder of a three-party chain without dropout or BatchNorm (what a pipelined or compressed run needs)."""

    def build():
        torch.manual_seed(1)
        segments = [
            nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU()),
            nn.Sequential(nn.Linear(24, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 5), nn.LogSoftmax(dim=1)),
        ]
        return splitnn.SplitNN(segments, [W(n) for n in ("alice", "bob", "claire")], **options)

    return build


def test_pipelined_run_with_weight_prediction_resumes_exactly(tmp_path):
    """A pipelined fit drains at every checkpoint and starts each chunk's weight prediction afresh, so a run
    crashed in its third chunk and resumed equals one that ran through with the same checkpoints."""
    build = _relu_chain(optimizer="sgd:lr=0.05,momentum=0.9", weight_prediction=0.5)
    fit = dict(FIT, pipeline=3, checkpoint_every=4)
    reference = build()
    ref_history = reference.fit(DATA, checkpoint_dir=tmp_path / "ref", **fit)

    first = build()
    calls, train_epoch = [0], first.train_epoch

    def crashing(*args, **kwargs):  # the researcher dies in the third chunk of four batches
        calls[0] += 1
        if calls[0] == 3:
            raise Crash
        return train_epoch(*args, **kwargs)

    first.train_epoch = crashing
    with pytest.raises(Crash):
        first.fit(DATA, checkpoint_dir=tmp_path / "run", **fit)
    second = build()
    history = second.fit(DATA, checkpoint_dir=tmp_path / "run", resume=True, **fit)
    assert_same_weights(second.collect(), reference.collect())
    assert history.losses() == ref_history.losses()


def _compressed(compression):
    return _relu_chain(optimizer="sgd:lr=0.05", compression=compression)


@pytest.mark.parametrize(
    "compression", ["topk:0.3", {"activation": "topk:0.2", "gradient": "int8"}], ids=["topk", "topk-int8"]
)
def test_compressed_chain_resumes_exactly_with_its_error_feedback(compression, tmp_path):
    """topk's error feedback (what earlier batches' encodings dropped, added to the next) is part of each sending
    party's checkpoint: without it the first batch after a resume would be encoded differently."""
    resumed_equals_uninterrupted(_compressed(compression), tmp_path, crash=17, every=4)


def test_error_feedback_saved_for_a_cut_that_no_longer_compresses_is_refused(tmp_path):
    first = _compressed("topk:0.3")()
    crash_at(first, 6)
    with pytest.raises(Crash):
        first.fit(DATA, checkpoint_dir=tmp_path, checkpoint_every=4, **FIT)
    with pytest.raises(CheckpointError, match="resume with the same compression"):
        _compressed(None)().fit(DATA, checkpoint_dir=tmp_path, checkpoint_every=4, resume=True, **FIT)


def test_a_scheduled_optimizer_resumes_its_schedule_exactly(tmp_path):
    """The step count of a warmup-cosine schedule lives in the optimizer's state: a resume continues it."""
    spec = "adamw:lr=0.01,weight_decay=0.1,decay=matrices,schedule=cosine,warmup=5,total=20,min_lr=0.001"
    resumed_equals_uninterrupted(lambda: chain(spec), tmp_path, crash=17, every=4)
