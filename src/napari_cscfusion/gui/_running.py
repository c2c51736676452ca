"""The run state every background widget shares: Run / Cancel enabled by turn, the progress bar
polled from the worker's CancelToken, and the token cancelled when the widget is destroyed.

Mixed into a magicgui Container that has ``run_button``, ``cancel_button`` and ``progress``
(a ProgressBar of PROGRESS_STEPS); call ``_init_run_state()`` after making them.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer

from ._state import CancelToken

PROGRESS_STEPS = 1000


class RunState:
    def _init_run_state(self) -> None:
        self._worker = None
        self._token: CancelToken | None = None
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
