"""`make loadtest-smoke` in `make test`: Locust's Parley users against real processes.

Real Daphne and worker processes on the test database, users minted by `loadtest_users`, Locust
headless in its own processes (master and two workers: the distributed path, with the counts
summed on the master). A run passes only with every message acked, delivered and checked: no
loss, gap, duplicate or error frame. A run whose threshold cannot be met exits non-zero.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtest"))

from local_run import run_locust, start_platform

pytestmark = [pytest.mark.timeout(400)]

USERS = 300


@pytest.fixture
def platform(live_stack, tmp_path):
    users_file = tmp_path / "users.jsonl"
    live_stack.manage("loadtest_users", "--count", str(USERS), "--out", str(users_file), "--prefix", "smoke")
    # Two protocol processes: users are spread over them and move to the other on a failed connect.
    return start_platform(live_stack, protocols=2), users_file


def test_a_distributed_locust_run_delivers_and_checks_every_message(platform, tmp_path):
    hosts, users_file = platform
    run = run_locust(hosts, users_file, tmp_path / "run", USERS, ramp_rate=100, hold_seconds=15,
                     extra=["--processes", "2"])
    figures = run.figures()
    assert run.returncode == 0, run.output[-4000:]
    assert figures["result"] == "PASS"
    for broken in ("lost", "gaps", "reordered", "duplicates", "mismatched", "stored_twice", "error_frames",
                   "connect_errors", "unacked"):
        assert figures[broken] == "0", f"{broken}: {run.last_line}"
    # Every user connected, users chatted and reconnected: the checks saw real traffic.
    assert int(figures["connects"]) >= USERS
    assert int(figures["acked"]) == int(figures["sent"]) > 100
    assert int(figures["deliveries"]) > int(figures["acked"])  # group rooms fan out
    assert int(figures["reconnects"]) > 0 and int(figures["resumes"]) > USERS  # reconnects + the final check
    # Locust's own reports hold what users feel.
    with open(run.out_dir / "run_stats.csv") as handle:
        names = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ("connect", "join", "ack", "delivery 1/1", "resume", "history"):
        assert int(names[name]["Request Count"]) > 0, name
        assert int(names[name]["Failure Count"]) == 0, name
    assert (run.out_dir / "run_stats_history.csv").stat().st_size > 0
    assert "<html" in (run.out_dir / "run.html").read_text()[:2000].lower()


def test_a_run_that_misses_a_threshold_exits_non_zero_and_says_which(platform, tmp_path):
    hosts, users_file = platform
    run = run_locust(hosts, users_file, tmp_path / "run", 50, ramp_rate=50, hold_seconds=5,
                     extra=["--max-delivery-p99-ms", "0.001"])
    assert run.returncode == 1, run.output[-4000:]
    assert run.figures()["result"] == "FAIL"
    assert "threshold missed: delivery p99" in run.output


def test_without_a_users_file_users_log_in_and_find_their_rooms(live_stack, tmp_path):
    # Accounts that exist already (a staging platform's test users): --login prefix:password.
    from chat.services import create_group, invite
    from tests.helpers import make_user

    users = [make_user(f"pw{i:07d}", "a-long-test-password")[0] for i in range(20)]
    room = create_group(users[0], "login-room", False)
    for user in users[1:]:
        invite(users[0].pk, room.pk, user.get_username())
    hosts = start_platform(live_stack, protocols=1)
    run = run_locust(hosts, tmp_path / "no-such-file.jsonl", tmp_path / "run", 20, ramp_rate=20, hold_seconds=8,
                     extra=["--login", "pw:a-long-test-password", "--mix", "group=1"])
    figures = run.figures()
    assert run.returncode == 0, run.output[-4000:]
    assert int(figures["connects"]) >= 20 and int(figures["acked"]) > 0
    # Each message reached the room's other members: they learnt the room from GET /api/rooms.
    assert int(figures["deliveries"]) >= 10 * int(figures["acked"])
