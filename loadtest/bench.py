#!/usr/bin/env python3
"""`make bench`: Parley's fan-out, socket phases and worker throughput, against references, in one run.

In one run, on this machine, against 127.0.0.1 only:

1. builds the Go load client (`loadtest/client/main.go`, installing Debian's Go toolchain and
   gorilla/websocket with apt-get when missing and running as root);
2. a fresh database (PostgreSQL `parley_bench` when 127.0.0.1:5432 answers, else SQLite in
   var/bench/) with bulk-created users, tokens, rooms of --room-size, one room of --big-room
   members, and memberships;
3. **fan-out**, for each server of --servers (Daphne, uvicorn): Parley (a throwaway Redis, a
   worker and a protocol process) and then the O(1) pub/sub hub (loadtest/reference/hub.py) under
   the same server, driven the same way: --sockets sockets in rooms of --room-size, one sender
   per room, offered load stepped up until a step fails p99 <= 100 ms or delivery ratio >= 0.999,
   then refined. `fanout_ratio` per server = Parley's best deliveries/s per process / the hub's;
4. **big room**: the same with one room of --big-room members (Parley and the hub, Daphne);
5. **sockets** (Parley, one Daphne process): --socket-count sockets connect, join a room each
   (RSS then gives the memory per idle socket), are closed, then reconnect and `resume`;
6. the Channels **tutorial** (Daphne): fan-out and idle memory, as the old reference;
7. **worker**: loadtest/worker_bench.py in a subprocess (PostgreSQL only);
8. prints the tables and, last, one machine-readable line:
   `fanout_ratio=<x> worker_msgs_per_s=<n> insert_ratio=<x> connect_per_s=<n> join_per_s=<n>
   resume_per_s=<n> delivery_ratio=<y> p99_ms=<z> idle_kb_per_conn=<w> max_sockets=<n>`
   (`nan` for a part skipped, or whose reference failed for reasons of its own).

A reference that fails for reasons of its own (connect errors, consumers closed, deliveries
lost or errors logged while it passed) is reported as failing and is no denominator.

Every process it starts is stopped on exit, on Ctrl-C and on errors. Logs and raw results go to
var/bench/<run>/. See loadtest/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOADTEST = REPO / "loadtest"
BUILD = REPO / "build"
CLIENT_SRC = LOADTEST / "client" / "main.go"
CLIENT_BIN = BUILD / "loadclient"
WORKER_BENCH = LOADTEST / "worker_bench.py"
VAR = REPO / "var" / "bench"
RECORD = REPO / "docs" / "benchmarks.json"
GOPATH = "/usr/share/gocode"
GORILLA = Path(GOPATH) / "src" / "github.com" / "gorilla" / "websocket"
POSTGRES_ADMIN = os.environ.get("PARLEY_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")

sys.path.insert(0, str(REPO / "tools"))
from embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from stack import Stack  # noqa: E402

SERVERS = ("daphne", "uvicorn")
DEFAULT_STEPS = "250,500,1000,2000,4000,8000,12000,16000,24000,32000,48000,64000"
QUICK_STEPS = "500,2000,8000,16000"
# Deliveries/s into one room of 2,000 with one sender: 0.5 to 16 messages/s. Each message is a
# burst of 2,000 sends, so p99 is set by how long one burst takes, more than by the rate.
BIG_ROOM_STEPS = "1000,2000,4000,8000,16000,32000"
QUICK_BIG_ROOM_STEPS = "400,1600,6400"
# worker_bench.py at smoke size for --quick (its defaults for a full run).
WORKER_QUICK_ARGS = "--messages 2000 --seconds 2"
# After the sockets are closed, the server handles their disconnects: the reconnects start once
# the protocol process has used less than this share of a core for a while (bounded).
QUIET_CPU_PCT = 10.0
QUIET_WINDOW_SECONDS = 0.5
QUIET_LIMIT_SECONDS = 60.0
EXIT_NO_GO = 3
NAN = float("nan")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- cleanup: everything started is stopped, whatever happens ----------------------------------

class Cleanup:
    def __init__(self) -> None:
        self.stacks: list[Stack] = []
        self.redis: list[EmbeddedRedis] = []
        self.procs: list[subprocess.Popen[Any]] = []

    def stop_proc(self, proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_stack(self, stack: Stack) -> None:
        stack.stop()
        if stack in self.stacks:
            self.stacks.remove(stack)

    def stop_redis(self, server: EmbeddedRedis) -> None:
        server.stop()
        if server in self.redis:
            self.redis.remove(server)

    def all(self) -> None:
        for proc in list(self.procs):
            self.stop_proc(proc)
        for stack in list(self.stacks):
            self.stop_stack(stack)
        for server in list(self.redis):
            self.stop_redis(server)


CLEANUP = Cleanup()


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    CLEANUP.procs.append(proc)
    return proc


# --- setup: limits, Go client, database ---------------------------------------------------------

def raise_nofile(want: int = 65536) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root may raise the hard limit
            return want
        except (ValueError, OSError):
            pass
    target = hard if hard != resource.RLIM_INFINITY else want
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def find_go() -> str | None:
    go = shutil.which("go") or next((p for p in ("/usr/lib/go/bin/go", "/usr/bin/go") if Path(p).exists()), None)
    return go if go and GORILLA.is_dir() else None


def ensure_go() -> str | None:
    """Go and gorilla/websocket from Debian; installed with apt-get when missing and root."""
    go = find_go()
    if go or os.geteuid() != 0 or not shutil.which("apt-get"):
        return go
    log("installing Debian's golang-go and golang-github-gorilla-websocket-dev (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = ["golang-go", "golang-github-gorilla-websocket-dev"]
    install = ["apt-get", "install", "-y", "-qq", *packages]
    if subprocess.run(install, env=env, timeout=900, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False)
        subprocess.run(install, env=env, timeout=900, check=False)
    return find_go()


def build_client() -> Path | None:
    go = ensure_go()
    if go is None:
        return None
    BUILD.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOCACHE": str(BUILD / "gocache"), "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(CLIENT_BIN), str(CLIENT_SRC)], env=env, check=True, timeout=600)
    return CLIENT_BIN


def prepare_database(kind: str, name: str) -> tuple[str, str]:
    """A fresh, empty database: (DATABASE_URL, description)."""
    if kind in ("auto", "postgres"):
        try:
            import psycopg

            with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
            base = POSTGRES_ADMIN.rsplit("/", 1)[0]
            return f"{base}/{name}", f"PostgreSQL ({base.split('@')[-1]}/{name})"
        except Exception as exc:
            if kind == "postgres":
                raise
            log(f"PostgreSQL not reachable ({exc.__class__.__name__}); using SQLite")
    VAR.mkdir(parents=True, exist_ok=True)
    path = VAR / f"{name}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}", f"SQLite ({path.relative_to(REPO)})"


def drop_database(url: str) -> None:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = url.rsplit("/", 1)[1]
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:
        log(f"could not drop database {name}: {exc}")


def parley_env(db_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        # The bench's senders send far more than a person: lift the per-connection rate limit.
        "PARLEY_RATE_PER_SECOND": "100000",
        "PARLEY_RATE_BURST": "100000",
        "PARLEY_METRICS_PORT": "0",
        "DJANGO_SETTINGS_MODULE": "parley.settings",
        # A local, throwaway stack: the development SECRET_KEY is fine (and required since the
        # processes refuse to start with it otherwise).
        "PARLEY_DEV": "1",
    }


def migrate_and_seed(db_url: str, users: int, room_size: int, big_room: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, **parley_env(db_url), "PYTHON": sys.executable}
    start = time.monotonic()
    subprocess.run([str(REPO / "bin" / "parley"), "manage", "migrate_locked", "--verbosity", "0"],
                   env=env, check=True, cwd=REPO, timeout=300)
    migrated = time.monotonic()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_seed", "--users", str(users),
                    "--room-size", str(room_size), "--big-room", str(big_room), "--out", str(out)],
                   env=env, check=True, cwd=REPO, timeout=600)
    seeded = time.monotonic()
    log(f"database ready: migrate {migrated - start:.1f}s, "
        f"{users} users/tokens/memberships in {seeded - migrated:.1f}s")
    return {"migrate_seconds": round(migrated - start, 2), "seed_seconds": round(seeded - migrated, 2)}


def seed(users: int, room_size: int, big_room: int, out: Path) -> None:
    """(Subprocess, Django set up.) Users with unusable passwords, tokens, public rooms of `room_size`,
    one more public room whose members are the first `big_room` users, memberships.

    Writes out/tokens.txt (socket i uses line i), out/rooms.txt (socket i is in room line i // room
    size) and out/big-room.txt (one line: the big room, for the client's room index 0)."""
    sys.path.insert(0, str(REPO / "app"))
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from chat.models import ApiToken, Membership, Room
    from chat.tokens import hash_token, ttl

    user_model = get_user_model()
    with transaction.atomic():
        made = user_model.objects.bulk_create(
            [user_model(username=f"bench{i:06d}", password="!bench") for i in range(users)], batch_size=2000
        )
        rooms = Room.objects.bulk_create(
            [Room(name=f"bench-{r}", kind=Room.Kind.GROUP, private=False)
             for r in range(math.ceil(users / room_size))], batch_size=2000
        )
        # Only hashes are stored: keep the plaintexts for the clients.
        tokens = [secrets.token_urlsafe(24) for _ in made]
        expires = timezone.now() + ttl()
        ApiToken.objects.bulk_create(
            [ApiToken(key_hash=hash_token(t), user=u, name="bench", expires_at=expires)
             for t, u in zip(tokens, made, strict=True)],
            batch_size=2000,
        )
        big = Room.objects.create(name="bench-big", kind=Room.Kind.GROUP, private=False)
        Membership.objects.bulk_create(
            [Membership(room=rooms[i // room_size], user=u) for i, u in enumerate(made)]
            + [Membership(room=big, user=u) for u in made[:big_room]], batch_size=5000
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens))
    (out / "rooms.txt").write_text("".join(f"{r.pk}\n" for r in rooms))
    (out / "big-room.txt").write_text(f"{big.pk}\n")


# --- measurement helpers ------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def settled_rss_kb(pid: int, args: argparse.Namespace) -> int:
    """The process's RSS once what was just done has settled (--settle-seconds)."""
    time.sleep(args.settle_seconds)
    return rss_kb(pid)


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def read_event(
    proc: subprocess.Popen[str], want: str | None, deadline: float, sink: list[dict[str, Any]]
) -> dict | None:
    """Next JSON line from the client (all are kept in `sink`); None at EOF."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        try:
            event = json.loads(line)
        except ValueError:
            log(f"client said: {line.rstrip()}")
            continue
        sink.append(event)
        if event.get("event") == "fatal":
            raise RuntimeError(f"load client failed: {event.get('error')}")
        if event.get("event") == "step":
            log(step_line(event))
        if want is None or event.get("event") == want:
            return event
    raise TimeoutError(f"load client gave no {want!r} event in time")


def step_line(e: dict[str, Any]) -> str:
    cpu = e.get("cpu_pct", {})
    cpu_text = " ".join(f"{k}={v:.0f}%" for k, v in sorted(cpu.items()) if k != "machine_all_cores")
    groups = e.get("cpu_groups", {})
    noise = groups.get("other", 0)
    others = ",".join(e.get("other_load_top", {}))
    kind = "r" if e.get("refine") else ("R" if e.get("retry") else " ")
    return (f"  step {e['step']:>2}{kind} offered {e['offered_deliveries_per_s']:>7.0f}/s "
            f"delivered {e['delivered_per_s']:>8.0f}/s ratio {e['delivery_ratio']:.4f} "
            f"p50 {e['p50_ms']:>7.1f} p95 {e['p95_ms']:>7.1f} p99 {e['p99_ms']:>7.1f} ms "
            f"{'PASS' if e['pass'] else 'FAIL'} | cpu% {cpu_text} postgres={groups.get('postgres', 0):.0f} "
            f"machine={cpu.get('machine_all_cores', 0):.0f}% of 2 cores"
            + (f" | OTHER LOAD {noise:.0f}% ({others})" if noise >= 10 else ""))


def machine_busy(seconds: float = 1.0) -> float:
    """Percent of all cores busy over `seconds` (nothing of this bench should be running)."""
    def ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    b0, t0 = ticks()
    time.sleep(seconds)
    b1, t1 = ticks()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def check_background(label: str) -> float:
    busy = machine_busy()
    if busy > 10:
        log(f"warning: before {label} the machine is already {busy:.0f}% busy (other programs): "
            "expect noisy numbers")
    return round(busy, 1)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_cpu_quiet(pid: int) -> float:
    """Seconds until `pid` uses less than QUIET_CPU_PCT of a core over a window (at most QUIET_LIMIT_SECONDS)."""
    hz = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    last = cpu_ticks(pid)
    while time.monotonic() - start < QUIET_LIMIT_SECONDS:
        time.sleep(QUIET_WINDOW_SECONDS)
        now = cpu_ticks(pid)
        if (now - last) / hz / QUIET_WINDOW_SECONDS * 100 < QUIET_CPU_PCT:
            break
        last = now
    return round(time.monotonic() - start, 2)


# --- the servers under test ---------------------------------------------------------------------

@dataclass
class Server:
    """A running server as the load client sees it."""

    proto: str  # the client's -proto: parley | hub | tutorial
    urls: list[str]  # one per protocol process
    pids: dict[str, int]  # processes whose CPU each step reports ("protocol*" are the servers)
    log_dir: Path


def parley_stack(db_url: str, server: str, log_dir: Path, args: argparse.Namespace) -> tuple[Stack, list[int], dict]:
    env = parley_env(db_url)
    stack = Stack(env=env, log_dir=log_dir)
    for key in ("REDIS_URL", "REDIS_URLS"):  # always a throwaway Redis, never one from the shell
        stack.env.pop(key, None)
    CLEANUP.stacks.append(stack)
    stack.ensure_redis(shards=1)
    pids: dict[str, int] = {"redis": stack.redis[0].process.pid}  # type: ignore[union-attr]
    for w in range(args.workers):
        pids[f"worker{w if args.workers > 1 else ''}"] = stack.start_worker().pid
    ports = []
    for p in range(args.protocols):
        ports.append(stack.start_protocol(server=server))
        pids[f"protocol{p if args.protocols > 1 else ''}"] = stack.processes[-1].pid
    return stack, ports, pids


@contextlib.contextmanager
def parley_server(db_url: str, server: str, log_dir: Path, args: argparse.Namespace) -> Iterator[Server]:
    stack, ports, pids = parley_stack(db_url, server, log_dir, args)
    try:
        yield Server("parley", [f"ws://127.0.0.1:{p}" for p in ports], pids, log_dir)
    finally:
        CLEANUP.stop_stack(stack)


def reference_command(server: str, port: int, proto: str) -> list[str]:
    """The reference app under `server`, with the options Parley's protocol process gets."""
    if server == "daphne":
        # The hub runs on the same Daphne as Parley (`parley.daphne_server`): its spread
        # keepalive pings alone move the hub's first failing step from 1,000 to 2,000+
        # deliveries/s on stock Daphne, and a reference should not fail for reasons Parley has
        # fixed. The tutorial chat stays on stock Daphne, as a team gets it.
        module = "parley.daphne_server" if proto == "hub" else "daphne"
        return [sys.executable, "-m", module, "-b", "127.0.0.1", "-p", str(port), "reference.asgi:application"]
    # As `bin/parley protocol` under PARLEY_SERVER=uvicorn (app/parley/uvicorn_server.py).
    sys.path.insert(0, str(REPO / "app"))
    from parley.config import CONFIG

    return [sys.executable, "-m", "uvicorn", "reference.asgi:application", "--host", "127.0.0.1",
            "--port", str(port), "--ws", "websockets-sansio", "--ws-max-size", str(CONFIG.ws_max_bytes),
            "--ws-max-queue", str(CONFIG.inbox_frames), "--no-proxy-headers", "--lifespan", "off",
            "--no-access-log"]


@contextlib.contextmanager
def reference_server(proto: str, server: str, log_dir: Path) -> Iterator[Server]:
    """The reference app (tutorial and hub in one ASGI app; `proto` picks the URL) with its own Redis."""
    redis = EmbeddedRedis().start()
    CLEANUP.redis.append(redis)
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REDIS_URL": redis.url, "DJANGO_SETTINGS_MODULE": "reference.settings",
           "PYTHONPATH": os.pathsep.join([str(LOADTEST), str(REPO / "app")])}
    with open(log_dir / f"{proto}.log", "ab") as out:
        proc = spawn(reference_command(server, port, proto), cwd=LOADTEST, env=env, stdout=out,
                     stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        pids = {"redis": redis.process.pid, "protocol": proc.pid}  # type: ignore[union-attr]
        yield Server(proto, [f"ws://127.0.0.1:{port}"], pids, log_dir)
    finally:
        CLEANUP.stop_proc(proc)
        CLEANUP.stop_redis(redis)


# --- the load client ----------------------------------------------------------------------------

def client_base(args: argparse.Namespace, srv: Server, fixtures: Path | None, rooms: str = "rooms.txt") -> list[str]:
    """The client's options common to every mode; Parley's sockets take tokens and room ids from `fixtures`."""
    cmd = [str(CLIENT_BIN), "-proto", srv.proto, "-urls", ",".join(srv.urls), "-room-size", str(args.room_size),
           "-concurrency", str(args.concurrency), "-procs", str(args.client_procs),
           "-timeout", str(args.client_timeout)]
    if srv.proto == "parley":
        assert fixtures is not None
        cmd += ["-tokens", str(fixtures / "tokens.txt"), "-room-ids", str(fixtures / rooms)]
    return cmd


def start_client(cmd: list[str], stdin: bool = False) -> subprocess.Popen[str]:
    return spawn(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None, text=True, bufsize=1)


def next_phase(proc: subprocess.Popen[str], want: str, deadline: float, events: list[dict[str, Any]]) -> dict:
    """Tell a stdin-driven client to go on, and wait for the event that ends its next phase."""
    assert proc.stdin is not None
    proc.stdin.write("next\n")
    proc.stdin.flush()
    return read_event(proc, want, deadline, events) or {}


def run_fanout(args: argparse.Namespace, srv: Server, fixtures: Path, rooms: str = "rooms.txt") -> dict[str, Any]:
    cmd = [
        *client_base(args, srv, fixtures, rooms),
        "-mode", "fanout", "-sockets", str(args.sockets), "-senders", str(args.senders),
        "-steps", args.steps, "-step-seconds", str(args.step_seconds), "-drain-seconds", str(args.drain_seconds),
        "-refine", str(args.refine), "-body-bytes", str(args.body_bytes),
        "-max-p99-ms", str(args.max_p99_ms), "-min-ratio", str(args.min_ratio),
        "-pids", ",".join(f"{k}={v}" for k, v in srv.pids.items()),
        "-root-pid", str(os.getpid()), "-noise-retry-pct", str(args.noise_retry_pct),
    ]
    background = check_background("the fan-out run")
    events: list[dict[str, Any]] = []
    # The size of the server's logs after setup and after each step: errors are then attributed
    # to the steps that passed or to the overload (see reference_failures).
    log_marks: list[dict[str, int]] = []
    proc = start_client(cmd)
    deadline = time.monotonic() + args.client_timeout + 30
    try:
        while (event := read_event(proc, None, deadline, events)) is not None:
            if event.get("event") in ("setup", "step"):
                log_marks.append(log_sizes(srv.log_dir))
        proc.wait(timeout=30)
    finally:
        CLEANUP.stop_proc(proc)
    return fanout_result(args, srv, events, log_marks, background)


def fanout_result(args: argparse.Namespace, srv: Server, events: list[dict[str, Any]],
                  log_marks: list[dict[str, int]], background: float) -> dict[str, Any]:
    setup = next((e for e in events if e.get("event") == "setup"), {})
    steps = [e for e in events if e.get("event") == "step"]
    done = next((e for e in events if e.get("event") == "done"), {})
    for step, late in itertools.zip_longest(steps, done.get("late_by_step", []), fillvalue=0):
        step["late"] = late
        # Never arrived, even after the wait for stragglers at the end: lost, not late.
        step["lost"] = step["expected"] - step["received"] - late
        step["protocol_cpu_us_per_delivery"] = cpu_us_per_delivery(step)
    for step, after in itertools.pairwise([*steps, {}]):
        # A failure retried because other programs loaded the machine is superseded by its retry.
        step["superseded"] = bool(after.get("retry")) and not step["pass"]
    passing = [s for s in steps if s["pass"]]
    best = max(passing, key=lambda s: s["delivered_per_s"]) if passing else None
    first_fail = next((i for i, s in enumerate(steps) if not s["pass"] and not s["superseded"]), len(steps))
    log(f"  setup: {setup.get('ready', 0)}/{args.sockets} sockets ready, "
        f"connect {setup.get('connect_rate', 0):.0f}/s, errors {setup.get('connect_errors', '?')}"
        + (f", join errors {setup.get('join_errors')}" if "join_errors" in setup else ""))
    log(f"  deliveries late (after their step's window) {sum(s['late'] for s in steps)}, lost (never arrived) "
        f"{sum(s['lost'] for s in steps)}" + ("" if done.get("quiet_at_end") else " (still arriving at the end)"))
    return {
        "background_busy_pct": background,
        "sockets": args.sockets, "room_size": args.room_size, "protocols": len(srv.urls),
        "setup": setup,
        "steps": steps,
        "done": done,
        "best": best,
        "best_per_process": (best["delivered_per_s"] / len(srv.urls)) if best else 0.0,
        # Errors logged up to the end of the last step before the first failing one (log_marks[i]:
        # the logs' sizes when the client reported step i - 1, or its setup for i = 0).
        "log_errors_while_passing": scan_logs(srv.log_dir, log_marks[min(first_fail, len(log_marks) - 1)]
                                              if log_marks else None)["errors"],
    }


def cpu_us_per_delivery(step: dict[str, Any]) -> float:
    """CPU time of the protocol process(es) over the step's window, per delivery received in it."""
    protocol_pct = sum(v for k, v in step.get("cpu_pct", {}).items() if k.startswith("protocol"))
    if not step["received"]:
        return NAN
    return round(protocol_pct / 100 * step["window_seconds"] * 1e6 / step["received"], 1)


def run_sockets(args: argparse.Namespace, srv: Server, fixtures: Path) -> dict[str, Any]:
    """Parley's socket phases on one protocol process: connect, join, RSS, close, reconnect + resume."""
    pid = srv.pids["protocol"]
    cmd = [*client_base(args, srv, fixtures), "-mode", "sockets", "-sockets", str(args.socket_count),
           "-warm", str(args.idle_warm)]
    background = check_background("the socket phases")
    events: list[dict[str, Any]] = []
    proc = start_client(cmd, stdin=True)
    deadline = time.monotonic() + args.client_timeout
    try:
        warm = read_event(proc, "warm", deadline, events) or {}
        rss_base = settled_rss_kb(pid, args)
        ready = next_phase(proc, "ready", deadline, events)
        rss_joined = settled_rss_kb(pid, args)
        closed = next_phase(proc, "closed", deadline, events)
        disconnect_wait = wait_cpu_quiet(pid)
        resumed = next_phase(proc, "resumed", deadline, events)
        rss_resumed = settled_rss_kb(pid, args)
        alive = next_phase(proc, "alive", deadline, events)
        proc.wait(timeout=60)
    finally:
        CLEANUP.stop_proc(proc)
    added = ready.get("ready", 0)
    result = {
        "background_busy_pct": background, "sockets": args.socket_count, "warm": warm, "ready": ready,
        "closed": closed, "disconnect_wait_seconds": disconnect_wait, "resumed": resumed, "alive": alive,
        "rss_base_kb": rss_base, "rss_joined_kb": rss_joined, "rss_resumed_kb": rss_resumed,
        "kb_per_conn": round((rss_joined - rss_base) / added, 2) if added else NAN,
        "closed_by_server": sum(alive.get("server_close_kinds", {}).values()),
    }
    log(f"  sockets: connect {ready.get('connect_rate', 0):.0f}/s, join {ready.get('join_rate', 0):.0f}/s, "
        f"resume {resumed.get('resumed', 0)} in {resumed.get('resume_seconds', 0):.1f}s; "
        f"RSS {rss_base / 1024:.0f} -> {rss_joined / 1024:.0f} MiB = {result['kb_per_conn']:.1f} KB/socket; "
        f"open at the end {alive.get('open', 0)}")
    return result


def run_idle(args: argparse.Namespace, srv: Server) -> dict[str, Any]:
    """The tutorial's idle sockets: RSS per connection (its sockets `group_add` one group each)."""
    pid = srv.pids["protocol"]
    # In idle mode the warm-up sockets are the first of -sockets: --socket-count more are measured.
    cmd = [*client_base(args, srv, None), "-mode", "idle", "-sockets", str(args.socket_count + args.idle_warm),
           "-warm", str(args.idle_warm)]
    events: list[dict[str, Any]] = []
    background = check_background("the idle run")
    proc = start_client(cmd, stdin=True)
    deadline = time.monotonic() + args.client_timeout
    try:
        warm = read_event(proc, "warm", deadline, events) or {}
        base = settled_rss_kb(pid, args)
        ready = next_phase(proc, "ready", deadline, events)
        loaded = settled_rss_kb(pid, args)
        alive = next_phase(proc, "alive", deadline, events)
        proc.wait(timeout=60)
    finally:
        CLEANUP.stop_proc(proc)
    added = ready.get("ready", 0)
    per_conn = (loaded - base) / added if added else NAN
    errors = warm.get("connect_errors", 0) + ready.get("connect_errors", 0)
    closed = sum(alive.get("server_close_kinds", {}).values())
    log(f"  idle: {alive.get('open', 0)} sockets open; RSS {base / 1024:.0f} -> {loaded / 1024:.0f} MiB = "
        f"{per_conn:.1f} KB/connection; connect {ready.get('connect_rate', 0):.0f}/s; errors {errors}, "
        f"closed by server {closed}")
    return {
        "background_busy_pct": background, "warm": warm, "ready": ready, "alive": alive,
        "rss_base_kb": base, "rss_loaded_kb": loaded, "kb_per_conn": round(per_conn, 2),
        "open": alive.get("open", 0), "errors": errors, "closed_by_server": closed,
        "connect_rate": ready.get("connect_rate", 0),
    }


# --- server logs --------------------------------------------------------------------------------

LOG_LINE = re.compile(r"(ERROR|CRITICAL|WARNING|Traceback|Exception|Error:)")
# Lines that are errors, not warnings (every server here logs the level in each line).
LOG_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


def log_sizes(log_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in log_dir.glob("*.log")}


def scan_logs(log_dir: Path, upto: dict[str, int] | None = None) -> dict[str, Any]:
    """Warnings and errors the servers logged (each file up to `upto` bytes when given), grouped
    with timestamps and numbers blanked."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    errors = 0
    for path in sorted(log_dir.glob("*.log")):
        with open(path, "rb") as handle:
            text = handle.read(upto.get(path.name, 0) if upto is not None else -1).decode(errors="replace")
        for line in text.splitlines():
            if not LOG_LINE.search(line):
                continue
            errors += bool(LOG_ERROR.search(line))
            key = re.sub(r"\d+", "N", re.sub(r"^\S+ \S+ ", "", line))[:200]
            counts[f"{path.name}: {key}"] += 1
            examples.setdefault(f"{path.name}: {key}", line[:300])
    return {"lines": sum(counts.values()), "errors": errors,
            "top": [{"count": n, "example": examples[k]} for k, n in counts.most_common(8)]}


# --- the phases -----------------------------------------------------------------------------------

Measure = Callable[[Server], dict[str, Any]]


def with_options(args: argparse.Namespace, **options: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **options})


def measured(name: str, server: contextlib.AbstractContextManager[Server], measure: Measure) -> dict[str, Any]:
    """`measure(server)` on a server started for it; the server's log summary once it stopped."""
    log(name)
    with server as srv:
        result = measure(srv)
    return {"name": name, **result, "logs": scan_logs(srv.log_dir)}


def measured_reference(name: str, proto: str, server: str, log_dir: Path, measure: Measure) -> dict[str, Any]:
    """`measured` for a reference: if it cannot be measured at all (it does not start, or no socket
    connects), that is its failure, reported as such, not the benchmark's."""
    try:
        return measured(name, reference_server(proto, server, log_dir), measure)
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        log(f"  {name}: FAILED: {exc}")
        # The shape of a run that passed no step, so that every report reads it the same way.
        return {"name": name, "error": f"{type(exc).__name__}: {exc}", "setup": {}, "steps": [], "best": None,
                "best_per_process": 0.0, "logs": scan_logs(log_dir)}


def fanout_phase(args: argparse.Namespace, db_url: str, fixtures: Path, run_dir: Path) -> dict[str, Any]:
    """Parley, then the hub, under each server: the same sockets, steps and pass criteria."""
    out: dict[str, Any] = {}
    for server in args.servers:
        pair = {"parley": measured(
            f"Parley ({server}): fan-out, {args.sockets} sockets in rooms of {args.room_size}",
            parley_server(db_url, server, run_dir / f"parley-{server}-fanout", args),
            lambda srv: run_fanout(args, srv, fixtures))}
        if not args.skip_reference:
            pair["hub"] = measured_reference(
                f"hub ({server}): fan-out, {args.sockets} sockets in rooms of {args.room_size}",
                "hub", server, run_dir / f"hub-{server}-fanout", lambda srv: run_fanout(args, srv, fixtures))
        out[server] = pair
    return out


def big_room_phase(args: argparse.Namespace, db_url: str, fixtures: Path, run_dir: Path) -> dict[str, Any]:
    """One room of --big-room members, one sender (Parley and the hub, Daphne)."""
    big = with_options(args, sockets=args.big_room, room_size=args.big_room, senders=1,
                       steps=args.big_room_steps, refine=min(args.refine, 1), protocols=1)
    out = {"parley": measured(
        f"Parley (daphne): big room, {args.big_room} members",
        parley_server(db_url, "daphne", run_dir / "parley-daphne-bigroom", big),
        lambda srv: run_fanout(big, srv, fixtures, rooms="big-room.txt"))}
    if not args.skip_reference:
        out["hub"] = measured_reference(
            f"hub (daphne): big room, {args.big_room} members",
            "hub", "daphne", run_dir / "hub-daphne-bigroom", lambda srv: run_fanout(big, srv, fixtures))
    return out


def sockets_phase(args: argparse.Namespace, db_url: str, fixtures: Path, run_dir: Path) -> dict[str, Any]:
    one = with_options(args, protocols=1)
    return measured(
        f"Parley (daphne): socket phases, {args.socket_count} sockets to one protocol process",
        parley_server(db_url, "daphne", run_dir / "parley-daphne-sockets", one),
        lambda srv: run_sockets(args, srv, fixtures))


def tutorial_phase(args: argparse.Namespace, fixtures: Path, run_dir: Path) -> dict[str, Any]:
    """The Channels tutorial (Daphne): fan-out and idle memory, as before the hub."""
    out = {}
    if not args.skip_fanout:
        out["fanout"] = measured_reference(
            f"tutorial (daphne): fan-out, {args.sockets} sockets",
            "tutorial", "daphne", run_dir / "tutorial-fanout", lambda srv: run_fanout(args, srv, fixtures))
    if not args.skip_sockets:
        out["idle"] = measured_reference(
            f"tutorial (daphne): {args.socket_count} idle sockets",
            "tutorial", "daphne", run_dir / "tutorial-idle", lambda srv: run_idle(args, srv))
    return out


WORKER_LINE = re.compile(
    r"worker_msgs_per_s=(?P<worker_msgs_per_s>\S+) insert_ratio=(?P<insert_ratio>\S+) "
    r"ack_p99_ms=(?P<ack_p99_ms>\S+) cpu_us_per_msg=(?P<cpu_us_per_msg>\S+) lost=(?P<lost>\d+)"
)


def worker_phase(args: argparse.Namespace, db_desc: str, run_dir: Path) -> dict[str, Any]:
    """loadtest/worker_bench.py, as `make bench-worker` runs it, from its machine-readable last line."""
    if args.skip_worker:
        return {"skipped": "--skip-worker"}
    if not db_desc.startswith("PostgreSQL"):
        return {"skipped": "the worker benchmark needs PostgreSQL, and this run has only SQLite"}
    # Never --record: the "worker" key of docs/benchmarks.json is `make bench-worker --record`'s;
    # this run's worker figures go to its own "bench" key.
    cmd = [sys.executable, str(WORKER_BENCH), *shlex.split(args.worker_args)]
    log(f"worker: {' '.join(cmd[1:])}")
    with open(run_dir / "worker-bench.log", "wb") as err:
        proc = spawn(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            out, _ = proc.communicate(timeout=args.client_timeout)
        except subprocess.TimeoutExpired:
            return {"failed": f"no result within {args.client_timeout:.0f} s (see {run_dir / 'worker-bench.log'})"}
        finally:
            CLEANUP.stop_proc(proc)
    (run_dir / "worker-bench.txt").write_text(out)
    match = WORKER_LINE.search(out.strip().splitlines()[-1] if out.strip() else "")
    if match is None:
        return {"failed": f"exit {proc.returncode}, no result line (see {run_dir / 'worker-bench.log'})"}
    figures = {k: float(v) for k, v in match.groupdict().items()}
    log(f"  worker: {figures}")
    return {"returncode": proc.returncode, **figures,
            "report": json.loads((VAR / "worker.json").read_text())}


# --- figures -------------------------------------------------------------------------------------

def first_failing(run: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in run["steps"] if not s["pass"] and not s.get("superseded")), None)


def shown_step(run: dict[str, Any]) -> dict[str, Any]:
    """The step a run's figures come from: its best passing step, else its first step."""
    return run["best"] or (run["steps"][0] if run["steps"] else {})


def reference_failures(run: dict[str, Any]) -> list[str]:
    """Faults of a reference's own while it was passing: connect errors, sockets it closed,
    deliveries it lost, errors it logged. Faults during the overload that ended its steps do not
    count: that overload is its score."""
    if "error" in run:
        return [run["error"]]
    reasons = []
    missing = run["sockets"] - run["setup"].get("ready", 0)
    if missing > 0:
        reasons.append(f"{missing} of {run['sockets']} sockets did not connect")
    passing = [s for s in run["steps"] if s["pass"]]
    if closed := sum(s["server_closes"] for s in passing):
        reasons.append(f"{closed} sockets closed by the server at passing steps")
    if lost := sum(s["lost"] for s in passing):
        reasons.append(f"{lost} deliveries lost at passing steps")
    if errors := run["log_errors_while_passing"]:
        reasons.append(f"{errors} errors in its log before its first failing step")
    return reasons


def reference_status(run: dict[str, Any]) -> str:
    if failures := reference_failures(run):
        return "FAILING: " + "; ".join(failures)
    return "ok" if run["best"] else "no step passed"


def ratio(parley: dict[str, Any] | None, reference: dict[str, Any] | None) -> float:
    """Parley's best deliveries/s per process / the reference's; nan when either is missing, or the
    reference passed no step or failed for reasons of its own (then it is no denominator)."""
    if parley is None or reference is None or reference_status(reference) != "ok":
        return NAN
    return parley["best_per_process"] / reference["best_per_process"]


def cost_ratio(parley: dict[str, Any] | None, reference: dict[str, Any]) -> float:
    """Parley's protocol CPU per delivery / the reference's, each at the step its figures come
    from: what a delivery costs, whatever the latency."""
    if parley is None:
        return NAN
    mine, theirs = (shown_step(run).get("protocol_cpu_us_per_delivery", NAN) for run in (parley, reference))
    return mine / theirs if theirs > 0 else NAN


def is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def summarise(runs: dict[str, Any], servers: list[str]) -> dict[str, Any]:
    """Every headline figure of the run, from the raw results (the tables, the last line and
    docs/benchmarks.json all read this)."""
    fanout = runs.get("fanout", {})
    ratios = {server: ratio(pair["parley"], pair.get("hub")) for server, pair in fanout.items()}
    lowest = NAN if not ratios or any(map(is_nan, ratios.values())) else min(ratios.values())
    # Parley's step on the last line: the server of the lower ratio (the first one without ratios).
    shown_server = min(ratios, key=ratios.__getitem__) if not is_nan(lowest) else next(iter(fanout), None)
    shown = shown_step(fanout[shown_server]["parley"]) if shown_server else {}
    big = runs.get("big_room", {})
    sockets = runs.get("sockets")
    worker = runs.get("worker", {})
    return {
        "fanout_ratio": lowest,
        **{f"fanout_ratio_{server}": ratios.get(server, NAN) for server in servers},
        "fanout_per_process": {server: {name: run["best_per_process"] for name, run in pair.items() if "steps" in run}
                               for server, pair in fanout.items()},
        "fanout_shown_server": shown_server,
        "delivery_ratio": shown.get("delivery_ratio", NAN),
        "p99_ms": shown.get("p99_ms", NAN),
        "big_room_members": big["parley"]["sockets"] if big else None,
        "big_room_per_process": {name: run["best_per_process"] for name, run in big.items()},
        "big_room_cpu_us_per_delivery": {name: shown_step(run).get("protocol_cpu_us_per_delivery", NAN)
                                         for name, run in big.items()},
        "big_room_ratio": ratio(big.get("parley"), big.get("hub")),
        "big_room_cost_ratio": cost_ratio(big.get("parley"), big["hub"]) if "hub" in big else NAN,
        **socket_figures(sockets),
        **{key: worker.get(key, NAN) for key in ("worker_msgs_per_s", "insert_ratio", "ack_p99_ms", "cpu_us_per_msg")},
        "worker_skipped": worker.get("skipped") or worker.get("failed"),
    }


def socket_figures(sockets: dict[str, Any] | None) -> dict[str, Any]:
    if sockets is None:
        return {key: NAN for key in ("connect_per_s", "join_per_s", "resume_per_s", "resume_seconds",
                                     "idle_kb_per_conn", "max_sockets")}
    return {
        "connect_per_s": sockets["ready"].get("connect_rate", NAN),
        "join_per_s": sockets["ready"].get("join_rate", NAN),
        "resume_per_s": sockets["resumed"].get("resume_rate", NAN),
        "resume_seconds": sockets["resumed"].get("resume_seconds", NAN),
        "idle_kb_per_conn": sockets["kb_per_conn"],
        # Sockets one protocol process held open at the end (warm-up ones included): each
        # connected, joined, was closed, reconnected and resumed.
        "max_sockets": sockets["alive"].get("open", 0),
    }


# (key, format) of the last line, in its order.
LAST_LINE = (("fanout_ratio", ".2f"), ("worker_msgs_per_s", ".0f"), ("insert_ratio", ".2f"),
             ("connect_per_s", ".0f"), ("join_per_s", ".0f"), ("resume_per_s", ".0f"),
             ("delivery_ratio", ".4f"), ("p99_ms", ".1f"), ("idle_kb_per_conn", ".1f"), ("max_sockets", ".0f"))


def final_line(summary: dict[str, Any]) -> str:
    return " ".join(f"{key}={'nan' if is_nan(summary[key]) else format(summary[key], spec)}"
                    for key, spec in LAST_LINE)


# --- report ---------------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".0f") -> str:
    return "n/a" if is_nan(value) else format(value, spec)


def timed(seconds: float | None, rate: float | None, errors: int | None) -> str:
    return f"{fmt(seconds, '.1f')} s, {fmt(rate)}/s, {'n/a' if errors is None else errors} errors"


def markdown_table(columns: list[str], cells: list[dict[str, str]]) -> str:
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key in dict.fromkeys(key for column in cells for key in column):  # every row, in order
        lines.append(f"| {key} | " + " | ".join(c.get(key, "—") for c in cells) + " |")
    return "\n".join(lines)


def fanout_cells(run: dict[str, Any], reference: bool = False, parley: dict[str, Any] | None = None) -> dict[str, str]:
    """One column of a fan-out table; a reference's also says whether it is a valid denominator and,
    given Parley's run, how Parley compares."""
    if "error" in run:
        return {"run failed": run["error"], **reference_cells(run, reference, parley)}
    shown = shown_step(run)
    fail = first_failing(run)
    steps = run["steps"]
    setup = run["setup"]
    cells = {
        "deliveries/s per protocol process (p99 <= 100 ms, ratio >= 0.999)":
            fmt(run["best_per_process"]) + ("" if run["best"] else " (no step passed; first step below)"),
        "offered load of that step (deliveries/s)": fmt(shown.get("offered_deliveries_per_s")),
        "p50 / p95 / p99 at that step (ms)": " / ".join(fmt(shown.get(f"p{n}_ms"), ".1f") for n in (50, 95, 99)),
        "delivery ratio at that step": fmt(shown.get("delivery_ratio"), ".4f"),
        "protocol CPU-µs per delivery at that step": fmt(shown.get("protocol_cpu_us_per_delivery"), ".1f"),
        "first failing step: offered/s, delivered/s, ratio, p99 ms, late, lost": (
            f"{fail['offered_deliveries_per_s']:.0f}, {fail['delivered_per_s']:.0f}, {fail['delivery_ratio']:.4f}, "
            f"{fail['p99_ms']:.0f}, {fail['late']}, {fail['lost']}" if fail else "none failed"),
        "deliveries late / lost, all steps": f"{sum(s['late'] for s in steps)} / {sum(s['lost'] for s in steps)}",
        "setup: connect": timed(setup.get("connect_seconds"), setup.get("connect_rate"), setup.get("connect_errors")),
        "setup: join": timed(setup.get("join_seconds"), setup.get("join_rate"), setup.get("join_errors"))
                       if "join_seconds" in setup else "—",
        "server log errors / warnings and errors": f"{run['logs']['errors']} / {run['logs']['lines']}",
        "steps with other programs > 10 % of a core": f"{sum(1 for s in steps if noisy(s))} of {len(steps)}",
    }
    return {**cells, **reference_cells(run, reference, parley)}


def reference_cells(run: dict[str, Any], reference: bool, parley: dict[str, Any] | None) -> dict[str, str]:
    if not reference:
        return {}
    return {
        "reference status": reference_status(run),
        "Parley ÷ this reference: deliveries/s per process": fmt(ratio(parley, run), ".2f"),
        "Parley ÷ this reference: CPU-µs per delivery": fmt(cost_ratio(parley, run), ".2f"),
    }


def noisy(step: dict[str, Any]) -> bool:
    return step.get("cpu_groups", {}).get("other", 0) > 10


def fanout_table(runs: dict[str, Any]) -> str:
    columns, cells = [], []
    for server, pair in runs.get("fanout", {}).items():
        columns.append(f"Parley ({server})")
        cells.append(fanout_cells(pair["parley"]))
        if "hub" in pair:
            columns.append(f"hub ({server})")
            cells.append(fanout_cells(pair["hub"], True, pair["parley"]))
    if tutorial := runs.get("tutorial", {}).get("fanout"):
        columns.append("tutorial (daphne)")
        cells.append(fanout_cells(tutorial, True, runs.get("fanout", {}).get("daphne", {}).get("parley")))
    return markdown_table(columns, cells) if cells else ""


def big_room_table(runs: dict[str, Any]) -> str:
    big = runs.get("big_room")
    if not big:
        return ""
    columns, cells = ["Parley (daphne)"], [fanout_cells(big["parley"])]
    if "hub" in big:
        columns.append("hub (daphne)")
        cells.append(fanout_cells(big["hub"], True, big["parley"]))
    return markdown_table(columns, cells)


def sockets_cells(s: dict[str, Any]) -> dict[str, str]:
    ready, resumed, alive = s["ready"], s["resumed"], s["alive"]
    n = s["sockets"]
    return {
        f"connect {n} sockets (up to hello)": timed(ready.get("connect_seconds"), ready.get("connect_rate"),
                                                     ready.get("connect_errors")),
        f"join one room each ({n})": timed(ready.get("join_seconds"), ready.get("join_rate"), ready.get("join_errors")),
        "KB per idle socket (RSS after the joins; MiB before → after)":
            f"{fmt(s['kb_per_conn'], '.1f')} ({s['rss_base_kb'] / 1024:.0f} → {s['rss_joined_kb'] / 1024:.0f})",
        f"server busy with the {n} disconnects (s)": fmt(s["disconnect_wait_seconds"], ".1f"),
        f"reconnect + resume all {n} (first dial to last resumed)": timed(
            resumed.get("resume_seconds"), resumed.get("resume_rate"), resumed.get("resume_errors")),
        "RSS after the resumes (MiB)": f"{s['rss_resumed_kb'] / 1024:.0f}",
        "sockets open at the end (with warm-up) / closed by the server":
            f"{alive.get('open', 0)} / {s['closed_by_server']}",
        "server log errors / warnings and errors": f"{s['logs']['errors']} / {s['logs']['lines']}",
    }


def idle_cells(idle: dict[str, Any]) -> dict[str, str]:
    if "error" in idle:
        return {"run failed": idle["error"]}
    ready = idle["ready"]
    n = ready.get("attempted", 0)
    return {
        f"connect {n} sockets (up to hello)": timed(ready.get("connect_seconds"), ready.get("connect_rate"),
                                                     idle["errors"]),
        "KB per idle socket (RSS after the joins; MiB before → after)": f"{fmt(idle['kb_per_conn'], '.1f')} "
            f"({idle['rss_base_kb'] / 1024:.0f} → {idle['rss_loaded_kb'] / 1024:.0f})",
        "sockets open at the end (with warm-up) / closed by the server": f"{idle['open']} / {idle['closed_by_server']}",
        "server log errors / warnings and errors": f"{idle['logs']['errors']} / {idle['logs']['lines']}",
    }


def sockets_table(runs: dict[str, Any]) -> str:
    columns, cells = [], []
    if sockets := runs.get("sockets"):
        columns.append("Parley (daphne, one process)")
        cells.append(sockets_cells(sockets))
    if idle := runs.get("tutorial", {}).get("idle"):
        columns.append("tutorial (daphne; connect, then idle)")
        cells.append(idle_cells(idle))
    return markdown_table(columns, cells) if cells else ""


def worker_table(worker: dict[str, Any]) -> str:
    if "worker_msgs_per_s" not in worker:
        return f"worker: skipped ({worker.get('skipped') or worker.get('failed')})"
    latency = worker["report"]["latency"]
    return markdown_table(["one worker (loadtest/worker_bench.py)"], [{
        "messages stored per second, 4 connections": fmt(worker["worker_msgs_per_s"]),
        "insert_ratio (÷ a plain batched insert)": fmt(worker["insert_ratio"], ".2f"),
        f"ack p99 at {latency['rate']}/s (ms)": fmt(worker["ack_p99_ms"], ".1f"),
        f"worker CPU-µs per message at {latency['rate']}/s": fmt(worker["cpu_us_per_msg"], ".1f"),
        "messages lost": fmt(worker["lost"]),
    }])


def log_lines(runs: dict[str, Any]) -> list[str]:
    """The commonest warnings and errors of each server's log."""
    out = []
    for run in iter_runs(runs):
        for item in run.get("logs", {}).get("top", [])[:4]:
            out.append(f"# {run['name']}: log x{item['count']}: {item['example']}")
    return out


def iter_runs(runs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every measured run (each has a name and its server's log summary)."""
    for pair in runs.get("fanout", {}).values():
        yield from pair.values()
    yield from runs.get("big_room", {}).values()
    if "sockets" in runs:
        yield runs["sockets"]
    yield from runs.get("tutorial", {}).values()


def print_report(meta: dict[str, Any], runs: dict[str, Any], summary: dict[str, Any]) -> None:
    print()
    print(f"# {meta['command']}  ({meta['date']}; {meta['machine']}; {meta['database']}; "
          f"{meta['elapsed_seconds']:.0f} s elapsed)")
    print(f"# logs and raw results: {meta['run_dir']}/")
    sections = [
        (f"Fan-out: {meta['sockets']} sockets in rooms of {meta['room_size']}, {meta['senders_per_room']} sender(s) "
         f"per room; Parley ÷ hub: " + ", ".join(f"{s} {fmt(summary[f'fanout_ratio_{s}'], '.2f')}"
                                                 for s in meta["servers"]), fanout_table(runs)),
        (f"Big room: one room of {summary['big_room_members']} members, one sender (Daphne); Parley ÷ hub "
         f"{fmt(summary['big_room_ratio'], '.2f')}; per-member cost (CPU-µs per delivery) Parley ÷ hub "
         f"{fmt(summary['big_room_cost_ratio'], '.2f')}", big_room_table(runs)),
        ("Sockets: one protocol process", sockets_table(runs)),
        ("Worker throughput (PostgreSQL)", worker_table(runs.get("worker", {}))),
    ]
    for title, body in sections:
        if body:
            print(f"\n## {title}\n\n{body}")
    print()
    for line in log_lines(runs):
        print(line)
    print(f"# elapsed: {meta['elapsed_seconds']:.0f} s")
    print()
    print(final_line(summary), flush=True)


def json_safe(value: Any) -> Any:
    """nan and inf as null: strict JSON (docs/benchmarks.json is read by other tools)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" + work tree" if git("status", "--porcelain") else "")


def record(meta: dict[str, Any], summary: dict[str, Any]) -> None:
    """The "bench" key of docs/benchmarks.json; the other keys are other benchmarks'."""
    recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    recorded["bench"] = json_safe({
        "when": meta["date"], "command": meta["command"], "git": git_revision(),
        "elapsed_seconds": meta["elapsed_seconds"], "machine": meta["machine"], "database": meta["database"],
        "last_line": final_line(summary), **summary,
    })
    RECORD.write_text(json.dumps(recorded, indent=2) + "\n")


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="servers of the fan-out runs, Parley and the hub under each (default daphne,uvicorn)")
    p.add_argument("--quick", action="store_true", help="smoke run of every part: fewer sockets, shorter steps")
    p.add_argument("--sockets", type=int, help="fan-out sockets (default 2000; quick 400)")
    p.add_argument("--room-size", type=int, default=20, help="sockets per room")
    p.add_argument("--senders", type=int, default=1, help="senders per room")
    p.add_argument("--steps", help=f"offered deliveries/s per step (default {DEFAULT_STEPS}; quick {QUICK_STEPS})")
    p.add_argument("--step-seconds", type=float, help="seconds of sending per step (default 6; quick 2)")
    p.add_argument("--drain-seconds", type=float, help="wait for a step's deliveries (default 3; quick 2)")
    p.add_argument("--refine", type=int, help="bisecting steps after the first failure (default 2; quick 0)")
    p.add_argument("--max-p99-ms", type=float, default=100.0)
    p.add_argument("--min-ratio", type=float, default=0.999)
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument("--big-room", type=int, help="members of the big room (default 2000; quick 200)")
    p.add_argument("--big-room-steps", help=f"big room steps (default {BIG_ROOM_STEPS}; quick {QUICK_BIG_ROOM_STEPS})")
    p.add_argument("--socket-count", type=int, help="sockets of the socket phases (default 10000; quick 1000)")
    p.add_argument("--idle-warm", type=int, default=20, help="sockets connected before the RSS baseline")
    p.add_argument("--skip-fanout", action="store_true", help="no rooms-of-20 fan-out (fanout_ratio, p99_ms: nan)")
    p.add_argument("--skip-big-room", action="store_true")
    p.add_argument("--skip-sockets", action="store_true", help="no socket phases, no tutorial idle run")
    p.add_argument("--skip-worker", action="store_true", help="no worker benchmark (worker figures: nan)")
    p.add_argument("--worker-args", help=f"options of worker_bench.py (default none; quick {WORKER_QUICK_ARGS!r})")
    p.add_argument("--skip-reference", action="store_true", help="no reference runs at all: no hub, no tutorial")
    p.add_argument("--skip-tutorial", action="store_true", help="no Channels tutorial runs (the hub still runs)")
    p.add_argument("--protocols", type=int, default=1, help="Parley protocol processes in the fan-out runs")
    p.add_argument("--workers", type=int, default=1, help="Parley worker processes")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent handshakes, joins and resumes")
    p.add_argument("--client-procs", type=int, default=1, help="GOMAXPROCS of the load client")
    p.add_argument("--settle-seconds", type=float, default=2.0, help="pause before each RSS reading")
    p.add_argument("--noise-retry-pct", type=float, default=25.0,
                   help="retry a failed step once if other programs used more than this %% of a core")
    p.add_argument("--client-timeout", type=float, default=900.0, help="hard limit per load-client run")
    p.add_argument("--db", choices=["auto", "postgres", "sqlite"], default="auto")
    p.add_argument("--db-name", default="parley_bench")
    p.add_argument("--keep-db", action="store_true", help="leave the bench database in place")
    p.add_argument("--build-only", action="store_true", help=f"build the load client and exit ({EXIT_NO_GO}: no Go)")
    p.add_argument("--json", type=Path, help="also write all results to this file")
    p.add_argument("--record", action="store_true",
                   help='also write the summary to the "bench" key of docs/benchmarks.json')
    args = p.parse_args(argv)
    for name, full, short in (("sockets", 2000, 400), ("steps", DEFAULT_STEPS, QUICK_STEPS),
                              ("step_seconds", 6.0, 2.0), ("drain_seconds", 3.0, 2.0), ("refine", 2, 0),
                              ("socket_count", 10000, 1000), ("big_room", 2000, 200),
                              ("big_room_steps", BIG_ROOM_STEPS, QUICK_BIG_ROOM_STEPS),
                              ("worker_args", "", WORKER_QUICK_ARGS)):
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - set(SERVERS):
        p.error(f"--servers: one or more of {','.join(SERVERS)}")
    if args.big_room < 2 and not args.skip_big_room:
        p.error("--big-room needs at least 2 members (or --skip-big-room)")
    return args


def users_needed(args: argparse.Namespace) -> int:
    """Seeded users (= tokens): enough for the largest phase run."""
    return max(0 if args.skip_fanout else args.sockets,
               0 if args.skip_sockets else args.socket_count + args.idle_warm,
               0 if args.skip_big_room else args.big_room, 1)


def run_phases(args: argparse.Namespace, run_dir: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Every phase, in order; the bench database lives while the Parley phases run."""
    db_url, db_desc = prepare_database(args.db, args.db_name)
    fixtures = run_dir / "fixtures"
    runs: dict[str, Any] = {}
    try:
        seeding = migrate_and_seed(db_url, users_needed(args), args.room_size,
                                           0 if args.skip_big_room else args.big_room, fixtures)
        if not args.skip_fanout:
            runs["fanout"] = fanout_phase(args, db_url, fixtures, run_dir)
        if not args.skip_big_room:
            runs["big_room"] = big_room_phase(args, db_url, fixtures, run_dir)
        if not args.skip_sockets:
            runs["sockets"] = sockets_phase(args, db_url, fixtures, run_dir)
    finally:
        if not args.keep_db:
            drop_database(db_url)
    if not (args.skip_reference or args.skip_tutorial or (args.skip_fanout and args.skip_sockets)):
        runs["tutorial"] = tutorial_phase(args, fixtures, run_dir)
    runs["worker"] = worker_phase(args, db_desc, run_dir)
    return runs, db_desc, seeding


def main(argv: list[str]) -> int:
    if argv[:1] == ["_seed"]:
        p = argparse.ArgumentParser()
        p.add_argument("--users", type=int, required=True)
        p.add_argument("--room-size", type=int, required=True)
        p.add_argument("--big-room", type=int, required=True)
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        seed(a.users, a.room_size, a.big_room, a.out)
        return 0
    args = parse_args(argv)
    started = time.monotonic()
    nofile = raise_nofile()
    # `kill`/`timeout` send SIGTERM: turn it into an exception so `finally` stops every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if build_client() is None:
            log("no Go toolchain (golang-go + golang-github-gorilla-websocket-dev) and cannot install it")
            return EXIT_NO_GO
        if args.build_only:
            log(f"load client built: {CLIENT_BIN}")
            return 0
        if args.socket_count + 1000 > nofile:
            log(f"warning: open-files limit {nofile} is low for {args.socket_count} sockets")
        run_dir = VAR / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        runs, db_desc, seeding = run_phases(args, run_dir)
        meta = {
            "command": " ".join(["loadtest/bench.py", *argv]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"nproc={os.cpu_count()}, Python {platform.python_version()}, {platform.platform()}",
            "database": db_desc, "seeding": seeding, "elapsed_seconds": round(time.monotonic() - started, 1),
            "servers": args.servers, "sockets": args.sockets, "room_size": args.room_size,
            "senders_per_room": args.senders, "big_room": args.big_room, "socket_count": args.socket_count,
            "protocols": args.protocols, "workers": args.workers, "client_procs": args.client_procs,
            "run_dir": str(run_dir.relative_to(REPO)),
        }
        summary = summarise(runs, args.servers)
        everything = json.dumps(json_safe({"meta": meta, "summary": summary, "runs": runs}), indent=2)
        (run_dir / "results.json").write_text(everything)
        if args.json:
            args.json.write_text(everything)
        print_report(meta, runs, summary)
        if args.record:
            record(meta, summary)
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping every process")
        return 130
    finally:
        CLEANUP.all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
