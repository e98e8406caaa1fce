"""The 60-second soak (loadtest/soak.py): churn, stalled clients and a NATS restart, no leaks.

The soak itself asserts and exits non-zero on any failure; this checks its exit code and
the numbers in its JSON line, so a regression shows which promise it broke.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import seconds

SOAK = Path(__file__).resolve().parents[1] / "loadtest" / "soak.py"
DURATION_S = 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_60s_has_no_leaks_and_every_healthy_client_gets_the_final_message() -> None:
    """A 60-s soak: RSS flat, fds and connections back to baseline, final message to all."""
    # Its own process group: if it overruns, the soak and everything it started go.
    soak = subprocess.Popen(
        [sys.executable, str(SOAK), "--duration", str(DURATION_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = soak.communicate(timeout=seconds(DURATION_S + 120))
    except subprocess.TimeoutExpired:
        os.killpg(soak.pid, signal.SIGKILL)
        stdout, stderr = soak.communicate()
        pytest.fail(f"the soak overran:\n{stdout[-4000:]}{stderr[-4000:]}")
    output = stdout[-4000:] + stderr[-4000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert soak.returncode == 0, output
    assert report["ok"], report["failures"]
    assert report["failures"] == []
    # The load really happened: churn, the NATS restart, stalled clients.
    assert report["client_connects"] > 100, report
    assert report["nats_restart_at_s"] > 0
    assert report["stalled_opened"] >= 5
    assert report["stalled_closed_by_gateway"] == report["stalled_opened"]
    # No leaks: connections and fds back to where they started.
    assert report["connections_end"] == 0
    assert report["fds_end"] <= report["fds_baseline"] + 2
    assert report["rss_end_mb"] <= 1.1 * report["rss_warm_median_mb"]
    # Every healthy client connected at the end got the final message; nobody was dropped.
    assert report["final_received"] == report["final_expected"] > 0
    assert report["exit_code"] == 0
