"""Speed and memory of the fusion engine against its classical peers and a naive network run.

    python benchmarks/speed.py --quick                  # 1 Mpx, every task
    python benchmarks/speed.py --sizes 1,4,16 --tasks ivf,mef
    python benchmarks/speed.py --tasks mef --sizes 12 --variants engine,compile,peer,naive

For each task and size (megapixels of the output) it prints one row per variant:

* ``engine``  — the public fuse_* function with automatic tiles (what users run: the fast
  path where the weights allow it, compiled, the compilation included);
* ``exact``   — the same with ``exact=True`` (the reference arithmetic);
* ``compile`` — the same with ``compile=True`` (torch.compile of the encoders; the first
  call's compilation is included, as a user's one-off run would pay it);
* ``compile-warm`` — compiled on a small crop first, then timed (a session's steady state);
* ``peer``    — the classical method: Laplacian-pyramid fusion (IVF), OpenCV Mertens (MEF),
  bicubic upsampling (MMF), from ``napari_cscfusion.baselines``;
* ``naive``   — the same network run untiled, one source at a time (IVF: each source through
  both encoders, the authors' two decoder passes, the same rules; MEF: each exposure through
  the network; MMF: the untiled forward).

with wall time, Mpx/s, peak resident memory (RSS) and, on CUDA, peak GPU memory. Every row
runs in a fresh child process, so peak RSS is that variant's alone.

``--targets`` instead measures issue 18's ratios in ONE process, each pair back to back,
``--repeat`` times, best of each (on a shared machine only ratios of one run mean anything):

* IVF, TNO pair 1 (768x576), default rules: the engine against the compute limit, i.e. the
  network's convolution FLOPs divided by the best throughput of a 64-channel 3x3 convolution
  measured in the same process (NCHW and channels_last);
* MEF, 3 Memorial exposures resized to 12 Mpx, uint8: the engine (``fuse_exposures`` with its
  defaults, weight maps on; also without them) against OpenCV's Mertens on the same uint8
  arrays (``cv2.createMergeMertens().process`` takes uint8 lists), and one call each of the
  PyTorch fast form (the fused numba kernel off) and the exact path;
* MMF, 1 and 4 Mpx: the engine against the naive untiled forward (skipped where the naive
  run's code maps would not fit in memory).

The engine's first call (which compiles the fast path) is timed separately from the warm
calls. ``--weights`` picks the networks: ``clamped`` (the packaged ones with every soft
threshold clamped at 0, a stand-in for weights trained with nonnegative thresholds),
``packaged`` or ``authors``; ``--exact`` forces the exact path. Inputs are real images
(TNO pair 1, three Memorial exposures, the Aloe guide with a 31-band low-resolution stand-in
derived from it) resized to the requested size. Targets (issue 5) are checked where measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CSCFUSION_SHARED", ROOT.parent / "shared"))
DATA, CKPT = SHARED / "data", SHARED / "reference-checkpoints"
WEIGHTS = {"ivf": CKPT, "mef": CKPT / "csc_mefn_authors.pth",
           "mmf": CKPT / "csc_mmfn_authors.pth"}
# bytes per output pixel the naive MMF forward holds at its peak (run A: 6257 MB at 1 Mpx)
NAIVE_MMF_BYTES_PER_PX = 6300
VARIANTS = ("engine", "exact", "compile", "compile-warm", "peer", "naive")
# naive runs hold every code map of the whole image: skip them where that alone is huge
NAIVE_MAX_MPX = {"ivf": 4.5, "mef": 16.5, "mmf": 1.5}


# --- inputs -----------------------------------------------------------------------------------

def _read(path):
    import imageio.v3 as iio
    import numpy as np

    return np.asarray(iio.imread(path))


def _resize(img, h: int, w: int):
    import cv2

    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR if h * w > img.shape[0] *
                      img.shape[1] else cv2.INTER_AREA)


def _hw(mpx, aspect: float = 4 / 3) -> tuple[int, int]:
    """Output (H, W) for a size: megapixels (4:3) or "HxW" (e.g. "8192x8192")."""
    if isinstance(mpx, str) and "x" in mpx:
        h, w = mpx.split("x")
        return int(h), int(w)
    h = int(round((float(mpx) * 1e6 / aspect) ** 0.5))
    return h, int(round(h * aspect))


def make_inputs(task: str, mpx):
    import numpy as np

    h, w = _hw(mpx)
    if task == "ivf":
        grey = [_read(DATA / "ivf" / "tno" / f"{n}1.png") for n in ("IR", "VIS")]
        return [_resize(g[..., 0] if g.ndim == 3 else g, h, w) for g in grey]
    if task == "mef":
        frames = [_read(DATA / "mef" / "memorial" / f"memorial_{i:02d}.png")[..., :3]
                  for i in (3, 8, 13)]
        return [np.stack([_resize(f, h, w) for f in frames])]
    if task == "mmf":
        guide = _resize(_read(DATA / "guided" / "aloeL.jpg")[..., :3], h, w)
        low = _resize(guide, h // 2, w // 2).astype(np.float32) / 255
        # 31 smooth mixtures of R, G, B: a hyperspectral stand-in the authors' network accepts
        mix = np.stack([np.cos(np.linspace(0, np.pi, 31) + p) * 0.5 + 0.5
                        for p in (0.0, 1.0, 2.0)], 1)
        bands = np.einsum("hwc,bc->bhw", low, mix / mix.sum(1, keepdims=True))
        return [np.ascontiguousarray(bands, dtype=np.float32), guide]
    raise ValueError(task)


# --- one measurement (child process) -------------------------------------------------------------

def _naive(task: str, model, inputs, device):
    import numpy as np
    import torch

    from napari_cscfusion.engine.rules import apply_rule

    net = model.network_on(device)
    with torch.inference_mode():
        if task == "ivf":
            zs = [net.encode(torch.from_numpy(a.astype(np.float32) / 255)[None, None].to(device))
                  for a in inputs]
            zb = torch.cat([z[0] for z in zs])
            zd = torch.cat([z[1] for z in zs])
            del zs
            fb, _ = apply_rule("saliency", zb)
            fd, _ = apply_rule("l1", zd)
            out = torch.sigmoid(net.decoder(2 * fb[None]) + net.decoder(2 * fd[None]))
            return out.cpu().numpy()
        if task == "mef":
            from napari_cscfusion.models.color import rgb_to_ycbcr

            x = torch.from_numpy(inputs[0].astype(np.float32) / 255).to(device)
            y = rgb_to_ycbcr(x, dim=-1)[..., 0]
            logits = torch.cat([net.logits(y[i][None, None]) for i in range(y.shape[0])])
            w = torch.softmax(logits[:, 0], 0)
            return (w * y).sum(0).cpu().numpy()
        g = np.moveaxis(inputs[1], -1, 0).astype(np.float32) / 255
        lr = inputs[0]
        if net.guide_channels == 1:  # the packaged network: grey guide, 1-band low-res input
            from napari_cscfusion.engine.resample import bicubic_resize
            from napari_cscfusion.models.color import luma

            g = luma(np.moveaxis(g, 0, -1))[None].astype(np.float32)
            lr = lr[None] if lr.ndim == 2 else lr
            if model.info.get("header", {}).get("training", {}).get("lr_input") == "bicubic":
                # files trained on bicubic pre-upsampled input (the packaged one until
                # 2026-12-07); low_res geometries take the low-res image as it is
                lr = np.clip(bicubic_resize(lr, g.shape[-2:]), 0.0, 1.0).astype(np.float32)
        lr = torch.from_numpy(np.ascontiguousarray(lr))[None].to(device)
        g = torch.from_numpy(np.ascontiguousarray(g))[None]
        return net(lr, g.to(device)).clamp(0, 1).cpu().numpy()


def measure(task: str, mpx, variant: str, device: str, tile, weights: str = "authors") -> dict:
    import resource

    import numpy as np
    import torch

    from napari_cscfusion import baselines
    from napari_cscfusion.engine import (
        fuse_exposures,
        fuse_guided,
        fuse_infrared_visible,
        resolve_device,
    )

    torch.set_num_threads(int(os.environ.get("CSC_THREADS", os.cpu_count() or 1)))
    inputs = make_inputs(task, mpx)
    # the MMF inputs are the authors' 31-band network's
    model = target_model(task, "authors" if task == "mmf" else weights)
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = {"device": dev, "tile": tile}
    if variant == "compile-warm" and task in ("ivf", "mef"):
        # compile on a small crop first (dynamic shapes): the steady state of a session
        kw["compile"] = True
        if task == "ivf":
            fuse_infrared_visible(*(a[:96, :96] for a in inputs), model, **kw)
        else:
            fuse_exposures(inputs[0][:, :96, :96], model, **kw)
    t0 = time.perf_counter()
    if variant in ("engine", "exact", "compile", "compile-warm"):
        if variant.startswith("compile"):
            kw["compile"] = True
        if variant == "exact":
            kw["exact"] = True
        if task == "ivf":
            out = fuse_infrared_visible(*inputs, model, **kw).image
        elif task == "mef":
            out = fuse_exposures(inputs[0], model, **kw).image
        else:
            kw.pop("tile")
            out = fuse_guided(inputs[0], inputs[1], model, **kw).image
    elif variant == "peer":
        if task == "ivf":
            out = baselines.laplacian_pyramid_fusion([a / 255.0 for a in inputs])
        elif task == "mef":
            out = baselines.mertens_fusion(inputs[0] / 255.0)
        else:
            out = baselines.bicubic_upsample(np.moveaxis(inputs[0], 0, -1),
                                             inputs[1].shape[:2])
    else:
        out = _naive(task, model, inputs, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    if not np.isfinite(np.asarray(out)).all():
        raise RuntimeError(f"{task} {variant}: non-finite output")
    res = {"task": task, "mpx": mpx, "variant": variant, "seconds": dt,
           "out_mpx": float(np.prod(_hw(mpx))) / 1e6,  # every task outputs at this size
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mb": rss0}
    if dev.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return res



# --- issue 18: ratios measured in one process ---------------------------------------------------

def conv_probe(repeat: int = 5, side: int = 256) -> float:
    """Best throughput (FLOP/s) of a 64 -> 64 3x3 convolution here, NCHW or channels_last."""
    import torch
    import torch.nn.functional as F

    flops = 2 * 64 * 64 * 9 * side * side
    best = float("inf")
    w = torch.randn(64, 64, 3, 3)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 64, side, side).contiguous(memory_format=fmt)
        with torch.inference_mode():
            F.conv2d(x, w, padding=1)
            for _ in range(repeat):
                t0 = time.perf_counter()
                F.conv2d(x, w, padding=1)
                best = min(best, time.perf_counter() - t0)
    return flops / best


def ivf_conv_flops(net, h: int, w: int, sources: int = 2) -> float:
    """Convolution FLOPs of one CSC-IVFN fusion of ``sources`` h x w images: both encoders
    per source (the first DCU has one convolution, the others two) and one decoder pass on
    the summed fused codes (what the engine runs), plus the 11x11 box blur."""
    from torch import nn

    macs = 0
    for enc in (net.base, net.detail):
        for i, dcu in enumerate(enc.dcus):
            one = dcu.adjoint.weight.numel()
            macs += sources * (one if i == 0 else 2 * one)
    macs += sum(m.weight.numel() for m in net.decoder.layers if isinstance(m, nn.Conv2d))
    macs += sources * 2 * 121  # box blur of each source (base and detail inputs)
    return 2.0 * macs * h * w


def target_model(task: str, weights: str):
    from napari_cscfusion.engine import FusionModel, load_model

    if weights == "authors":
        return load_model(task, WEIGHTS[task])
    model = load_model(task)
    if weights == "packaged":
        return model
    from napari_cscfusion.models.fastpath import with_clamped_thresholds

    return FusionModel(task, with_clamped_thresholds(model.network),
                       dict(model.info, label=f"packaged {task}.pt, thresholds clamped >= 0"))


def _timed(fn, repeat: int) -> tuple[float, float, object]:
    """(first call s, best of ``repeat`` further calls s (the first with none), last
    result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return first, (first if repeat < 1 else best), out


def _exact_kw(fn, exact: bool) -> dict:
    import inspect

    return {"exact": exact} if "exact" in inspect.signature(fn).parameters else {}


def targets(repeat: int, weights: str, exact: bool, tasks, device: str = "cpu",
            mmf_weights: str | None = None) -> list[str]:
    """Issue 18's ratios, each pair measured back to back in this process."""
    import numpy as np
    import torch

    from napari_cscfusion.engine import fuse_guided, fuse_infrared_visible

    torch.set_num_threads(int(os.environ.get("CSC_THREADS", os.cpu_count() or 1)))
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"machine: {machine()}; weights: {weights}; exact: {exact}; repeat {repeat}")
    if "ivf" in tasks:
        model = target_model("ivf", weights)
        ir, vis = (_read(DATA / "ivf" / "tno" / f"{n}1.png") for n in ("IR", "VIS"))
        ir, vis = (g[..., 0] if g.ndim == 3 else g for g in (ir, vis))
        h, w = ir.shape[:2]
        flops = ivf_conv_flops(model.network, h, w)
        kw = _exact_kw(fuse_infrared_visible, exact)
        first, best, res = _timed(
            lambda: fuse_infrared_visible(ir, vis, model, device=device, **kw), repeat)
        probe = max(conv_probe() for _ in range(repeat))
        _, ref_s, ref = _timed(lambda: fuse_infrared_visible(ir, vis, model, device=device,
                                                             exact=True), repeat)
        limit = flops / probe
        diff = np.abs(res.image - ref.image)
        say(f"ivf TNO pair {h}x{w}: conv {flops / 1e9:.1f} GFLOP, probe {probe / 1e9:.0f} "
            f"GFLOP/s -> limit {limit:.3f} s; engine {best:.3f} s (first call {first:.1f} s, "
            f"path {res.metadata.get('path', 'exact')}): {best / limit:.1f}x the limit "
            f"(target <= 5x, beyond <= 2x); exact path {ref_s:.3f} s ({ref_s / limit:.1f}x); "
            f"|engine - exact| max {diff.max():.2g}, mean {diff.mean():.2g}"
            + "".join(f"; notice: {n}" for n in res.metadata.get("notices", [])))
    if "mef" in tasks:
        say(mef_target(model=target_model("mef", weights), repeat=repeat, exact=exact,
                       device=device))
    if "mmf" in tasks:
        # the authors' 31-band network and inputs as in the rows above (its thresholds are
        # clamped at >= 0 by design: the fast path applies to it); with ``--weights
        # packaged`` the packaged thermal network (1-band low-res, grey guide, 32 codes: its
        # naive forward fits in memory at 4 Mpx) on a grey low-res stand-in
        # ``mmf_weights``: a weights file (e.g. a low_res-geometry candidate), grey inputs
        packaged = weights == "packaged" or mmf_weights is not None
        if mmf_weights is not None:
            from napari_cscfusion.engine import load_model

            model = load_model("mmf", mmf_weights)
        else:
            model = target_model("mmf", "packaged" if packaged else "authors")
        kw = _exact_kw(fuse_guided, exact)
        for mpx in (1, 4):
            lr, guide = make_inputs("mmf", mpx)
            if packaged:
                lr = np.ascontiguousarray(lr[[0, 15, 30]].mean(0))  # (h, w) grey stand-in
            first, best, res = _timed(
                lambda lr=lr, guide=guide: fuse_guided(lr, guide, model, device=device, **kw),
                repeat)
            import psutil

            need = NAIVE_MMF_BYTES_PER_PX * guide.shape[0] * guide.shape[1] \
                * model.network.hparams["code_channels"] / 256
            if need > 0.8 * psutil.virtual_memory().available:
                say(f"mmf {mpx} Mpx: engine {best:.2f} s (first call {first:.1f} s); naive "
                    f"not run: it would hold ~{need / 2 ** 30:.0f} GiB")
                continue
            dev = torch.device(device)
            _, naive, ref = _timed(
                lambda lr=lr, guide=guide, dev=dev: _naive("mmf", model, [lr, guide], dev),
                repeat)
            diff = np.abs(res.image - ref[0])
            say(f"mmf {mpx} Mpx ({model.weights_label}): engine {best:.2f} s (first call "
                f"{first:.1f} s, path {res.metadata.get('path', 'exact')}, kernel "
                f"{res.metadata.get('fast_kernel')}, tile {res.metadata.get('tile')}), naive "
                f"{naive:.2f} s: engine {naive / best:.2f}x faster (target >= 1.5x); "
                f"|engine - naive| max {diff.max():.2g}, mean {diff.mean():.2g}"
                + ("" if getattr(model.network, "geometry", "authors") != "authors" else
                   " (the naive forward's float32 cumulative-sum guided filter is the "
                   "inaccurate side: benchmarks/README.md)"))
            if res.metadata.get("fast_kernel") == "numba" and not exact:
                say(mmf_without_numba(model, lr, guide, device, repeat))
    return lines


