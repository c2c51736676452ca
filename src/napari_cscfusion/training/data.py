"""Training data for the three networks, made from real images (engine layer: numpy/torch).

- ivf: random resized crops of single grey images (IR and visible mixed) from FLIR ``flir_train``;
- mef: exposure brackets simulated from real HDR radiance maps (``mef/hdr/*.exr``), one scene
  (``HELD_OUT_HDR``) never used;
- mmf: thermal guided super-resolution: an area-downsampled IR crop (scale 2-4) + the full
  resolution visible frame as guide -> the full resolution IR crop.

Every batch is a pure function of (seed, epoch, step): runs are reproducible and a resumed run
sees exactly the batches the interrupted one would have seen.

The held-out sets (TNO, FLIR-test, nir_country, the held-out HDR scene) are never read here.
A validation split of ``flir_train`` (every ``VAL_EVERY``-th pair) is kept apart for choosing
the epoch; for mef the right-hand ``MEF_VAL_FRACTION`` of each training panorama is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")  # must precede the cv2 import
import cv2  # noqa: E402

from ..models.checkpoints import TASKS  # noqa: E402  (the one task list)
from .brackets import (  # noqa: E402, F401  (simulated brackets: brackets.py)
    MEF_MAX_SPAN,
    MEF_SPACING,
    camera_response,
    covering_evs,
    random_evs,
    simulate_bracket,
)

HELD_OUT_HDR = "sunrise"  # never used for training or validation: kept for evaluation
VAL_EVERY = 10  # flir_train pairs 10, 20, ..., 180 form the validation split
MEF_VAL_FRACTION = 0.2  # right-hand part of each training HDR panorama: validation
MEF_COUNTS = (2, 16)  # exposures per bracket (real brackets: 2-3 to 16, e.g. Memorial)
MEF_BLACK = (0.0, 0.08)  # black level / pedestal of the output (display units), random
MMF_SCALES = (2.0, 4.0)  # one model for every scale in this range
DATA_ENV = "CSCFUSION_DATA_ROOT"


def default_data_root() -> Path:
    """``$CSCFUSION_DATA_ROOT`` or, in a source checkout, ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def resolve_data_root(data_root: str | Path | None) -> Path:
    root = Path(data_root) if data_root is not None else default_data_root()
    if not (root / "ivf" / "flir_train").is_dir() and not (root / "mef" / "hdr").is_dir():
        raise FileNotFoundError(
            f"no training data under {str(root)!r}: expected ivf/flir_train and mef/hdr "
            f"(pass data_root / --data-root or set ${DATA_ENV})")
    return root


# --- reading ---------------------------------------------------------------------------

def read_grey(path: str | Path) -> np.ndarray:
    """An 8-bit image file as float32 grey in [0,1] (colour is converted with BT.601)."""
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise OSError(f"cannot read image {str(path)!r}")
    if im.ndim == 3:
        im = cv2.cvtColor(im[..., :3], cv2.COLOR_BGR2GRAY)
    scale = 65535.0 if im.dtype == np.uint16 else 255.0
    return im.astype(np.float32) / scale


def read_hdr(path: str | Path) -> np.ndarray:
    """An OpenEXR radiance map as float32 RGB [H,W,3], negative values clipped to 0.

    OpenCV is tried first (with OPENCV_IO_ENABLE_OPENEXR=1); wheels built without OpenEXR
    (opencv-python-headless 5 here) return None, then the ``OpenEXR`` package is used.
    """
    path = Path(path)
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if im is not None:
        rgb = cv2.cvtColor(im[..., :3], cv2.COLOR_BGR2RGB)
    else:
        try:
            import OpenEXR
        except ImportError:
            raise ImportError(
                f"cannot read {str(path)!r}: this OpenCV build has no OpenEXR support and the "
                f"'openexr' package is not installed (pip install openexr)") from None
        with OpenEXR.File(str(path)) as f:
            ch = f.channels()
            if "RGB" in ch:
                rgb = np.asarray(ch["RGB"].pixels)
            elif all(c in ch for c in "RGB"):
                rgb = np.stack([np.asarray(ch[c].pixels) for c in "RGB"], -1)
            else:
                raise OSError(f"{str(path)!r} has no R, G, B channels ({list(ch)})")
    return np.ascontiguousarray(np.clip(rgb[..., :3].astype(np.float32), 0.0, None))


