"""`python -m loadtest.capacity`: the plan from the recorded figures, values-400k.yaml kept derived
from them, missing figures refused, the model's constants checked against the code they stand for,
and the validation against Locust runs.

The arithmetic tests read tests/fixtures/capacity/benchmarks.json, round synthetic figures whose
plan can be worked out by hand (shown next to each expected number); the check of the committed
values file reads the committed docs/benchmarks.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.capacity_inputs import Documents, load_json, read_inputs
from loadtest.capacity_model import (
    ROLLOUT_MAX_SURGE,
    STATEMENTS_PER_BATCH,
    Planning,
    Workload,
    app_defaults,
    batching,
    distinct_pods,
    plan,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "capacity"
BENCH = FIXTURES / "benchmarks.json"
SYNTHETIC_RUNS = FIXTURES / "loadtest-synthetic.json"
APP = app_defaults()


def capacity(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest.capacity", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def plan_of(workload: Workload, bench: Path = BENCH, loadtest: Path | None = None, **assume: float):
    doc = Documents(load_json(bench), load_json(loadtest) if loadtest else None, bench,
                    loadtest or FIXTURES / "absent.json", "daphne", APP.store_connections)
    inputs = read_inputs(doc, {k.replace("__", "."): v for k, v in assume.items()})
    return plan(workload, Planning(poll_seconds=10, jitter_seconds=APP.reconnect_jitter_ms / 1000), inputs, APP)


# --- the committed file ---------------------------------------------------------------------------

def test_the_committed_values_file_is_derived_from_the_committed_measurements() -> None:
    done = capacity("--users", "400000", "--check-values", "values-400k.yaml")
    assert done.returncode == 0, (
        "values-400k.yaml disagrees with the capacity model on docs/benchmarks.json:\n"
        f"{done.stdout[-4000:]}\n{done.stderr}")


# --- the arithmetic, on round figures ---------------------------------------------------------------

def test_round_figures_give_the_hand_worked_plan() -> None:
    result = plan_of(Workload(400_000))
    protocol, workers = result.protocol, result.workers
    assert protocol is not None and workers is not None
    # Deliveries 10,000/s less 25 % = 7,500 per pod; the peak is 400,000/s (1/min x 20 x 3): 7,500
    # users per pod. Sockets 10,000 less 20 % = 8,000. Rollout: 500 resumes/s less 25 % = 375/s x
    # 5 s jitter; with 55 pods 14 drain at once: 55 x 1,875 / 14 = 7,366 per pod.
    # min(8,000, 7,500, 7,366) -> 7,300 (2 significant figures) -> ceil(400,000 / 7,300) = 55 pods.
    assert protocol.target_per_pod == 7300
    assert (protocol.tier.count, protocol.tier.ceiling) == (55, 83)  # ceiling: 600,000 / 7,300
    assert protocol.tier.bounds[0].name == "reconnect storm of a rollout"
    assert {b.name: b.needs for b in protocol.tier.bounds} == {
        "reconnect storm of a rollout": 55, "deliveries per pod": 54, "connections per pod": 50}
    # Memory: 100 MiB of process + 9,125 sockets (7,300 / 0.8) x 10 KB = 189 MiB; x 2 -> 384Mi.
    assert (protocol.memory_request_mi, protocol.memory_limit_mi) == (384, 768)
    # Workers: 7,500/s planned; 6,667/s needs 1, the floor is 2; the peak's 20,000/s needs 3; the
    # ceiling 30,000 / 7,500 = 4. Queue target: 0.25 s x 7,500 = 1,875 -> 1,800.
    assert (workers.tier.count, workers.tier.ceiling, workers.peak_workers) == (2, 4, 3)
    assert workers.tier.bounds[0].name == "availability floor"
    assert workers.target_queue_depth == 1800
    assert result.unsized == {"Locust workers": ["locust.users_per_process", "locust.cpu_cores_per_1000_users",
                                                 "locust.rss_mb_per_1000_users"]}


def test_big_rooms_make_deliveries_the_limit_and_the_floor_carries_the_peak() -> None:
    workload = Workload(400_000, room_mix=((40.0, 1.0),))
    protocol = plan_of(workload).protocol
    assert protocol is not None
    assert protocol.tier.bounds[0].name == "deliveries per pod"
    # The operator adds protocol pods for connections only: the floor alone must deliver the peak.
    assert protocol.tier.count * protocol.per_pod_deliveries >= workload.peak_deliveries_per_s
    assert protocol.target_per_pod == 3700  # 7,500 x 400,000 / 800,000 = 3,750 -> 3,700


def test_fast_resumes_and_small_rooms_leave_connections_as_the_limit() -> None:
    result = plan_of(Workload(400_000, room_mix=((10.0, 1.0),)), protocol__resume_per_s=2000)
    assert result.protocol is not None
    assert result.protocol.tier.bounds[0].name == "connections per pod"
    assert (result.protocol.target_per_pod, result.protocol.tier.count) == (8000, 50)
    assert result.inputs.figures["protocol.resume_per_s"].kind == "assumed"


def test_many_users_make_stored_messages_the_worker_limit() -> None:
    workers = plan_of(Workload(4_000_000)).workers
    assert workers is not None
    # 66,667 messages/s / 7,500 per worker = 9 (8.9).
    assert workers.tier.bounds[0].name == "stored messages/s per worker"
    assert workers.tier.count == 9


def test_members_spread_over_pods() -> None:
    assert distinct_pods(50, 20) == pytest.approx(16.62, abs=0.01)
    assert distinct_pods(1, 20) == 1
    assert distinct_pods(1000, 2) == pytest.approx(2, abs=0.01)


# --- the model's constants against the code they stand for ------------------------------------------

def test_the_batching_model_matches_the_worker_benchmark() -> None:
    """The pacing and split rules predict the mean batch make bench-worker counted at its latency
    run's rate (docs/benchmarks.json: batches read from the worker's own histogram)."""
    latency = json.loads((REPO / "docs" / "benchmarks.json").read_text())["worker"]["latency"]
    predicted = batching(latency["rate"], APP).mean_batch
    assert predicted == pytest.approx(latency["mean_batch"], rel=0.15)


def test_the_rollout_surge_is_the_operators() -> None:
    from parley_operator import resources
    from parley_operator.spec import parse_body

    body = {"apiVersion": "parley.dev/v1alpha1", "kind": "ChatPlatform",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u"},
            "spec": {"image": "registry.example/parley:1", "allowedHosts": ["chat.example.com"],
                     "redis": {"urls": ["redis://r:6379/0"]}, "database": {"secretRef": {"name": "db"}}}}
    rolling = resources.deployment(body, parse_body(body), "protocol", 50)["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    assert float(rolling["maxSurge"].rstrip("%")) / 100 == ROLLOUT_MAX_SURGE


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_worker_stores_a_batch_in_the_statements_the_model_counts() -> None:
    from chat.services import create_group
    from chat.store_pg import PgStore, conninfo_from_django
    from tests.helpers import make_user

    alice, _ = make_user("alice")
    rooms = [create_group(alice, f"room-{n}", False) for n in range(3)]
    batch = [{"room": rooms[n % 3].pk, "sender": alice.pk, "body": f"m{n}", "client_msg_id": f"c{n}"}
             for n in range(30)]
    statements: list[str] = []

    async def store() -> list:
        store = PgStore(conninfo_from_django())
        conn = await store._connection()
        execute = conn.execute

        async def counted(query, *args, **kwargs):
            statements.append(str(query))
            return await execute(query, *args, **kwargs)

        conn.execute = counted  # type: ignore[method-assign]
        try:
            return await store.store_batch(batch)
        finally:
            await store.close()

    outcomes = asyncio.run(store())
    assert [o.status for o in outcomes] == ["stored"] * 30
    assert len(statements) == STATEMENTS_PER_BATCH


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RSS for {pid}")


def settled_rss_mib(pid: int, limit: float = 30.0) -> float:
    """RSS once start-up is over: unchanged within 1 MiB for two seconds."""
    deadline, last = time.monotonic() + limit, -1.0
    while time.monotonic() < deadline:
        now = rss_mib(pid)
        if abs(now - last) < 1:
            return now
        last = now
        time.sleep(2)
    return rss_mib(pid)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_real_idle_processes_fit_the_memory_estimates(live_stack) -> None:
    live_stack.start_protocol()
    protocol = live_stack.processes[-1]
    worker = live_stack.start_worker()
    # No recorded figures: the estimates the model falls back on.
    inputs = read_inputs(Documents(None, None, BENCH, BENCH, "daphne", APP.store_connections), {})
    estimates = {role: inputs.get(f"{role}.process_rss_mb") for role in ("protocol", "worker")}
    assert all(inputs.figures[f"{role}.process_rss_mb"].kind == "estimate" for role in estimates)
    measured = {"protocol": settled_rss_mib(protocol.pid), "worker": settled_rss_mib(worker.pid)}
    for role, mib in measured.items():
        assert mib < estimates[role], f"an idle {role} process holds {mib:.0f} MiB, the model assumes {estimates[role]}"


# --- refusing to pretend ---------------------------------------------------------------------------------

def test_missing_measurements_are_named_and_no_tier_is_sized_from_guesses(tmp_path: Path) -> None:
    bench = json.loads(BENCH.read_text())
    del bench["worker"]
    partial = tmp_path / "benchmarks.json"
    partial.write_text(json.dumps(bench))
    values = tmp_path / "values-400k.yaml"
    shutil.copy(REPO / "values-400k.yaml", values)

    done = capacity("--benchmarks", partial, "--loadtest", tmp_path / "none.json")
    assert done.returncode == 3
    assert "| worker pods | not sized |" in done.stdout
    assert "worker.msgs_per_s" in done.stderr and "loadtest/worker_bench.py --record" in done.stderr
    assert "--assume worker.msgs_per_s=VALUE" in done.stderr

    before = values.read_text()
    done = capacity("--benchmarks", partial, "--loadtest", tmp_path / "none.json", "--check-values", values)
    assert done.returncode == 3 and values.read_text() == before
    done = capacity("--benchmarks", partial, "--loadtest", tmp_path / "none.json", "--write-values", values)
    assert done.returncode == 3 and values.read_text() == before


def test_the_locust_tier_needs_the_locust_runs_or_a_stated_assumption(tmp_path: Path) -> None:
    done = capacity("--benchmarks", BENCH, "--loadtest", tmp_path / "none.json")
    assert done.returncode == 3
    assert "| Locust workers | not sized |" in done.stdout
    assert "locust.users_per_process" in done.stderr and "does not exist yet" in done.stderr

    done = capacity("--benchmarks", BENCH, "--loadtest", tmp_path / "none.json",
                    "--assume", "locust.users_per_process=8000", "--assume", "locust.cpu_cores_per_1000_users=0.05",
                    "--assume", "locust.rss_mb_per_1000_users=40")
    assert done.returncode == 0, done.stderr
    assert "| Locust workers | 50 |" in done.stdout  # 400,000 / 8,000
    assert "ASSUMED (not measured): locust.users_per_process = 8000" in done.stdout


def test_an_unknown_assumption_is_refused() -> None:
    done = capacity("--assume", "protocol.magic=3")
    assert done.returncode == 2
    assert "protocol.deliveries_per_s" in done.stderr  # it lists the keys it knows


# --- writing and checking a values file ---------------------------------------------------------------------

def test_a_stale_values_file_fails_the_check_with_a_diff_and_write_repairs_only_what_the_model_owns(
        tmp_path: Path) -> None:
    values = tmp_path / "values-400k.yaml"
    shutil.copy(REPO / "values-400k.yaml", values)
    args = ("--benchmarks", BENCH, "--loadtest", tmp_path / "none.json")
    assert capacity(*args, "--write-values", values).returncode == 0
    assert capacity(*args, "--check-values", values).returncode == 0

    text = values.read_text()
    edited = (text.replace("minReplicas: 55", "minReplicas: 40")
              .replace("host: chat.example.com", "host: chat.mine.example"))
    assert edited.count("minReplicas: 40") == 1 and "chat.mine.example" in edited
    values.write_text(edited)
    done = capacity(*args, "--check-values", values)
    assert done.returncode == 1
    assert "-  minReplicas: 40\n+  minReplicas: 55" in done.stdout
    assert "chat.mine.example" not in done.stdout  # a line the model does not own is not its business
    assert "--write-values" in done.stderr

    assert capacity(*args, "--write-values", values).returncode == 0
    repaired = values.read_text()
    assert "minReplicas: 55" in repaired and "host: chat.mine.example" in repaired
    assert capacity(*args, "--check-values", values).returncode == 0


def test_the_written_values_are_the_plans_numbers(tmp_path: Path) -> None:
    import yaml

    values = tmp_path / "values-400k.yaml"
    shutil.copy(REPO / "values-400k.yaml", values)
    assert capacity("--benchmarks", BENCH, "--write-values", values).returncode == 0
    written = yaml.safe_load(values.read_text())
    assert written["protocol"]["minReplicas"] == 55
    assert written["protocol"]["maxReplicas"] == 83
    assert written["protocol"]["targetConnectionsPerPod"] == 7300
    assert written["protocol"]["resources"] == {"requests": {"cpu": "1", "memory": "384Mi"},
                                                "limits": {"memory": "768Mi"}}
    assert (written["worker"]["minReplicas"], written["worker"]["maxReplicas"]) == (2, 4)
    assert written["worker"]["targetQueueDepthPerReplica"] == 1800
    assert written["redis"]["shards"] >= 1
    assert written["global"]["image"]["repository"] == "registry.example.com/parley"  # untouched


# --- validation against Locust runs ------------------------------------------------------------------------

def test_validation_prints_model_against_runs_and_plots_cost_per_user(tmp_path: Path) -> None:
    png = tmp_path / "capacity.png"
    done = capacity("--benchmarks", BENCH, "--loadtest", SYNTHETIC_RUNS, "--validate", "--plot", png)
    assert done.returncode == 0, done.stderr
    assert "SYNTHETIC" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("| 2,000 | protocol |")]
    # 2,000 users, 2 processes: model memory = 2 x 100 MiB + 2,000 x 10 KB = 219.5 MiB -> 109.8 per
    # 1,000 users, against 240 / 2 = 120.0 measured (-9 %); CPU: 200 deliveries/s x 50 us = 0.01
    # cores -> 0.005 per 1,000, against 0.050 measured.
    assert table[0] == "| 2,000 | protocol | 0.050 | 0.005 | -90% | 120.0 | 109.8 | -9% |  |"
    assert "| 5,000 | redis | — |" in done.stdout  # that run recorded no Redis CPU
    # What the model does not explain, per socket: (0.100 - 0.010) cores / 2,000 sockets = 45 us/s.
    assert "| 2,000 | protocol | 0.100 | 0.010 | 45.0 us per socket per second |" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_validation_without_runs_says_so(tmp_path: Path) -> None:
    done = capacity("--benchmarks", BENCH, "--loadtest", tmp_path / "none.json", "--validate")
    assert done.returncode == 3
    assert "does not exist yet" in done.stderr


# --- the load test profile's workload ----------------------------------------------------------------------

def write_users_file(path: Path, users: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    # No 1,000-member rooms: picked with weight 1/1,000, a few draws of them would swing the
    # sampled mean by more than the tolerance (the expectation itself handles them).
    sizes = [5, 5, 5, 20, 20, 100]
    lines = [json.dumps({"format": "parley-loadtest-users", "version": 1, "count": users, "prefix": "lt",
                         "created_at": "2026-12-07T00:00:00+00:00", "params": {}, "rooms": {}})]
    for i in range(users):
        rooms = [{"id": 1000 + n, "kind": "group", "size": rng.choice(sizes)} for n in range(3)]
        if i % 2 == 0:
            rooms.append({"id": 5000 + i // 2, "kind": "dm", "size": 2})
        if i % 10 == 0:
            rooms.append({"id": 9000 + i, "kind": "bot", "size": 2})
        lines.append(json.dumps({"i": i, "id": i + 1, "username": f"lt{i:07d}", "token": "t", "rooms": rooms}))
    path.write_text("\n".join(lines) + "\n")


def test_the_profile_workload_is_what_the_locust_users_draw(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "loadtest"))
    from parley_locust.mix import parse_mix, pick_room, plan_for
    from parley_locust.users_file import iter_users

    from loadtest.capacity_profile import DEFAULT_MESSAGE_RATE, DEFAULT_MIX, profile_workload

    users = tmp_path / "users.jsonl"
    write_users_file(users, 300)
    profile = profile_workload(users)
    mean = sum(size * share for size, share in profile.room_mix)

    # The Locust code's own draws: each user's behaviour, then the rooms it sends to.
    rng, mix = random.Random(7), parse_mix(DEFAULT_MIX)
    sent, recipients = 0.0, 0.0
    records = list(iter_users(users))
    draws = 200
    for record in records:
        for _ in range(draws):
            chosen = plan_for(record, mix, rng)
            if chosen.talks_in:
                room = pick_room(chosen, rng)
                sent += DEFAULT_MESSAGE_RATE
                recipients += DEFAULT_MESSAGE_RATE * (room.size - 1 if room.kind == "bot" else room.size)
    assert profile.messages_per_user_per_minute == pytest.approx(sent / len(records) / draws, rel=0.03)
    assert mean == pytest.approx(recipients / sent, rel=0.03)


def test_the_cli_takes_the_profile_from_a_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users.jsonl"
    write_users_file(users, 100)
    done = capacity("--benchmarks", BENCH, "--users", "10000", "--loadtest-profile", users)
    assert "Workload from the load test profile" in done.stdout
    assert "rooms of 100" in done.stdout and os.fspath(users) in done.stdout
