"""A federation stood up from its kits: three parties and a researcher, mutual TLS, on 127.0.0.1.

Each party runs from its own kit only (its start script and worker.toml, its own directory and
process). The researcher trains through ``splitnn train --federation`` and ends bit-identical to
the same training in process; the parties' Prometheus metrics, scraped during training, match
their ledgers; the TensorBoard events hold the losses ``fit`` returned; ``splitnn status`` sees all
parties up, then one down.
"""

from __future__ import annotations

import csv
import json
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import splitnn
from splitnn.cli.main import main
from splitnn.deploy.federation import tomllib  # tomllib, or tomli before Python 3.11
from splitnn.deploy.kits import provision
from splitnn.split.persist import load_model
from splitnn.workers import policy as _policy
from tests.deploy.kits import federation_text, start_kit

PARTIES = {"alice": "data", "bob": "compute", "claire": "labels"}
# the end of training collects the weights: where data holders keep them closed by default, open that
OPEN = "release_weights = true" if "release_weights" in _policy._RULES else ""


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    fed = root / "federation.toml"
    fed.write_text(federation_text(PARTIES, metrics=True, policy=OPEN))
    provision(fed, root / "kits")
    kits = root / "kits"
    workers = {}
    try:
        for name in PARTIES:
            workers[name] = start_kit(kits / name)
        yield kits, workers
    finally:
        for w in workers.values():
            w.stop()


def _train_args(shared_data, tmp, tag: str) -> list[str]:
    return [
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(shared_data / "fashion-mnist"),
        "--epochs",
        "1",
        "--limit",
        "256",
        "--batch-size",
        "64",
        "--no-progress",
        "--save",
        str(tmp / f"{tag}.safetensors"),
        "--json",
        str(tmp / f"{tag}.json"),
    ]


def test_train_through_the_federation_equals_the_in_process_run(federation, shared_data, tmp_path, capsys):
    kits, _ = federation
    researcher = kits / "dr-lee" / "federation.toml"
    logs = tmp_path / "logs"
    assert (
        main([*_train_args(shared_data, tmp_path, "net"), "--federation", str(researcher), "--log-dir", str(logs)]) == 0
    )
    assert main(_train_args(shared_data, tmp_path, "local")) == 0
    net, local = load_model(tmp_path / "net.safetensors"), load_model(tmp_path / "local.safetensors")
    a, b = net.state_dict(), local.state_dict()
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    hn, hl = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("net", "local"))
    assert [e["train_loss"] for e in hn] == [e["train_loss"] for e in hl]
    assert hn[0]["bytes_sent"]["alice"] == 256 * 128 * 4  # alice sent its 128-wide activations, nothing else
    # splitnn train --log-dir: the CSV beside the event files holds the epoch's loss and bytes, as --json does
    with open(logs / "metrics.csv", newline="") as fh:
        rows = {r["tag"]: float(r["value"]) for r in csv.DictReader(fh) if r["epoch"] == "1" and r["step"] == "1"}
    assert rows["train/loss"] == hn[0]["train_loss"] and rows["bytes_sent/alice"] == 256 * 128 * 4
    assert rows["test/accuracy"] == hn[0]["test_metrics"]["accuracy"] and rows["lr/0"] == 0.03
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())


def _metrics_url(kit) -> str:
    return "http://" + tomllib.loads((kit / "worker.toml").read_text())["metrics_listen"] + "/metrics"


