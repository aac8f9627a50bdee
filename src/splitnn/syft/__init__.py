"""A PySyft 0.2 facade: ``import splitnn.syft as sy`` runs OpenMined's split-learning tutorials.

The tutorials "Split Neural Network" and "MultiLayer Split Neural Network" were
written for PySyft 0.2, which no longer installs on current Python and PyTorch.
With this module in place of ``import syft as sy`` their code runs unchanged on
in-process workers, and every transfer is recorded in a splitnn
:class:`~splitnn.accounting.Ledger`::

    import torch
    import splitnn.syft as sy

    hook = sy.TorchHook(torch)                  # opt-in: patches torch.Tensor / nn.Module
    alice = sy.VirtualWorker(hook, id="alice")
    x = torch.randn(4, 784).send(alice)         # a PointerTensor at alice
    model = torch.nn.Linear(784, 10).send(alice)
    out = model(x)                              # runs at alice
    out.get()                                   # home again, recorded
    print(sy.ledger().format_table())

What the facade covers: ``TorchHook``, ``VirtualWorker(hook, id=...)``;
tensors: ``.send``, ``.location``, ``.move``, ``.get``, ``.copy``, ``.grad``,
``.backward``, ``.shape`` and every torch operation on tensors at one worker;
modules: ``.send``, ``.location``, ``.move``, ``.get``, ``.copy`` and calling a
sent module on a tensor at its worker. Mixing places raises
:class:`TensorsNotCollocatedException` naming both. Ledger kinds: ``features``
(a float tensor sent), ``labels`` (an integer tensor sent), ``activation``
(a computed tensor moved), ``gradient`` (a ``.grad`` moved), ``weights``
(modules sent, moved or fetched), ``output`` (a computed tensor fetched).

Not covered (PySyft features beyond the split-learning tutorials): remote
workers over websockets, pointer chains (``.send`` of a pointer), encrypted and
fixed-precision tensors, federated datasets, plans and protocols.
"""

from splitnn.syft import exceptions
from splitnn.syft.exceptions import TensorsNotCollocatedException
from splitnn.syft.hook import TorchHook, is_hooked, ledger, unhook
from splitnn.syft.pointers import PointerTensor
from splitnn.syft.worker import VirtualWorker

__all__ = [
    "TorchHook",
    "VirtualWorker",
    "PointerTensor",
    "TensorsNotCollocatedException",
    "exceptions",
    "ledger",
    "unhook",
    "is_hooked",
]