def _index(p: Path) -> int:
    m = re.search(r"(\d+)", p.stem)
    return int(m.group(1)) if m else -1


def flir_pairs(data_root: str | Path | None = None,
               split: str = "train") -> list[tuple[Path, Path]]:
    """(IR, visible) file pairs of ``ivf/flir_train``; split 'train', 'val' or 'all'."""
    folder = resolve_data_root(data_root) / "ivf" / "flir_train"
    irs = sorted(folder.glob("IR*.*"), key=_index)
    pairs = []
    for ir in irs:
        vis = [p for p in folder.glob(f"VIS{_index(ir)}.*")]
        if vis:
            pairs.append((ir, vis[0]))
    if not pairs:
        raise FileNotFoundError(f"no IR*/VIS* pairs in {str(folder)!r}")
    if split == "all":
        return pairs
    is_val = [_index(ir) % VAL_EVERY == 0 for ir, _ in pairs]
    if split == "val":
        return [p for p, v in zip(pairs, is_val, strict=True) if v]
    if split == "train":
        return [p for p, v in zip(pairs, is_val, strict=True) if not v]
    raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


def hdr_scenes(data_root: str | Path | None = None) -> list[Path]:
    """The training HDR maps (every ``mef/hdr/*.exr`` but ``HELD_OUT_HDR``)."""
    folder = resolve_data_root(data_root) / "mef" / "hdr"
    scenes = sorted(p for p in folder.glob("*.exr") if p.stem != HELD_OUT_HDR)
    if not scenes:
        raise FileNotFoundError(f"no training HDR maps (*.exr) in {str(folder)!r}")
    return scenes


@lru_cache(maxsize=16)
def _cached_grey(path: str) -> np.ndarray:
    return read_grey(path)


@lru_cache(maxsize=8)
def _cached_hdr(path: str) -> np.ndarray:
    hdr = read_hdr(path)
    # Normalise exposure: the scene's median luminance becomes 0.18 at EV 0.
    lum = hdr @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    return hdr * np.float32(0.18 / max(float(np.median(lum)), 1e-6))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


# --- augmentation ----------------------------------------------------------------------

