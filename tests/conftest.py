"""Suite-wide rules: a skipped test fails the run.

Every test here exercises something real (vLLM, PostgreSQL, S3); a skip would
hide that it did not run, so the session fails instead.
"""

from __future__ import annotations

import pytest

from tests import reliability

_skipped: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):
        reliability.reset()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == 0:
        print(f"\nFAILED: {len(_skipped)} test(s) skipped; skips are failures here:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = 1
