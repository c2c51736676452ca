"""Command-line paths users hit that test_cli.py does not: ``fuse mmf`` with ``--codes-out``, the
exit statuses (0 done, 2 bad input / missing device, 130 cancelled), the installed ``cscfusion``
console script and ``python -m napari_cscfusion`` in a subprocess, ``--version``, ``train``
through ``main``, and the automatic streaming of TIFF inputs over ``STREAM_BYTES``."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_cscfusion import cli, fuse_guided, fuse_infrared_visible, load_model
from napari_cscfusion.engine import Cancelled, batch
from napari_cscfusion.engine.io import read_tiff_metadata

from ._shared import MMF_AUTHORS_GEOMETRY, SAMPLES, grey, read, shared_path


def _missing_device() -> str:
    import torch

    return "mps" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture(scope="module")
def mmf_inputs(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """TNO sample 3: the infrared crop area-downsampled x4 (low-res PNG) and the visible crop
    (guide PNG)."""
    folder = tmp_path_factory.mktemp("mmf")
    ir = grey(read(SAMPLES / "tno_03_ir.png"))[200:264, 300:380]
    guide = grey(read(SAMPLES / "tno_03_vis.png"))[200:264, 300:380]
    low = np.round(ir.reshape(16, 4, 20, 4).mean((1, 3))).astype(np.uint8)
    iio.imwrite(folder / "low.png", low)
    iio.imwrite(folder / "guide.png", guide)
    return folder / "low.png", folder / "guide.png", low, guide


@pytest.fixture(scope="module")
def ivf_inputs(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("ivf")
    ir = grey(read(SAMPLES / "tno_01_ir.png"))[200:248, 300:356]
    vis = grey(read(SAMPLES / "tno_01_vis.png"))[200:248, 300:356]
    iio.imwrite(folder / "ir.png", ir)
    iio.imwrite(folder / "vis.png", vis)
    return folder / "ir.png", folder / "vis.png", ir, vis


def test_fuse_mmf_writes_the_image_and_its_codes(mmf_inputs, tmp_path, capsys):
    low_path, guide_path, low, guide = mmf_inputs
    out, codes_out = tmp_path / "sr.tif", tmp_path / "codes.tif"
    assert cli.main(["fuse", "mmf", str(low_path), str(guide_path), "-o", str(out),
                     "--codes-out", str(codes_out), "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    want = fuse_guided(low, guide, device="cpu", codes=True)
    image = tifffile.imread(out)
    assert image.shape == guide.shape and image.dtype == np.float32
    np.testing.assert_allclose(image, want.image, atol=1e-6, rtol=0)
    meta = read_tiff_metadata(out)
    assert meta["network"] == "CSC-MMFN" and meta["scale"] == [4.0, 4.0]
    # the packaged network (low_res_detail geometry) codes the low-res input at its own
    # size: codes of two sizes, one file per code kind, each (1, q, H, W), its name in the
    # file's metadata
    names = sorted(want.codes)
    assert names == ["fused", "guide", "low_res"] and want.codes["low_res"].shape[1:] == low.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"codes_{n}.tif" for n in names] \
        + ["sr.tif"]
    for n in names:
        path = tmp_path / f"codes_{n}.tif"
        got = tifffile.imread(path)
        assert got.shape == (1, *want.codes[n].shape)
        np.testing.assert_allclose(got[0], want.codes[n], atol=1e-6, rtol=0)
        assert read_tiff_metadata(path)["codes"] == [n]
    # weights trained on bicubic pre-upsampled input (the previous packaged file): every code
    # has the guide's size: one (name, q, H, W) array, read back in that shape, the names in
    # the metadata in the order of its first axis
    previous = tmp_path / "previous"
    previous.mkdir()
    codes_out = previous / "codes.tif"
    assert cli.main(["fuse", "mmf", str(low_path), str(guide_path), "-o",
                     str(previous / "sr.tif"), "--codes-out", str(codes_out), "--device", "cpu",
                     "--weights", str(MMF_AUTHORS_GEOMETRY), "-q"]) == 0
    want = fuse_guided(low, guide, load_model("mmf", MMF_AUTHORS_GEOMETRY), device="cpu",
                       codes=True)
    names = sorted(want.codes)
    assert len(names) >= 2 and {want.codes[n].shape[1:] for n in names} == {guide.shape}
    stacked = tifffile.imread(codes_out)
    q = want.codes[names[0]].shape[0]
    assert stacked.shape == (len(names), q, *guide.shape)
    np.testing.assert_allclose(stacked, np.stack([want.codes[n] for n in names]), atol=1e-6,
                               rtol=0)
    meta = read_tiff_metadata(codes_out)
    assert meta["codes"] == names and meta["axes"] == "ICYX"
    assert sorted(p.name for p in previous.iterdir()) == ["codes.tif", "sr.tif"]


def test_codes_of_several_shapes_go_one_file_per_name(tmp_path):
    """(The packaged CSC-MMFN makes codes of two sizes: its low-res codes.) Each
    file holds (1, q, H, W) and names its code."""
    from napari_cscfusion.engine.io import write_codes

    rng = np.random.default_rng(0)
    codes = {"low": rng.standard_normal((4, 6, 8), np.float32),
             "fused": rng.standard_normal((3, 12, 16), np.float32)}
    written = write_codes(tmp_path / "codes.tif", codes, {"network": "X"})
    assert sorted(p.name for p in written) == ["codes_fused.tif", "codes_low.tif"]
    for name, code in codes.items():
        path = tmp_path / f"codes_{name}.tif"
        np.testing.assert_array_equal(tifffile.imread(path), code[None])
        meta = read_tiff_metadata(path)
        assert meta["codes"] == [name] and meta["network"] == "X"


def test_fuse_mmf_bad_input_is_exit_status_2_naming_the_argument(mmf_inputs, tmp_path,
                                                                  capsys):
    low_path, guide_path, _low, _guide = mmf_inputs
    out = tmp_path / "sr.tif"
    # the guide smaller than the low-res image: arguments swapped
    assert cli.main(["fuse", "mmf", str(guide_path), str(low_path), "-o", str(out)]) == 2
    assert "guide: must be at least as large" in capsys.readouterr().err
    assert cli.main(["fuse", "mmf", str(low_path), str(guide_path), "-o", str(out),
                     "--device", _missing_device()]) == 2
    err = capsys.readouterr().err
    assert "not available on this machine" in err and "cpu" in err
    with pytest.raises(SystemExit, match="LOWRES then GUIDE"):
        cli.main(["fuse", "mmf", str(low_path), "-o", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_a_cancelled_run_is_exit_status_130_and_writes_nothing(ivf_inputs, tmp_path,
                                                                monkeypatch, capsys):
    """The engine raises Cancelled when its progress callback says so (the GUI's Cancel; a
    caller's own callback): the command line reports it and exits with 130, as for Ctrl-C."""
    ir_path, vis_path, _ir, _vis = ivf_inputs
    # the command line fuses through engine.batch.fuse_sources, which looks the function up there
    real, steps = batch.fuse_infrared_visible, []

    def cancelled_after_the_first_step(*args, progress=None, **kwargs):
        def cancelling(done, total):
            steps.append(done)
            if progress is not None:  # the command line's own progress bar
                progress(done, total)
            if done >= 1:  # after the first tile
                raise Cancelled("cancelled by the user")

        return real(*args, progress=cancelling, **kwargs)

    monkeypatch.setattr(batch, "fuse_infrared_visible", cancelled_after_the_first_step)
    rc = cli.main(["fuse", "ivf", str(ir_path), str(vis_path), "-o", str(tmp_path / "f.tif"),
                   "--device", "cpu", "--tile", "24"])
    assert rc == 130 and steps == [0, 1]
    assert "cscfusion: cancelled" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _run(*args, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_installed_console_script(ivf_inputs, tmp_path):
    script = Path(sys.executable).parent / "cscfusion"
    assert script.is_file(), "the cscfusion console script is not installed"
    res = _run(str(script), "--version")
    assert res.returncode == 0 and res.stdout.strip() == \
        f"napari-cscfusion {version('napari-cscfusion')}"
    res = _run(str(script), "devices")
    assert res.returncode == 0 and "cpu" in res.stdout.split()
    ir_path, vis_path, ir, vis = ivf_inputs
    out = tmp_path / "fused.tif"
    res = _run(str(script), "fuse", "ivf", str(ir_path), str(vis_path), "-o", str(out),
               "--device", "cpu", "--base-rule", "l1")
    assert res.returncode == 0, res.stderr
    want = fuse_infrared_visible(ir, vis, base_rule="l1", device="cpu").image
    np.testing.assert_allclose(tifffile.imread(out), want, atol=1e-5, rtol=0)
    res = _run(str(script), "fuse", "ivf", str(ir_path), "-o", str(out))
    assert res.returncode == 1 and "needs exactly two images" in res.stderr
    res = _run(str(script), "fuse", "nope", "a.png")
    assert res.returncode == 2 and "invalid choice" in res.stderr  # argparse usage error


def test_python_dash_m_napari_cscfusion(mmf_inputs, tmp_path):
    res = _run(sys.executable, "-m", "napari_cscfusion", "--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == \
        f"napari-cscfusion {version('napari-cscfusion')}"
    low_path, guide_path, _low, _guide = mmf_inputs
    res = _run(sys.executable, "-m", "napari_cscfusion", "fuse", "mmf", str(low_path),
               str(guide_path), "-o", str(tmp_path / "sr.tif"), "--device", _missing_device(),
               cwd=tmp_path)
    assert res.returncode == 2 and "not available on this machine" in res.stderr
    assert not (tmp_path / "sr.tif").exists()


def test_train_through_main(tmp_path, capsys):
    """``cscfusion train``: one tiny MEF epoch on the training data; the weights file says
    how it was made and loads."""
    from napari_cscfusion.models import load_network

    data = shared_path("data/mef/hdr").parents[1]
    out = tmp_path / "mef.pt"
    assert cli.main(["train", "mef", "--out", str(out), "--data-root", str(data),
                     "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                     "--crop", "24", "--device", "cpu", "--seed", "4", "--no-progress",
                     "--threads", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    net, info = load_network("mef", out)
    tr = info["header"]["training"]
    assert tr["seed"] == 4 and tr["epochs"] == 1 and tr["crop"] == 24
    assert info["header"]["task"] == "mef"


def _tiff_pair(folder: Path, size=(96, 80)) -> tuple[Path, Path]:
    rng = np.random.default_rng(6)
    paths = []
    for name in ("ir.tif", "vis.tif"):
        paths.append(folder / name)
        tifffile.imwrite(paths[-1], (rng.random(size) * 255).astype(np.uint8))
    return paths[0], paths[1]


def test_tiff_inputs_over_the_threshold_are_streamed_automatically(tmp_path, monkeypatch,
                                                                    capsys):
    ir_path, vis_path = _tiff_pair(tmp_path)
    size = ir_path.stat().st_size  # 96 x 80 bytes of image data in each
    args = ["fuse", "ivf", str(ir_path), str(vis_path), "--device", "cpu", "--tile", "32",
            "--base-rule", "l1"]
    streamed = []
    real_stream = cli.cmd_fuse_stream
    monkeypatch.setattr(cli, "cmd_fuse_stream",
                        lambda a, m: streamed.append(a.output) or real_stream(a, m))
    monkeypatch.setattr(cli, "STREAM_BYTES", 96 * 80)  # not over: in memory
    assert cli.main([*args, "-o", str(tmp_path / "memory.tif")]) == 0
    assert streamed == [] and "streamed" not in capsys.readouterr().out
    monkeypatch.setattr(cli, "STREAM_BYTES", 96 * 80 - 1)  # one byte over: streamed
    assert cli.main([*args, "-o", str(tmp_path / "stream.tif")]) == 0
    assert streamed == [str(tmp_path / "stream.tif")]
    assert "(streamed, tile 32)" in capsys.readouterr().out
    np.testing.assert_allclose(tifffile.imread(tmp_path / "stream.tif"),
                               tifffile.imread(tmp_path / "memory.tif"), atol=1e-5, rtol=0)
    # the same pixels as PNG are never streamed (only TIFFs can be read lazily), nor is mmf
    for name in ("ir", "vis"):
        iio.imwrite(tmp_path / f"{name}.png", tifffile.imread(tmp_path / f"{name}.tif"))
    assert cli.main(["fuse", "ivf", str(tmp_path / "ir.png"), str(tmp_path / "vis.png"),
                     "-o", str(tmp_path / "png.tif"), "--device", "cpu", "-q"]) == 0
    assert cli.main(["fuse", "mmf", str(ir_path), str(vis_path), "-o",
                     str(tmp_path / "mmf.tif"), "--device", "cpu", "-q"]) == 0
    assert streamed == [str(tmp_path / "stream.tif")] and size > 96 * 80
