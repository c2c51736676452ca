"""Pure PyTorch: the DCU/SST blocks, the three CSC networks and the checkpoint loader."""

from .checkpoints import CheckpointError, load_network, save_checkpoint
from .csc import DCU, CSCEncoder, SoftThreshold
from .ivfn import CSCIVFN
from .mefn import CSCMEFN
from .mmfn import CSCMMFN

__all__ = ["DCU", "CSCEncoder", "SoftThreshold", "CSCIVFN", "CSCMEFN", "CSCMMFN",
           "CheckpointError", "load_network", "save_checkpoint"]
