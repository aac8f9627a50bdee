"""The configurations of split learning beyond a single chain.

* :class:`MultiHolderSplitNN`: many data holders, one label holder; the holders
  take round-robin turns and pass the bottom segment's weights peer to peer or
  through a weight store.
* :class:`SplitFedSplitNN`: many data holders train in parallel, each with its own
  copy of the bottom segment, averaged (FedAvg-style) at the end of every round.
* :class:`UShapedSplitNN`: the data holder keeps the labels and the output
  layers; only the middle lives elsewhere.
* :class:`VerticalSplitNN`: data holders own different feature columns of the
  same samples; a merging party combines their activations.

Each is a :class:`~splitnn.split.trainable.Trainable`, so
:func:`~splitnn.training.fit` and :func:`~splitnn.training.evaluate` drive it.
:func:`build_topology` makes one from a :class:`TopologyConfig` (the CLI's way).
"""

from splitnn.training.topologies.base import Topology
from splitnn.training.topologies.multi import HANDOFF_MODES, HandOff, MultiHolderSplitNN
from splitnn.training.topologies.presets import TOPOLOGIES, TopologyConfig, build_topology
from splitnn.training.topologies.splitfed import VARIANTS, SplitFedSplitNN
from splitnn.training.topologies.ushape import UShapedSplitNN
from splitnn.training.topologies.vertical import VerticalData, VerticalNet, VerticalSplitNN

__all__ = [
    "Topology",
    "MultiHolderSplitNN",
    "HandOff",
    "HANDOFF_MODES",
    "SplitFedSplitNN",
    "VARIANTS",
    "UShapedSplitNN",
    "VerticalSplitNN",
    "VerticalData",
    "VerticalNet",
    "TopologyConfig",
    "build_topology",
    "TOPOLOGIES",
]
