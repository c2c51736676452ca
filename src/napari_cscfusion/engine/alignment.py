"""Alignment check and rigid (rotation + translation) registration of two 2D images.

Fusion assumes registered sources. ``estimate_misalignment(fixed, moving)`` says how far apart two
images are; ``register_rigid(fixed, moving)`` resamples ``moving`` onto ``fixed``'s pixel grid.

Conventions (pixel index coordinates, rows down, as napari shows layers whose translate is 0;
images of different sizes share their first pixel, as napari draws them):

* The transform maps a fixed pixel p = (row, col) to the moving pixel where the same anatomy is:
  ``q = R (p - center) + center + shift``, ``center`` the centre of the fixed image.
* ``shift = (dy, dx)``: how far the moving image's content is displaced (down, right) from the
  fixed one, in moving pixels. A copy of ``fixed`` moved 17 px down and 13 px right gives
  (17, 13).
* ``rotation_deg``: positive when the moving content is turned clockwise as displayed (ITK's
  convention for 2D images with y down).
* ``matrix``: the same map as a 3x3 homogeneous matrix on (row, col), ready for
  ``scipy.ndimage.affine_transform(moving, matrix, output_shape=fixed.shape)``.

Method: a global estimate by phase correlation (scikit-image): rotation from the log-polar
Fourier magnitude of the gradient magnitudes (translation-invariant), then translation from the
phase correlation of gradient magnitudes, which works across contrasts (T1 vs PD, CT vs MRI),
where raw intensities do not correlate. It is refined by maximising normalised mutual information
(Studholme) with scipy's Powell optimiser. Written with scikit-image/scipy rather than adding
SimpleITK (a 53 MB wheel) for a three-parameter 2D problem.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import minimize

from ..models.color import luma
from .inputs import check_min_size, normalise

#: Misalignment (RMS displacement over the fixed image's foreground) tolerated as "aligned".
DEFAULT_TOLERANCE_PX = 1.5
MIN_SIZE = 16  # phase correlation and 32-bin histograms need some pixels
NMI_BINS = 32
NMI_SAMPLES = 10_000  # about this many fixed pixels are compared per evaluation
_SMOOTH_SIGMA = 1.0  # Gaussian pre-smoothing for the NMI refinement (fewer interpolation artefacts)


def _grey(image, name: str) -> np.ndarray:
    """A float64 (H, W) image in [0, 1]: grey as is, RGB/RGBA reduced to BT.601 luminance."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = normalise(a[..., :3], name).data.astype(np.float64)
        a = luma(a)
    elif a.ndim == 2:
        a = normalise(a, name).data.astype(np.float64)
    else:
        raise ValueError(f"{name}: expected a 2D grey image (H, W) or a colour image (H, W, 3|4), "
                         f"got shape {a.shape}; for volumes check one slice at a time")
    check_min_size(a.shape, name, MIN_SIZE, "alignment estimation")
    return a


def rotation_matrix(rotation_deg: float) -> np.ndarray:
    """2x2 matrix on (row, col) turning content clockwise as displayed for positive angles."""
    t = np.deg2rad(rotation_deg)
    c, s = np.cos(t), np.sin(t)
    # (x, y) -> (c x - s y, s x + c y), written on (y, x) = (row, col)
    return np.array([[c, s], [-s, c]])


def transform_matrix(rotation_deg: float, shift, center) -> np.ndarray:
    """3x3 homogeneous (row, col) matrix of q = R (p - center) + center + shift."""
    r = rotation_matrix(rotation_deg)
    center = np.asarray(center, float)
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = center - r @ center + np.asarray(shift, float)
    return m


def displacement_rms(matrix: np.ndarray, mask: np.ndarray, reference=None) -> float:
    """RMS over ``mask`` pixels of |T(p) - T_ref(p)| (T_ref = identity when None), in pixels."""
    pts = np.argwhere(mask).astype(float)
    ref = np.eye(3) if reference is None else np.asarray(reference, float)
    d = (pts @ (matrix[:2, :2] - ref[:2, :2]).T) + (matrix[:2, 2] - ref[:2, 2])
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1)))) if len(pts) else 0.0


def _foreground(img: np.ndarray) -> np.ndarray:
    """Pixels above Otsu's threshold (the anatomy, not the background); all if that is empty."""
    from skimage.filters import threshold_otsu

    if np.ptp(img) == 0:
        return np.ones(img.shape, bool)
    mask = img > threshold_otsu(img)
    return mask if mask.any() else np.ones(img.shape, bool)


