"""Whole folders (engine.batch, ``cscfusion batch``) and ``cscfusion fuse medical``: pairing by
name, sorted brackets, skipping outputs, a bad file in the middle, formats, metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_cscfusion.cli import main
from napari_cscfusion.engine import (
    Cancelled,
    fuse_exposures,
    fuse_guided,
    fuse_infrared_visible,
    load_model,
)
from napari_cscfusion.engine.batch import plan_batch, run_batch
from napari_cscfusion.engine.io import read_image_metadata, read_tiff_metadata
from napari_cscfusion.engine.medical import fuse_multimodal

RNG = np.random.default_rng(19)
FAST = ["--device", "cpu", "--base-rule", "l1", "-q"]  # saliency is slow on a CPU


def noise(shape, seed):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def ivf_folders(tmp_path, stems=("a", "b", "c"), shape=(40, 48)):
    ir, vis = tmp_path / "IR", tmp_path / "VIS"
    ir.mkdir()
    vis.mkdir()
    for i, s in enumerate(stems):
        iio.imwrite(ir / f"{s}.png", noise(shape, i))
        iio.imwrite(vis / f"{s}.png", noise(shape, 100 + i))
    return ir, vis


def sample(name):
    from napari_cscfusion.gui._sample_data import sample_path

    return np.asarray(iio.imread(sample_path(name)))


# --- pairing ---------------------------------------------------------------------------------

def test_files_are_paired_by_name_and_missing_partners_are_items_with_a_problem(tmp_path):
    ir, vis = ivf_folders(tmp_path, stems=("scene2", "scene10"))
    iio.imwrite(ir / "only_ir.png", noise((8, 8), 0))
    (vis / "scene2.png").rename(vis / "scene2.tif")  # any extension pairs
    (vis / ".hidden.png").write_bytes(b"")
    (vis / "notes.txt").write_text("not an image")
    iio.imwrite(vis / "scene10.jpg", noise((8, 8), 1))  # a second file named scene10
    plan = plan_batch("ivf", [ir, vis], tmp_path / "out", "png")
    by_name = {i.name: i for i in plan.items}
    assert [i.name for i in plan.items] == ["only_ir", "scene2", "scene10"]  # natural order
    assert by_name["scene2"].inputs == (ir / "scene2.png", vis / "scene2.tif")
    assert by_name["scene2"].output == tmp_path / "out" / "scene2.png"
    assert by_name["scene2"].problem is None
    assert "no file named 'only_ir'" in by_name["only_ir"].problem
    assert str(vis) in by_name["only_ir"].problem
    assert "more than one file named 'scene10'" in by_name["scene10"].problem


def test_brackets_are_sub_folders_in_sorted_order_or_multi_page_tiffs(tmp_path):
    root = tmp_path / "brackets"
    (root / "hall").mkdir(parents=True)
    for name in ("e10.png", "e2.png", "e1.png"):
        iio.imwrite(root / "hall" / name, noise((16, 16, 3), len(name)))
    tifffile.imwrite(root / "garden.tif", noise((3, 16, 16), 5))
    iio.imwrite(root / "stray.png", noise((16, 16), 6))
    (root / "empty").mkdir()
    plan = plan_batch("mef", [root], tmp_path / "out")
    by_name = {i.name: i for i in plan.items}
    assert sorted(by_name) == ["empty", "garden", "hall", "stray"]
    assert [p.name for p in by_name["hall"].inputs] == ["e1.png", "e2.png", "e10.png"]
    assert by_name["garden"].inputs == (root / "garden.tif",)
    assert by_name["hall"].output == tmp_path / "out" / "hall.tif"
    assert "not a bracket" in by_name["stray"].problem
    assert "no image files" in by_name["empty"].problem


@pytest.mark.parametrize("task, n, match", [("ivf", 1, "needs 2 input folder"),
                                            ("mef", 2, "needs 1 input folder"),
                                            ("medical", 1, "two or more input folders")])
def test_a_batch_with_the_wrong_number_of_folders_is_refused(tmp_path, task, n, match):
    dirs = []
    for i in range(n):
        dirs.append(tmp_path / f"d{i}")
        dirs[-1].mkdir()
    with pytest.raises(ValueError, match=match):
        plan_batch(task, dirs, tmp_path / "out")


def test_the_output_folder_cannot_be_an_input_folder(tmp_path):
    ir, vis = ivf_folders(tmp_path)
    with pytest.raises(ValueError, match="is an input folder"):
        plan_batch("ivf", [ir, vis], vis)
    with pytest.raises(ValueError, match="inside the brackets folder"):
        plan_batch("mef", [ir], ir / "fused")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_batch("ivf", [ir, tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(ValueError, match="format"):
        plan_batch("ivf", [ir, vis], tmp_path / "out", "gif")


# --- running ---------------------------------------------------------------------------------

def test_cli_batch_goes_past_a_bad_file_lists_it_and_fails(tmp_path, capsys):
    ir, vis = ivf_folders(tmp_path)
    (vis / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the middle item is corrupt
    out = tmp_path / "out"
    rc = main(["batch", "ivf", str(ir), str(vis), "-o", str(out), "--device", "cpu",
               "--base-rule", "l1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "c.tif"]  # no partial b
    assert "2 written, 0 skipped" in captured.out and "1 failed" in captured.out
    assert "1 failed:" in captured.err
    failure = [line for line in captured.err.splitlines() if line.startswith("  b ")]
    assert len(failure) == 1 and "cannot read" in failure[0] and "b.png" in failure[0]
    # each output is what the engine gives for that pair, with the run's metadata
    want = fuse_infrared_visible(iio.imread(ir / "c.png"), iio.imread(vis / "c.png"),
                                 base_rule="l1", device="cpu")
    np.testing.assert_allclose(tifffile.imread(out / "c.tif"), want.image, atol=1e-6)
    meta = read_tiff_metadata(out / "c.tif")
    assert meta["network"] == "CSC-IVFN" and meta["base_rule"] == "l1"
    assert meta["inputs"] == [str(ir / "c.png"), str(vis / "c.png")]
    assert meta["batch_item"] == "c"


def test_outputs_that_exist_are_skipped_unless_overwrite(tmp_path, capsys):
    ir, vis = ivf_folders(tmp_path, stems=("a", "b"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.tif").write_bytes(b"an older result")
    assert main(["batch", "ivf", str(ir), str(vis), "-o", str(out), *FAST]) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().out
    assert (out / "a.tif").read_bytes() == b"an older result"
    b_stamp = (out / "b.tif").stat().st_mtime_ns
    assert main(["batch", "ivf", str(ir), str(vis), "-o", str(out), *FAST]) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out
    assert (out / "b.tif").stat().st_mtime_ns == b_stamp
    assert main(["batch", "ivf", str(ir), str(vis), "-o", str(out), "--overwrite", *FAST]) == 0
    assert "2 written, 0 skipped" in capsys.readouterr().out
    assert tifffile.imread(out / "a.tif").shape == (40, 48)


@pytest.mark.parametrize("fmt, suffix", [("png", ".png"), ("jpeg", ".jpg")])
def test_eight_bit_formats_carry_the_metadata(tmp_path, fmt, suffix):
    ir, vis = ivf_folders(tmp_path, stems=("a",))
    assert main(["batch", "ivf", str(ir), str(vis), "-o", str(tmp_path / "tif"), *FAST]) == 0
    assert main(["batch", "ivf", str(ir), str(vis), "-o", str(tmp_path / fmt), "--format", fmt,
                 *FAST]) == 0
    ref = tifffile.imread(tmp_path / "tif" / "a.tif")
    path = tmp_path / fmt / f"a{suffix}"
    img = iio.imread(path)
    assert img.dtype == np.uint8 and img.shape == ref.shape
    err = np.abs(img.astype(float) - np.clip(ref, 0, 1) * 255)
    assert err.max() <= (0.5 if fmt == "png" else 40) and err.mean() < (0.5 if fmt == "png" else 4)
    meta = read_image_metadata(path)
    assert meta["network"] == "CSC-IVFN" and meta["batch_item"] == "a"
    assert meta == read_tiff_metadata(tmp_path / "tif" / "a.tif") | {
        k: meta[k] for k in ("timings", "elapsed_s") if k in meta}


def test_mef_and_mmf_batches_match_the_engine(tmp_path, capsys):
    root = tmp_path / "brackets"
    (root / "hall").mkdir(parents=True)
    frames = [noise((24, 32, 3), s) for s in range(3)]
    for i, f in enumerate(frames):
        iio.imwrite(root / "hall" / f"e{i}.png", f)
    tifffile.imwrite(root / "garden.tif", np.stack(frames[::-1]))
    assert main(["batch", "mef", str(root), "-o", str(tmp_path / "mef"), *FAST]) == 0
    want = fuse_exposures(np.stack(frames), device="cpu").image
    np.testing.assert_allclose(tifffile.imread(tmp_path / "mef" / "hall.tif"), want, atol=1e-6)
    assert tifffile.imread(tmp_path / "mef" / "garden.tif").shape == (24, 32, 3)
    low, guide = tmp_path / "low", tmp_path / "guide"
    low.mkdir()
    guide.mkdir()
    iio.imwrite(low / "x.png", noise((8, 10), 7))
    iio.imwrite(guide / "x.png", noise((32, 40), 8))
    assert main(["batch", "mmf", str(low), str(guide), "-o", str(tmp_path / "mmf"), *FAST]) == 0
    want = fuse_guided(noise((8, 10), 7), noise((32, 40), 8), device="cpu").image
    np.testing.assert_allclose(tifffile.imread(tmp_path / "mmf" / "x.tif"), want, atol=1e-6)


def test_run_batch_stops_when_cancelled_and_goes_on_past_out_of_memory(tmp_path, monkeypatch):
    ir, vis = ivf_folders(tmp_path)
    plan = plan_batch("ivf", [ir, vis], tmp_path / "out")
    model = load_model("ivf")

    def cancel(done, total):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        list(run_batch(plan, model, device="cpu", base_rule="l1", progress=cancel))
    assert list((tmp_path / "out").iterdir()) == []

    from napari_cscfusion.engine import batch

    real = batch.fuse_infrared_visible

    def exhausted_on_b(ir_img, vis_img, **kw):
        if np.array_equal(ir_img, iio.imread(ir / "b.png")):
            raise MemoryError
        return real(ir_img, vis_img, **kw)

    monkeypatch.setattr(batch, "fuse_infrared_visible", exhausted_on_b)
    outcomes = list(run_batch(plan, model, device="cpu", base_rule="l1"))
    assert [o.status for o in outcomes] == ["written", "failed", "written"]
    assert outcomes[1].error == "MemoryError"
    assert outcomes[0].metadata["device"] == "cpu" and outcomes[0].seconds > 0


# --- medical ---------------------------------------------------------------------------------

def test_fuse_medical_keeps_the_functional_colour(tmp_path, capsys):
    t1 = sample("mni152_t1.png")[60:124, 40:104]
    pet = sample("simulated_pet.png")[60:124, 40:104]
    iio.imwrite(tmp_path / "t1.png", np.repeat(t1[..., None], 3, -1))  # grey stored as RGB
    iio.imwrite(tmp_path / "pet.png", pet)
    out = tmp_path / "fused.tif"
    # no --base-rule / --detail-rule: the medical defaults, not infrared/visible's saliency / l1
    assert main(["fuse", "medical", str(tmp_path / "t1.png"), str(tmp_path / "pet.png"),
                 "-o", str(out), "--device", "cpu", "-q"]) == 0
    assert "t1.png: RGB with equal channels, read as grey" in capsys.readouterr().err
    meta = read_tiff_metadata(out)
    assert meta["sources"] == ["t1", "pet"] and meta["colour_source"] == "pet"
    assert meta["code_gain"] == 1.0
    assert (meta["base_rule"], meta["detail_rule"]) == ("choose-max", "l1-black")
    want = fuse_multimodal({"t1": t1, "pet": pet}, device="cpu")
    np.testing.assert_allclose(tifffile.imread(out), want.image, atol=1e-6)


def test_medical_batch_names_sources_by_folder(tmp_path):
    t1, pd = tmp_path / "T1", tmp_path / "PD"
    t1.mkdir()
    pd.mkdir()
    a, b = sample("brainweb_t1.png"), sample("brainweb_pd.png")
    a, b = (x[..., 0] if x.ndim == 3 else x for x in (a, b))
    iio.imwrite(t1 / "slice.png", a[60:124, 50:114])
    iio.imwrite(pd / "slice.png", b[60:124, 50:114])
    assert main(["batch", "medical", str(t1), str(pd), "-o", str(tmp_path / "out"),
                 *FAST]) == 0
    meta = read_tiff_metadata(tmp_path / "out" / "slice.tif")
    assert meta["sources"] == ["T1", "PD"] and meta["colour_source"] is None


def test_the_installed_console_script_runs_a_batch(tmp_path):
    """One real process of the entry point: progress bar on stderr, failures, exit status."""
    ir, vis = ivf_folders(tmp_path, stems=("a", "b"))
    (ir / "b.png").write_bytes(b"not a png")
    script = Path(sys.executable).with_name("cscfusion")
    assert script.is_file(), "the package is not installed with its console script"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(script), "batch", "ivf", str(ir), str(vis), "-o",
                           str(tmp_path / "out"), "--device", "cpu", "--base-rule", "l1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "batch ivf: 100%" in proc.stderr and "2/2" in proc.stderr  # tqdm's bar
    assert "b (" in proc.stderr and "cannot read" in proc.stderr
    assert "1 written, 0 skipped" in proc.stdout
    assert (tmp_path / "out" / "a.tif").is_file()
