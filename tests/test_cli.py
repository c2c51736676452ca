"""The cscfusion command line: real files in, TIFF with metadata out, clear errors."""

import numpy as np
import pytest
import tifffile

from napari_cscfusion.cli import main
from napari_cscfusion.engine.io import read_tiff_metadata, write_tiff

from ._shared import CKPT, DATA, needs_shared, read


def test_devices_lists_cpu(capsys):
    assert main(["devices"]) == 0
    assert "cpu" in capsys.readouterr().out.split()


@needs_shared
def test_fuse_mef_writes_tiff_with_metadata_and_codes(tmp_path, capsys):
    paths = []
    for i in (2, 7, 12):
        p = tmp_path / f"e{i}.png"
        import imageio.v3 as iio

        iio.imwrite(p, read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[:48, :40, :3])
        paths.append(str(p))
    out, codes = tmp_path / "fused.tif", tmp_path / "codes.tif"
    rc = main(["fuse", "mef", *paths, "-o", str(out), "--codes-out", str(codes),
               "--weights", str(CKPT / "csc_mefn_authors.pth"), "--device", "cpu"])
    assert rc == 0
    img = tifffile.imread(out)
    assert img.shape == (48, 40, 3) and img.dtype == np.float32
    meta = read_tiff_metadata(out)
    assert meta["network"] == "CSC-MEFN" and meta["device"] == "cpu"
    assert len(meta["weights_sha256"]) == 64
    assert read_tiff_metadata(codes)["codes"] == ["exposure_0", "exposure_1", "exposure_2"]
    assert tifffile.imread(codes).shape == (3, 24, 48, 40)  # (exposure, q, H, W)
    assert "wrote" in capsys.readouterr().out


def test_fuse_reports_missing_file(tmp_path, capsys):
    rc = main(["fuse", "ivf", str(tmp_path / "nope.png"), str(tmp_path / "nope2.png"),
               "-o", str(tmp_path / "x.tif")])
    assert rc == 2
    assert "nope.png" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists()


def test_write_tiff_leaves_no_partial_file(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        write_tiff(tmp_path / "missing" / "f.tif", np.zeros((4, 4), np.float32))

    target = tmp_path / "f.tif"
    with pytest.raises((TypeError, ValueError, KeyError)):  # tifffile cannot store objects
        write_tiff(target, np.zeros((4, 4), object))
    assert list(tmp_path.iterdir()) == []
    write_tiff(target, np.ones((4, 4), np.float32), {"task": "ivf"})
    assert read_tiff_metadata(target) == {"task": "ivf"}


def test_out_of_memory_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import napari_cscfusion.cli as cli

    def exhausted(args):
        raise MemoryError

    monkeypatch.setattr(cli, "cmd_devices", exhausted)
    assert main(["devices"]) == 3
    assert "out of memory" in capsys.readouterr().err


def _mef_args(tmp_path, *extra):
    """A small bracket as PNGs and the fuse arguments for it."""
    import imageio.v3 as iio

    from napari_cscfusion.engine.registry import packaged_weights_path

    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"e{i}.png"))
        iio.imwrite(paths[-1], (rng.random((96, 80)) * 255).astype(np.uint8))
    weights = CKPT / "csc_mefn_authors.pth"
    if not weights.is_file():
        if not packaged_weights_path("mef").is_file():
            pytest.skip("no MEF weights")
        weights = packaged_weights_path("mef")
    return ["fuse", "mef", *paths, "-o", str(tmp_path / "fused.tif"), "--weights",
            str(weights), *extra]


def _oom_on(monkeypatch, device_type=None, pixels=0):
    """Every convolution on more than ``pixels`` pixels (on ``device_type``) runs out of
    memory, as on a GPU too small for the tiles."""
    import torch
    import torch.nn.functional as F

    real = F.conv2d

    def conv2d(x, *args, **kwargs):
        if (device_type is None or x.device.type == device_type) and \
                x.shape[-2] * x.shape[-1] > pixels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)


def test_out_of_memory_retries_are_noticed_on_stderr(monkeypatch, capsys, tmp_path):
    args = _mef_args(tmp_path, "--device", "cpu", "--tile", "0", "-q")
    _oom_on(monkeypatch, pixels=96 * 80 - 1)  # the whole image does not fit, half of it does
    line = ("cscfusion: warning: out of memory on cpu with the whole 96x80 image; retried "
            "with tiles of 48 px")
    for _ in range(2):  # each run says so (not once per process)
        assert main(args) == 0
        assert capsys.readouterr().err.strip() == line
    meta = read_tiff_metadata(tmp_path / "fused.tif")
    assert meta["notices"] == [line.removeprefix("cscfusion: warning: ")]
    assert meta["device"] == "cpu"


