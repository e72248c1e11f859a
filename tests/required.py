"""CI's strict mode for skips, a pytest plugin (loaded by conftest.py).

A skip whose reason starts with ``[required]`` is for a package or system service that .ci/run
installs (Debian's PostgreSQL and Chromium, Playwright, pgserver, ray, lancedb, schemathesis,
LangChain, LlamaIndex). On a developer's machine it stays a skip with its reason; with
``E5KIT_REQUIRE_SERVICES=1`` (set by .ci/run) it fails with the same reason, so CI cannot pass
with those tests skipped. Tag a skip with ``pytest.importorskip(name, reason="[required] ...")``
or ``pytest.skip("[required] ...")``.
"""

from __future__ import annotations

import os

import pytest

TAG = "[required]"


def _fail_required_skip(report):
    if report.skipped and os.environ.get("E5KIT_REQUIRE_SERVICES") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(TAG):
            report.outcome = "failed"
            report.longrepr = f"{reason} (E5KIT_REQUIRE_SERVICES=1: not skipped)"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_required_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _fail_required_skip((yield))
