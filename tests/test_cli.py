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
    assert tifffile.imread(codes).size == 3 * 24 * 48 * 40
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
