"""Collects each benchmark's figures and prints one summary table at the end of the session."""

import json
import os

import pytest

RESULTS: list[dict] = []


@pytest.fixture
def record():
    def add(**row):
        RESULTS.append(row)
    return add


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("kvlink benchmark summary")
    tr.write_line(f"{'case':<44} {'bytes r+w':>12} {'time(us)':>10} {'GB/s':>9} {'vs base':>8} {'verified':>8}")
    for row in RESULTS:
        tr.write_line(f"{row['case']:<44} {row.get('bytes', 0):>12} {row['time_us']:>10.2f} "
                      f"{row.get('GBps', 0):>9.1f} {row.get('vs_copy', float('nan')):>8.3f} {str(row.get('verified', '')):>8}")
    path = os.environ.get("KVLINK_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=2)
        tr.write_line(f"wrote {path}")
