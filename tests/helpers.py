"""Test helpers: synthetic datasets and a monolithic twin trainer."""

from __future__ import annotations

import asyncio
import copy
import struct
from collections.abc import Callable, Sequence

import torch
from torch import nn

from splitnn.data import Dataset
from splitnn.training import epoch_batches


def toy_dataset(
    n: int = 256, shape: Sequence[int] = (1, 28, 28), classes: int = 10, seed: int = 0, name: str = "toy"
) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        features=torch.randn(n, *shape, generator=g),
        labels=torch.randint(0, classes, (n,), generator=g),
        name=name,
        num_classes=classes,
    )


def train_twin(
    segments: Sequence[nn.Module],
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 0.03,
    seed: int = 0,
    shuffle: bool = True,
) -> nn.Sequential:
    """Train the same layers as one nn.Sequential with one SGD optimizer, in fit's data order."""
    twin = nn.Sequential(*copy.deepcopy(list(segments)))
    opt = torch.optim.SGD(twin.parameters(), lr=lr)
    loss_fn = nn.NLLLoss()
    for epoch in range(epochs):
        for idx in epoch_batches(len(data), batch_size, shuffle=shuffle, seed=seed, epoch=epoch):
            opt.zero_grad()
            loss_fn(twin(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return twin


def sgd_step(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """One plain SGD update, written out (the arithmetic of torch.optim.SGD without momentum: p.add_(g, alpha=-lr))."""
    return [w.add(g, alpha=-lr) for w, g in zip(weights, grads)]


def four_stages() -> list[nn.Module]:
    """Four Linear segments for (3, 4) inputs, 12-10-8-6-4 (ReLUs, LogSoftmax last): two per party where a test
    puts consecutive stages on one party. Draws from torch's global generator: seed it first."""
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU()),
        nn.Sequential(nn.Linear(10, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 6), nn.ReLU()),
        nn.Sequential(nn.Linear(6, 4), nn.LogSoftmax(dim=1)),
    ]


def at_batch(model, batch: int, action: Callable[[], object]) -> list[int]:
    """Call ``action()`` when ``model``'s training hands the researcher its ``batch``-th loss of the fit (from 1;
    shipped epochs or batch by batch through ``train_epoch``), before the loss goes on. Returns the count of
    losses seen, as a one-item list that grows while the model trains."""
    seen = [0]
    train_epoch = model.train_epoch

    def watching_train_epoch(name, batches, on_batch, **kw):
        def watch(stats):
            seen[0] += 1
            if seen[0] == batch:
                action()
            on_batch(stats)

        return train_epoch(name, batches, watch, **kw)

    model.train_epoch = watching_train_epoch
    return seen


def flat_params(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict().values()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert len(pa) == len(pb), f"{len(pa)} tensors vs {len(pb)}"
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert x.shape == y.shape, f"tensor {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        assert torch.equal(x, y), f"tensor {i} differs (max abs diff {(x - y).abs().max().item():.3g})"


def assert_fit_equals_in_process(segments: Sequence[nn.Module], workers: Sequence, data: Dataset) -> None:
    """Train ``segments`` on ``workers`` (networked) and a copy on in-process workers of the same names, one epoch
    of batch 32; the weights end equal."""
    import splitnn

    twin = splitnn.SplitNN(copy.deepcopy(list(segments)), [splitnn.VirtualWorker(w.name) for w in workers])
    model = splitnn.SplitNN(list(segments), list(workers))
    model.fit(data, epochs=1, batch_size=32, progress=False)
    twin.fit(data, epochs=1, batch_size=32, progress=False)
    assert_same_weights(model.collect(), twin.collect())


def framed(payload: bytes) -> bytes:
    """``payload`` as one frame of a TCP data plane, its 4-byte little-endian length written out plainly."""
    return struct.pack("<I", len(payload)) + payload


def data_plane_answer(
    address: str, raw: bytes, *, ssl_context=None, server_hostname: str | None = None
) -> bytes | None:
    """Open a raw connection to a worker's TCP data plane at ``address`` (with TLS: ``ssl_context``), write ``raw``
    and return the first frame it answers (None: it closed the connection). Connection errors propagate."""
    from splitnn.transport import tcp
    from splitnn.transport.addresses import split_host_port

    async def main() -> bytes | None:
        stream = tcp.FrameStream(1 << 20)
        host, port = split_host_port(address, "the data plane's address")
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: stream, host, port, ssl=ssl_context, server_hostname=server_hostname
            )
            stream.transport.write(raw)
            answer = await asyncio.wait_for(stream.read(), 20)
        finally:
            stream.cancel()
        return None if answer is None else bytes(answer)

    return asyncio.run(main())


def write_trust_packages(root) -> None:
    """``mypkg.models`` (trusted by the tests) imports ``evilpkg`` and re-exports its ``Dropper``, whose
    constructor writes a file: building it through ``mypkg.models`` would run untrusted code."""
    (root / "evilpkg").mkdir()
    (root / "evilpkg" / "__init__.py").write_text(
        "import pathlib\nfrom torch import nn\n\n\n"
        "class Dropper(nn.Module):\n"
        "    def __init__(self, path: str = '', n: int = 1) -> None:\n"
        "        super().__init__()\n"
        "        if path:\n            pathlib.Path(path).write_text('pwned')\n"
        "        self.n = n\n        self.lin = nn.Linear(n, n)\n\n"
        "    def forward(self, x):\n        return self.lin(x)\n"
    )
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "models.py").write_text(
        "import evilpkg\nfrom evilpkg import Dropper as Reexported\nfrom torch import nn\n\n\n"
        "class Good(nn.Module):\n"
        "    def __init__(self, n: int = 2) -> None:\n"
        "        super().__init__()\n        self.n = n\n        self.lin = nn.Linear(n, n)\n\n"
        "    def forward(self, x):\n        return self.lin(x)\n"
    )
