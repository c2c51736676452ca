"""Medical / multi-modal fusion with CSC-IVFN: N >= 2 registered sources (MRI T1/T2/PD, CT, and
at most one pseudo-coloured functional image such as PET or SPECT), 2D images or volumes.

* Grey sources are fused together with the CSC-IVFN rules generalised to N sources.
* A colour functional image (..., 3) takes part through its luminance (Y of full-range BT.601
  YCbCr); its chroma (Cb, Cr) is kept and recombined with the fused luminance -> RGB output.
  This is the usual practice for PET/SPECT-MRI fusion: the anatomy sharpens the luminance and the
  colour still encodes the tracer uptake.
* The fused codes are decoded with ``code_gain`` 1, not the authors' x2 for infrared/visible
  (which stretches the contrast): the fused image keeps the sources' intensity scale.
* Volumes (3D, 3D+t, ...) are fused plane by plane: ``axis`` is the slice axis; the planes are
  the two last axes other than ``axis`` and every other axis (time, ...) is looped over too.
  Only one plane of each source is read at a time, so dask-backed (lazy) arrays work; the values
  are mapped to [0, 1] with statistics of the whole volume so that slices stay comparable.
* ``MedicalVolume``: the same sources and slicing for a caller that drives the planes itself
  (the napari widget: progress, cancelling, codes per plane) and the axis order of its result.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..models.color import rgb_to_ycbcr, ycbcr_to_rgb
from . import notices
from .device import resolve_device
from .fast import run_path
from .inputs import check_min_size, map_values, normalise, value_mapping
from .ivf import IVF_MIN_SIZE, check_code_gain, fuse_grey_sources
from .registry import resolve_model
from .result import FusionResult, base_metadata, plane_progress
from .rules import check_rules

COLOUR_NAME = "functional"  # default name of a colour source given in a list
MEDICAL_CODE_GAIN = 1.0  # no contrast stretch: the fused image keeps the sources' intensity scale
# Per pixel the base codes of the source farthest from black, the detail codes weighed by
# their distance from black: in a scan black is "nothing here". Chosen on the Harvard MRI/CT
# and MRI/PET pairs (weights/README.md): they beat the pixel average on SSIM and Qabf there,
# where the authors' saliency / l1 did not (the PET's black regions darkened the MRI).
MEDICAL_BASE_RULE, MEDICAL_DETAIL_RULE = "choose-max", "l1-black"


def _as_sources(images, names) -> dict[str, object]:
    if isinstance(images, Mapping):
        if names is not None:
            raise ValueError("names: give names only with a list of images (a dict already "
                             "names its sources)")
        out = {str(k): v for k, v in images.items()}
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
        if names is None:
            names = [f"source_{i}" for i in range(len(items))]
        names = [str(n) for n in names]
        if len(names) != len(items):
            raise ValueError(f"names: {len(names)} name(s) for {len(items)} image(s)")
        if len(set(names)) != len(names):
            raise ValueError(f"names: must be unique, got {names}")
        out = dict(zip(names, items, strict=True))
    elif hasattr(images, "ndim"):
        raise ValueError("images: pass the sources as a list or a dict of arrays, not one "
                         f"array (got an array of shape {tuple(np.shape(images))}; for a stack "
                         "use list(stack))")
    else:
        raise ValueError(f"images: expected a list or a dict of arrays, got "
                         f"{type(images).__name__}")
    if len(out) < 2:
        raise ValueError(f"images: at least 2 sources are needed, got {len(out)}")
    return out


def _is_colour(array, flag) -> bool:
    shape = tuple(np.shape(array))
    if flag is None:  # napari's guess: a last axis of 3 or 4 on a 3D+ array
        return len(shape) >= 3 and shape[-1] in (3, 4)
    return bool(flag)


class _Source:
    """One source: lazily read planes, normalised with whole-array statistics."""

    def __init__(self, name: str, array, colour: bool):
        self.name = name
        self.array = array if hasattr(array, "ndim") and hasattr(array, "shape") \
            else np.asarray(array)
        self.colour = colour
        shape = tuple(self.array.shape)
        if colour:
            if len(shape) < 3 or shape[-1] not in (3, 4):
                raise ValueError(f"images[{name!r}]: a colour source needs RGB or RGBA last, "
                                 f"(..., H, W, 3|4); got shape {shape}")
            self.spatial = shape[:-1]
        else:
            self.spatial = shape
        if len(self.spatial) < 2:
            raise ValueError(f"images[{name!r}]: expected an image (H, W) or a volume, got shape "
                             f"{shape}")
        self._mapping()

    def _mapping(self) -> None:
        """inputs.value_mapping for the whole array: planes are mapped with the whole array's
        minimum and maximum (where the rule needs them), so slices stay comparable."""
        a = self.array
        dtype = np.dtype(a.dtype)
        label = f"images[{self.name!r}]"
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            normalise(np.zeros((1, 1), dtype), label)  # raises the engine's TypeError
        if a.size == 0:
            raise ValueError(f"{label}: the image is empty (shape {tuple(a.shape)})")
        lo, hi = float(a.min()), float(a.max())  # dask: lazy reductions, computed here
        if np.issubdtype(dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{label}: contains NaN or infinite pixel(s); replace or mask them "
                             f"before fusing")
        self.mapping = value_mapping(dtype, lo, hi)
        if self.mapping[0] in ("divide", "as is"):
            self.note = normalise(np.zeros((1, 1), dtype), label).note
        elif hi > lo:
            self.note = f"min-max scaled over the whole array ({dtype} range [{lo:.6g}, {hi:.6g}])"
        else:
            self.note = f"constant image set to 0 ({dtype} value {lo:.6g})"

    def plane(self, index) -> np.ndarray:
        """float32 [0, 1] copy of one plane: (H, W) grey or (H, W, 3) RGB (alpha dropped)."""
        p = np.asarray(self.array[index])
        if self.colour:
            p = p[..., :3]
        return map_values(p, *self.mapping)


class MultimodalSources:
    """Validated sources for multi-modal fusion, read plane by plane.

    images: a list or a dict name -> array (numpy, dask, zarr: anything indexable with a shape
    and a dtype); names: names for a list; rgb: None (guess: a last axis of 3 or 4 on a 3D+
    array, as napari does), or one boolean per source (list, or dict by name). Checks: >= 2
    sources, at most one colour source and at least one grey one, one spatial shape, numeric
    finite values. Value mapping to [0, 1] uses whole-array statistics (computed here).
    """

    def __init__(self, images, names=None, rgb=None):
        given = _as_sources(images, names)
        if rgb is None:
            flags = {n: None for n in given}
        elif isinstance(rgb, Mapping):
            unknown = set(rgb) - set(given)
            if unknown:
                raise ValueError(f"rgb: unknown source name(s) {sorted(unknown)}; sources are "
                                 f"{list(given)}")
            flags = {n: rgb.get(n) for n in given}
        else:
            rgb = list(rgb)
            if len(rgb) != len(given):
                raise ValueError(f"rgb: {len(rgb)} flag(s) for {len(given)} source(s)")
            flags = dict(zip(given, rgb, strict=True))
        self.sources = [_Source(n, a, _is_colour(a, flags[n])) for n, a in given.items()]
        self.colour = [s for s in self.sources if s.colour]
        if len(self.colour) > 1:
            raise ValueError(f"images: at most one colour source can be fused (its chroma is "
                             f"kept); got {len(self.colour)}: {[s.name for s in self.colour]}. "
                             f"Convert the others to grey first")
        if len(self.colour) == len(self.sources):
            raise ValueError("images: at least one grey (anatomical) source is needed besides "
                             "the colour one")
        shapes = {s.name: s.spatial for s in self.sources}
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{k} {v}" for k, v in shapes.items())
            raise ValueError(f"images: sources must have the same spatial shape (register or "
                             f"resample them first): {listing}")
        self.spatial: tuple[int, ...] = self.sources[0].spatial
        self.names = [s.name for s in self.sources]
        self.rgb = [s.colour for s in self.sources]
        self.notes = {s.name: s.note for s in self.sources}

    def layout(self, axis=None) -> dict:
        """How the volume is cut for slice axis ``axis`` (see fuse_multimodal): plane_axes,
        loop_axes, plane_shape, loop_shape, planes (count). Checks the plane size."""
        plane_axes, loop_axes = _plane_axes(len(self.spatial), axis)
        plane_shape = (self.spatial[plane_axes[0]], self.spatial[plane_axes[1]])
        check_min_size(plane_shape, "images", IVF_MIN_SIZE, "CSC-IVFN's 11x11 blur")
        loop_shape = tuple(self.spatial[a] for a in loop_axes)
        return {"plane_axes": plane_axes, "loop_axes": loop_axes, "plane_shape": plane_shape,
                "loop_shape": loop_shape, "planes": int(np.prod(loop_shape)) if loop_shape else 1}

    def index(self, loop_index, loop_axes) -> tuple:
        """The spatial index of one plane: ints on the loop axes, full slices elsewhere."""
        index: list = [slice(None)] * len(self.spatial)
        for a, i in zip(loop_axes, loop_index, strict=True):
            index[a] = int(i)
        return tuple(index)

    def planes(self, index) -> dict[str, np.ndarray]:
        """name -> float32 [0, 1] plane ((H, W), or (H, W, 3) for the colour source)."""
        return {s.name: s.plane(index) for s in self.sources}


def _recolour(y: torch.Tensor, chroma: torch.Tensor) -> tuple[np.ndarray, int]:
    """RGB from the fused luminance y (H, W) and the colour source's (Cb, Cr) (H, W, 2).

    Where that colour is outside the RGB cube, the chroma is scaled towards neutral grey just
    enough to fit (hue and the fused luminance kept exactly) rather than clipping each channel,
    which would change the luminance and the hue. Returns (float32 RGB, desaturated pixels).
    """
    y = y.to(chroma.dtype).clamp(0.0, 1.0)
    ycc = torch.cat((y[..., None], chroma), -1)
    d = ycbcr_to_rgb(ycc, dim=-1) - y[..., None]  # the chroma's contribution to each channel
    yy = y[..., None].expand_as(d)
    room = torch.where(d > 0, (1.0 - yy) / d.clamp_min(1e-12),
                       torch.where(d < 0, yy / (-d).clamp_min(1e-12), torch.ones_like(d)))
    s = room.amin(-1).clamp(0.0, 1.0)
    rgb = (y[..., None] + s[..., None] * d).clamp(0.0, 1.0)  # clamp: rounding only
    return rgb.numpy().astype(np.float32), int((s < 1.0).sum())


def _plane_axes(ndim: int, axis) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(plane axes, looped axes) for a spatial ndim and the slice ``axis``."""
    if ndim == 2:
        return (0, 1), ()
    if axis is None:
        axis = ndim - 3
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis: expected an integer axis, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: {axis} is out of range for {ndim}D sources (spatial shape "
                         f"without colour channels)")
    axis = int(axis) % ndim
    plane = tuple(a for a in range(ndim) if a != axis)[-2:]
    loop = tuple(a for a in range(ndim) if a not in plane)
    return plane, loop  # type: ignore[return-value]


