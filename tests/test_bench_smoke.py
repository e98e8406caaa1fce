"""A seconds-long run of the fan-out benchmark (loadtest/bench.py), so the tool cannot rot.

Tiny N, all three targets (gateway, nats-server's WebSocket listener, the naive relay),
real processes on loopback. Checks the JSON line's shape and that the gateway delivered
every frame; it measures nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import seconds

BENCH = Path(__file__).resolve().parents[1] / "loadtest" / "bench.py"


def test_bench_quick_run_reports_all_targets(tmp_path: Path) -> None:
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
    runs = {r["target"]: r for r in report["results"] if r["scenario"] == "grid"}
    assert set(runs) == {"gateway", "nats", "naive"}

    gateway = runs["gateway"]
    assert gateway["expected"] == gateway["published"] * gateway["clients"] > 0
    assert gateway["delivered"] == gateway["expected"], gateway
    assert gateway["min_per_client"] == gateway["published"]
    for target, run in runs.items():
        assert run["clients"] == 5, target
        assert 0 < run["delivered"] <= run["expected"], (target, run)
        lat = run["lat_ms"]
        assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 10_000, (target, lat)
        assert run["server_cpu_s_per_1k"] >= 0, target
        assert run["server_rss_kib"] > 1000, target
        assert run["client_cpu_s"] >= 0, target
        assert run["drained"], target
    assert "naive relay (seed design, BASELINE)" in done.stdout
