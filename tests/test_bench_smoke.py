"""The benchmark harness works end to end: Go client build, real Parley, the hub and the tutorial.

Runs `loadtest/bench.py` as `make bench` does, at toy size: under Daphne and uvicorn, Parley and
the O(1) pub/sub hub with 40 sockets in 2 rooms and one 1 s step; a big room of 40; the socket
phases with 60 sockets (connect, join, close, reconnect, resume); the Channels tutorial; the
worker benchmark at 200 messages (PostgreSQL only). It checks the machine-readable last line and
the raw results. It proves the harness, not the numbers: the load is far below any limit.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.bench import final_line, summarise

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "loadtest" / "bench.py"
EXIT_NO_GO = 3
LAST_LINE = re.compile(
    r"fanout_ratio=(?P<fanout_ratio>\S+) worker_msgs_per_s=(?P<worker_msgs_per_s>\S+) "
    r"insert_ratio=(?P<insert_ratio>\S+) connect_per_s=(?P<connect_per_s>\S+) join_per_s=(?P<join_per_s>\S+) "
    r"resume_per_s=(?P<resume_per_s>\S+) delivery_ratio=(?P<delivery_ratio>\S+) p99_ms=(?P<p99_ms>\S+) "
    r"idle_kb_per_conn=(?P<idle_kb_per_conn>\S+) max_sockets=(?P<max_sockets>\S+)"
)
SOCKETS, WARM = 60, 10


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    # The bench starts its own Redis and database; never the test run's. And it runs from a
    # user's shell, where neither PARLEY_DEV nor SECRET_KEY is set (`make bench` once failed
    # there, while this test, run with the test run's PARLEY_DEV, passed).
    for key in ("REDIS_URL", "REDIS_URLS", "DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PARLEY_DEV", "SECRET_KEY"):
        env.pop(key, None)
    return env


def run_toy_bench(results: Path) -> subprocess.CompletedProcess[str]:
    build = subprocess.run([sys.executable, str(BENCH), "--build-only"], env=bench_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    if build.returncode == EXIT_NO_GO:
        pytest.skip("no Go toolchain (golang-go, golang-github-gorilla-websocket-dev) and apt-get cannot install it")
    assert build.returncode == 0, build.stderr[-3000:]
    return subprocess.run(
        [sys.executable, str(BENCH), "--sockets", "40", "--room-size", "20", "--steps", "200",
         "--step-seconds", "1", "--drain-seconds", "2", "--refine", "0", "--big-room", "40", "--big-room-steps", "200",
         "--socket-count", str(SOCKETS), "--idle-warm", str(WARM), "--settle-seconds", "0.5",
         "--worker-args", "--messages 200 --seconds 1 --rate 200", "--noise-retry-pct", "0", "--max-p99-ms", "5000",
         "--db-name", f"parley_bench_smoke_{os.getpid()}", "--client-timeout", "120", "--json", str(results)],
        env=bench_env(), cwd=REPO, capture_output=True, text=True, timeout=240,
    )


def assert_all_delivered(run: dict, members: int, parley: bool) -> None:
    step = run["steps"][0]
    assert run["setup"]["ready"] == run["sockets"]
    assert step["sent"] > 0 and step["received"] == step["expected"] == step["sent"] * members
    assert step["late"] == 0 and step["lost"] == 0
    if parley:
        assert step["acks"] == step["sent"]  # every send was acked by the worker
        assert step["seq_gaps"] == 0 and step["seq_dups"] == 0


# django_db only so that conftest's session teardown finds a test database when this file runs
# alone; the test itself uses none of it (the bench makes and drops its own database).
@pytest.mark.slow
@pytest.mark.django_db
def test_bench_harness_runs_every_part_at_toy_size(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = run_toy_bench(results)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    match = LAST_LINE.fullmatch(run.stdout.strip().splitlines()[-1])
    assert match, run.stdout.strip().splitlines()[-1]
    figures = {key: float(value) for key, value in match.groupdict().items()}
    # 10 deliveries/s per room: Parley and the hub each deliver everything, so both score the step.
    assert figures["delivery_ratio"] == 1.0
    assert 0.5 < figures["fanout_ratio"] < 2
    assert figures["connect_per_s"] > 0 and figures["join_per_s"] > 0 and figures["resume_per_s"] > 0
    assert 0 < figures["idle_kb_per_conn"] < 500
    assert figures["max_sockets"] == SOCKETS + WARM

    data = json.loads(results.read_text())
    runs = data["runs"]
    for server in ("daphne", "uvicorn"):
        assert_all_delivered(runs["fanout"][server]["parley"], 20, parley=True)
        assert_all_delivered(runs["fanout"][server]["hub"], 20, parley=False)
        assert runs["fanout"][server]["hub"]["logs"]["errors"] == 0
        assert data["summary"][f"fanout_ratio_{server}"] is not None  # the hub was a valid denominator
    assert_all_delivered(runs["big_room"]["parley"], 40, parley=True)
    assert_all_delivered(runs["big_room"]["hub"], 40, parley=False)
    assert_all_delivered(runs["tutorial"]["fanout"], 20, parley=False)

    sockets = runs["sockets"]
    assert sockets["ready"]["joined"] == SOCKETS and sockets["ready"]["join_errors"] == 0
    assert sockets["resumed"]["resumed"] == SOCKETS and sockets["resumed"]["resume_errors"] == 0
    assert sockets["alive"]["open"] == SOCKETS + WARM and sockets["closed_by_server"] == 0

    if data["meta"]["database"].startswith("PostgreSQL"):
        assert figures["worker_msgs_per_s"] > 0 and figures["insert_ratio"] > 0
        assert runs["worker"]["lost"] == 0
    else:
        assert math.isnan(figures["worker_msgs_per_s"]) and "PostgreSQL" in runs["worker"]["skipped"]


def test_last_line_says_nan_for_every_part_skipped() -> None:
    summary = summarise({"worker": {"skipped": "--skip-worker"}}, ["daphne", "uvicorn"])
    assert final_line(summary) == (
        "fanout_ratio=nan worker_msgs_per_s=nan insert_ratio=nan connect_per_s=nan join_per_s=nan "
        "resume_per_s=nan delivery_ratio=nan p99_ms=nan idle_kb_per_conn=nan max_sockets=nan"
    )
