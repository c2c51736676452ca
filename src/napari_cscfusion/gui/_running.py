"""The run state every background widget shares: Run / Cancel enabled by turn, the progress bar
polled from the worker's CancelToken with the elapsed time and an estimate of the time left in
the status (runs over a few seconds, issue 18), and the token cancelled when the widget is
destroyed.

Mixed into a magicgui Container that has ``run_button``, ``cancel_button``, ``progress`` (a
ProgressBar of PROGRESS_STEPS) and ``status`` (a Label); call ``_init_run_state()`` after
making them, ``_start_run(worker, token, text)`` to start a run, and ``_show_running(text)``
as it goes.
"""

from __future__ import annotations

import time

from qtpy.QtCore import QTimer

from ._state import CancelToken
from ._worker import timing_text

PROGRESS_STEPS = 1000


class RunState:
    def _init_run_state(self) -> None:
        self._worker = None
        self._token: CancelToken | None = None
        self._started = 0.0  # the running job's start (perf_counter)
        self._running_text = ""  # what the status says of it, before the timing
        self._timer = QTimer(self.native)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll_progress)
        self.native.destroyed.connect(self._cancel_token_only)

    @property
    def running(self) -> bool:
        """True from Run until the run's result is shown, it fails, or Cancel is pressed."""
        return self._token is not None

    @property
    def worker(self):
        """The current (or last) worker, for tests and scripts."""
        return self._worker

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        if running:
            self._timer.start()
        else:
            self._timer.stop()

    def _poll_progress(self) -> None:
        if self._token is not None:
            self.progress.value = int(round(self._token.fraction * PROGRESS_STEPS))
            self._show_running(self._running_text)

    def _start_run(self, worker, token: CancelToken, text: str) -> None:
        """Start ``worker`` (cancelled through ``token``): progress at 0, the clock started,
        ``text`` in the status, Run disabled and Cancel enabled."""
        self._worker, self._token = worker, token
        self.progress.value = 0
        self._started = time.perf_counter()
        self._show_running(text)
        self._set_running(True)
        worker.start()

    def _show_running(self, text: str) -> None:
        """The status of a running job: ``text`` and the time so far ("running …
        (12 s elapsed, about 30 s left)": ``timing_text``; a short run shows seconds only)."""
        self._running_text = text
        elapsed = time.perf_counter() - self._started
        fraction = self._token.fraction if self._token is not None else 0.0
        timing = timing_text(elapsed, fraction)
        self.status.value = f"{text} ({timing or f'{elapsed:.0f} s'})"

    def _stop(self) -> bool:
        """Cancel the running worker's token and make the widget ready again; False when
        nothing was running."""
        token = self._token
        if token is None:
            return False
        token.cancel()
        self._token = None
        self._set_running(False)
        return True

    def _cancel_token_only(self, *_) -> None:
        if self._token is not None:
            self._token.cancel()
