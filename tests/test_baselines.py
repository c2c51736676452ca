"""Tests for napari_cscfusion.baselines."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from napari_cscfusion import baselines as B
from napari_cscfusion import metrics as M


@pytest.fixture(scope="module")
def camera():
    return data.camera()[::2, ::2].astype(np.float64) / 255.0  # 256x256, real photograph


@pytest.fixture(scope="module")
def pair(camera):
    """Two complementary real sources: left half blanked in one, right half in the other."""
    a = camera.copy()
    b = camera.copy()
    a[:, :128] = 0.5
    b[:, 128:] = 0.5
    return a, b


def _detail_ratio(f, ref, cols):
    """std of the high-pass (x - Gaussian_2(x)) of f over that of ref, on a column band."""
    from scipy.ndimage import gaussian_filter

    hf = (f - gaussian_filter(f, 2))[8:-8, cols]
    hr = (ref - gaussian_filter(ref, 2))[8:-8, cols]
    return hf.std() / hr.std()


def _in_unit(x):
    return x.dtype == np.float64 and x.min() >= 0.0 and x.max() <= 1.0


def test_average_fusion(pair):
    a, b = pair
    f = B.average_fusion([a, b])
    assert f.shape == a.shape and _in_unit(f)
    np.testing.assert_allclose(f, (a + b) / 2)
    # uint8 input is read as x/255
    f8 = B.average_fusion([(a * 255).round().astype(np.uint8)] * 2)
    np.testing.assert_allclose(f8, np.round(a * 255) / 255)
    with pytest.raises(ValueError):
        B.average_fusion([a, b[:10]])


def test_max_abs_fusion_modes(pair, camera):
    a, b = pair
    np.testing.assert_array_equal(B.max_abs_fusion([a, b], mode="intensity"), np.maximum(a, b))
    f = B.max_abs_fusion([a, b])
    assert f.shape == a.shape and _in_unit(f)
    # detail choose-max keeps each half's full texture; averaging halves it
    avg = B.average_fusion([a, b])
    for cols in (slice(8, 120), slice(136, 248)):
        assert _detail_ratio(f, camera, cols) > 0.85
        assert _detail_ratio(avg, camera, cols) == pytest.approx(0.5, abs=0.01)
    np.testing.assert_allclose(B.max_abs_fusion([camera, camera]), camera, atol=1e-12)
    with pytest.raises(ValueError):
        B.max_abs_fusion([a, b], mode="median")


def test_laplacian_pyramid_identical_sources_return_the_source(camera):
    f = B.laplacian_pyramid_fusion([camera, camera, camera], levels=4)
    np.testing.assert_allclose(f, camera, atol=1e-12)
    odd = camera[:101, :77]  # odd sizes must reconstruct too
    np.testing.assert_allclose(B.laplacian_pyramid_fusion([odd, odd], levels=5), odd, atol=1e-12)


def test_laplacian_pyramid_keeps_details_of_both(pair, camera):
    a, b = pair
    f = B.laplacian_pyramid_fusion([a, b])
    assert f.shape == a.shape and _in_unit(f)
    assert M.qabf([a, b], f) > M.qabf([a, b], B.average_fusion([a, b])) + 0.1
    # each half keeps (away from the seam) the full-contrast texture of the camera image
    for cols in (slice(8, 100), slice(156, 248)):
        assert _detail_ratio(f, camera, cols) > 0.85


def test_laplacian_pyramid_colour():
    rgb = data.astronaut()[::4, ::4].astype(np.float64) / 255.0
    dark = rgb * 0.5
    f = B.laplacian_pyramid_fusion([rgb, dark])
    assert f.shape == rgb.shape and _in_unit(f)
    np.testing.assert_allclose(B.laplacian_pyramid_fusion([rgb, rgb]), rgb, atol=1e-12)


def test_mertens_fusion():
    pytest.importorskip("cv2")
    rgb = data.astronaut()[::4, ::4].astype(np.float64) / 255.0
    # identical exposures: Mertens' weights are normalised, so the image comes back
    np.testing.assert_allclose(B.mertens_fusion(np.stack([rgb] * 3)), rgb, atol=2e-3)
    # a synthetic bracket (gain, clip): fusion beats the naive mean in MEF-SSIM
    stack = np.stack([np.clip(rgb * g, 0, 1) for g in (0.25, 1.0, 4.0)])
    f = B.mertens_fusion(stack)
    assert f.shape == rgb.shape and _in_unit(f)
    assert M.mef_ssim(stack, f) > M.mef_ssim(stack, stack.mean(0))
    grey = stack.mean(-1)
    fg = B.mertens_fusion(grey)
    assert fg.shape == grey.shape[1:] and _in_unit(fg)


def test_bicubic_upsample(camera):
    low = camera.reshape(128, 2, 128, 2).mean((1, 3))
    up = B.bicubic_upsample(low, (256, 256))
    assert up.shape == (256, 256) and _in_unit(up)
    np.testing.assert_allclose(B.bicubic_upsample(np.full((5, 7), 0.3), (10, 21)), 0.3)
    # Keys cubic (a=-0.75) with half-pixel centres, as OpenCV's INTER_CUBIC
    cv2 = pytest.importorskip("cv2")
    ref = cv2.resize(low.astype(np.float32), (256, 256), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(up[2:-2, 2:-2], np.clip(ref, 0, 1)[2:-2, 2:-2], atol=1e-5)
    rgb = np.random.default_rng(0).random((6, 8, 3))
    assert B.bicubic_upsample(rgb, (12, 16)).shape == (12, 16, 3)


def test_guided_filter_upsample(camera):
    low = camera.reshape(64, 4, 64, 4).mean((1, 3))
    out = B.guided_filter_upsample(low, camera)
    assert out.shape == camera.shape and _in_unit(out)
    # a guide that carries the target's edges must beat plain bicubic
    bic = B.bicubic_upsample(low, camera.shape)
    assert M.psnr(camera, out) > M.psnr(camera, bic) + 0.5
    # constant input stays constant whatever the guide
    np.testing.assert_allclose(B.guided_filter_upsample(np.full((64, 64), 0.4), camera), 0.4)
    with pytest.raises(ValueError):
        B.guided_filter_upsample(low, camera, shape=(100, 100))


def test_guided_filter_is_edge_preserving(camera):
    noisy = np.clip(camera + 0.05 * np.random.default_rng(1).standard_normal(camera.shape), 0, 1)
    out = B.guided_filter(camera, noisy, r=2, eps=1e-3)
    # guided by the clean image it denoises
    assert M.psnr(camera, out) > M.psnr(camera, noisy) + 3


def test_mertens_without_opencv_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError, match=r"napari-cscfusion\[benchmarks\]"):
        B.mertens_fusion(np.zeros((2, 8, 8)))


def test_baselines_module_does_not_import_cv2_or_napari_at_import_time():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(B))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"cv2", "napari", "qtpy", "magicgui"}