def fuse_multimodal(images, model=None, base_rule: str = MEDICAL_BASE_RULE,
                    detail_rule: str = MEDICAL_DETAIL_RULE, device="auto", codes: bool = False,
                    names=None, progress=None, axis=None,
                    rgb=None, code_gain: float = MEDICAL_CODE_GAIN, *,
                    exact: bool = False) -> FusionResult:
    """Fuse N >= 2 registered medical images (e.g. MRI T1 + PD, CT + MRI, MRI + PET) with
    CSC-IVFN.

    images: a list or a dict name -> array. Grey sources are (H, W) images or volumes
    (..., H, W) of one shape; at most one colour source (same spatial shape + a last axis of 3
    (RGB) or 4 (RGBA, alpha ignored)), e.g. a pseudo-coloured PET/SPECT image, whose luminance is
    fused and whose chroma is kept (RGB output). Values are mapped to [0, 1] as in the other
    fusion functions (unsigned integers / dtype max, floats in [0, 1] as they are, else min-max
    over the whole array).
    model: None for the packaged medical.pt (a CSC-IVFN trained to keep tones at code gain 1),
      or any CSC-IVFN: a FusionModel (``load_model("medical" | "ivf", weights)``) or a weights
      path (ours, or the authors' file or folder).
    base_rule / detail_rule: default 'choose-max' (base: per pixel every code of the source
      whose codes are farthest from the codes of an all-black image, 3x3 activity, the choices
      checked by a 5x5 majority vote) and 'l1-black' (detail: the authors' l1 attention with
      the activity measured from the codes of black); or 'saliency', 'l1', 'average' (see
      fuse_infrared_visible), either rule for either codes.
    names: names for a list of images (default source_0, source_1, ...).
    axis: for volumes, the slice axis (default: the third axis from the end, i.e. 0 for a
      (Z, Y, X) volume, 1 for (T, Z, Y, X)); planes are the two last axes other than ``axis``
      and any other axis is looped over too. The output has the sources' spatial shape.
    rgb: None guesses colour sources as napari does (a last axis of 3 or 4 on a 3D+ array);
      otherwise a list (or dict by name) of booleans, one per source (e.g. napari's layer.rgb).
    codes: also return the sparse codes (2D inputs only: volumes would need 64 maps per voxel).
    code_gain: the factor on the fused base and detail codes before decoding (a finite number
      > 0). Default 1: a source fused with itself comes back unchanged in scale, so the fused
      image keeps the sources' (quantitative) intensities. The authors' 2 (the default of
      fuse_infrared_visible) is an infrared/visible display heuristic that stretches the
      contrast. Below 1 (the packaged weights) the codes' distance from the codes of black is
      scaled: the image fades towards black, and black stays black.
    progress(done, total) is called between steps and may raise Cancelled.
    exact: the exact path even for weights the fast path applies to (see
      fuse_infrared_visible; metadata['path'] says which ran).

    Returns a FusionResult: image float32 in [0, 1] ((..., H, W) grey or (..., H, W, 3) RGB when
    a colour source takes part); weights 'base' and 'detail', (N, ...spatial) per-source weight
    maps in the order of metadata['sources'] (per-channel base weights averaged over channels);
    metadata with the sources, the colour source, rules, code_gain, axis, normalisation and
    timings.
    """
    t0 = time.perf_counter()
    notices.begin_run()
    check_rules(base_rule, detail_rule)
    code_gain = check_code_gain(code_gain)
    sources = MultimodalSources(images, names=names, rgb=rgb)
    if codes not in (True, False):
        raise ValueError(f"codes: expected True or False, got {codes!r}")
    srcs, colour, spatial = sources.sources, sources.colour, sources.spatial
    layout = sources.layout(axis)
    loop_axes, loop_shape, n_planes = layout["loop_axes"], layout["loop_shape"], layout["planes"]
    if codes and n_planes > 1:
        raise ValueError(f"codes: sparse codes are returned for 2D images only ({n_planes} "
                         f"planes here would need 64 maps per voxel and source); fuse one slice "
                         f"with codes=True to inspect them")
    model = resolve_model(model, "medical")
    dev = resolve_device(device)
    out_shape = spatial + ((3,) if colour else ())
    image = np.empty(out_shape, np.float32)
    w_base = np.empty((len(srcs),) + spatial, np.float32)
    w_detail = np.empty((len(srcs),) + spatial, np.float32)
    code_maps: dict = {}
    desaturated = 0
    t1 = time.perf_counter()
    for k, loop_idx in enumerate(np.ndindex(*loop_shape) if loop_shape else [()]):
        index_t = sources.index(loop_idx, loop_axes)
        fused, cmaps, weights, n_desat = _fuse_planes(
            sources, sources.planes(index_t), model, base_rule, detail_rule, dev, codes,
            plane_progress(progress, k, n_planes), code_gain, exact)
        desaturated += n_desat
        image[index_t] = fused
        for i in range(len(srcs)):
            w_base[(i,) + index_t] = weights["base"][i]
            w_detail[(i,) + index_t] = weights["detail"][i]
        code_maps = cmaps
    meta = _metadata(sources, spatial, layout, model, dev, base_rule, detail_rule, code_gain,
                     desaturated, t0, t1)
    meta["path"] = run_path(model, exact)
    return FusionResult(image, code_maps, {"base": w_base, "detail": w_detail}, meta)