def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop on a numpy [H,W(,C)] image (area interpolation when
    shrinking, linear when enlarging)."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw = ch = min(h, w)
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    crop = img[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if cw * ch > size * size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def random_flip_rot(arrays: Sequence[np.ndarray], rng: np.random.Generator,
                    rot90: bool = True) -> list[np.ndarray]:
    """The same random flips (and rot90 of square arrays) for every [H,W(,C)] array."""
    k = int(rng.integers(0, 4)) if rot90 else 0
    fh, fv = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    out = []
    for a in arrays:
        if fh:
            a = a[:, ::-1]
        if fv:
            a = a[::-1]
        if k:
            a = np.rot90(a, k, axes=(0, 1))
        out.append(np.ascontiguousarray(a))
    return out


def add_extremes(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey [H,W] image in [0,1] with regions real images have and FLIR frames rarely do, so
    that the autoencoder learns to keep them (black stays black, saturated stays saturated):
    one of black borders (1-4 sides, as scanner/letterbox margins), a black elliptic mask
    outside a field of view (as medical scans), clipped highlights (gain until 2-30 % of the
    pixels saturate), or a flat crop (all black, all white, or one grey level)."""
    h, w = img.shape
    kind = rng.choice(("border", "mask", "clip", "flat"), p=(0.3, 0.3, 0.3, 0.1))
    out = img.astype(np.float32, copy=True)
    if kind == "border":
        sides = rng.random(4) < 0.5
        sides[int(rng.integers(0, 4))] = True
        top, bottom, left, right = (int(rng.integers(1, max(2, n // 3)))
                                    for n in (h, h, w, w))
        if sides[0]:
            out[:top] = 0.0
        if sides[1]:
            out[h - bottom:] = 0.0
        if sides[2]:
            out[:, :left] = 0.0
        if sides[3]:
            out[:, w - right:] = 0.0
    elif kind == "mask":
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.25, 0.6) * h, rng.uniform(0.25, 0.6) * w
        out[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 > 1.0] = 0.0
    elif kind == "clip":
        level = float(np.quantile(out, 1.0 - rng.uniform(0.02, 0.3)))
        out = np.clip(out / max(level, 1e-3), 0.0, 1.0)
    else:
        out[:] = rng.choice((0.0, 1.0, float(rng.uniform(0.0, 1.0))))
    return out


def add_photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey [H,W] image in [0,1] brightened as an over-exposed or contrast-stretched frame:
    a gamma in [0.3, 1] (lifts the mid-tones), then a gain in [1, 1.6] clipped at 1. FLIR
    frames have few bright pixels (17.5 % above 0.8, 0.6 % at >= 0.99); with this on half the
    crops about a third of those crops' pixels end above 0.8 and a tenth at 1, so that bright
    tones and saturated plateaus decode to themselves (issue 17: self-fusion with clipped
    highlights)."""
    gamma = float(rng.uniform(0.3, 1.0))
    gain = float(rng.uniform(1.0, 1.6))
    return np.clip(gain * np.power(img.astype(np.float32), gamma), 0.0, 1.0)


# --- batches ------------------------------------------------------------------------------

class BatchSource:
    """Base: ``batch(epoch, step)`` -> dict of float32 tensors, ``steps_per_epoch``."""

    task: str
    steps_per_epoch: int

    def describe(self) -> dict:
        raise NotImplementedError

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class IVFCrops(BatchSource):
    """Random resized crops of single grey images, IR and visible mixed (autoencoder)."""

    task = "ivf"

    def __init__(self, data_root=None, *, crop: int = 96, batch_size: int = 16, seed: int = 0,
                 split: str = "train", scale: tuple[float, float] | None = None,
                 steps_per_epoch: int | None = None, extremes: float = 0.0,
                 photometric: float = 0.0):
        for name, p in (("extremes", extremes), ("photometric", photometric)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: a probability in [0, 1], got {p!r}")
        if scale is None:
            # torchvision's default area range (0.08, 1) at the authors' 128 px crops; smaller
            # crops take proportionally smaller areas so the pixel scale stays the same.
            f = (crop / 128.0) ** 2
            scale = (0.08 * f, min(1.0, f))
        pairs = flir_pairs(data_root, split)
        self.files = [str(p) for pair in pairs for p in pair]
        self.crop, self.batch_size, self.seed, self.scale = crop, batch_size, seed, scale
        self.steps_per_epoch = steps_per_epoch or max(1, len(self.files) // batch_size)
        self.split = split
        self.extremes = extremes
        self.photometric = photometric

    def describe(self) -> dict:
        return {"data": f"ivf/flir_train ({self.split} split: {len(self.files)} images, IR and "
                        f"visible mixed; pairs with index % {VAL_EVERY} == 0 are validation)",
                "augment": f"random resized crop {self.crop} (area fraction "
                           f"{self.scale[0]:.3g}-{self.scale[1]:.3g}), flips, rot90"
                           + (f"; extremes with probability {self.extremes:g} "
                              f"(training.data.add_extremes: black borders/masks, clipped "
                              f"highlights, flat crops)" if self.extremes else "")
                           + (f"; photometric with probability {self.photometric:g} "
                              f"(training.data.add_photometric: gamma 0.3-1, gain 1-1.6, "
                              f"clipped)" if self.photometric else "")}

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        order = _rng(self.seed, 1, epoch).permutation(len(self.files))
        out = []
        for j in range(self.batch_size):
            i = int(order[(step * self.batch_size + j) % len(order)])
            rng = _rng(self.seed, 2, epoch, step, j)
            img = random_resized_crop(_cached_grey(self.files[i]), self.crop, rng, self.scale)
            (img,) = random_flip_rot([img], rng)
            # drawn only when asked for, so runs without it keep their batches
            if self.photometric and rng.random() < self.photometric:
                img = add_photometric(img, rng)
            if self.extremes and rng.random() < self.extremes:
                img = add_extremes(img, rng)
            out.append(img)
        x = torch.from_numpy(np.stack(out)[:, None])
        return {"image": x}


class MEFBrackets(BatchSource):
    """Simulated brackets [N,K,3,H,W] (K random in ``counts`` per batch) from training HDR maps.

    Exposure values (per bracket): with probability ``cover_prob`` a bracket that covers the
    crop's dynamic range (``covering_evs``, as real brackets such as Memorial are shot), else
    one centred near the scene median (``random_evs``); ``spacing`` EV apart in both cases.
    Camera per bracket: gamma 1.8-2.6, S-curve 0-0.5, black level ``black`` (display units),
    shot noise 0-0.01 and read noise 0.0002-0.002 (linear), 8 bit.
    """

    task = "mef"

    def __init__(self, data_root=None, *, crop: int = 128, batch_size: int = 8, seed: int = 0,
                 split: str = "train", counts: tuple[int, int] = MEF_COUNTS,
                 spacing: tuple[float, float] = MEF_SPACING,
                 black: tuple[float, float] = MEF_BLACK, cover_prob: float = 0.5,
                 steps_per_epoch: int | None = None):
        self.scenes = [str(p) for p in hdr_scenes(data_root)]
        self.crop, self.batch_size, self.seed = crop, batch_size, seed
        self.counts = (int(counts[0]), int(counts[1]))
        self.spacing = (float(spacing[0]), float(spacing[1]))
        self.black = (float(black[0]), float(black[1]))
        self.cover_prob = float(cover_prob)
        if not 2 <= self.counts[0] <= self.counts[1]:
            raise ValueError(f"counts must satisfy 2 <= lo <= hi, got {counts}")
        self.split = split
        self.steps_per_epoch = steps_per_epoch or 25

    def describe(self) -> dict:
        names = [Path(s).stem for s in self.scenes]
        return {"data": f"mef/hdr {names} ({self.split} part: "
                        f"{'left' if self.split == 'train' else 'right'} "
                        f"{1 - MEF_VAL_FRACTION if self.split == 'train' else MEF_VAL_FRACTION:.0%}"
                        f" of each panorama)",
                "augment": f"random crops {self.crop} at scale 0.25-1, flips, rot90; "
                           f"{self.counts[0]}-{self.counts[1]} exposures (same K in a batch) "
                           f"{self.spacing[0]:g}-{self.spacing[1]:g} EV apart (span <= "
                           f"{MEF_MAX_SPAN:g} EV), covering the crop's range with p = "
                           f"{self.cover_prob:g} else centred near the median; gamma 1.8-2.6 + "
                           f"S-curve 0-0.5, black level {self.black[0]:g}-{self.black[1]:g}, "
                           f"shot noise 0-0.01, read noise 0.0002-0.002, 8-bit",
                "mef_counts": list(self.counts), "mef_spacing_ev": list(self.spacing),
                "mef_black_level": list(self.black), "mef_cover_prob": self.cover_prob,
                "mef_max_span_ev": MEF_MAX_SPAN}

    def _region(self, hdr: np.ndarray) -> np.ndarray:
        w = hdr.shape[1]
        cut = int(round(w * (1 - MEF_VAL_FRACTION)))
        return hdr[:, :cut] if self.split == "train" else hdr[:, cut:]

    def batch(self, epoch: int, step: int, count: int | None = None) -> dict[str, torch.Tensor]:
        """One batch; ``count`` fixes K (validation), else K is drawn from ``counts``."""
        brng = _rng(self.seed, 3, epoch, step)
        k = int(brng.integers(self.counts[0], self.counts[1] + 1))
        if count is not None:
            k = int(count)
        out = []
        for j in range(self.batch_size):
            rng = _rng(self.seed, 4, epoch, step, j)
            hdr = self._region(_cached_hdr(self.scenes[int(rng.integers(len(self.scenes)))]))
            s = rng.uniform(0.25, 1.0)
            h, w = hdr.shape[:2]
            side = int(min(h, w, round(self.crop / s)))
            y0 = int(rng.integers(0, h - side + 1))
            x0 = int(rng.integers(0, w - side + 1))
            patch = cv2.resize(hdr[y0:y0 + side, x0:x0 + side], (self.crop, self.crop),
                               interpolation=cv2.INTER_AREA)
            if rng.random() < self.cover_prob:
                lum = patch @ np.array([0.2126, 0.7152, 0.0722], np.float32)
                evs = covering_evs(rng, k, lum, self.spacing)
            else:
                evs = random_evs(rng, k, self.spacing)
            stack = simulate_bracket(patch, evs, rng, gamma=rng.uniform(1.8, 2.6),
                                     contrast=rng.uniform(0.0, 0.5),
                                     shot_noise=rng.uniform(0.0, 0.01),
                                     read_noise=rng.uniform(0.0002, 0.002),
                                     black=rng.uniform(*self.black))
            stack = np.stack(random_flip_rot(list(stack), _rng(self.seed, 5, epoch, step, j)))
            out.append(stack.transpose(0, 3, 1, 2))
        return {"stack": torch.from_numpy(np.ascontiguousarray(np.stack(out)))}


def area_downsample(img: np.ndarray, scale: float) -> np.ndarray:
    """Area (box) downsampling by ``scale`` with cv2.INTER_AREA (size rounded)."""
    h, w = img.shape[:2]
    size = (max(1, int(round(w / scale))), max(1, int(round(h / scale))))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def align_lr_for_mmfn(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample a low-resolution image [h,w] so that CSC-MMFN's align_corners=True upsampling
    to ``size`` (H, W) puts every pixel where it belongs.

    A real (area-sampled) low-res pixel i covers high-res position (i + 0.5)·H/h − 0.5, but
    ``upsample(align_corners=True)`` maps it to i·(H − 1)/(h − 1): a shift growing from
    −(s−1)/2 px at one border to +(s−1)/2 px at the other that no convolution can undo. This
    samples ``lr`` (bicubic, reflected border) at p_i = (i·(H−1)/(h−1) + 0.5)·h/H − 0.5, so the
    network's geometry matches the data. Training inputs go through it; inference must too.
    """
    h, w = lr.shape[:2]
    big_h, big_w = size

    def pos(n: int, big: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        step = (big - 1) / (n - 1) if n > 1 else 0.0
        return ((i * step + 0.5) * n / big - 0.5).astype(np.float32)

    map_x = np.broadcast_to(pos(w, big_w)[None, :], (h, w)).copy()
    map_y = np.broadcast_to(pos(h, big_h)[:, None], (h, w)).copy()
    out = cv2.remap(np.ascontiguousarray(lr, dtype=np.float32), map_x, map_y, cv2.INTER_CUBIC,
                    borderMode=cv2.BORDER_REFLECT)
    return np.clip(out, 0.0, 1.0)


MMF_LR_INPUTS = ("bicubic", "align", "native")


def prepare_mmf_lr(lr: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """What CSC-MMFN gets as its low-resolution input for an output of ``size`` (H, W).

    'bicubic': lr upsampled to (H, W) with cv2.INTER_CUBIC, so the network's own upsampling is
    the identity and it learns a guided residual over bicubic interpolation (the shipped
    weights); 'align': ``align_lr_for_mmfn`` (kept at low resolution); 'native': lr as it is
    (the low_res geometry of CSC-MMFN, which resamples itself). The checkpoint header records
    the mode under ``training['lr_input']``; inference must prepare lr the same way.
    """
    if mode == "native":
        return np.asarray(lr, np.float32)
    if mode == "bicubic":
        h, w = size
        return np.clip(cv2.resize(np.asarray(lr, np.float32), (w, h),
                                  interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    if mode == "align":
        return align_lr_for_mmfn(lr, size)
    raise ValueError(f"lr input mode must be one of {MMF_LR_INPUTS}, got {mode!r}")


class MMFPairs(BatchSource):
    """Thermal guided super-resolution: lr IR (area-downsampled at a random scale in 2-4, the
    same for a batch), visible guide and full resolution IR target, crops of ``crop`` px."""

    task = "mmf"

    def __init__(self, data_root=None, *, crop: int = 96, batch_size: int = 16, seed: int = 0,
                 split: str = "train", scales: tuple[float, float] = MMF_SCALES,
                 steps_per_epoch: int | None = None, lr_input: str = "bicubic",
                 flat_guide: bool = False):
        if lr_input not in MMF_LR_INPUTS:
            raise ValueError(f"lr_input must be one of {MMF_LR_INPUTS}, got {lr_input!r}")
        self.lr_input = lr_input
        self.pairs = [(str(a), str(b)) for a, b in flir_pairs(data_root, split)]
        self.crop, self.batch_size, self.seed, self.scales = crop, batch_size, seed, scales
        # every guide a constant at its crop's mean: trains the network without a guide (its
        # single-image super-resolution), a baseline for what a real guide adds
        self.flat_guide = flat_guide
        self.split = split
        self.steps_per_epoch = steps_per_epoch or max(1, 2 * len(self.pairs) // batch_size)

    def describe(self) -> dict:
        return {"data": f"ivf/flir_train ({self.split} split: {len(self.pairs)} IR/visible "
                        f"pairs; index % {VAL_EVERY} == 0 are validation)",
                "augment": f"random crops {self.crop}, flips, rot90; lr = INTER_AREA "
                           f"downsampling of the IR crop at a random scale "
                           f"{self.scales[0]}-{self.scales[1]} per batch",
                "lr_input": self.lr_input,
                **({"guide": "flat: a constant at each crop's mean (no guide)"}
                   if self.flat_guide else {}),
                "lr_input_note": "network input = training.data.prepare_mmf_lr(lr, (H, W), "
                                 f"{self.lr_input!r})"}

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        brng = _rng(self.seed, 6, epoch, step)
        # Half the batches use an integer scale (2, 3 or 4), half a random real one.
        lo, hi = self.scales
        ints = [s for s in range(int(np.ceil(lo)), int(np.floor(hi)) + 1)]
        scale = float(brng.choice(ints)) if ints and brng.random() < 0.5 else brng.uniform(lo, hi)
        order = _rng(self.seed, 7, epoch).permutation(len(self.pairs))
        lrs, guides, targets = [], [], []
        for j in range(self.batch_size):
            i = int(order[(step * self.batch_size + j) % len(order)])
            rng = _rng(self.seed, 8, epoch, step, j)
            ir, vis = _cached_grey(self.pairs[i][0]), _cached_grey(self.pairs[i][1])
            h, w = min(ir.shape[0], vis.shape[0]), min(ir.shape[1], vis.shape[1])
            y0 = int(rng.integers(0, h - self.crop + 1))
            x0 = int(rng.integers(0, w - self.crop + 1))
            t = ir[y0:y0 + self.crop, x0:x0 + self.crop]
            g = vis[y0:y0 + self.crop, x0:x0 + self.crop]
            t, g = random_flip_rot([t, g], rng)
            lrs.append(prepare_mmf_lr(area_downsample(t, scale), t.shape, self.lr_input))
            guides.append(np.full_like(g, g.mean()) if self.flat_guide else g)
            targets.append(t)
        return {"lr": torch.from_numpy(np.stack(lrs)[:, None]),
                "guide": torch.from_numpy(np.stack(guides)[:, None]),
                "target": torch.from_numpy(np.stack(targets)[:, None]),
                "scale": torch.tensor(scale)}


def make_source(task: str, data_root=None, **kw) -> BatchSource:
    cls = {"ivf": IVFCrops, "mef": MEFBrackets, "mmf": MMFPairs}.get(task)
    if cls is None:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return cls(data_root, **kw)
