"""CSC-MMFN: guided super-resolution of a low-resolution modality by a high-resolution guide.
Two CSC backbones code each input; a fast guided filter transfers the guide's codes to the
low-resolution content; a decoder adds the result to the bilinear upsampling of the input.

Three geometries (``hparams["geometry"]``, recorded in the weights file's header):

* ``"authors"`` (the default; the authors' checkpoint and every file without the field): codes
  resampled bilinearly with align_corners=True, guided-filter means by cumulative sums, base =
  the align_corners bilinear upsampling of the input, exactly as the authors wrote it.
* ``"low_res"``: for a real low-res image, whose pixel i covers the high-res span
  [i·H/h, (i+1)·H/h): the guide's codes are area-averaged over each low-res pixel's span
  (``adaptive_avg_pool2d``), the guided-filter coefficients are fitted there over
  (2r+1)² low-res pixels (window means with exact border counts) and upsampled bilinearly
  with half-pixel centres, and the base is the bicubic upsampling of the input (half-pixel
  centres, Keys a = -0.75, as cv2.INTER_CUBIC). The input comes in at its own resolution.
* ``"low_res_detail"``: low_res, plus what the guided filter's fit leaves of the low-res codes
  (z_lr - (a z_guide_low + b), upsampled as b is; so b becomes z_lr - a z_guide_low): with a
  flat guide (a = 0) the fused codes are the input's own codes upsampled rather than their
  3x3 window mean, so the decoder can sharpen the input by itself as the authors' geometry
  does, and the guide's detail a (z_guide - z_guide_low) is added on top.

``guide_num_dcus`` (hparams, only where it differs from ``num_dcus``; read off the tensors
when a file is loaded): a guide backbone deeper than the low-res one (same code channels, as
the guided filter pairs them channel by channel); ``deepen_guide`` grows a trained file's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .csc import CSCEncoder, ReflectConv2d, code_activation

GEOMETRIES = ("authors", "low_res", "low_res_detail")
LOW_RES_GEOMETRIES = ("low_res", "low_res_detail")  # the input at its own resolution


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def upsample_half_pixel(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def window_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over (2r+1)^2 windows clipped at the border (exact border counts), summed window
    by window: unlike cumulative sums, a crop rounds as the whole image does."""
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_coefficients(lr_guide: torch.Tensor, lr_target: torch.Tensor, radius: int,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided filter's local-linear coefficients (a, b) at the low resolution
    (``window_mean`` means; the low_res geometry)."""
    mean_x, mean_y = window_mean(lr_guide, radius), window_mean(lr_target, radius)
    cov_xy = window_mean(lr_guide * lr_target, radius) - mean_x * mean_y
    var_x = window_mean(lr_guide * lr_guide, radius) - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    return a, mean_y - a * mean_x


def box_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum over (2r+1)^2 windows clipped at the border, by cumulative sums (as the authors'
    fast guided filter does; the clipped windows give the exact border counts)."""

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        c = t.cumsum(dim)
        n = t.shape[dim]
        head = c.narrow(dim, r, r + 1)
        mid = c.narrow(dim, 2 * r + 1, n - 2 * r - 1) - c.narrow(dim, 0, n - 2 * r - 1)
        tail = c.narrow(dim, n - 1, 1) - c.narrow(dim, n - 2 * r - 1, r)
        return torch.cat((head, mid, tail), dim)

    return along(along(x, 2), 3)


def fast_guided_filter(
    lr_guide: torch.Tensor, lr_target: torch.Tensor, hr_guide: torch.Tensor,
    radius: int = 1, eps: float = 1e-4,
) -> torch.Tensor:
    """Fast guided filter (Wu et al. 2018): linear coefficients at low resolution, upsampled."""
    h, w = lr_guide.shape[-2:]
    if h <= 2 * radius + 1 or w <= 2 * radius + 1:
        raise ValueError(
            f"the low-resolution image must be larger than {2 * radius + 1} px per side, "
            f"got {h}x{w}"
        )
    n = box_sum(lr_guide.new_ones(1, 1, h, w), radius)
    mean_x = box_sum(lr_guide, radius) / n
    mean_y = box_sum(lr_target, radius) / n
    cov_xy = box_sum(lr_guide * lr_target, radius) / n - mean_x * mean_y
    var_x = box_sum(lr_guide * lr_guide, radius) / n - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    b = mean_y - a * mean_x
    size = hr_guide.shape[-2:]
    return upsample(a, size) * hr_guide + upsample(b, size)


class CSCMMFN(nn.Module):
    def __init__(self, lr_channels: int = 31, guide_channels: int = 3, code_channels: int = 256,
                 num_dcus: int = 3, radius: int = 1, eps: float = 1e-4,
                 geometry: str = "authors", guide_num_dcus: int | None = None):
        super().__init__()
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        self.hparams = {"lr_channels": lr_channels, "guide_channels": guide_channels,
                        "code_channels": code_channels, "num_dcus": num_dcus,
                        "radius": radius, "eps": eps}
        if geometry != "authors":  # files of the authors' geometry keep their hparams as they were
            self.hparams["geometry"] = geometry
        # the guide's backbone may be deeper than the low-res one (codes of the same channels:
        # the guided filter pairs them channel by channel); recorded only where it differs
        if guide_num_dcus is not None and guide_num_dcus != num_dcus:
            self.hparams["guide_num_dcus"] = guide_num_dcus
        self.radius, self.eps, self.geometry = radius, eps, geometry

        def backbone(c: int, n: int) -> CSCEncoder:
            return CSCEncoder(c, code_channels, n, "sst", stem=True, stem_norm=False,
                              nonnegative_threshold=True)

        self.lr_encoder = backbone(lr_channels, num_dcus)
        self.guide_encoder = backbone(guide_channels, guide_num_dcus or num_dcus)
        self.decoder = ReflectConv2d(code_channels, lr_channels, 3)

    @property
    def lr_channels(self) -> int:
        return self.hparams["lr_channels"]

    @property
    def guide_channels(self) -> int:
        return self.hparams["guide_channels"]

    def encode(self, lr: torch.Tensor, guide: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes of both inputs and the fused high-resolution codes."""
        z_guide = self.guide_encoder(guide)
        z_lr = self.lr_encoder(lr)
        if self.geometry in LOW_RES_GEOMETRIES:
            z_guide_low = F.adaptive_avg_pool2d(z_guide, lr.shape[-2:])
            a, b = guided_coefficients(z_guide_low, z_lr, self.radius, self.eps)
            if self.geometry == "low_res_detail":
                # b plus the fit's residual z_lr - (a z_guide_low + b)
                b = z_lr - a * z_guide_low
            size = z_guide.shape[-2:]
            z_fused = upsample_half_pixel(a, size) * z_guide + upsample_half_pixel(b, size)
            return {"guide": z_guide, "low_res": z_lr, "fused": z_fused}
        z_guide_low = upsample(z_guide, lr.shape[-2:])
        z_fused = fast_guided_filter(z_guide_low, z_lr, z_guide, self.radius, self.eps)
        return {"guide": z_guide, "low_res": z_lr, "fused": z_fused}

    def decode(self, z_fused: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        # The authors upsample to (H, H), which breaks non-square images: use (H, W).
        base = (upsample_bicubic if self.geometry in LOW_RES_GEOMETRIES else upsample)(
            lr, z_fused.shape[-2:])
        return self.decoder(z_fused) + base

    def forward(self, lr: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """lr [N,c,h,w], guide [N,g,H,W] in [0,1] -> [N,c,H,W] (unclamped: training output)."""
        return self.decode(self.encode(lr, guide)["fused"], lr)

    def code_activations(self) -> dict[str, str]:
        """Code kind -> ``csc.code_activation`` (the engine's code names)."""
        lr, guide = code_activation(self.lr_encoder), code_activation(self.guide_encoder)
        return {"guide": guide, "low_res": lr,
                "fused": lr if lr == guide else f"{lr} / {guide}"}


@torch.no_grad()
def deepen_guide(net: CSCMMFN, guide_num_dcus: int, guides: torch.Tensor) -> CSCMMFN:
    """A copy of ``net`` whose guide backbone has ``guide_num_dcus`` DCUs (at least its own),
    to train from a file of a shallower guide: every tensor as it was, and each extra unit an
    identity at inference (Conv1 = 0, threshold 0, batch norm undoing itself on the statistics
    of the codes it receives, measured on the guide images ``guides`` [N, g, H, W]), so the
    deeper network starts as ``net`` and training shapes the extra units from there."""
    n = len(net.guide_encoder.dcus)
    if guide_num_dcus < n:
        raise ValueError(f"guide_num_dcus: at least the network's {n}, got {guide_num_dcus}")
    deeper = CSCMMFN(**{**net.hparams, "guide_num_dcus": guide_num_dcus})
    deeper.load_state_dict(net.state_dict(), strict=False)
    training = net.training
    z = net.eval().guide_encoder(guides)
    net.train(training)
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    for dcu in deeper.guide_encoder.dcus[n:]:
        dcu.adjoint.weight.zero_()
        dcu.shrink.theta.zero_()
        dcu.norm.running_mean.copy_(mean)
        dcu.norm.running_var.copy_(var)
        dcu.norm.weight.copy_((var + dcu.norm.eps).sqrt())
        dcu.norm.bias.copy_(mean)
    return deeper.train(training)
