"""Reader, writer, sample data and manifest of the napari plugin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_cscfusion.gui import _reader, _sample_data, _writer  # noqa: E402

PLUGIN = "napari-cscfusion"
ROOT = Path(__file__).resolve().parents[1]


def test_reader_folder_of_exposures_is_one_stack(make_napari_viewer, tmp_path):
    import imageio.v3 as iio
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    folder = tmp_path / "bracket"
    folder.mkdir()
    for i, im in enumerate(imgs):  # natural order: 2 before 10
        iio.imwrite(folder / f"shot_{[2, 10, 1][i]}.png", im)
    (folder / "notes.txt").write_text("not an image")
    assert _reader.get_reader(str(folder)) is not None
    viewer = make_napari_viewer()
    layers = viewer.open(str(folder), plugin=PLUGIN)
    assert len(layers) == 1
    stack = layers[0]
    assert stack.rgb and stack.data.shape == (3, 24, 32, 3)
    np.testing.assert_array_equal(stack.data[0], imgs[2])  # shot_1
    np.testing.assert_array_equal(stack.data[1], imgs[0])  # shot_2
    np.testing.assert_array_equal(stack.data[2], imgs[1])  # shot_10
    meta = stack.metadata["cscfusion"]
    assert meta["exposure_axis"] == 0 and meta["files"] == ["shot_1.png", "shot_2.png",
                                                            "shot_10.png"]


def test_reader_refuses_what_it_cannot_stack(tmp_path):
    import imageio.v3 as iio
    import tifffile
    one = tmp_path / "one"
    one.mkdir()
    iio.imwrite(one / "a.png", np.zeros((8, 8), np.uint8))
    assert _reader.get_reader(str(one)) is None  # a single image is not a bracket
    tifffile.imwrite(tmp_path / "single.tif", np.zeros((8, 8), np.uint8))
    assert _reader.get_reader(str(tmp_path / "single.tif")) is None  # left to other readers
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    iio.imwrite(mixed / "a.png", np.zeros((8, 8), np.uint8))
    iio.imwrite(mixed / "b.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="same size"):
        _reader.get_reader(str(mixed))(str(mixed))


def test_reader_multipage_tiff_is_one_stack(make_napari_viewer, tmp_path):
    import tifffile
    data = np.arange(4 * 10 * 12, dtype=np.uint16).reshape(4, 10, 12)
    path = tmp_path / "exposures.tif"
    tifffile.imwrite(path, data)
    assert _reader.get_reader(str(path)) is _reader.read_exposure_tiff
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    np.testing.assert_array_equal(layer.data, data)
    assert layer.metadata["cscfusion"]["exposure_axis"] == 0


def test_writer_round_trip_fused_and_codes(make_napari_viewer, tmp_path):
    from napari_cscfusion.gui._common import DIVERGING
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    run_meta = {"cscfusion": {"role": "fused", "network": "CSC-IVFN", "weights_sha256": "ab12",
                              "base_rule": "l1", "device": "cpu", "elapsed_s": 1.5,
                              "timings": {"network_s": 1.0}, "source_layers": ["ir", "vis"]}}
    fused = viewer.add_image(rng.random((20, 24), np.float32), name="ir + vis (CSC-IVFN)",
                             metadata=run_meta, scale=(0.5, 2.0), translate=(1.0, -4.0))
    codes = viewer.add_image(rng.standard_normal((8, 20, 24)).astype(np.float32),
                             name="codes", colormap=DIVERGING, contrast_limits=(-2.0, 2.0),
                             metadata={"cscfusion": {"role": "codes", "sparsity": 0.25}})
    viewer.layers.selection = {fused, codes}
    target = tmp_path / "result.tif"
    written = viewer.layers.save(str(target), selected=True, plugin=PLUGIN)
    assert written == [str(target)] and target.is_file()
    assert not list(tmp_path.glob(".*.part"))
    import tifffile
    with tifffile.TiffFile(target) as tif:  # the metadata is JSON in the descriptions
        descriptions = [json.loads(p.description) for p in tif.pages
                        if p.description.startswith("{")]
    assert descriptions[0]["napari_cscfusion"]["metadata"] == run_meta

    viewer2 = make_napari_viewer()
    layers = viewer2.open(str(target), plugin=PLUGIN)
    by_name = {lay.name: lay for lay in layers}
    f2, c2 = by_name["ir + vis (CSC-IVFN)"], by_name["codes"]
    np.testing.assert_array_equal(f2.data, fused.data)
    np.testing.assert_array_equal(c2.data, codes.data)
    assert f2.metadata == run_meta
    np.testing.assert_allclose(f2.scale, (0.5, 2.0))
    np.testing.assert_allclose(f2.translate, (1.0, -4.0))
    assert c2.metadata["cscfusion"]["sparsity"] == 0.25
    assert tuple(c2.contrast_limits) == (-2.0, 2.0)
    np.testing.assert_allclose(c2.colormap.colors, DIVERGING.colors)


def test_reader_opens_cli_codes_one_layer_per_code(make_napari_viewer, tmp_path):
    """``cscfusion fuse --codes-out`` writes (names, q, H, W); the reader gives one layer per
    code name with its q channels and the run's metadata (not an exposure stack)."""
    import imageio.v3 as iio

    from napari_cscfusion import cli, fuse_infrared_visible

    from ._shared import SAMPLES, grey, read

    ir = grey(read(SAMPLES / "tno_01_ir.png"))[200:232, 300:340]
    vis = grey(read(SAMPLES / "tno_01_vis.png"))[200:232, 300:340]
    iio.imwrite(tmp_path / "ir.png", ir)
    iio.imwrite(tmp_path / "vis.png", vis)
    out, codes_out = tmp_path / "fused.tif", tmp_path / "codes.tif"
    assert cli.main(["fuse", "ivf", str(tmp_path / "ir.png"), str(tmp_path / "vis.png"),
                     "-o", str(out), "--codes-out", str(codes_out), "--base-rule", "l1",
                     "--device", "cpu", "-q"]) == 0
    want = fuse_infrared_visible(ir, vis, base_rule="l1", device="cpu", codes=True)
    assert _reader.get_reader(str(codes_out)) is _reader.read_codes_tiff
    viewer = make_napari_viewer()
    layers = viewer.open(str(codes_out), plugin=PLUGIN)
    assert len(layers) == len(want.codes) == 6  # infrared/visible/fused x base/detail
    for layer in layers:
        meta = layer.metadata["cscfusion"]
        assert meta["role"] == "codes" and meta["run"]["network"] == "CSC-IVFN"
        assert layer.name == f"{meta['code'].replace('_', ' ')} codes · codes"
        np.testing.assert_allclose(layer.data, want.codes[meta["code"]], atol=1e-6, rtol=0)
    assert {lay.metadata["cscfusion"]["code"] for lay in layers} == set(want.codes)


