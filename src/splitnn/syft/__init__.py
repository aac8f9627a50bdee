"""A PySyft 0.2 facade: ``import splitnn.syft as sy`` runs OpenMined's split-learning tutorials.

OpenMined's three SplitNN tutorials were written for PySyft 0.2, which does not install on current
Python and PyTorch; with this module in place of ``import syft as sy`` their code runs as published on
in-process workers, and every transfer is recorded in a :class:`~splitnn.accounting.Ledger`::

    hook = sy.TorchHook(torch)                  # opt-in: patches torch.Tensor / nn.Module
    alice, bob = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="bob")
    a = torch.nn.Linear(784, 10).send(alice)(torch.randn(4, 784).send(alice))  # runs at alice
    (a.move(bob, requires_grad=True) ** 2).sum().backward()  # at bob, then at alice
    print(sy.ledger().format_table())

What it covers, its ledger kinds and what it leaves out: docs/pysyft.md. A feature it leaves out
raises :class:`UnsupportedFeatureError` naming it and what to use instead.
"""

from splitnn.syft import exceptions
from splitnn.syft.exceptions import TensorsNotCollocatedException, UnsupportedAttributeError, UnsupportedFeatureError
from splitnn.syft.hook import TorchHook, is_hooked, ledger, unhook
from splitnn.syft.pointers import PointerTensor
from splitnn.syft.worker import VirtualWorker

__all__ = [
    "TorchHook",
    "VirtualWorker",
    "PointerTensor",
    "TensorsNotCollocatedException",
    "UnsupportedFeatureError",
    "exceptions",
    "ledger",
    "unhook",
    "is_hooked",
]

_NETWORK = "use `splitnn worker` and splitnn.connect(url, token=...) (README, 'Networked workers')"
_FEDERATED = "partition data with splitnn.data.iid_shards / dirichlet_shards and train with splitnn.training.FedAvg"
_SMPC = "splitnn has no secure computation; see README, 'Privacy at the cut' for the defenses it measures"
_PLANS = "write the training step as ordinary Python; networked splitnn workers take models as declarative specs"

#: PySyft 0.2's top-level names that the facade does not provide: name -> what to use instead.
_NOT_PROVIDED = {
    "local_worker": "the researcher's process is not a worker here: .get() brings a tensor home",
    "WebsocketClientWorker": _NETWORK,
    "WebsocketServerWorker": _NETWORK,
    "PrivateGridNetwork": _NETWORK,
    "PublicGridNetwork": _NETWORK,
    "FederatedDataset": _FEDERATED,
    "FederatedDataLoader": _FEDERATED,
    "BaseDataset": _FEDERATED,
    "Plan": _PLANS,
    "func2plan": _PLANS,
    "Protocol": _PLANS,
    "func2protocol": _PLANS,
    "AdditiveSharingTensor": _SMPC,
    "ReplicatedSharingTensor": _SMPC,
    "FixedPrecisionTensor": "train in floating point",
    "AutogradTensor": "use .move(worker, requires_grad=True) or .send(worker, requires_grad=True)",
    "MultiPointerTensor": "send one tensor to one worker per call",
    "PrivateTensor": "keep the tensor at its worker and .get() it explicitly",
    "LoggingTensor": "every transfer is recorded in sy.ledger()",
    "create_sandbox": "hook = sy.TorchHook(torch); alice = sy.VirtualWorker(hook, id='alice')",
    "make_hook": "hook = sy.TorchHook(torch)",
    "KerasHook": "splitnn is for PyTorch",
    "TFEWorker": "splitnn is for PyTorch",
    "TFECluster": "splitnn is for PyTorch",
}


def __getattr__(name: str) -> object:
    if name in _NOT_PROVIDED:
        raise UnsupportedAttributeError(f"sy.{name}", _NOT_PROVIDED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
