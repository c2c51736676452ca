"""Timing and memory bounds that used to be asserts in unit tests (issue 20): on a busy machine
they failed by chance, so the tests now assert the behaviour (the run stops before its end,
nothing is added, the worker ends) and the numbers are measured here.

    python benchmarks/bounds.py heap          # malloc_trim on a pinned heap (Linux/glibc)
    xvfb-run -a python benchmarks/bounds.py gui [--repeats 5]   # napari viewer, needs a display
    python benchmarks/bounds.py all

heap: 96 MB freed in blocks under glibc's mmap threshold, each followed by a small block kept
(as a tile's results pin the heap's top); ``release_freed_memory()`` must hand at least half of
it back (RSS before minus after; the former unit-test bound, test_tiling).

gui (packaged CSC-IVFN, saliency rule, random planes; the former bounds of test_gui_ivf and
test_gui_reliability):
* cancel: Cancel clicked mid-run -> the worker's ``finished`` signal; target < 2 s
  (6 planes of 160x160);
* source removed: a source layer deleted mid-run -> ``finished``; target < 5 s (4 x 128x128);
* viewer closed: the viewer closed mid-run -> ``finished``; target < 5 s (4 x 128x128);
* event loop: 10 ms timer ticks seen while a run is on; target >= 10 (2 x 96x96, l1 rule).

Prints one line per measurement (median and worst of ``--repeats``) and exits 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import numpy as np


def heap() -> list[tuple[str, float, float, str, bool]]:
    import psutil

    from napari_cscfusion.engine import notices

    if notices._malloc_trim() is None:
        print("heap: the C library has no malloc_trim (not glibc): nothing to measure")
        return []
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, n = 96 << 10, 1024  # 96 MB in blocks under glibc's mmap threshold: heap memory
    big, pins = [], []
    try:
        for _ in range(n):
            big.append(libc.malloc(block))
            ctypes.memset(big[-1], 1, block)
            pins.append(libc.malloc(4000))  # a small block kept after each
        for p in big:
            libc.free(p)
        big.clear()
        before = psutil.Process().memory_info().rss
        notices.release_freed_memory()
        released = before - psutil.Process().memory_info().rss
    finally:
        for p in big + pins:
            libc.free(p)
    mb = released / 1e6
    return [("heap released (MB of 100.7)", mb, mb, f">= {n * block / 2e6:.1f}",
             released >= n * block // 2)]


def _wait(app, condition, timeout: float) -> bool:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        app.processEvents()
        if condition():
            return True
        time.sleep(0.002)
    return False


def _slow_ivf(viewer, planes: int, size: int, rule: str = "saliency"):
    rng = np.random.default_rng(1)
    ir = viewer.add_image(rng.random((planes, size, size), np.float32), name="ir")
    vis = viewer.add_image(rng.random((planes, size, size), np.float32), name="vis")
    _dock, widget = viewer.window.add_plugin_dock_widget(
        "napari-cscfusion", "Infrared + visible fusion (CSC-IVFN)")
    widget.ir_layer.value, widget.vis_layer.value = ir, vis
    widget.base_rule.value = rule
    return widget, ir


def _stop_latency(app, how: str, planes: int, size: int) -> float:
    import napari

    viewer = napari.Viewer(show=False)
    widget, ir = _slow_ivf(viewer, planes, size)
    finished = []
    widget.run_button.native.click()
    widget.worker.finished.connect(lambda: finished.append(time.perf_counter()))
    if not _wait(app, lambda: widget._token is not None and widget._token.fraction > 0, 120):
        raise RuntimeError("the run did not start")
    t0 = time.perf_counter()
    if how == "cancel":
        widget.cancel_button.native.click()
    elif how == "remove":
        viewer.layers.remove(ir)
    else:
        viewer.close()
    if not _wait(app, lambda: bool(finished), 120):
        raise RuntimeError(f"{how}: the worker did not end within 120 s")
    latency = finished[0] - t0
    if how != "close":
        viewer.close()
    return latency


def _event_loop_ticks(app) -> float:
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(show=False)
    widget, _ir = _slow_ivf(viewer, 2, 96, rule="l1")
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(widget.running))
    timer.start()
    widget.run_button.native.click()
    _wait(app, lambda: not widget.running, 300)
    timer.stop()
    viewer.close()
    return float(sum(ticks))


def gui(repeats: int) -> list[tuple[str, float, float, str, bool]]:
    from napari.qt import get_qapp

    app = get_qapp()
    rows = []
    for name, how, planes, size, target in (("cancel -> worker ended (s)", "cancel", 6, 160, 2.0),
                                            ("source removed -> ended (s)", "remove", 4, 128,
                                             5.0),
                                            ("viewer closed -> ended (s)", "close", 4, 128, 5.0)):
        values = [_stop_latency(app, how, planes, size) for _ in range(repeats)]
        rows.append((name, statistics.median(values), max(values), f"< {target}",
                     max(values) < target))
    ticks = [_event_loop_ticks(app) for _ in range(repeats)]
    rows.append(("event-loop ticks during a run", statistics.median(ticks), min(ticks), ">= 10",
                 min(ticks) >= 10))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["heap", "gui", "all"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = []
    if args.what in ("heap", "all"):
        rows += heap()
    if args.what in ("gui", "all"):
        rows += gui(args.repeats)
    print(f"{'measurement':34s} {'median':>8s} {'worst':>8s}  target")
    for name, median, worst, target, ok in rows:
        print(f"{name:34s} {median:8.2f} {worst:8.2f}  {target} {'ok' if ok else 'MISSED'}")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
