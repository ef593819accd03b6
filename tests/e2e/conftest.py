"""Fixtures for `make e2e`, and the summary table printed at the end of the run:
client, version, route (client format -> upstream kind), cell, result, seconds.

`make test` does not collect this folder (the Makefile passes --ignore=tests/e2e)."""
from __future__ import annotations

import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROWS = []                    # (client, version, route, cell, result, seconds)


class Cell:
    """What a test tells the table about itself."""

    def __init__(self, node_name: str):
        self.client, self.version, self.route, self.name = "", "", "", node_name

    def set(self, client: str, version: str, route: str, name: str = "") -> "Cell":
        self.client, self.version, self.route = client, version, route
        self.name = name or self.name
        return self


@pytest.fixture(scope="session")
def tools() -> dict:
    return harness.load_tools()


@pytest.fixture
def cell(request) -> Cell:
    return request.node._e2e_cell


def tool_path(tools: dict, name: str) -> str:
    """The installed CLI, or skip with the installer's reason."""
    info = tools.get(name)
    if not info:
        pytest.skip(f"{name}: setup_tools.py has not run (no {harness.CACHE}/tools.json)")
    if "skipped" in info:
        pytest.skip(f"{name}: {info['skipped']}")
    return info["path"]


def pytest_sessionstart(session) -> None:
    shutil.rmtree(harness.ARTIFACTS, ignore_errors=True)
    os.makedirs(harness.ARTIFACTS, exist_ok=True)


def pytest_runtest_setup(item) -> None:
    item._e2e_cell = Cell(item.name)
    item._e2e_started = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    cell = getattr(item, "_e2e_cell", None)
    if cell is None or report.when == "teardown" and report.passed:
        return report
    if report.when == "call" or not report.passed:
        if report.passed:
            result = "pass"
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result = "skip: " + reason.replace("Skipped: ", "")
        else:
            result = "fail: " + failure_line(report)
        seconds = time.monotonic() - getattr(item, "_e2e_started", time.monotonic())
        ROWS.append((cell.client or "-", cell.version or "-", cell.route or "-", cell.name,
                     result, seconds))
    return report


def failure_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    text = text.replace("AssertionError: ", "").split("\nassert ")[0]
    return " ".join(text.split())


def table(rows: list, width: int = 150) -> list:
    head = ("client", "version", "route", "cell", "result", "seconds")
    cells = [(c, v, r, n, res if len(res) <= width else res[:width - 3] + "...", f"{s:.1f}")
             for c, v, r, n, res, s in rows]
    widths = [max(len(str(x[i])) for x in [head] + cells) for i in range(5)]
    line = lambda x: "  ".join(str(x[i]).ljust(widths[i]) for i in range(5)) + "  " + x[5].rjust(7)
    return [line(head), line(tuple("-" * w for w in widths) + ("-------",))] + [line(x) for x in cells]


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    lines = table(ROWS)
    terminalreporter.section("e2e cells")
    for text in lines:
        terminalreporter.write_line(text)
    counts = {k: sum(1 for r in ROWS if r[4].startswith(k)) for k in ("pass", "fail", "skip")}
    total = sum(r[5] for r in ROWS)
    terminalreporter.write_line(f"{counts['pass']} passed, {counts['fail']} failed, "
                                f"{counts['skip']} skipped in {total:.0f}s of cells; "
                                f"artifacts in {harness.ARTIFACTS}")
    with open(os.path.join(harness.ARTIFACTS, "summary.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(table(ROWS, width=10_000)) + "\n")
