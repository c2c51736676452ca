"""CSC-IVFN: infrared + visible fusion. Base (low-pass) and detail (high-pass) CSC encoders
of 8 DCUs each and one decoder shared by both codes; fusion rules act on the codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .csc import CSCEncoder, code_activation, reflect_pad

BLUR_SIZE = 11  # the authors' low-pass: an 11x11 box mean with reflection border
IVF_ALPHA = 2.0  # the authors scale both fused codes by 2 before decoding


def box_blur(x: torch.Tensor, size: int = BLUR_SIZE) -> torch.Tensor:
    """Mean over size x size windows, reflection border, as kornia's BoxBlur computes it
    (a convolution with a 1/size^2 kernel: summation order matters for exactness, because
    negative soft thresholds amplify rounding differences)."""
    kernel = x.new_full((1, 1, size, size), 1.0 / (size * size))
    return F.conv2d(reflect_pad(x, size // 2), kernel)


class IVFNDecoder(nn.Module):
    """Three 3x3 reflection-padded convolutions with batch norm, no nonlinearity.

    It is affine, so dec(a) + dec(b) = dec(a + b) + dec(0): one pass decodes both codes.
    """

    def __init__(self, code_channels: int = 64):
        super().__init__()
        q = code_channels
        self.layers = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(q, q // 2, 3, bias=False), nn.BatchNorm2d(q // 2),
            nn.ReflectionPad2d(1), nn.Conv2d(q // 2, q // 4, 3, bias=False),
            nn.BatchNorm2d(q // 4),
            nn.ReflectionPad2d(1), nn.Conv2d(q // 4, 1, 3, bias=False), nn.BatchNorm2d(1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)

    def offset(self) -> torch.Tensor:
        """dec(0): the constant the affine decoder adds (a scalar tensor)."""
        p = next(self.parameters())
        zero = torch.zeros(1, self.layers[1].in_channels, 2, 2, device=p.device, dtype=p.dtype)
        return self.layers(zero)[0, 0, 0, 0]


class CSCIVFN(nn.Module):
    receptive_radius_decoder = 3

    def __init__(self, code_channels: int = 64, num_dcus: int = 8):
        super().__init__()
        self.hparams = {"code_channels": code_channels, "num_dcus": num_dcus}
        self.base = CSCEncoder(1, code_channels, num_dcus, activation="prelu")
        self.detail = CSCEncoder(1, code_channels, num_dcus, activation="sst")
        self.decoder = IVFNDecoder(code_channels)

    @property
    def receptive_radius(self) -> int:
        """Context of one output pixel: blur, encoder chain and decoder (no fusion rule)."""
        return BLUR_SIZE // 2 + self.base.receptive_radius + 3

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,1,H,W] in [0,1] -> (base codes, detail codes), each [N,q,H,W].

        Only the first DCU sees the filtered image; the later ones see the raw x (the
        published weights need exactly this).
        """
        low = box_blur(x)
        return self.base(x, first_input=low), self.detail(x, first_input=x - low)

    def decode(self, z_base: torch.Tensor, z_detail: torch.Tensor) -> torch.Tensor:
        """sigmoid(dec(z_B) + dec(z_D)), computed as one decoder pass on the summed codes."""
        return torch.sigmoid(self.decoder(z_base + z_detail) + self.decoder.offset())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Autoencoder pass (training, self-checks): reconstruct x from its own codes."""
        return self.decode(*self.encode(x))

    def code_activations(self) -> dict[str, str]:
        """Code kind -> ``csc.code_activation`` (keys as the engine's code names end)."""
        return {"base": code_activation(self.base), "detail": code_activation(self.detail)}
