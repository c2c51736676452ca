"""CSC-MEFN: multi-exposure fusion. A tiny CSC network maps each exposure's luminance to a
weight logit; a softmax across exposures blends the luminance, chroma is blended by its
saturation, and the result goes back to RGB."""

from __future__ import annotations

import torch
from torch import nn

from .color import fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb
from .csc import CSCEncoder, ReflectConv2d


class CSCMEFN(nn.Module):
    def __init__(self, code_channels: int = 24, num_dcus: int = 2):
        super().__init__()
        self.hparams = {"code_channels": code_channels, "num_dcus": num_dcus}
        # The stem's soft threshold has a single shared theta ([1,1,1,1]) in the authors' net.
        self.encoder = CSCEncoder(1, code_channels, num_dcus, "sst", stem=True, stem_norm=True,
                                  stem_threshold_channels=1)
        self.head = ReflectConv2d(code_channels, 1, 1)

    @property
    def receptive_radius(self) -> int:
        return self.encoder.receptive_radius

    def codes(self, y: torch.Tensor) -> torch.Tensor:
        """Sparse codes after the last DCU for luminance images y [N,1,H,W] -> [N,q,H,W]."""
        return self.encoder(y)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """Per-pixel weight logits for luminance images y [N,1,H,W] -> [N,1,H,W]."""
        return self.head(self.encoder(y))

    def fuse_luminance(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y: [K,1,H,W] exposures of one scene -> (fused Y [1,H,W], softmax weights [K,H,W])."""
        w = torch.softmax(self.logits(y)[:, 0], dim=0)
        return (w * y[:, 0]).sum(0, keepdim=True), w

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        """stack: [K,3,H,W] RGB exposures in [0,1] -> fused RGB [3,H,W] clamped to [0,1]."""
        ycc = rgb_to_ycbcr(stack, dim=1)
        y_f, _ = self.fuse_luminance(ycc[:, :1])
        cb = fuse_chroma(ycc[:, 1], dim=0)
        cr = fuse_chroma(ycc[:, 2], dim=0)
        fused = ycbcr_to_rgb(torch.cat((y_f, cb[None], cr[None]), 0), dim=0)
        return fused.clamp(0.0, 1.0)
