"""CSC-MEFN: multi-exposure fusion. A tiny CSC network maps each exposure's luminance to a
weight logit; a softmax across exposures blends the luminance, chroma is blended by its
saturation, and the result goes back to RGB."""

from __future__ import annotations

import torch
from torch import nn

from .color import fuse_chroma, rgb_to_ycbcr, ycbcr_to_rgb
from .csc import CSCEncoder, ReflectConv2d, code_activation


def exposure_prior(mean_luminance: torch.Tensor, sigma: float) -> torch.Tensor:
    """A logit added to every pixel of an exposure by weights trained with it (ours; their
    header holds ``training['exposure_prior_sigma']``; the authors' have none):
    -(m - 0.5)^2 / (2 sigma^2), m = that exposure's mean luminance over the whole image.

    Why: the network sees 11x11 px of one exposure, never how well exposed the frame is as a
    whole, which MEF-SSIM's luminance weights (Ma et al. 2015) and real long brackets depend on
    (the global term exp(-(m - .5)^2 / (2 sigma_g^2)) of those weights, in log form)."""
    return -(mean_luminance - 0.5) ** 2 / (2.0 * sigma * sigma)


class CSCMEFN(nn.Module):
    def __init__(self, code_channels: int = 24, num_dcus: int = 2,
                 prior_sigma: float | None = None):
        super().__init__()
        self.hparams = {"code_channels": code_channels, "num_dcus": num_dcus}
        # sigma of ``exposure_prior`` for weights trained with it (None: none, as the
        # authors'); load_network sets it from our checkpoint header
        self.prior_sigma = prior_sigma
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

    def weight_logits(self, y: torch.Tensor) -> torch.Tensor:
        """Luminance of brackets [..., K, 1, H, W] -> the logits softmaxed over K
        [..., K, H, W]: the network's, plus the exposure prior if the weights have one."""
        *lead, _, h, w = y.shape
        logits = self.logits(y.reshape(-1, 1, h, w)).reshape(*lead, h, w)
        if self.prior_sigma:
            logits = logits + exposure_prior(y.mean((-3, -2, -1)),
                                             self.prior_sigma)[..., None, None]
        return logits

    def fuse_luminance(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y: [K,1,H,W] exposures of one scene -> (fused Y [1,H,W], softmax weights [K,H,W])."""
        w = torch.softmax(self.weight_logits(y), dim=0)
        return (w * y[:, 0]).sum(0, keepdim=True), w

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        """stack: [K,3,H,W] RGB exposures in [0,1] -> fused RGB [3,H,W] clamped to [0,1]."""
        ycc = rgb_to_ycbcr(stack, dim=1)
        y_f, _ = self.fuse_luminance(ycc[:, :1])
        cb = fuse_chroma(ycc[:, 1], dim=0)
        cr = fuse_chroma(ycc[:, 2], dim=0)
        fused = ycbcr_to_rgb(torch.cat((y_f, cb[None], cr[None]), 0), dim=0)
        return fused.clamp(0.0, 1.0)

    def code_activations(self) -> dict[str, str]:
        """Code kind -> ``csc.code_activation`` (keys as the engine's code names start)."""
        return {"exposure": code_activation(self.encoder)}