def _gradient_magnitude(img: np.ndarray) -> np.ndarray:
    from skimage.filters import sobel

    return sobel(ndi.gaussian_filter(img, 1.0))


def _pad_to(img: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape, img.dtype)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def _rotation_candidates(gf: np.ndarray, gm: np.ndarray) -> list[float]:
    """Clockwise angles (deg) from log-polar phase correlation of the Fourier magnitudes; the
    magnitude spectrum is symmetric, so the angle is known modulo 180 (both are returned)."""
    from skimage.filters import window
    from skimage.registration import phase_cross_correlation
    from skimage.transform import warp_polar

    shape = tuple(max(a, b) for a, b in zip(gf.shape, gm.shape, strict=True))
    spectra = []
    for g in (gf, gm):
        g = _pad_to(g * window("hann", g.shape), shape)
        spectra.append(np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(g)))))
    radius = min(shape) // 2
    n_angles = 360
    polar = [warp_polar(s, radius=radius, output_shape=(n_angles, radius), scaling="log",
                        order=1) for s in spectra]
    # keep half the angles (the other half repeats them) and leave out the lowest frequencies,
    # where the window's own spectrum dominates
    lo = radius // 8
    pf, pm = (p[: n_angles // 2, lo:] for p in polar)
    shifts, _, _ = phase_cross_correlation(pf, pm, upsample_factor=20, normalization=None)
    # a clockwise turn of the image turns its spectrum clockwise too: rows of the polar image
    # run with the angle measured clockwise (rows down), so the content moved by -shift rows
    cw = -shifts[0] * 360.0 / n_angles
    return [_wrap(cw), _wrap(cw + 180.0)]


def _wrap(angle: float) -> float:
    return float((angle + 180.0) % 360.0 - 180.0)


def _resample(moving: np.ndarray, matrix: np.ndarray, shape, order: int = 1,
              cval: float = 0.0) -> np.ndarray:
    return ndi.affine_transform(moving, matrix, output_shape=shape, order=order, cval=cval,
                                mode="constant")


def _translation_for(fixed_g, moving_g, angle, center) -> np.ndarray:
    """With the rotation undone, phase-correlate gradient magnitudes for the shift."""
    from skimage.registration import phase_cross_correlation

    # canvas large enough for any shift up to the larger image's size without wrapping
    big = tuple(2 * max(a, b) for a, b in zip(fixed_g.shape, moving_g.shape, strict=True))
    g = _resample(moving_g, transform_matrix(angle, (0.0, 0.0), center), big)
    f = _pad_to(fixed_g, big)
    u, _, _ = phase_cross_correlation(f, g, upsample_factor=10, normalization="phase")
    # phase_cross_correlation returns the shift that moves g onto f: g(p) = f(p + u),
    # so the moving content sits at p - u in the de-rotated frame; back in moving pixels:
    return rotation_matrix(angle) @ (-np.asarray(u, float))


class _NMI:
    """Normalised mutual information (H(F) + H(M)) / H(F, M) of fixed and resampled moving,
    32 bins, linear (first-order B-spline) Parzen windows so that it varies smoothly."""

    def __init__(self, fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray | None = None):
        self.fixed = ndi.gaussian_filter(fixed, _SMOOTH_SIGMA)
        self.moving = ndi.gaussian_filter(moving, _SMOOTH_SIGMA)
        sel = np.zeros(fixed.shape, bool)
        # a regular subsample of the fixed pixels keeps each evaluation cheap
        step = max(1, round(np.sqrt(fixed.size / NMI_SAMPLES)))
        sel[::step, ::step] = True
        if mask is not None:
            sel &= mask
        self.pts = np.argwhere(sel).astype(float)  # fixed pixels used
        self.fvals = self.fixed[sel]
        self.center = (np.asarray(fixed.shape, float) - 1) / 2
        self.mshape = np.asarray(moving.shape, float)

    def __call__(self, params) -> float:
        angle, dy, dx = params
        m = transform_matrix(angle, (dy, dx), self.center)
        q = self.pts @ m[:2, :2].T + m[:2, 2]
        inside = np.all((q >= 0) & (q <= self.mshape - 1), axis=1)
        if inside.sum() < 64:
            return 0.0
        mv = ndi.map_coordinates(self.moving, q[inside].T, order=1, mode="nearest")
        return _nmi(self.fvals[inside], mv)


def _nmi(a: np.ndarray, b: np.ndarray, bins: int = NMI_BINS) -> float:
    def split(v):
        x = np.clip(v, 0.0, 1.0) * (bins - 1)
        i0 = np.minimum(np.floor(x).astype(np.int64), bins - 2)
        return i0, x - i0

    ia, wa = split(a)
    ib, wb = split(b)
    joint = np.zeros(bins * bins)
    for da, wa_ in ((0, 1 - wa), (1, wa)):
        for db, wb_ in ((0, 1 - wb), (1, wb)):
            joint += np.bincount((ia + da) * bins + ib + db, weights=wa_ * wb_,
                                 minlength=bins * bins)
    joint = joint.reshape(bins, bins) / joint.sum()

    def h(p):
        p = p[p > 0]
        return -np.sum(p * np.log(p))

    hj = h(joint)
    return float((h(joint.sum(1)) + h(joint.sum(0))) / hj) if hj > 0 else 0.0


def estimate_misalignment(fixed, moving, tolerance_px: float = DEFAULT_TOLERANCE_PX,
                          refine: bool = True, moving_offset=(0.0, 0.0)) -> dict:
    """Estimate the rigid misalignment of ``moving`` relative to ``fixed`` (2D, grey or RGB;
    sizes may differ). See the module docstring for the conventions.

    moving_offset: where the moving image's first pixel is drawn, in fixed pixels, when the two
    are shown with the same pixel size (napari: (moving.translate - fixed.translate) / scale).
    error_px and aligned then measure the misalignment as displayed; shift and matrix stay in
    array index coordinates (what resampling needs).

    Returns a dict: shift (dy, dx), rotation_deg, center (row, col), matrix (3x3, fixed pixel
    -> moving pixel), error_px (RMS displacement of the fixed image's foreground pixels, Otsu
    mask), max_error_px, aligned (error_px <= tolerance_px), tolerance_px, nmi_identity and
    nmi (normalised mutual information, 1..2, before/after), method.
    """
    f = _grey(fixed, "fixed")
    m = _grey(moving, "moving")
    if not np.isfinite(tolerance_px) or tolerance_px < 0:
        raise ValueError(f"tolerance_px: must be a number >= 0, got {tolerance_px!r}")
    offset = np.asarray(moving_offset, float)
    if offset.shape != (2,) or not np.isfinite(offset).all():
        raise ValueError(f"moving_offset: expected (dy, dx), got {moving_offset!r}")
    center = (np.asarray(f.shape, float) - 1) / 2
    gf, gm = _gradient_magnitude(f), _gradient_magnitude(m)
    fg = _foreground(f)
    score = _NMI(f, m)

    candidates = [(0.0, 0.0, 0.0)]
    for angle in _rotation_candidates(gf, gm) + [0.0]:
        dy, dx = _translation_for(gf, gm, angle, center)
        candidates.append((angle, float(dy), float(dx)))
    scores = [score(c) for c in candidates]
    best = np.asarray(candidates[int(np.argmax(scores))], float)
    if refine:
        res = minimize(lambda p: -score(p), best, method="Powell",
                       options={"xtol": 1e-3, "ftol": 1e-7, "maxfev": 2000})
        if -res.fun >= max(scores):
            best = res.x
    angle, dy, dx = (float(v) for v in best)
    angle = _wrap(angle)
    matrix = transform_matrix(angle, (dy, dx), center)
    pts = np.argwhere(fg).astype(float)
    disp = pts @ (matrix[:2, :2] - np.eye(2)).T + matrix[:2, 2] + offset
    norms = np.sqrt(np.sum(disp * disp, axis=1))
    error = float(np.sqrt(np.mean(norms**2)))
    return {
        "shift": (dy, dx),
        "rotation_deg": angle,
        "center": (float(center[0]), float(center[1])),
        "matrix": matrix,
        "error_px": error,
        "max_error_px": float(norms.max()),
        "aligned": bool(error <= tolerance_px),
        "tolerance_px": float(tolerance_px),
        "nmi_identity": score((0.0, 0.0, 0.0)),
        "nmi": score((angle, dy, dx)),
        "fixed_shape": tuple(f.shape),
        "moving_shape": tuple(m.shape),
        "moving_offset": (float(offset[0]), float(offset[1])),
        "method": "log-polar + gradient phase correlation (scikit-image), refined by "
                  "normalised mutual information (scipy Powell)",
    }


def _cast(out: np.ndarray, dtype, preserve_dtype: bool) -> np.ndarray:
    if preserve_dtype and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(dtype)
    return out.astype(np.float32, copy=False)


def apply_rigid(moving, transform: dict, output_shape, order: int = 1,
                preserve_dtype: bool = False) -> np.ndarray:
    """Resample ``moving`` (H, W) or (H, W, C) with ``transform['matrix']`` onto a grid of
    ``output_shape`` (H, W). float32 in moving's value range (preserve_dtype: integer inputs
    are rounded back to their dtype); pixels from outside are 0."""
    a = np.asarray(moving)
    mat = np.asarray(transform["matrix"], float)
    shape = tuple(int(s) for s in output_shape[:2])
    data = a.astype(np.float32) if a.dtype != np.float64 else a
    if a.ndim == 2:
        out = _resample(data, mat, shape, order)
    elif a.ndim == 3:
        out = np.stack([_resample(data[..., c], mat, shape, order)
                        for c in range(a.shape[-1])], -1)
    else:
        raise ValueError(f"moving: expected (H, W) or (H, W, C), got shape {a.shape}")
    return _cast(out, a.dtype, preserve_dtype)


def apply_rigid_planes(moving, transform: dict, plane_axes=(-2, -1), rgb: bool = False,
                       order: int = 1, preserve_dtype: bool = False) -> np.ndarray:
    """Apply one 2D ``transform`` (from :func:`estimate_misalignment`) to every plane of an nD
    ``moving`` array (a volume, a time series; ``rgb``: a last colour axis): the planes along
    ``plane_axes`` are resampled onto the fixed plane's grid (transform['fixed_shape']), every
    other axis is kept. Planes are read one at a time (dask arrays work). float32, or moving's
    integer dtype with preserve_dtype."""
    shape = tuple(int(n) for n in np.shape(moving))
    nsp = len(shape) - (1 if rgb else 0)
    if nsp < 2:
        raise ValueError(f"moving: expected at least 2 spatial axes, got shape {shape}")
    axes = tuple(int(a) % nsp for a in plane_axes)
    if len(set(axes)) != 2:
        raise ValueError(f"plane_axes: two different spatial axes needed, got {plane_axes}")
    fh, fw = transform["fixed_shape"]
    loop = [a for a in range(nsp) if a not in axes]
    out_sp = [shape[a] for a in range(nsp)]
    out_sp[axes[0]], out_sp[axes[1]] = int(fh), int(fw)
    dtype = np.dtype(moving.dtype) if hasattr(moving, "dtype") else np.asarray(moving).dtype
    keep = preserve_dtype and np.issubdtype(dtype, np.integer)
    out = np.zeros(tuple(out_sp) + ((shape[-1],) if rgb else ()), dtype if keep else np.float32)
    for idx in np.ndindex(*[shape[a] for a in loop]):
        index: list = [slice(None)] * nsp
        for a, i in zip(loop, idx, strict=True):
            index[a] = i
        plane = np.asarray(moving[tuple(index)])
        if axes[0] > axes[1]:
            plane = np.swapaxes(plane, 0, 1)
        res = apply_rigid(plane, transform, (fh, fw), order, preserve_dtype=keep)
        if axes[0] > axes[1]:
            res = np.swapaxes(res, 0, 1)
        out[tuple(index)] = res
    return out


def register_rigid(fixed, moving, tolerance_px: float = DEFAULT_TOLERANCE_PX,
                   order: int = 1, preserve_dtype: bool = False) -> tuple[np.ndarray, dict]:
    """Rigidly register ``moving`` onto ``fixed``: returns (registered, transform) where
    ``registered`` is moving resampled on fixed's grid (shape fixed.shape[:2] (+ moving's
    channels), float32 in moving's value range or moving's integer dtype with preserve_dtype,
    0 where moving has no data; linear interpolation by default) and ``transform`` is
    :func:`estimate_misalignment`'s dict plus ``residual``, the alignment check re-run on the
    result. Inputs are not modified."""
    est = estimate_misalignment(fixed, moving, tolerance_px)
    registered = apply_rigid(moving, est, np.shape(fixed)[:2], order, preserve_dtype)
    est["residual"] = estimate_misalignment(fixed, registered, tolerance_px)
    return registered, est