def _fuse_planes(sources: MultimodalSources, planes: dict[str, np.ndarray], model, base_rule,
                 detail_rule, dev, codes, progress, code_gain, exact: bool = False
                 ) -> tuple[np.ndarray, dict, dict, int]:
    """Fuse one plane of each source, already mapped to [0, 1] (``sources.planes``): the colour
    source takes part through its luminance and gives its chroma back to the fused luminance.
    Returns (image (H, W) or (H, W, 3), codes, weights (N, H, W), desaturated pixels)."""
    chroma = None
    grey = {}
    for s in sources.sources:
        p = planes[s.name]
        if s.colour:
            ycc = rgb_to_ycbcr(torch.from_numpy(p), dim=-1)
            grey[s.name] = ycc[..., 0].numpy().astype(np.float32)
            chroma = ycc[..., 1:]
        else:
            grey[s.name] = p
    fused, cmaps, weights = fuse_grey_sources(grey, model, base_rule, detail_rule, dev, codes,
                                              progress, code_gain=code_gain, exact=exact)
    if chroma is None:
        return fused, cmaps, weights, 0
    fused, n_desat = _recolour(torch.from_numpy(fused), chroma)
    return fused, cmaps, weights, n_desat


def _metadata(sources: MultimodalSources, spatial: tuple, layout: dict, model, dev, base_rule,
              detail_rule, code_gain, desaturated: int, t0: float, t1: float) -> dict:
    """A multi-modal result's metadata, once the work is done (base_metadata takes the run's
    notices): ``spatial`` is the shape fused and ``layout`` how it was cut (as
    MultimodalSources.layout), t0 / t1 the start and the end of the preparation."""
    colour, n_planes = sources.colour, layout["planes"]
    plane_axes, plane_shape = layout["plane_axes"], layout["plane_shape"]
    meta = base_metadata(model, dev, sources.notes)
    meta.update(
        sources=sources.names,
        colour_source=colour[0].name if colour else None,
        colour=("YCbCr: fused luminance, chroma of the colour source (scaled towards grey, "
                "hue kept, where the colour would leave the RGB gamut)") if colour else "grey",
        desaturated_fraction=desaturated / (n_planes * plane_shape[0] * plane_shape[1])
        if colour else None,
        base_rule=base_rule, detail_rule=detail_rule, code_gain=code_gain,
        spatial_shape=spatial, plane_axes=plane_axes if len(spatial) > 2 else None,
        slice_axes=layout["loop_axes"] or None, planes=n_planes,
        timings={"prepare_s": t1 - t0, "network_s": time.perf_counter() - t1},
    )
    return meta


