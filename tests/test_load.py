"""The load test (issue 14's "Done when"): 32 concurrent pollers during a tiny training.

Prints requests/s, p50/p99 and errors of job reads and of /api/health under the same load, and
the largest gap between the trainer's progress events; ``bench/server_load.py`` does the work.
Slow and not in CI: run it with ``pytest -s -m slow tests/test_load.py``.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import server_load  # noqa: E402

CLIENTS = 32


@pytest.mark.slow
def test_32_pollers_during_a_tiny_training():
    result = server_load.measure(CLIENTS, seconds=15.0)
    print(f"\n{CLIENTS} clients, {result.cpus} CPUs")
    print("\n".join(result.lines()))
    assert result.status == "running"
    assert result.job.errors == 0 and result.health.errors == 0
    assert result.job.requests > 0 and result.health.requests > 0
    # The trainer's reports (its heartbeat) get through: the heartbeat timeout is 120 s.
    assert result.largest_progress_gap_s < 30
