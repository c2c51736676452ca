"""The background run: a napari thread_worker that calls the engine plane by plane.

Cancel: the GUI sets a CancelToken. The engine's ``progress`` callback raises
``engine.Cancelled`` when it is set (between the engine's steps). Because one engine step can
take long on a CPU (a whole encoder, or the saliency rule), the run also executes under a
``TorchFunctionMode`` that raises Cancelled at the next torch operation once the token is set.
Torch function modes are thread-local, so only this run's thread is affected; a run stops
within one torch operation (milliseconds) and hands nothing back.
"""

from __future__ import annotations

import time

from napari.qt.threading import GeneratorWorker, create_worker
from torch.overrides import TorchFunctionMode

from ..engine import Cancelled
from ..engine.notices import recorded_only
from ..engine.planes import PlaneAssembler, plane_indices
from ._state import MODELS, CancelToken, FusionJob, RunOutcome


class CancelMode(TorchFunctionMode):
    """Raise Cancelled at the next torch function call once ``token`` is set."""

    def __init__(self, token: CancelToken):
        super().__init__()
        self.token = token

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.token.cancelled:
            raise Cancelled("cancelled by the user")
        return func(*args, **(kwargs or {}))


def run_job(job: FusionJob, token: CancelToken):
    """Generator run in the worker thread: yields (planes done, planes total), returns a
    RunOutcome. Every failure is returned, not raised, so the widget decides how to show it."""
    t0 = time.perf_counter()
    try:
        model = MODELS.get(job.task, job.weights)
        if token.cancelled:
            raise Cancelled("cancelled by the user")
        assembler = PlaneAssembler(job.leading_shape, job.codes)
        total = assembler.n_planes
        want_codes = job.codes != "none"
        for k, index in enumerate(plane_indices(job.leading_shape)):
            if token.cancelled:
                raise Cancelled("cancelled by the user")

            def progress(done: int, steps: int, k: int = k) -> None:
                if token.cancelled:
                    raise Cancelled("cancelled by the user")
                token.fraction = (k + (done / steps if steps else 1.0)) / total

            # entered per plane: never held across a yield. The engine's notices (out of
            # memory: smaller tiles, or the CPU) go to metadata["notices"] only, which the
            # widget shows each run (a warning from this thread would reach napari's hook,
            # which shows a given message once per session)
            with CancelMode(token), recorded_only():
                result = job.run_plane(index, model, progress, want_codes)
            assembler.add(index, result)
            token.fraction = (k + 1) / total
            yield (k + 1, total)
        result = assembler.result()
        if job.finish is not None:
            result = job.finish(result)
        elapsed = time.perf_counter() - t0
        result.metadata["elapsed_s"] = elapsed
        return RunOutcome(result=result, elapsed_s=elapsed)
    except Cancelled:
        return RunOutcome(cancelled=True, elapsed_s=time.perf_counter() - t0)
    except Exception as exc:  # shown to the user as a notification by the widget
        return RunOutcome(error=exc, elapsed_s=time.perf_counter() - t0)


def make_worker(job: FusionJob, token: CancelToken) -> GeneratorWorker:
    """A started-later worker; connect its signals, then call ``start()``."""
    return create_worker(run_job, job, token, _start_thread=False, _ignore_errors=True)
