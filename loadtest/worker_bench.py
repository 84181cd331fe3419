#!/usr/bin/env python3
"""`make bench-worker`: messages one worker process stores per second, against a plain insert.

In one run, on this machine, against 127.0.0.1 only (PostgreSQL is required: the worker's
async store path is PostgreSQL's):

1. a fresh database `parley_bench_worker`, migrated, with --rooms rooms of --room-size members;
   a throwaway Redis;
2. **throughput**, for each store path (`async` with PARLEY_STORE_CONNECTIONS connections,
   `async` with one connection, and the ORM path `orm` through asgiref's database thread): --messages messages are put
   on `chat.persist` first, then one `parley worker` process is started and the time from its
   first ack to its last is measured, with the worker's CPU time (from /proc) over the same span;
3. **latency**: --rate messages/s offered for --seconds to a worker of the default path; send ->
   ack p50/p99 and the worker's CPU-µs per message;
4. **reference**: the same rows inserted by one plain Python process with psycopg, in batches
   of PARLEY_BATCH_MAX, one `INSERT ... SELECT FROM unnest(...)` and one commit per batch, into a
   copy of the message table with the same indexes: no dedupe, no membership check, no seqs, no
   Redis, no acks. `insert_ratio` = the worker's messages/s / the reference's rows/s.

Acks are counted by subscribing to the reply topic the worker publishes them on; a message
that is never acked is reported as lost (the run fails), never passed off as slow.

Prints a table and, last, one machine-readable line:
`worker_msgs_per_s=<n> insert_ratio=<x> ack_p99_ms=<y> cpu_us_per_msg=<z> lost=<k>`.
Writes var/bench/worker.json (and, with --record, the "worker" key of docs/benchmarks.json, the
figures capacity plans read). Recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var" / "bench"
RECORD = REPO / "docs" / "benchmarks.json"
DB_NAME = "parley_bench_worker"
sys.path[:0] = [str(REPO), str(REPO / "app"), str(REPO / "tools")]

from embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from loadtest.bench import POSTGRES_ADMIN, drop_database, prepare_database  # noqa: E402
from loadtest.floods import percentile  # noqa: E402
from stack import Stack  # noqa: E402

# Acks come back on the reply topics of this many made-up protocol processes (`bench-worker-<n>`),
# as in a deployment of that many protocol pods: a batch's acks go out in one PUBLISH per
# process it has senders on, so one process only would flatter the worker.
BENCH_PROCESSES = 50
# The store paths compared, and the PARLEY_STORE value that selects each (on PostgreSQL).
STORE_SETTING = {"async": "auto", "orm": "orm"}
# A worker that has acked nothing for this long after the last message was sent is stuck.
ACK_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[bench-worker {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def seed(rooms: int, room_size: int) -> list[tuple[int, list[int]]]:
    """(Django set up.) Rooms with their members: [(room id, [member ids])]."""
    from django.contrib.auth import get_user_model

    from chat.models import Membership, Room

    users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"w{n}", password="!") for n in range(rooms * room_size)]
    )
    made = Room.objects.bulk_create([Room(name=f"room-{n}", kind=Room.Kind.GROUP) for n in range(rooms)])
    plan = [(room.pk, [u.pk for u in users[n * room_size:(n + 1) * room_size]]) for n, room in enumerate(made)]
    Membership.objects.bulk_create(
        [Membership(room_id=room, user_id=user) for room, members in plan for user in members]
    )
    return plan


def messages(plan: list[tuple[int, list[int]]], count: int, tag: str) -> list[dict[str, Any]]:
    """`count` persist.message payloads, round robin over rooms and their members."""
    out = []
    for n in range(count):
        room, members = plan[n % len(plan)]
        out.append({
            "type": "persist.message", "room": room, "sender": members[(n // len(plan)) % len(members)],
            "body": f"benchmark message {n} of {tag}", "kind": "text", "client_msg_id": f"{tag}-{n}",
            "reply_to": f"{bench_pid(n)}|{n}",
        })
    return out


def bench_pid(n: int) -> str:
    return f"bench-worker-{n % BENCH_PROCESSES}"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Acks:
    """Acks (and errors) the worker publishes on this run's reply topic, with arrival times."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.errors: dict[str, int] = {}

    async def listen(self, ready: asyncio.Event) -> None:
        from chat.contract import decode_reply_payload, process_topic
        from chat.redis_pool import client_for

        topics = [process_topic(bench_pid(n)) for n in range(BENCH_PROCESSES)]
        pubsub = client_for(topics[0]).pubsub()
        await pubsub.subscribe(*topics)
        ready.set()
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                arrived = time.monotonic()
                for key, frame in decode_reply_payload(message["data"]):
                    parsed = json.loads(frame)
                    if parsed["type"] == "ack":
                        self.at.setdefault(key, arrived)
                    else:
                        self.errors[parsed.get("code", "?")] = self.errors.get(parsed.get("code", "?"), 0) + 1
        finally:
            await pubsub.aclose()

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while len(self.at) < count and time.monotonic() < deadline:
            if len(self.at) != last_count:
                last_count, last_change = len(self.at), time.monotonic()
            elif time.monotonic() - last_change > ACK_TIMEOUT:
                break
            await asyncio.sleep(0.02)


