#!/usr/bin/env python3
"""`make attacks`: a normal user's round trip on one protocol process while one hostile socket floods.

In one run, on this machine, against 127.0.0.1 only: a fresh database (SQLite in var/attacks/,
or PostgreSQL `parley_attacks` when 127.0.0.1:5432 answers), a throwaway Redis, one worker and
one protocol process (Daphne, or uvicorn with --server uvicorn). First a baseline with no flood,
then each flood of `loadtest/floods.py` for --seconds beside the normal user (a message every
--interval seconds: send -> ack at the sender, send -> delivery at a second member). Prints a
table, writes var/attacks/results.json, and ends with one machine-readable line:
`worst_ack_p99_ms=<x> worst_delivery_p99_ms=<y> lost=<n> floods=<k>`.
Recorded in docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var" / "attacks"
sys.path[:0] = [str(REPO), str(REPO / "app"), str(REPO / "tools")]

from loadtest import floods  # noqa: E402
from stack import Stack  # noqa: E402


def database_url() -> str:
    admin = "postgres://postgres@127.0.0.1:5432/postgres"
    try:
        import psycopg

        with psycopg.connect(admin, connect_timeout=3, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS parley_attacks WITH (FORCE)")
            conn.execute("CREATE DATABASE parley_attacks")
        return "postgres://postgres@127.0.0.1:5432/parley_attacks"
    except Exception as exc:
        print(f"PostgreSQL not reachable ({type(exc).__name__}); using SQLite", file=sys.stderr)
        VAR.mkdir(parents=True, exist_ok=True)
        path = VAR / "attacks.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"


def seed() -> dict[str, Any]:
    """Users, rooms and a room of big messages, straight through the ORM."""
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    from chat.models import Membership, Message, Room
    from chat.services import store_batch
    from chat.tokens import create_token

    users = get_user_model().objects
    made = {name: users.create_user(name, password="attack-run-1") for name in ("alice", "bob", "eve")}
    tokens = {name: create_token(user, "attacks")[1] for name, user in made.items()}
    normal = Room.objects.create(name="normal", kind=Room.Kind.GROUP)
    big = Room.objects.create(name="big", kind=Room.Kind.GROUP)
    Membership.objects.bulk_create([Membership(room=normal, user=made["alice"]),
                                    Membership(room=normal, user=made["bob"]),
                                    Membership(room=normal, user=made["eve"]),
                                    Membership(room=big, user=made["eve"])])
    many = Room.objects.bulk_create([Room(name=f"r{n}", kind=Room.Kind.GROUP) for n in range(500)])
    Membership.objects.bulk_create([Membership(room=room, user=made["eve"]) for room in many])
    store_batch([{"room": big.pk, "sender": made["eve"].pk, "body": f"{n}", "client_msg_id": f"b{n}"}
                 for n in range(200)])
    # ~24 KB of JSON per message (\u0001 escapes): a page of 200 would be ~4.9 MB.
    Message.objects.filter(room=big).update(body="\x01" * 4000)
    return {"tokens": tokens, "normal": normal.pk, "big": big.pk, "many": [r.pk for r in many]}


async def run(args: argparse.Namespace, port: int, pid: int, data: dict[str, Any]) -> list[dict[str, Any]]:
    t = data["tokens"]
    s = args.seconds

    def normal() -> Any:
        return floods.normal_user(port, t["alice"], t["bob"], data["normal"], s, args.interval)

    e, long = t["eve"], s + 1
    plan: list[tuple[str, str | None, dict[str, Any]]] = [
        ("none (baseline)", None, {}),
        ("resume of 500 rooms, repeated", "resume", {"token": e, "rooms": data["many"], "seconds": long}),
        ("history pages of 4.9 MB, never read", "nonreader", {"token": e, "room": data["big"], "seconds": long}),
        ("1 MiB frames", "big_frames", {"token": e, "seconds": long}),
        ("200 sockets of one user", "sockets", {"token": e, "seconds": s, "count": 200}),
        ("invalid frames, full speed", "invalid", {"token": e, "seconds": long}),
        ("typing in the normal room", "typing", {"token": e, "room": data["normal"], "seconds": long}),
        ("handshakes with random tokens", "handshakes", {"seconds": long}),
    ]
    results = []
    for name, flood, kwargs in plan:
        rss_before = floods.rss_kb(pid)
        started = time.monotonic()
        if flood is None:
            attack, latency = None, await normal()
        else:
            attack, latency = await floods.beside(flood, {"port": port, **kwargs}, normal())
        row = {"flood": name, "seconds": round(time.monotonic() - started, 1), **latency.summary(),
               "attacker_saw": attack, "rss_growth_mb": round((floods.rss_kb(pid) - rss_before) / 1024, 1)}
        results.append(row)
        print(f"[attacks] {name}: ack p99 {row['ack_p99_ms']} ms, delivery p99 {row['delivery_p99_ms']} ms, "
              f"lost {row['lost']}, attacker {attack}", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)  # let the rate limits and buffers of one flood clear
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| flood (one hostile socket) | sent | ack p50 / p99 ms | delivery p50 / p99 ms | lost | RSS growth MB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['flood']} | {r['sent']} | {r['ack_p50_ms']} / {r['ack_p99_ms']} | "
                     f"{r['delivery_p50_ms']} / {r['delivery_p99_ms']} | {r['lost']} | {r['rss_growth_mb']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("daphne", "uvicorn"), default="daphne")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each flood")
    parser.add_argument("--interval", type=float, default=0.05, help="the normal user's send interval")
    args = parser.parse_args()
    VAR.mkdir(parents=True, exist_ok=True)
    db = database_url()
    os.environ.update({"DATABASE_URL": db, "PARLEY_DEV": "1", "DJANGO_SETTINGS_MODULE": "parley.settings"})
    # The handshake limit applies to loopback too here: every client of this run is on 127.0.0.1.
    stack = Stack(env={"DATABASE_URL": db, "PARLEY_METRICS_PORT": "0", "PARLEY_DB_CONN_MAX_AGE": "60",
                       "PARLEY_HANDSHAKE_EXEMPT": ""}, log_dir=VAR / "logs")
    try:
        stack.ensure_redis()
        os.environ["REDIS_URLS"] = stack.env["REDIS_URLS"]
        stack.manage("migrate_locked", "--verbosity", "0")
        data = seed()
        stack.start_worker()
        port = stack.start_protocol(server=args.server)
        pid = stack.processes[-1].pid
        results = asyncio.run(run(args, port, pid, data))
    finally:
        stack.stop()
    report = {"server": args.server, "seconds": args.seconds, "interval": args.interval,
              "database": db.split(":", 1)[0], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["python", "loadtest/attacks.py", *sys.argv[1:]]), "results": results}
    (VAR / "results.json").write_text(json.dumps(report, indent=2))
    print(table(results))
    floods_only = results[1:]
    print(f"worst_ack_p99_ms={max(r['ack_p99_ms'] for r in floods_only)} "
          f"worst_delivery_p99_ms={max(r['delivery_p99_ms'] for r in floods_only)} "
          f"lost={sum(r['lost'] for r in results)} floods={len(floods_only)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        sys.exit(f"attacks: {exc}")