def mmf_without_numba(model, lr, guide, device: str, repeat: int) -> str:
    """What a CPU without numba runs (CSCFUSION_NO_NUMBA): the PyTorch fast form against the
    exact path, best of ``repeat`` warm calls each, back to back (engine.mmf.mmf_form's
    choice for the low_res geometries rests on it)."""
    import numpy as np

    from napari_cscfusion.engine import fuse_guided
    from napari_cscfusion.engine.numba_jit import NO_NUMBA_ENV

    os.environ[NO_NUMBA_ENV] = "1"
    try:
        first, fast_s, fast = _timed(lambda: fuse_guided(lr, guide, model, device=device,
                                                         exact=False), repeat)
        _, exact_s, ref = _timed(lambda: fuse_guided(lr, guide, model, device=device,
                                                     exact=True), repeat)
    finally:
        del os.environ[NO_NUMBA_ENV]
    diff = np.abs(fast.image - ref.image)
    return (f"  numba off: PyTorch fast form {fast_s:.2f} s (first call {first:.1f} s, kernel "
            f"{fast.metadata.get('fast_kernel')}), exact path {exact_s:.2f} s: PyTorch form "
            f"{exact_s / fast_s:.2f}x faster than the exact path; |diff| max "
            f"{diff.max():.2g}, mean {diff.mean():.2g}")