async def put(layer: Any, batch: list[dict[str, Any]]) -> None:
    from channels.exceptions import ChannelFull

    for start in range(0, len(batch), 200):
        chunk = batch[start:start + 200]
        while True:
            try:
                await asyncio.gather(*(layer.send("chat.persist", m) for m in chunk))
                break
            except ChannelFull:
                await asyncio.sleep(0.05)


async def throughput(stack: Stack, plan: list[tuple[int, list[int]]], count: int, path: str, connections: int) -> dict:
    from channels.layers import get_channel_layer

    tag = f"t-{path}-{connections}"
    acks, ready = Acks(), asyncio.Event()
    listener = asyncio.create_task(acks.listen(ready))
    await ready.wait()
    await put(get_channel_layer(), messages(plan, count, tag))
    worker = stack.start_worker("chat.persist", PARLEY_STORE=STORE_SETTING[path],
                                PARLEY_STORE_CONNECTIONS=str(connections))
    try:
        # Django's start-up is not the store's cost: measure from the first ack.
        while not acks.at and worker.poll() is None:  # noqa: ASYNC110 (a process, not an event)
            await asyncio.sleep(0.005)
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}: see {stack.log_dir}")
        cpu_start, first = cpu_seconds(worker.pid), time.monotonic()
        await acks.wait_for(count, ACK_TIMEOUT * 5)
        last = max(acks.at.values(), default=first)
        cpu = cpu_seconds(worker.pid) - cpu_start
    finally:
        stack.stop_process(worker)
        listener.cancel()
    span = max(last - first, 1e-6)
    stored = len(acks.at)
    return {
        "path": path, "connections": connections, "messages": count, "acked": stored, "lost": count - stored,
        "errors": acks.errors, "seconds": round(span, 3), "msgs_per_s": round((stored - 1) / span),
        "cpu_us_per_msg": round(cpu / max(stored, 1) * 1e6, 1), "worker_cpu_share": round(cpu / span, 2),
    }


PROFILE = VAR / "worker-profile.txt"


