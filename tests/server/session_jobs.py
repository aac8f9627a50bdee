"""Researcher processes for the session tests: ``python -m tests.server.session_jobs JOB CONFIG_JSON``.

``train``: train a few small models, one per thread, each on its own connections to the
workers, and compare each with its in-process run (``torch.equal``); print ``OK <n>`` or fail.
``hog``: connect, upload 40 x 2 MiB of features that stay at the data holder, start training
and print ``READY`` after a few batches -- then keep training until the parent kills it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
import time

import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.data import Dataset


def segments(seed: int, parties: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    hidden = 6 + seed % 7
    layers = [nn.Sequential(nn.Linear(12, hidden), nn.ReLU())]
    if parties == 3:
        layers.append(nn.Sequential(nn.Linear(hidden, hidden + 1), nn.Tanh()))
        hidden += 1
    layers.append(nn.Sequential(nn.Linear(hidden, 4), nn.LogSoftmax(dim=1)))
    return layers


def dataset(seed: int, n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(1000 + seed)
    # every model's data is called "rand": their placements must not collide
    return Dataset(torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g), name="rand", num_classes=4)


def train_one(cfg: dict, seed: int) -> None:
    parties = cfg["parties"][: 2 + seed % 2]  # alternately two and three parties
    segs = segments(seed, len(parties))
    twin_segs = copy.deepcopy(segs)
    data = dataset(seed)
    ship = seed % 3 != 0  # shipped epochs and per-op commands, mixed
    workers = [splitnn.connect(url, token=cfg["token"], name=name, timeout=120) for name, url in parties]
    try:
        model = splitnn.SplitNN(segs, workers, optimizer="sgd:lr=0.1", ship_epochs=ship)
        model.fit(data, epochs=2, batch_size=16, seed=seed, progress=False)
        trained = model.collect()
    finally:
        for w in workers:
            w.close()
    twin = splitnn.SplitNN(twin_segs, [splitnn.VirtualWorker(n) for n, _ in parties], optimizer="sgd:lr=0.1")
    twin.fit(data, epochs=2, batch_size=16, seed=seed, progress=False)
    expected = list(twin.collect().state_dict().values())
    got = list(trained.state_dict().values())
    assert len(got) == len(expected), seed
    for a, b in zip(got, expected):
        assert torch.equal(a, b), f"model {seed}: weights differ from its in-process run"


def train(cfg: dict) -> None:
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            train_one(cfg, seed)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in cfg["seeds"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(f"OK {len(threads)}", flush=True)


def hog(cfg: dict) -> None:
    deadline = time.monotonic() + cfg.get("lifetime", 120)  # in case the parent dies before killing us
    parties = cfg["parties"][:2]
    workers = [splitnn.connect(url, token=cfg["token"], name=name, timeout=60) for name, url in parties]
    model = splitnn.SplitNN(segments(7, 2), workers, optimizer="sgd:lr=0.1", ship_epochs=False)
    alice = workers[0]
    for i in range(40):  # 80 MiB of features the data holder keeps until the session ends
        alice.put(torch.full((512, 1024), float(i)), src=RESEARCHER, kind="features")
    alice.drain()
    calls = {"n": 0}
    train_batch = model.train_batch

    def announcing_train_batch(name, idx):
        calls["n"] += 1
        if calls["n"] == 3:
            print("READY", flush=True)
        if time.monotonic() > deadline:
            os._exit(3)
        return train_batch(name, idx)

    model.train_batch = announcing_train_batch
    model.fit(dataset(7, n=4096), epochs=100, batch_size=8, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    job, config = sys.argv[1], json.loads(sys.argv[2])
    {"train": train, "hog": hog}[job](config)