class MedicalVolume:
    """Sources fused plane by plane by a caller that drives the planes itself (the napari
    widget: progress, cancelling, and codes per plane, which ``fuse_multimodal`` gives for 2D
    inputs only). Validated once, values mapped to [0, 1] with whole-volume statistics, cut
    into planes along ``axis`` (as in fuse_multimodal).

    ``loop_shape``: the planes' index space; ``fuse_plane`` fuses one plane;
    ``source_order`` puts a result assembled plane by plane (loop axes first, per-source and
    code axes just before the plane axes) back in the sources' axis order."""

    def __init__(self, images, names=None, rgb=None, axis=None):
        self.sources = MultimodalSources(images, names=names, rgb=rgb)
        layout = self.sources.layout(axis)
        self.plane_axes, self.loop_axes = layout["plane_axes"], layout["loop_axes"]
        self.loop_shape = layout["loop_shape"]
        self.names, self.notes = self.sources.names, self.sources.notes
        self.colour = bool(self.sources.colour)

    def fuse_plane(self, index, model=None, progress=None, codes: bool = False, *,
                   base_rule: str = MEDICAL_BASE_RULE, detail_rule: str = MEDICAL_DETAIL_RULE,
                   device="auto",
                   code_gain: float = MEDICAL_CODE_GAIN) -> FusionResult:
        """fuse_multimodal of plane ``index`` (of ``loop_shape``), on the planes as mapped
        with the whole volume's statistics (metadata["normalisation"] says how)."""
        t0 = time.perf_counter()
        notices.begin_run()
        check_rules(base_rule, detail_rule)
        code_gain = check_code_gain(code_gain)
        if codes not in (True, False):
            raise ValueError(f"codes: expected True or False, got {codes!r}")
        model = resolve_model(model, "medical")
        dev = resolve_device(device)
        planes = self.sources.planes(self.sources.index(index, self.loop_axes))
        t1 = time.perf_counter()
        fused, cmaps, weights, desaturated = _fuse_planes(
            self.sources, planes, model, base_rule, detail_rule, dev, codes, progress, code_gain)
        shape = tuple(fused.shape[:2])
        layout = {"plane_axes": (0, 1), "loop_axes": (), "plane_shape": shape, "planes": 1}
        meta = _metadata(self.sources, shape, layout, model, dev, base_rule, detail_rule,
                         code_gain, desaturated, t0, t1)
        return FusionResult(fused, cmaps, weights, meta)

    def source_order(self, result: FusionResult) -> FusionResult:
        """``result`` (image (*loop, H, W[, 3]), weights (*loop, N, H, W), codes
        (*loop, *inner, H, W)) with its axes in the sources' order (views, in place)."""
        loop, plane = self.loop_axes, self.plane_axes
        if list(plane) == [len(loop), len(loop) + 1]:
            return result  # the planes are already the last axes
        result.image = _source_axes(result.image, loop, plane, trailing=1 if self.colour else 0)
        result.weights = {k: _source_axes(w, loop, plane, inner=1)
                          for k, w in result.weights.items()}
        result.codes = {k: _source_axes(c, loop, plane, inner=c.ndim - len(loop) - 2)
                        for k, c in result.codes.items()}
        return result


def _source_axes(arr: np.ndarray, loop_axes, plane_axes, inner: int = 0, trailing: int = 0):
    """From the plane-by-plane layout (loop axes, inner axes, plane axes, trailing axes) back to
    the sources' axis order, with the inner axes (source or code channel) placed just before
    the sources' last two axes."""
    nsp = len(loop_axes) + 2
    labels = ([("s", a) for a in loop_axes] + [("i", k) for k in range(inner)]
              + [("s", a) for a in plane_axes] + [("t", k) for k in range(trailing)])
    target = ([("s", a) for a in range(nsp - 2)] + [("i", k) for k in range(inner)]
              + [("s", a) for a in range(nsp - 2, nsp)] + [("t", k) for k in range(trailing)])
    return np.transpose(arr, [labels.index(t) for t in target])
