"""Strict skips for CI: with MOBILLM_STRICT_SKIPS=1 (set by .ci/run) a skip whose reason is not on
tests/accepted_skips.txt fails, with its reason, instead of passing quietly.

A skip hides a test: on a developer's laptop that is the right call (no chromium, no ../shared),
in CI it is how a broken setup step turns into a green run. Both a skipped test and a skipped
module (a module-level `pytest.skip` or `importorskip`, reported at collection) are checked.
Expected failures (xfail) are not skips and are left alone. tests/conftest.py loads these hooks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ACCEPTED_FILE = Path(__file__).with_name("accepted_skips.txt")
ENV = "MOBILLM_STRICT_SKIPS"


def strict() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def accepted_patterns(path: Path = ACCEPTED_FILE) -> list[tuple[re.Pattern, str]]:
    """[(regex, why)] from `path`: `REGEX ## why` lines; blank lines and # comments ignored."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, sep, why = line.partition(" ## ")
        if not sep or not why.strip() or not pattern.strip():
            raise ValueError(f"{path}:{n}: expected 'REGEX ## why', got {line!r}")
        out.append((re.compile(pattern.strip()), why.strip()))
    return out


def skip_reason(longrepr) -> str:
    """The reason of a skip report (pytest keeps it as (path, lineno, 'Skipped: reason'))."""
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def skip_where(longrepr) -> str:
    return f"{longrepr[0]}:{longrepr[1]}" if isinstance(longrepr, tuple) else "?"


def refuse(report) -> None:
    """Turn an unaccepted skip report into a failure that says why."""
    reason = skip_reason(report.longrepr)
    if any(p.search(reason) for p, _ in accepted_patterns()):
        return
    report.outcome = "failed"
    report.longrepr = (f"unaccepted skip ({ENV}=1; accepted: tests/accepted_skips.txt) at "
                       f"{skip_where(report.longrepr)}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        refuse(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if strict() and report.skipped:
        refuse(report)