def test_writer_leaves_no_partial_file_on_failure(tmp_path):
    class Boom:
        shape, dtype, ndim, nbytes = (4, 4), np.dtype("float32"), 2, 64

        def __array__(self, *a, **k):
            raise RuntimeError("read failed")

    target = tmp_path / "x.tif"
    with pytest.raises(RuntimeError, match="read failed"):
        _writer.write_tiff(str(target), [(Boom(), {"name": "x"}, "image")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key, names, shapes", [
    ("infrared_visible", ["TNO infrared", "TNO visible"], [(576, 768), (576, 768)]),
    ("exposure_bracket", ["courtyard exposures"], [(4, 256, 512, 3)]),
    ("mri_t1_pd", ["BrainWeb T1", "BrainWeb PD"], [(217, 181), (217, 181)]),
    ("mri_pet", ["MNI152 T1 (anatomy)", "simulated PET (hot colours)"],
     [(233, 197), (233, 197, 3)]),
    ("guided_sr", ["TNO visible guide", "TNO infrared low-res x4", "TNO infrared reference"],
     [(576, 768), (144, 192), (576, 768)]),
])
def test_sample_data_loads(make_napari_viewer, key, names, shapes):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, key)
    assert [lay.name for lay in layers] == names
    assert [tuple(lay.data.shape) for lay in layers] == shapes
    for lay in layers:
        assert lay.metadata["cscfusion"]["credit"]


def test_sample_files_are_small_and_attributed():
    folder = _sample_data.sample_path("")
    files = [p for p in folder.iterdir() if p.suffix == ".png"]
    assert len(files) == 12
    attribution = (folder / "ATTRIBUTION.md").read_text()
    for p in files:
        assert p.stat().st_size < 1_000_000, p
        assert p.name in attribution
    for credit in ("TNO Image Fusion Dataset, A. Toet", "CC BY 4.0",
                   "BrainWeb, via the ITK examples", "Apache-2.0", "CC0",
                   "Copyright (C) 1993-2004 Louis Collins", "SIMULATED"):
        assert credit in attribution


def test_manifest_is_valid_and_lists_the_widgets():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent))
    if npe2 is None:
        pytest.skip("npe2 command not found")
    out = subprocess.run([npe2, "validate", PLUGIN], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    from npe2 import PluginManager
    pm = PluginManager.instance()
    pm.discover()
    widgets = {w.display_name for w in pm.get_manifest(PLUGIN).contributions.widgets}
    assert {"Infrared + visible fusion", "Exposure fusion",
            "Guided super-resolution", "Fusion quality"} <= widgets
    root = ROOT / "napari.yaml"
    assert root.is_symlink()
    assert root.resolve() == (ROOT / "src" / "napari_cscfusion" / "napari.yaml").resolve()


def test_widgets_appear_in_the_layers_menus(make_napari_viewer):
    make_napari_viewer()
    from napari._app_model import get_app_model
    menus = get_app_model().menus

    def ids(menu):
        return [getattr(getattr(i, "command", None), "id", None) or getattr(i, "submenu", None)
                for i in menus.get_menu(menu)]

    assert "cscfusion_fusion" in ids("napari/layers/filter")
    assert {"napari-cscfusion.make_ivf_widget", "napari-cscfusion.make_mef_widget",
            "napari-cscfusion.make_mmf_widget"} <= set(ids("cscfusion_fusion"))
    assert "napari-cscfusion.make_quality_widget" in ids("napari/layers/measure")
