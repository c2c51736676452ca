"""Training the CSC networks on the project's data (engine layer: torch/numpy, no napari)."""

from .data import HELD_OUT_HDR, simulate_bracket
from .train import TrainConfig, train

__all__ = ["HELD_OUT_HDR", "TrainConfig", "simulate_bracket", "train"]