def test_out_of_memory_on_the_gpu_runs_on_the_cpu_and_says_so(monkeypatch, capsys, tmp_path):
    """No GPU needed: 'cuda' resolves to the meta device (weights left on the CPU), where every
    convolution runs out of memory (see test_reliability for the engine's side)."""
    import torch

    from napari_cscfusion.engine import mef
    from napari_cscfusion.engine.registry import FusionModel

    want_args = _mef_args(tmp_path, "--device", "cpu", "-q")
    assert main(want_args) == 0
    want = tifffile.imread(tmp_path / "fused.tif")
    capsys.readouterr()
    fake, real_resolve, real_on = torch.device("meta"), mef.resolve_device, \
        FusionModel.network_on
    monkeypatch.setattr(mef, "resolve_device",
                        lambda d: fake if d == "cuda" else real_resolve(d))
    monkeypatch.setattr(FusionModel, "network_on",
                        lambda self, d: real_on(self, torch.device("cpu") if d == fake else d))
    _oom_on(monkeypatch, device_type="meta")
    assert main(_mef_args(tmp_path, "--device", "cuda")) == 0
    captured = capsys.readouterr()
    assert "cscfusion: warning: out of memory on meta even with 48 px tiles; ran on the CPU " \
           "instead (slower)" in captured.err
    assert "CSC-MEFN, cpu," in captured.out  # the 'wrote ...' line names the device used
    assert read_tiff_metadata(tmp_path / "fused.tif")["device"] == "cpu"
    np.testing.assert_allclose(tifffile.imread(tmp_path / "fused.tif"), want, atol=1e-5)


def test_fuse_ivf_code_gain(tmp_path, capsys):
    """--code-gain reaches the engine (metadata), is checked by it, and is ivf only."""
    import imageio.v3 as iio

    from ._shared import grey, medical_image

    src = tmp_path / "t1.png"
    t1 = grey(read(medical_image("BrainT1Slice.png")))[60:124, 50:114]
    iio.imwrite(src, t1)
    out = tmp_path / "fused.tif"
    base = ["fuse", "ivf", str(src), str(src), "-o", str(out), "--device", "cpu",
            "--base-rule", "l1", "-q"]
    assert main(base + ["--code-gain", "1"]) == 0
    assert read_tiff_metadata(out)["code_gain"] == 1.0
    one = tifffile.imread(out)
    assert main(base) == 0
    assert read_tiff_metadata(out)["code_gain"] == 2.0  # the function's default
    assert np.abs(tifffile.imread(out) - one).mean() > 0.01
    capsys.readouterr()
    assert main(base + ["--code-gain", "0"]) == 2
    assert "code_gain" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--code-gain is for ivf and medical only"):
        main(["fuse", "mef", str(src), str(src), "-o", str(out), "--code-gain", "1"])


@needs_shared
def test_fuse_asks_the_engine_for_no_weight_maps_and_writes_the_same_image(
        monkeypatch, tmp_path):
    """The CLI writes only the image (and codes): the IVF weight maps alone would be 1 GB of
    an 8192x8192 pair's memory. Dropping them must not change the image."""
    import imageio.v3 as iio

    from napari_cscfusion import cli
    from napari_cscfusion.engine import batch, fuse_exposures, fuse_infrared_visible

    from ._shared import grey

    asked = []

    def recording(fuse):
        def wrapper(*a, **kw):
            asked.append(kw.get("weights", True))
            return fuse(*a, **kw)
        return wrapper

    monkeypatch.setattr(batch, "fuse_infrared_visible", recording(fuse_infrared_visible))
    monkeypatch.setattr(batch, "fuse_exposures", recording(fuse_exposures))
    ir = grey(read(DATA / "ivf" / "tno" / "IR1.png"))[100:164, 200:264]
    vis = grey(read(DATA / "ivf" / "tno" / "VIS1.png"))[100:164, 200:264]
    frames = [read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[:48, :40, :3]
              for i in (2, 7, 12)]
    paths = {}
    for name, a in {"ir": ir, "vis": vis, **{f"e{i}": f for i, f in enumerate(frames)}}.items():
        paths[name] = str(tmp_path / f"{name}.png")
        iio.imwrite(paths[name], a)
    out = tmp_path / "fused.tif"
    mefn = ["--weights", str(CKPT / "csc_mefn_authors.pth")]
    assert main(["fuse", "ivf", paths["ir"], paths["vis"], "-o", str(out), "--device",
                 "cpu", "--tile", "32", "-q"]) == 0
    ivf_image = tifffile.imread(out)
    assert main(["fuse", "mef", paths["e0"], paths["e1"], paths["e2"], "-o", str(out),
                 "--device", "cpu", "-q", *mefn]) == 0
    assert asked == [False, False]
    ref = fuse_infrared_visible(ir, vis, device="cpu", tile=32)
    assert ref.weights  # the engine's default keeps them
    np.testing.assert_allclose(ivf_image, ref.image, atol=1e-6, rtol=0)
    mef_ref = fuse_exposures(np.stack([iio.imread(paths[f"e{i}"]) for i in range(3)]),
                             model=cli.load_model("mef", mefn[1]), device="cpu")
    np.testing.assert_allclose(tifffile.imread(out), mef_ref.image, atol=1e-6, rtol=0)