def batch_count(port: int) -> int:
    """Batches the worker has stored so far (its parley_persist_batch_size histogram)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("parley_persist_batch_size_count"):
                return int(float(line.split()[-1]))
    return 0


def start_profile(pid: int, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy (pip install py-spy) sampling the worker for `seconds`, collapsed stacks."""
    py_spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--format", "raw", "--output", str(PROFILE), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: Path, top: int = 25) -> str:
    """The functions the worker spent its samples in (inclusive), most first."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"{100 * n / total:5.1f}%  {frame}" for frame, n in ranked)


async def latency(stack: Stack, plan: list[tuple[int, list[int]]], rate: int, seconds: float, path: str,
                  profile: bool = False) -> dict:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    count = int(rate * seconds)
    batch = messages(plan, count, f"l-{path}")
    acks, ready = Acks(), asyncio.Event()
    listener = asyncio.create_task(acks.listen(ready))
    await ready.wait()
    metrics_port = free_port()
    worker = stack.start_worker("chat.persist", PARLEY_STORE=STORE_SETTING[path], PARLEY_METRICS_PORT=str(metrics_port))
    try:
        # Warm up (Django start-up, first connections) on messages of their own.
        warm = messages(plan, 50, f"w-{path}")
        for m in warm:
            n = 10_000_000 + int(m["client_msg_id"].rsplit("-", 1)[1])
            m["reply_to"] = f"{bench_pid(n)}|{n}"
        await put(layer, warm)
        await acks.wait_for(50, 60)
        acks.at.clear()
        batches_before = batch_count(metrics_port)
        sent: dict[int, float] = {}
        profiler = start_profile(worker.pid, seconds) if profile else None
        cpu_start, start = cpu_seconds(worker.pid), time.monotonic()
        # Paced in ticks of 10 ms: what a steady stream of senders looks like to the worker.
        tick = 0.01
        per_tick = max(1, round(rate * tick))
        for offset in range(0, count, per_tick):
            due = start + (offset / per_tick) * tick
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for n, m in enumerate(batch[offset:offset + per_tick], start=offset):
                sent[n] = time.monotonic()
                await layer.send("chat.persist", m)
        offered_for = time.monotonic() - start
        await acks.wait_for(count, ACK_TIMEOUT)
        cpu = cpu_seconds(worker.pid) - cpu_start
        batches = batch_count(metrics_port) - batches_before
        if profiler is not None:
            profiler.wait(timeout=seconds + 30)
            log(f"profile of the worker at {rate}/s: {PROFILE}\n{summarise_profile(PROFILE)}")
    finally:
        stack.stop_process(worker)
        listener.cancel()
    latencies = [(acks.at[n] - sent[n]) * 1000 for n in sent if n in acks.at]
    return {
        "path": path, "rate": rate, "seconds": seconds, "offered_per_s": round(count / offered_for),
        "acked": len(latencies), "lost": count - len(latencies), "errors": acks.errors,
        "ack_p50_ms": round(percentile(latencies, 0.50), 1), "ack_p99_ms": round(percentile(latencies, 0.99), 1),
        "cpu_us_per_msg": round(cpu / max(len(latencies), 1) * 1e6, 1),
        "batches": batches, "mean_batch": round(len(latencies) / max(batches, 1), 1),
    }


def plain_insert(db_url: str, plan: list[tuple[int, list[int]]], count: int, batch: int) -> dict:
    """The reference: the same rows, inserted by one process as fast as psycopg allows."""
    import datetime as dt

    import psycopg

    rows = messages(plan, count, "ref")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_insert_ref")
        conn.execute("CREATE TABLE bench_insert_ref (LIKE chat_message INCLUDING ALL)")
        seqs: dict[int, int] = {}
        prepared = []
        for m in rows:
            seqs[m["room"]] = seqs.get(m["room"], 0) + 1
            prepared.append((m["room"], seqs[m["room"]], m["sender"], m["body"], m["kind"], m["client_msg_id"]))
        sql = (
            "INSERT INTO bench_insert_ref (room_id, seq, sender_id, body, kind, client_msg_id, created_at) "
            "SELECT room_id, seq, sender_id, body, kind, client_msg_id, %s::timestamptz FROM "
            "unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[]) "
            "AS v(room_id, seq, sender_id, body, kind, client_msg_id)"
        )
        start = time.monotonic()
        cpu_start = time.process_time()
        for offset in range(0, count, batch):
            chunk = prepared[offset:offset + batch]
            with conn.transaction():
                conn.execute(sql, (dt.datetime.now(dt.UTC), *[list(column) for column in zip(*chunk, strict=True)]))
        span = time.monotonic() - start
        cpu = time.process_time() - cpu_start
        stored = conn.execute("SELECT count(*) FROM bench_insert_ref").fetchone()[0]
        conn.execute("DROP TABLE bench_insert_ref")
    return {"rows": stored, "seconds": round(span, 3), "rows_per_s": round(stored / span),
            "client_cpu_us_per_row": round(cpu / stored * 1e6, 1)}


async def run(args: argparse.Namespace, stack: Stack, db_url: str, plan: list[tuple[int, list[int]]]) -> dict:
    paths = [("async", args.connections), ("async", 1), ("orm", 1)]
    results: dict[str, Any] = {"throughput": [], "latency": None, "reference": None}
    for path, connections in paths:
        log(f"throughput: {args.messages} messages, store path {path}, {connections} connection(s)")
        got = await throughput(stack, plan, args.messages, path, connections)
        log(f"  {got}")
        results["throughput"].append(got)
    log(f"latency: {args.rate}/s for {args.seconds}s, store path async")
    results["latency"] = await latency(stack, plan, args.rate, args.seconds, "async", args.profile)
    log(f"  {results['latency']}")
    log(f"reference: plain batched insert of {args.messages} rows")
    results["reference"] = await asyncio.to_thread(plain_insert, db_url, plan, args.messages, args.batch)
    log(f"  {results['reference']}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per throughput run")
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--room-size", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4, help="PARLEY_STORE_CONNECTIONS of the main run")
    parser.add_argument("--rate", type=int, default=1000, help="offered messages/s of the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--batch", type=int, default=200, help="rows per statement of the reference")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker during the latency run")
    parser.add_argument("--record", action="store_true", help="also write the results to docs/benchmarks.json")
    args = parser.parse_args()
    # `kill`/`timeout` send SIGTERM: stop the worker and Redis too, and drop the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if not 1 <= args.messages <= 200_000 or not 1 <= args.rate <= 20_000 or not 0 < args.seconds <= 120:
        parser.error("bounded runs only: --messages 1..200000, --rate 1..20000, --seconds up to 120")
    VAR.mkdir(parents=True, exist_ok=True)
    try:
        db_url, _ = prepare_database("postgres", DB_NAME)
    except Exception as exc:
        print(f"bench-worker needs PostgreSQL at {POSTGRES_ADMIN} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    redis = EmbeddedRedis().start()
    env = {
        "DATABASE_URL": db_url, "REDIS_URLS": redis.url, "PARLEY_METRICS_PORT": "0", "PARLEY_DEV": "1",
        "PARLEY_WORKER_CAPACITY": str(args.messages + 1000), "PARLEY_HEARTBEAT_SECONDS": "5",
        "DJANGO_SETTINGS_MODULE": "parley.settings",
    }
    os.environ.update(env)
    stack = Stack(env=env, log_dir=VAR / "worker-logs")
    try:
        stack.manage("migrate_locked", "--verbosity", "0")
        import django

        django.setup()
        plan = seed(args.rooms, args.room_size)
        results = asyncio.run(run(args, stack, db_url, plan))
    finally:
        stack.stop()
        redis.stop()
        drop_database(db_url)
    main_run = results["throughput"][0]
    reference = results["reference"]
    lat = results["latency"]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "loadtest/worker_bench.py", *sys.argv[1:]]),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO).stdout.strip(),
        **results,
    }
    (VAR / "worker.json").write_text(json.dumps(report, indent=2))
    if args.record:
        # The committed figures that capacity plans read (docs/benchmarks.json, key "worker").
        recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        recorded["worker"] = report
        RECORD.write_text(json.dumps(recorded, indent=2) + "\n")
    print("| store path | connections | messages | acked | msgs/s | worker CPU-µs/msg | worker CPU share |")
    print("|---|---|---|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['path']} | {r['connections']} | {r['messages']} | {r['acked']} | {r['msgs_per_s']} | "
              f"{r['cpu_us_per_msg']} | {r['worker_cpu_share']} |")
    print(f"| plain batched insert (reference) | — | {reference['rows']} | — | {reference['rows_per_s']} | "
          f"(client {reference['client_cpu_us_per_row']}) | — |")
    print(f"latency at {lat['rate']}/s offered ({lat['offered_per_s']}/s sent): ack p50 {lat['ack_p50_ms']} ms, "
          f"p99 {lat['ack_p99_ms']} ms, worker CPU {lat['cpu_us_per_msg']} µs/msg, {lat['batches']} batches "
          f"(mean {lat['mean_batch']} messages), lost {lat['lost']}")
    lost = sum(r["lost"] for r in results["throughput"]) + lat["lost"]
    print(f"worker_msgs_per_s={main_run['msgs_per_s']} "
          f"insert_ratio={main_run['msgs_per_s'] / reference['rows_per_s']:.2f} "
          f"ack_p99_ms={lat['ack_p99_ms']} cpu_us_per_msg={lat['cpu_us_per_msg']} lost={lost}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
