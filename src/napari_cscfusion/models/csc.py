"""The two building blocks every CSC network here is made of: the soft-threshold (SST)
activation and the dictionary convolutional unit (DCU), one unrolled ISTA step.

    z_next = f( BN( z + Conv1( x - Conv0(z) ) ) )

Conv0 plays the dictionary d (codes -> image), Conv1 its learned adjoint (image -> codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection padding (edge pixel not repeated: c b | a b c), as the authors' layers use."""
    return F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x


class ReflectConv2d(nn.Conv2d):
    """A bias-free convolution with 'same' reflection padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, padding=0, bias=False)
        self.same_pad = (kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(reflect_pad(x, self.same_pad))


class SoftThreshold(nn.Module):
    """Learnable soft threshold (SST): sign(v) * relu(|v| - theta).

    ``nonnegative=True`` clamps theta at 0 (the MMFN variant). The IVFN and MEFN checkpoints
    contain negative thresholds that must be used as they are, so no clamp there.
    """

    def __init__(self, channels: int = 1, init: float = 1e-3, nonnegative: bool = False):
        super().__init__()
        self.theta = nn.Parameter(torch.full((1, channels, 1, 1), float(init)))
        self.nonnegative = nonnegative

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        theta = self.theta.clamp(min=0.0) if self.nonnegative else self.theta
        return v.sign() * F.relu(v.abs() - theta)

    def extra_repr(self) -> str:
        return f"channels={self.theta.shape[1]}, nonnegative={self.nonnegative}"


def make_activation(kind: str, channels: int, nonnegative: bool = False) -> nn.Module:
    """'sst' (soft threshold, per channel) or 'prelu' (the IVFN base encoder)."""
    if kind == "sst":
        return SoftThreshold(channels, nonnegative=nonnegative)
    if kind == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"activation must be 'sst' or 'prelu', got {kind!r}")


class DCU(nn.Module):
    """Dictionary convolutional unit: one learned ISTA step for c-channel images and q codes.

    ``forward(x, z)`` with ``z=None`` starts from z = 0 (then Conv0(z) = 0 is skipped).
    """

    def __init__(
        self,
        image_channels: int,
        code_channels: int,
        activation: str = "sst",
        norm: bool = True,
        nonnegative_threshold: bool = False,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.dictionary = ReflectConv2d(code_channels, image_channels, kernel_size)  # Conv0
        self.adjoint = ReflectConv2d(image_channels, code_channels, kernel_size)  # Conv1
        self.norm = nn.BatchNorm2d(code_channels) if norm else nn.Identity()
        self.shrink = make_activation(activation, code_channels, nonnegative_threshold)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            v = self.adjoint(x)
        else:
            v = z + self.adjoint(x - self.dictionary(z))
        return self.shrink(self.norm(v))


class CSCEncoder(nn.Module):
    """An optional stem (conv [+ BN] + activation) followed by a chain of DCUs.

    Every DCU sees the image ``x``; ``first_input`` (if given) replaces x for the first unit
    only — the IVFN encoders feed their filtered image to the first DCU and the raw one later.
    ``forward`` returns the codes after the last unit (or every unit's with ``all_codes``).
    """

    def __init__(
        self,
        image_channels: int,
        code_channels: int,
        num_dcus: int,
        activation: str = "sst",
        stem: bool = False,
        stem_norm: bool = True,
        stem_threshold_channels: int | None = None,
        nonnegative_threshold: bool = False,
    ):
        super().__init__()
        self.image_channels = image_channels
        self.code_channels = code_channels
        if stem:
            self.stem = nn.Sequential()
            self.stem.add_module("conv", ReflectConv2d(image_channels, code_channels, 3))
            if stem_norm:
                self.stem.add_module("norm", nn.BatchNorm2d(code_channels))
            self.stem.add_module(
                "shrink",
                SoftThreshold(stem_threshold_channels or code_channels,
                              nonnegative=nonnegative_threshold),
            )
        else:
            self.stem = None
        self.dcus = nn.ModuleList(
            DCU(image_channels, code_channels, activation, True, nonnegative_threshold)
            for _ in range(num_dcus)
        )

    def forward(self, x: torch.Tensor, first_input: torch.Tensor | None = None) -> torch.Tensor:
        z = self.stem(x) if self.stem is not None else None
        for i, dcu in enumerate(self.dcus):
            z = dcu(first_input if (i == 0 and first_input is not None) else x, z)
        return z

    @property
    def receptive_radius(self) -> int:
        """Pixels of context each output code depends on (for tiling halos)."""
        # Each DCU with z given chains two 3x3 convs (Conv0 then Conv1); the first, one.
        r = 1 if self.stem is not None else 0
        for i, _ in enumerate(self.dcus):
            r += 1 if (i == 0 and self.stem is None) else 2
        return r


def code_activation(encoder: nn.Module) -> str:
    """What produces an encoder's codes, for the code layers' names and metadata: 'PReLU'
    (dense by design: the IVFN base encoder), 'sparse' (soft thresholds all >= 0: a true
    shrinkage, exact zeros below the threshold) or 'soft threshold' (some thresholds negative,
    as in the authors' IVFN/MEFN weights: the SST then expands small values, no zeros)."""
    if any(isinstance(m, nn.PReLU) for m in encoder.modules()):
        return "PReLU"
    shrinks = [m for m in encoder.modules() if isinstance(m, SoftThreshold)]
    if shrinks and all(m.nonnegative or bool((m.theta >= 0).all()) for m in shrinks):
        return "sparse"
    return "soft threshold"
