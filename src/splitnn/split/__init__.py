"""The split network: a chain of segments on workers, forward and backward across them."""

from splitnn.split.chain import SplitNN, bind_workers
from splitnn.split.stage import Stage

__all__ = ["SplitNN", "Stage", "bind_workers"]
