"""The benchmark harness works end to end: Go client build, real Parley processes, one tiny step.

Runs `loadtest/bench.py` as `make bench` does, at toy size (40 sockets in 2 rooms, one 1 s step,
60 idle sockets, the reference server too) and checks the machine-readable last line and the
raw results. It proves the harness, not the numbers: the load is far below any limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "loadtest" / "bench.py"
EXIT_NO_GO = 3

# django_db only so that conftest's session teardown finds a test database when this file runs
# alone; the test itself uses none of it (the bench makes and drops its own database).
pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    # The bench starts its own Redis and database; never the test run's. And it runs from a
    # user's shell, where neither PARLEY_DEV nor SECRET_KEY is set (`make bench` once failed
    # there, while this test, run with the test run's PARLEY_DEV, passed).
    for key in ("REDIS_URL", "REDIS_URLS", "DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PARLEY_DEV", "SECRET_KEY"):
        env.pop(key, None)
    return env


def test_bench_harness_runs_a_tiny_step_against_real_parley(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, str(BENCH), "--build-only"], env=bench_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    if build.returncode == EXIT_NO_GO:
        pytest.skip("no Go toolchain (golang-go, golang-github-gorilla-websocket-dev) and apt-get cannot install it")
    assert build.returncode == 0, build.stderr[-3000:]

    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--sockets", "40", "--room-size", "20", "--steps", "200",
         "--step-seconds", "1", "--drain-seconds", "2", "--refine", "0", "--idle-sockets", "60",
         "--idle-warm", "10", "--settle-seconds", "0.5", "--noise-retry-pct", "0", "--max-p99-ms", "5000",
         "--db-name", f"parley_bench_smoke_{os.getpid()}", "--client-timeout", "120", "--json", str(results)],
        env=bench_env(), cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    last = run.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"fanout_ratio=(\S+) delivery_ratio=([\d.]+) p99_ms=([\d.]+) idle_kb_per_conn=(\S+) max_sockets=(\d+)", last
    )
    assert match, last
    assert float(match.group(2)) == 1.0  # 10 deliveries/s per room: nothing may be lost
    assert int(match.group(5)) == 60

    data = json.loads(results.read_text())
    parley, reference = data["results"]
    step = parley["fanout"]["steps"][0]
    assert parley["fanout"]["setup"]["ready"] == 40
    assert step["sent"] > 0 and step["received"] == step["expected"] == step["sent"] * 20
    assert step["acks"] == step["sent"]  # every send was acked by the worker
    assert step["seq_gaps"] == 0 and step["seq_dups"] == 0
    assert parley["idle"]["open"] == 60 and parley["idle"]["errors"] == 0
    ref_step = reference["fanout"]["steps"][0]
    assert ref_step["received"] == ref_step["expected"] > 0