def mef_target(model, repeat: int, exact: bool, device: str = "cpu") -> str:
    """Issue 18's MEF ratio: ``fuse_exposures`` with its defaults (weight maps on) on 3 x 12 Mpx
    uint8 frames against OpenCV's Mertens on the same arrays, best of ``repeat`` warm calls
    each; also without the weight maps and, one call each (they take minutes), the PyTorch
    fast form (numba off: what the fast path ran before the fused kernel) and the exact path."""
    import cv2
    import numpy as np

    from napari_cscfusion.engine import fuse_exposures
    from napari_cscfusion.engine.numba_jit import NO_NUMBA_ENV

    stack = make_inputs("mef", 12)[0]  # (3, H, W, 3) uint8, as a camera gives them
    frames = [np.ascontiguousarray(f[..., ::-1]) for f in stack]  # BGR for OpenCV
    merge = cv2.createMergeMertens()
    kw = _exact_kw(fuse_exposures, exact)
    first, best, res = _timed(lambda: fuse_exposures(stack, model, device=device, **kw),
                              repeat)
    _, no_maps, _ = _timed(lambda: fuse_exposures(stack, model, device=device, weights=False,
                                                  **kw), repeat)
    _, mertens, _ = _timed(lambda: merge.process(frames), repeat)
    kernel = res.metadata.get("fast_kernel")
    torch_s = torch_diff = None
    if kernel == "numba":
        os.environ[NO_NUMBA_ENV] = "1"  # the PyTorch fast form, for comparison
        try:
            torch_s, _, torch_res = _timed(
                lambda: fuse_exposures(stack, model, device=device, **kw), 0)
        finally:
            del os.environ[NO_NUMBA_ENV]
        torch_diff = np.abs(torch_res.image - res.image).max()
    ref_s, _, ref = _timed(lambda: fuse_exposures(stack, model, device=device, exact=True), 0)
    diff = np.abs(res.image - ref.image)
    line = (f"mef 3 x {stack.shape[1]}x{stack.shape[2]} uint8: engine {best:.2f} s (weight "
            f"maps on; first call {first:.1f} s, path {res.metadata.get('path', 'exact')}, "
            f"kernel {kernel}), OpenCV Mertens on the same uint8 arrays {mertens:.2f} s: "
            f"{best / mertens:.2f}x Mertens (target <= 2x, beyond < 1x); without the weight "
            f"maps {no_maps:.2f} s ({no_maps / mertens:.2f}x); ")
    if torch_s is not None:
        line += (f"PyTorch fast form (numba off, one call) {torch_s:.2f} s "
                 f"({torch_s / mertens:.2f}x, |diff| max {torch_diff:.2g}); ")
    return line + (f"exact path (one call) {ref_s:.2f} s ({ref_s / mertens:.2f}x); |engine - "
                   f"exact| max {diff.max():.2g}, mean {diff.mean():.2g}")