def _ledger_bytes(url: str) -> dict[tuple[str, str, str], float]:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "splitnn_ledger_bytes_total":
                out[(s.labels["src"], s.labels["dst"], s.labels["kind"])] = s.value
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def test_metrics_match_the_ledgers_and_tensorboard_holds_the_losses(federation, shared_data, tmp_path):
    kits, _ = federation
    workers = splitnn.connect_federation(kits / "dr-lee" / "federation.toml")
    try:
        assert list(workers) == list(PARTIES) and all(w.name == n for n, w in workers.items())
        urls = {n: _metrics_url(kits / n) for n in PARTIES}
        train = splitnn.load_dataset(
            "fashion-mnist", "train", data_dir=shared_data / "fashion-mnist", limit=192, download=False, progress=False
        )
        torch.manual_seed(0)
        segments = splitnn.models.tutorial_mlp([128, 640], in_features=784, classes=10)
        model = splitnn.SplitNN(segments, list(workers.values()), optimizer="sgd:lr=0.03")
        before = {n: _ledger_bytes(u) for n, u in urls.items()}
        during = []
        history = model.fit(
            train,
            epochs=2,
            batch_size=64,
            progress=False,
            log_dir=tmp_path / "logs",
            on_epoch=lambda e: during.append(_ledger_bytes(urls["bob"])) if e.epoch == 1 else None,
        )
        activation = ("alice", "bob", "activation")
        # scraped after the first of two epochs: bob had received the activations of that epoch only
        assert _delta(during[0], before["bob"])[activation] == 192 * 128 * 4
        for name, worker in workers.items():
            got = _delta(_ledger_bytes(urls[name]), before[name])
            rows = worker.stats()["ledger"]  # the worker's own ledger of this session
            assert got == {(r["src"], r["dst"], r["kind"]): float(r["nbytes"]) for r in rows if r["nbytes"]}, name
        assert _delta(_ledger_bytes(urls["bob"]), before["bob"])[activation] == 2 * 192 * 128 * 4
        assert model.ledger.total(src="alice", dst="bob", kind="activation") == 2 * 192 * 128 * 4
    finally:
        for w in workers.values():
            w.close()
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/loss")] == [float(np.float32(x)) for x in history.losses()]
    assert len(events.Scalars("train/loss_step")) == 2 * 3  # 192 samples, batches of 64
    assert [e.value for e in events.Scalars("bytes_sent/alice")] == [192 * 128 * 4] * 2


def test_status_reports_every_party_then_one_down(federation, capsys):
    kits, workers = federation
    researcher = str(kits / "dr-lee" / "federation.toml")
    assert main(["status", researcher, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["up"]) for r in rows] == [(n, True) for n in PARTIES]
    for r in rows:
        assert r["version"] == splitnn.__version__ and r["device"] == "cpu" and r["uptime"] > 0
        assert isinstance(r["sessions"], int) and r["cert_expiry"]
        # the kits' certificates last 2 days: a warning, in status and in the worker's log
        assert any("certificate expires" in w for w in r["warnings"])
    assert "expires on" in workers["alice"].log.read_text()
    # an operator checks its own party with its own kit, by address
    alice = kits / "alice"
    own = [
        "--tls-cert",
        str(alice / "alice.pem"),
        "--tls-key",
        str(alice / "alice.key"),
        "--tls-ca",
        str(alice / "ca.pem"),
    ]
    url = f"alice=grpc://{workers['alice'].address}"
    assert main(["status", url, "--token-file", str(alice / "token"), *own]) == 0
    assert " up " in capsys.readouterr().out
    wrong = kits.parent / "wrong-token"
    wrong.write_text("not-the-token\n")
    assert main(["status", url, "--token-file", str(wrong), *own]) == 1
    assert "missing or wrong federation token" in capsys.readouterr().out
    # ... and alice's metrics count that refusal by its reason, beside the process's memory
    samples = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for family in text_string_to_metric_families(
            urllib.request.urlopen(_metrics_url(alice), timeout=30).read().decode()
        )
        for smp in family.samples
    }
    assert samples[("splitnn_refusals_total", (("reason", "rejected"),))] >= 1
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("splitnn_commands_total", (("op", "health"),))] >= 2
    workers["claire"].stop()
    assert main(["status", researcher]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in PARTIES}
    assert " up " in lines["alice"] and " up " in lines["bob"] and " DOWN " in lines["claire"]
    assert "1 of 3 down: claire" in out
