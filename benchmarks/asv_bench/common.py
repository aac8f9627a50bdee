"""What the asv benchmarks share: the tutorial network, synthetic MNIST-shaped data, one thread."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the worker processes inherit it

import torch  # noqa: E402

NAMES = ("alice", "bob", "claire")
BATCH = 64
BATCHES = 30  # per timed epoch: about 0.05 s in process, 0.1-0.2 s across worker processes


def toy_data(batches: int = BATCHES):
    """MNIST-shaped random features and labels, ``batches`` batches of :data:`BATCH`."""
    from splitnn.data import Dataset

    g = torch.Generator().manual_seed(0)
    n = batches * BATCH
    return Dataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "bench", 10)


def tutorial_model(workers, **kwargs):
    """The PySyft tutorial's 784-128-640-10 network in three segments, SGD lr 0.03."""
    import splitnn
    from splitnn.models import tutorial_mlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return splitnn.SplitNN(tutorial_mlp(), workers, **kwargs)


def trained_on_workers(root, *, tcp: bool = False, ship_epochs: bool = True, env: dict | None = None):
    """Three ``splitnn worker`` processes on 127.0.0.1 under ``root`` and the tutorial network trained one epoch on
    them (data placement, warm-up): ``(cluster, workers, data, model)``. ``env``: for the workers only."""
    from splitnn.testing.cluster import Cluster

    cluster = Cluster(root, lifetime=600, tcp=tcp, env=dict(env or {}))
    for n in NAMES:
        cluster.start(n)
    workers = cluster.connect(*NAMES)
    data = toy_data()
    model = tutorial_model(workers, ship_epochs=ship_epochs)
    model.fit(data, epochs=1, batch_size=BATCH, progress=False)
    return cluster, workers, data, model