# --- driver ------------------------------------------------------------------------------------

def _size(spec: str):
    """A --sizes entry: megapixels (float) or "HxW" (kept as the string)."""
    return spec if "x" in str(spec) else float(spec)


def _fmt(mpx) -> str:
    return mpx if isinstance(mpx, str) else f"{mpx:g}"


def run_child(task, mpx, variant, device, tile, timeout, weights="authors") -> dict:
    cmd = [sys.executable, __file__, "--child", f"{task}:{mpx}:{variant}", "--device", device,
           "--weights", weights]
    if tile is not None:
        cmd += ["--tile", str(tile)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"task": task, "mpx": mpx, "variant": variant, "error": f"over {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"task": task, "mpx": mpx, "variant": variant, "error": tail[:120]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM"
    except ImportError:
        mem = "? RAM"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem}, "
            f"{gpu}, torch {torch.__version__}, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['task']} | {_fmt(r['mpx'])} | {r['variant']} | - | - | - | {r['error']} |"
    gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
    return (f"| {r['task']} | {_fmt(r['mpx'])} | {r['variant']} | {r['seconds']:.1f} | "
            f"{r['out_mpx'] / r['seconds']:.3f} | {r['peak_rss_mb']:.0f} | {gpu} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,64",
                    help="output sizes, comma separated: megapixels (4:3) or HxW (8192x8192)")
    ap.add_argument("--tasks", default="ivf,mef,mmf")
    ap.add_argument("--variants", default="engine,peer,naive",
                    help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--quick", action="store_true", help="1 Mpx only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tile", type=int, default=None, help="engine tile (default: automatic)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    ap.add_argument("--json", help="also append every row to this JSON-lines file")
    ap.add_argument("--targets", action="store_true",
                    help="issue 18's ratios in one process (see the module docstring)")
    ap.add_argument("--repeat", type=int, default=2, help="warm calls per measurement (--targets)")
    ap.add_argument("--weights", default=None, choices=("clamped", "packaged", "authors"),
                    help="networks (default: authors' for the rows, clamped for --targets; "
                    "MMF always the authors')")
    ap.add_argument("--mmf-weights", help="--targets: the MMF network from this weights file "
                    "(grey inputs, as --weights packaged)")
    ap.add_argument("--exact", action="store_true", help="--targets on the exact path")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import numpy as np

    if a.child:
        task, mpx, variant = a.child.split(":")
        print(json.dumps(measure(task, _size(mpx), variant, a.device, a.tile,
                                 a.weights or "authors")))
        return 0
    if a.targets:
        targets(a.repeat, a.weights or "clamped", a.exact, a.tasks.split(","), a.device,
                a.mmf_weights)
        return 0
    sizes = [1.0] if a.quick else [_size(s) for s in a.sizes.split(",")]
    variants = a.variants.split(",")
    print(f"machine: {machine()}", flush=True)
    print("| task | Mpx | variant | s | Mpx/s | peak RSS MB | peak GPU MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    results = []
    for task in a.tasks.split(","):
        for mpx in sizes:
            for v in variants:
                if v == "naive" and np.prod(_hw(mpx)) / 1e6 > NAIVE_MAX_MPX[task]:
                    r = {"task": task, "mpx": mpx, "variant": v,
                         "error": "skipped: the untiled run holds every code map at once"}
                elif v.startswith("compile") and task == "mmf":
                    continue
                else:
                    r = run_child(task, mpx, v, a.device, a.tile, a.timeout,
                                  a.weights or "authors")
                results.append(r)
                print(row(r), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    by = {(r["task"], r["mpx"], r["variant"]): r for r in results if "error" not in r}
    print()
    for (task, mpx, v), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        if v != "engine":
            continue
        peer, naive = by.get((task, mpx, "peer")), by.get((task, mpx, "naive"))
        comp = by.get((task, mpx, "compile"))
        warm = by.get((task, mpx, "compile-warm"))
        notes = []
        if peer:
            notes.append(f"{r['seconds'] / peer['seconds']:.1f}x the peer's time")
        if comp and peer:
            notes.append(f"compiled {comp['seconds'] / peer['seconds']:.1f}x the peer's time")
        if warm and peer:
            notes.append(f"compiled, warm {warm['seconds'] / peer['seconds']:.1f}x the peer's time")
        if naive:
            notes.append(f"{naive['seconds'] / r['seconds']:.2f}x faster than naive, "
                         f"{naive['peak_rss_mb'] / r['peak_rss_mb']:.1f}x less peak RSS")
        print(f"{task} {_fmt(mpx)} Mpx: " + "; ".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
