"""IVF, MEF and MMF on a process-based dask.distributed LocalCluster, as a real cluster runs
them: the kernels and the weights are pickled to a worker process, the tiles run there, and
the values equal the in-process run with the same tiles. Packaged weights and the packaged
sample images (no shared data); small images, one single-threaded worker (a 2-core machine).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from napari_cscfusion.engine import fuse_exposures, fuse_guided, fuse_infrared_visible
from napari_cscfusion.engine.io import store_tiff
from napari_cscfusion.engine.lazy import close_clients, is_dask

from ._shared import SAMPLES, grey, read

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client
            close_clients()


def within(seconds: float, call, *args, **kwargs):
    """``call(*args, **kwargs)``, failing the test when it has not returned in ``seconds``
    (a task a worker process cannot unpickle can leave the client waiting)."""
    from concurrent.futures import ThreadPoolExecutor, TimeoutError

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call, *args, **kwargs).result(timeout=seconds)
    except TimeoutError:
        pytest.fail(f"no result from the cluster within {seconds} s")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def ran_on_worker_processes(client, stream, at_least: int) -> None:
    """Every task of ``stream`` ran in a worker process other than this one, and there were
    at least ``at_least`` of them."""
    pids = client.run(os.getpid)
    assert pids and os.getpid() not in pids.values()
    assert len(stream.data) >= at_least, len(stream.data)
    assert {task["worker"] for task in stream.data} <= set(pids)


def ivf_pair():
    ir = grey(read(SAMPLES / "tno_01_ir.png"))[200:264, 300:380]
    vis = grey(read(SAMPLES / "tno_01_vis.png"))[200:264, 300:380]
    return ir, vis


def bracket():
    frames = [read(SAMPLES / f"courtyard_ev{ev}.png")[100:148, 200:264, :3]
              for ev in ("-2", "+0", "+2")]
    return np.stack(frames)


def test_ivf_saliency_rule_on_a_process_cluster(client):
    """The saliency rule has whole-image statistics passes (extremes, histograms) before the
    fusion pass: all three run as tasks on the worker."""
    ir, vis = ivf_pair()
    want = fuse_infrared_visible(ir, vis, base_rule="saliency", device="cpu", tile=32).image
    with distributed.get_task_stream(client) as stream:
        got = within(120, fuse_infrared_visible, ir, vis, base_rule="saliency",
                     device="cpu", tile=32, client=client)
    assert isinstance(got.image, np.ndarray)
    np.testing.assert_allclose(got.image, want, atol=1e-5, rtol=0)
    ran_on_worker_processes(client, stream, at_least=3 * 6)  # 3 passes over 2 x 3 tiles


def test_mef_dask_in_on_a_process_cluster_streams_to_a_tiff(client, tmp_path):
    """dask in (by scheduler address): the result stays on the cluster and store_tiff gathers
    it band by band into the output file."""
    stack = bracket()
    want = fuse_exposures(stack, device="cpu", tile=32).image
    lazy = fuse_exposures(da.from_array(stack, chunks=(3, 24, 32, 3)), device="cpu", tile=32,
                          scheduler=client.scheduler.address)
    assert is_dask(lazy.image)
    with distributed.get_task_stream(client) as stream:
        within(120, store_tiff, tmp_path / "fused.tif", lazy.image, lazy.metadata)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "fused.tif"), want, atol=1e-5,
                               rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["fused.tif"]
    assert stream.data  # the bands were computed there
    ran_on_worker_processes(client, stream, at_least=1)


def test_mmf_on_a_process_cluster(client):
    target = grey(read(SAMPLES / "tno_03_ir.png"))[200:264, 300:380] / 255.0
    guide = grey(read(SAMPLES / "tno_03_vis.png"))[200:264, 300:380] / 255.0
    low = target.reshape(16, 4, 20, 4).mean((1, 3)).astype(np.float32)  # x4 area downsampling
    want = fuse_guided(low, guide, device="cpu", tile=32).image
    with distributed.get_task_stream(client) as stream:
        got = within(120, fuse_guided, low, guide, device="cpu", tile=32, client=client)
    np.testing.assert_allclose(got.image, want, atol=1e-6, rtol=0)
    ran_on_worker_processes(client, stream, at_least=6)  # 2 x 3 tiles


class _LoadsOnlyHere:
    """An object that unpickles only in the process that made it: in a worker it fails as a
    network would there without this package (or with another torch)."""

    def __init__(self):
        self.pid = os.getpid()

    def __reduce__(self):
        return _loads_only_in, (self.pid,)


def _loads_only_in(pid):
    if os.getpid() != pid:
        raise ModuleNotFoundError("No module named 'simulated_missing_package'")
    return _LoadsOnlyHere()


def test_a_network_the_workers_cannot_load_fails_at_once_naming_the_cause(client,
                                                                           monkeypatch):
    """Without the check the client waited for ever (the worker drops the task it cannot
    unpickle): now a RuntimeError in seconds, with the worker's reason; the cluster goes on
    working."""
    import time

    from napari_cscfusion.engine import ivf

    built = ivf.IVFKernel.__init__

    def init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.unloadable = _LoadsOnlyHere()

    monkeypatch.setattr(ivf.IVFKernel, "__init__", init)
    ir, vis = ivf_pair()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="workers cannot load the fusion network .*"
                                           "simulated_missing_package.*napari-cscfusion"):
        within(60, fuse_infrared_visible, ir, vis, base_rule="l1", device="cpu", tile=32,
               client=client)
    assert time.perf_counter() - t0 < 30
    monkeypatch.undo()
    got = within(120, fuse_infrared_visible, ir, vis, base_rule="l1", device="cpu", tile=32,
                 client=client)
    want = fuse_infrared_visible(ir, vis, base_rule="l1", device="cpu", tile=32).image
    np.testing.assert_allclose(got.image, want, atol=1e-5, rtol=0)
