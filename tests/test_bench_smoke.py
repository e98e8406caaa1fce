"""A seconds-long run of the fan-out benchmark (loadtest/bench.py), so the tool cannot rot.

Tiny N, all three targets (gateway, nats-server's WebSocket listener, the naive relay),
two repeats per point, and the compression scenario (permessage-deflate off vs on), real
processes on loopback. Checks the JSON line's shape, that the gateway delivered every
frame, that the per-message lateness and the median/worst tables are there, and that a
client offering deflate really gets compressed frames; it measures nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import seconds

BENCH = Path(__file__).resolve().parents[1] / "loadtest" / "bench.py"

# The bench's clients and the naive relay come from the opt-in load group; .ci/run and the
# GitHub workflow install it (`uv sync --group load`), a bare `uv run pytest` may not.
pytest.importorskip("picows", reason="the load group is not installed: uv sync --group load")
pytest.importorskip("uvloop", reason="the load group is not installed: uv sync --group load")


def test_bench_quick_run_reports_all_targets_and_compression(tmp_path: Path) -> None:
    """`bench.py --quick`: every target, repeats, late messages named, deflate negotiated."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=seconds(90),
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "gateway-fanout"
    assert list(tmp_path.glob("bench-*.json")), "the result is saved in --out"
    assert report["machine"]["nproc"] >= 1
    grid = [r for r in report["results"] if r["scenario"] == "grid"]
    assert sorted((r["target"], r["repeat"]) for r in grid) == [
        (t, k) for t in ("gateway", "naive", "nats") for k in (1, 2)
    ]

    for run in grid:
        target = run["target"]
        assert run["clients"] == 5, target
        assert 0 < run["delivered"] <= run["expected"], (target, run)
        lat = run["lat_ms"]
        assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 10_000, (target, lat)
        assert run["server_cpu_s_per_1k"] >= 0, target
        assert run["server_rss_kib"] > 1000, target
        assert run["client_cpu_s"] >= 0, target
        assert run["loadavg_1m_before"] >= 0, target
        assert run["drained"], target
        late = run["per_message"]
        assert late["messages"] == run["published"], target
        assert late["slowest"], target
        for m in late["slowest"]:
            assert 1 <= m["n"] <= late["messages"], (target, m)
            assert m["median_ms"] <= m["max_ms"] <= lat["max"], (target, m)
        if target == "gateway":
            assert run["expected"] == run["published"] * run["clients"] > 0
            assert run["delivered"] == run["expected"], run
            assert run["min_per_client"] == run["published"]
            assert run["deflated_frames"] == 0, "picows offers no deflate unless asked"
    assert "naive relay (seed design, BASELINE)" in done.stdout
    assert "median=" in done.stdout, done.stdout[-3000:]
    assert "worst=" in done.stdout, done.stdout[-3000:]

    bytes_runs = (r for r in report["results"] if r["scenario"] == "deflate-bytes")
    sized = {(r["target"], r["shape"], r["size"]): r for r in bytes_runs}
    for shape, size in (("pad", 0), ("pad", 4096), ("levels", 4096)):
        off, on = sized[("gw-off", shape, size)], sized[("gw-deflate", shape, size)]
        assert off["deflated_frames"] == 0, shape
        assert on["deflated_frames"] == on["delivered"] == on["expected"] > 0, on
        assert on["wire_bytes_per_frame"] < off["wire_bytes_per_frame"], (shape, size)
        assert on["inflate_errors"] == 0, "every compressed frame inflates to whole JSON"
    idle = {(r["target"], r["deflate_clients"]) for r in report["results"] if "rss_after_kib" in r}
    assert idle == {("gw-off", False), ("gw-deflate", True), ("gw-deflate", False)}
