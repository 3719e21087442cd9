"""The suite's time budget: a whole run that takes longer than SUITE_BUDGET_S seconds (default 480, 8 minutes
on 2 cores) fails and names its ten slowest tests, so a slow test is seen when it lands, not later.

SUITE_BUDGET_S=0 turns the check off (e.g. on a machine much slower than the one the budget is for).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest

BUDGET_S = float(os.environ.get("SUITE_BUDGET_S", "480"))
SLOWEST_SHOWN = 10

_seconds_by_test: dict[str, float] = defaultdict(float)
_run: dict[str, float] = {}


def pytest_sessionstart(session) -> None:
    _run["start"] = time.monotonic()


def pytest_runtest_logreport(report) -> None:
    _seconds_by_test[report.nodeid] += report.duration  # setup + call + teardown


def pytest_sessionfinish(session, exitstatus) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller judges the whole run
    _run["elapsed"] = time.monotonic() - _run["start"]
    if BUDGET_S and _run["elapsed"] > BUDGET_S and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if hasattr(config, "workerinput") or "elapsed" not in _run or not _seconds_by_test:
        return
    elapsed = _run["elapsed"]
    over = BUDGET_S and elapsed > BUDGET_S
    terminalreporter.write_line(f"suite time: {elapsed:.0f} s of a {BUDGET_S:.0f} s budget"
                                + (" - OVER BUDGET, the ten slowest tests:" if over else ""),
                                red=bool(over), bold=bool(over))
    if over:
        slowest = sorted(_seconds_by_test.items(), key=lambda item: item[1], reverse=True)[:SLOWEST_SHOWN]
        for nodeid, seconds in slowest:
            terminalreporter.write_line(f"  {seconds:7.1f} s  {nodeid}")
