"""Behaviour fingerprint of the engine: a fixed set of fusion runs, one sha256 per run.

Not a test: a tool for restructuring (issue 16). Run it before and after a change that must not
change behaviour; every line must be identical. Each hash covers the outputs of one run: the
image, the codes and weight maps (dtype, shape and bytes, in name order) and the metadata less
what legitimately varies between runs (timings). Real data from ../shared (crops, to keep the
whole run at a few minutes on one CPU thread).

    nice -n 5 .venv/bin/python benchmarks/behaviour_hashes.py > before.txt
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference-checkpoints"
VOLATILE = {"timings"}


def _read(path: Path, grey: bool = False) -> np.ndarray:
    import imageio.v3 as iio

    a = np.asarray(iio.imread(path))
    if grey and a.ndim == 3:
        a = a[..., 0]
    return a


def _digest(h, a) -> None:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def fingerprint(result) -> tuple[str, str]:
    """(sha256 of the image, sha256 of everything the run returned but timings)."""
    whole, image = hashlib.sha256(), hashlib.sha256()
    _digest(image, result.image)
    _digest(whole, result.image)
    for group in (result.codes, result.weights):
        for name in sorted(group):
            whole.update(name.encode())
            _digest(whole, group[name])
    meta = {k: v for k, v in result.metadata.items() if k not in VOLATILE}
    whole.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    return image.hexdigest()[:16], whole.hexdigest()


def runs():
    import dask.array as da

    from napari_cscfusion import (
        fuse_exposures,
        fuse_guided,
        fuse_infrared_visible,
        fuse_multimodal,
        load_model,
    )

    rules = ("saliency", "l1", "average")
    tno = (_read(DATA / "ivf/tno/IR1.png", True)[100:260, 200:400],
           _read(DATA / "ivf/tno/VIS1.png", True)[100:260, 200:400])
    flir = (_read(DATA / "ivf/flir_test/IR3.jpg", True)[50:210, 100:300],
            _read(DATA / "ivf/flir_test/VIS3.jpg", True)[50:210, 100:300])
    for name, (ir, vis) in (("tno", tno), ("flir", flir)):
        for base in rules:
            for detail in rules:
                yield (f"ivf {name} base={base} detail={detail}",
                       lambda ir=ir, vis=vis, b=base, d=detail: fuse_infrared_visible(
                           ir, vis, base_rule=b, detail_rule=d, device="cpu"))
    ir, vis = tno
    yield ("ivf tno saliency/l1 codes", lambda: fuse_infrared_visible(
        ir, vis, device="cpu", codes=True))
    yield ("ivf tno saliency/l1 tile=64", lambda: fuse_infrared_visible(
        ir, vis, device="cpu", tile=64))
    yield ("ivf tno l1/average tile=64", lambda: fuse_infrared_visible(
        ir, vis, base_rule="l1", detail_rule="average", device="cpu", tile=64))
    yield ("ivf tno code_gain=1 float input", lambda: fuse_infrared_visible(
        ir.astype(np.float32) * 3.0 - 7.0, vis, device="cpu", code_gain=1.0))
    yield ("ivf tno 2-plane stack", lambda: fuse_infrared_visible(
        np.stack([ir, vis]), np.stack([vis, ir]), device="cpu"))
    ivf_authors = REFERENCE if (REFERENCE / "csc_ivfn_base_authors.pth").is_file() else None
    if ivf_authors is not None:
        yield ("ivf tno authors' checkpoint", lambda: fuse_infrared_visible(
            ir, vis, model=load_model("ivf", ivf_authors), device="cpu"))

    memorial = np.stack([_read(DATA / f"mef/memorial/memorial_{i:02d}.png")[..., :3]
                         for i in (2, 6, 10, 14)])
    yield ("mef memorial rgb codes", lambda: fuse_exposures(memorial, device="cpu", codes=True))
    yield ("mef memorial rgb tile=48", lambda: fuse_exposures(memorial, device="cpu", tile=48))
    yield ("mef memorial grey", lambda: fuse_exposures(
        memorial.mean(-1).astype(np.uint8), device="cpu"))
    if (REFERENCE / "csc_mefn_authors.pth").is_file():
        yield ("mef memorial authors' checkpoint", lambda: fuse_exposures(
            memorial, model=load_model("mef", REFERENCE / "csc_mefn_authors.pth"),
            device="cpu"))

    guide = flir[1]
    low = guide[::4, ::4].copy()
    yield ("mmf flir x4 packaged", lambda: fuse_guided(low, guide, device="cpu"))
    yield ("mmf flir x4 packaged tile=64", lambda: fuse_guided(low, guide, device="cpu",
                                                               tile=64))
    yield ("mmf flir x4 packaged codes", lambda: fuse_guided(low, guide, device="cpu",
                                                             codes=True))
    if (REFERENCE / "csc_mmfn_authors.pth").is_file():
        rgb_guide = _read(DATA / "mef/memorial/memorial_06.png")[:64, :80, :3]
        bands = np.random.default_rng(0).random((31, 32, 40)).astype(np.float32)
        mmf_authors = load_model("mmf", REFERENCE / "csc_mmfn_authors.pth")
        yield ("mmf authors' 31 bands x2", lambda: fuse_guided(
            bands, rgb_guide, model=mmf_authors, device="cpu"))
        yield ("mmf authors' 31 bands x2 tile=32", lambda: fuse_guided(
            bands, rgb_guide, model=mmf_authors, device="cpu", tile=32))

    t1 = _read(DATA / "medical/BrainT1Slice.png", True)
    pd = _read(DATA / "medical/BrainProtonDensitySlice.png", True)
    vol_t1 = np.stack([t1, t1[::-1], np.roll(t1, 9, 1)])
    vol_pd = np.stack([pd, pd[::-1], np.roll(pd, 9, 1)])
    yield ("medical brainweb volume", lambda: fuse_multimodal(
        [vol_t1, vol_pd], names=["T1", "PD"], device="cpu"))
    yield ("medical brainweb volume axis=0 float", lambda: fuse_multimodal(
        {"T1": vol_t1.astype(np.float32) * 2.5, "PD": vol_pd}, axis=0, device="cpu",
        base_rule="l1", detail_rule="average"))
    yield ("medical brainweb 2D codes", lambda: fuse_multimodal(
        [t1, pd], device="cpu", codes=True))
    mri_pet = DATA / "medical/harvard/mri_pet"
    if (mri_pet / "MRI/11.png").is_file():
        mri, pet = _read(mri_pet / "MRI/11.png", True), _read(mri_pet / "PET/11.png")[..., :3]
        yield ("medical harvard mri+pet colour", lambda: fuse_multimodal(
            {"MRI": mri, "PET": pet}, device="cpu"))

    yield ("dask ivf tno tile=64", lambda: _computed(fuse_infrared_visible(
        da.from_array(ir, chunks=80), da.from_array(vis, chunks=80), device="cpu", tile=64)))
    yield ("dask ivf tno 2-plane float", lambda: _computed(fuse_infrared_visible(
        da.from_array(np.stack([ir, vis]).astype(np.float32) - 3.0, chunks=(1, 80, 80)),
        da.from_array(np.stack([vis, ir]), chunks=(1, 80, 80)), device="cpu")))
    yield ("dask mef memorial tile=48", lambda: _computed(fuse_exposures(
        da.from_array(memorial, chunks=(4, 60, 60, 3)), device="cpu", tile=48)))
    yield ("dask mmf flir x4 tile=64", lambda: _computed(fuse_guided(
        da.from_array(low, chunks=20), da.from_array(guide, chunks=80), device="cpu",
        tile=64)))


def _computed(result):
    result.image = np.asarray(result.image)
    result.weights = {k: np.asarray(v) for k, v in result.weights.items()}
    return result


def main() -> int:
    torch.set_num_threads(1)
    import dask

    dask.config.set(scheduler="synchronous")
    start = time.perf_counter()
    for name, run in runs():
        t0 = time.perf_counter()
        image, whole = fingerprint(run())
        print(f"{name:<40} {image} {whole}", flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
