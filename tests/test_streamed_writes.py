"""Nothing is lost on a failed write: the streamed TIFF writer (engine.io.store_tiff, used by
``cscfusion fuse --stream``) and the napari writer (File > Save Layers) write to a temporary
file beside the target and rename it at the end. A failure, Ctrl-C or a cancel part-way leaves
the folder byte for byte as it was: no partial file, an existing target untouched."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
import tifffile

from napari_cscfusion.engine import Cancelled
from napari_cscfusion.engine.io import read_tiff_metadata, store_tiff, write_tiff

da = pytest.importorskip("dask.array")


def folder_state(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def folder(tmp_path):
    """A folder holding an earlier result (the target of the next write) and another file."""
    write_tiff(tmp_path / "fused.tif", np.full((6, 5), 0.25, np.float32), {"run": 1})
    (tmp_path / "notes.txt").write_text("keep me")
    return tmp_path


def _image(seed=0):
    """A 64x48 image in 16x16 blocks: 12 blocks to stream."""
    rng = np.random.default_rng(seed)
    return da.from_array(rng.random((64, 48)).astype(np.float32), chunks=16)


def _failing_block(image, bad_block: int, exc: BaseException):
    """``image`` whose block number ``bad_block`` (row-major) raises ``exc`` when computed."""
    n_cols = len(image.chunks[1])

    def block(x, block_info=None):
        i, j = block_info[0]["chunk-location"]
        if i * n_cols + j == bad_block:
            raise exc
        return x

    return image.map_blocks(block, dtype=image.dtype)


def _watching(folder, target, before):
    """A progress callback that checks, while the stream runs, that the target still holds
    its old bytes and that the blocks go to a temporary file in the same folder."""
    seen = []

    def progress(done, total):
        assert target.read_bytes() == before[target.name]
        assert [p.name for p in folder.iterdir() if p.name.endswith(".part")]
        seen.append((done, total))

    return progress, seen


def test_a_failure_mid_stream_leaves_the_folder_as_it_was(folder):
    target = folder / "fused.tif"
    before = folder_state(folder)
    progress, seen = _watching(folder, target, before)
    image = _failing_block(_image(), 6, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OSError, match="fused.tif.*No space left") as info:
        store_tiff(target, image, {"run": 2}, progress)
    assert info.value.errno == errno.ENOSPC
    assert seen  # blocks were written before the failure: it happened mid-stream
    assert folder_state(folder) == before


@pytest.mark.parametrize("stop", [Cancelled("cancelled by the user"), KeyboardInterrupt()],
                         ids=["cancel", "ctrl-c"])
def test_a_cancel_or_ctrl_c_mid_stream_leaves_the_folder_as_it_was(folder, stop):
    target = folder / "fused.tif"
    before = folder_state(folder)
    watch, seen = _watching(folder, target, before)

    def progress(done, total):
        watch(done, total)
        if done == 3:
            raise stop

    with pytest.raises(type(stop)):
        store_tiff(target, _image(), {"run": 2}, progress)
    assert len(seen) == 3 and seen[-1][1] > 3  # stopped part-way
    assert folder_state(folder) == before


def test_a_completed_stream_replaces_the_target_keeping_its_mode(folder):
    target = folder / "fused.tif"
    target.chmod(0o640)
    image = _image(1)
    progress, seen = _watching(folder, target, folder_state(folder))
    store_tiff(target, image, {"run": 2}, progress)
    assert seen and seen[-1][0] == seen[-1][1]
    np.testing.assert_array_equal(tifffile.imread(target), image.compute())
    assert read_tiff_metadata(target) == {"run": 2}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in folder.iterdir()) == ["fused.tif", "notes.txt"]


def test_cli_stream_failure_is_a_clear_error_and_leaves_the_folder(folder, monkeypatch, capsys):
    """``cscfusion fuse --stream`` on TIFF inputs: the output stream fails part-way (a full
    disk at the fifth block): exit status 2, the error names the output, the folder as it
    was (the inputs included)."""
    from napari_cscfusion import cli
    from napari_cscfusion.engine import io

    rng = np.random.default_rng(2)
    for name in ("ir.tif", "vis.tif"):
        tifffile.imwrite(folder / name, (rng.random((64, 64)) * 255).astype(np.uint8))
    before = folder_state(folder)
    real_store, ticks = io.store_tiff, []

    def progress_then_full(done, total):
        ticks.append(done)
        if done == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io, "store_tiff", lambda path, image, metadata, progress:
                        real_store(path, image, metadata, progress_then_full))
    rc = cli.main(["fuse", "ivf", str(folder / "ir.tif"), str(folder / "vis.tif"), "--stream",
                   "--tile", "32", "--device", "cpu", "-o", str(folder / "fused.tif"), "-q"])
    assert rc == 2 and ticks[-1] == 5
    assert "fused.tif" in capsys.readouterr().err
    assert folder_state(folder) == before


# --- the napari writer (File > Save Layers) --------------------------------------------------

class _FailsToRead:
    """Layer data whose read fails (a disk or network error while saving)."""

    shape, dtype, nbytes = (8, 8), np.dtype(np.float32), 256

    def __array__(self, dtype=None, copy=None):
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_gui_write_failing_part_way_leaves_the_folder_as_it_was(folder):
    """Three layers (fused, codes, weights) into one TIFF: the second cannot be read after
    the first was written; nothing is left and the earlier file is untouched."""
    pytest.importorskip("napari")
    from napari_cscfusion.gui._writer import write_tiff as write_layers

    target = folder / "fused.tif"
    before = folder_state(folder)
    layers = [(np.ones((8, 8), np.float32), {"name": "fused"}, "image"),
              (_FailsToRead(), {"name": "codes"}, "image"),
              (np.zeros((8, 8), np.float32), {"name": "weights"}, "image")]
    written = []
    real_write = tifffile.TiffWriter.write

    def write(self, data, *args, **kwargs):
        written.append(np.shape(data))
        return real_write(self, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tifffile.TiffWriter, "write", write)
        with pytest.raises(OSError, match="Input/output error"):
            write_layers(str(target), layers)
    assert written == [(8, 8)]  # the first layer was written: it failed part-way
    assert folder_state(folder) == before
    # the same layers without the failing one are written and replace the file
    assert write_layers(str(target), layers[::2]) == [str(target)]
    assert len(tifffile.TiffFile(target).series) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["fused.tif", "notes.txt"]
