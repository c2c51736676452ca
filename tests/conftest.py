"""Fixtures shared by the test files (keep this small), and the skip policy:

- at the end of a run, one line says how many tests were skipped and why (grouped);
- under ``CI=true`` a skip is a failure unless the test needs a CUDA or MPS device (reason
  starting "needs CUDA" / "needs MPS"): CI runs with the shared data, so a missing data root
  (or a wrong ``CSCFUSION_SHARED``) fails the run naming what is missing instead of passing
  with a third of the suite skipped.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest

from ._shared import AUTHORS_WEIGHTS, NEEDS_SHARED, SHARED

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
ALLOWED_IN_CI = re.compile(r"needs (a )?(CUDA|MPS)\b")


@pytest.fixture
def fusion_weights():
    """fusion_weights(task) -> the authors' checkpoint path (../shared), else None for the
    packaged weights when they are installed; skips the test when neither is available."""
    def get(task: str) -> str | None:
        path = SHARED / AUTHORS_WEIGHTS[task]
        if path.exists():
            return str(path)
        from napari_cscfusion.engine.registry import packaged_weights_path
        if packaged_weights_path(task).is_file():
            return None
        pytest.skip(f"no weights for {task!r}: neither {path} nor packaged {task}.pt")
    return get


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


_SKIPS = pytest.StashKey[Counter]()
_PARTS = pytest.StashKey[set]()


def pytest_configure(config):
    config.stash[_SKIPS] = Counter()
    config.stash[_PARTS] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(NEEDS_SHARED):  # group by the missing parts
        reason_parts = reason.removeprefix(NEEDS_SHARED).split(" under ")[0].strip()
        item.config.stash[_PARTS].update(p.strip() for p in reason_parts.split(","))
        group = f"{NEEDS_SHARED} at {SHARED}"
    else:
        group = reason
    item.config.stash[_SKIPS][group] += 1
    if CI and not ALLOWED_IN_CI.match(reason):
        report.outcome = "failed"
        report.longrepr = (f"CI=true: this test was skipped ({reason}); CI must run every "
                           f"test that needs no CUDA/MPS device. Shared data root: {SHARED} "
                           f"({'present' if SHARED.is_dir() else 'MISSING'})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = config.stash.get(_SKIPS, Counter())
    if CI and not SHARED.is_dir():
        terminalreporter.write_line(
            f"shared data root {SHARED} is missing: the tests that need its data or the "
            f"authors' checkpoints cannot run (set CSCFUSION_SHARED); CI=true makes that a "
            f"failure", red=True)
    if skips:
        parts = [f"{n} {why}" for why, n in skips.most_common()]
        missing = sorted(config.stash.get(_PARTS, set()))
        if missing:
            parts.append(f"missing there: {', '.join(missing)}")
        failed = CI and any(not ALLOWED_IN_CI.match(why) for why in skips)
        what = "skipped (failures under CI=true)" if failed else "skipped"
        terminalreporter.write_line(f"{what} {sum(skips.values())}: " + "; ".join(parts),
                                    red=failed, yellow=not failed)


def pytest_sessionfinish(session, exitstatus):
    if CI and not SHARED.is_dir() and exitstatus == 0:
        session.exitstatus = 1  # e.g. a run selecting only tests that need no data
