#!/usr/bin/env python3
"""`make bench`: Parley's fan-out throughput, latency and idle-socket cost against the Channels tutorial.

In one run, on this machine:

1. builds the Go load client (`loadtest/client/main.go`, installing Debian's Go toolchain and
   gorilla/websocket with apt-get when missing and running as root);
2. Parley: a fresh database (PostgreSQL `parley_bench` when 127.0.0.1:5432 answers, else SQLite
   in var/bench/), bulk-created users, tokens, rooms and memberships, a throwaway Redis, a worker
   and a protocol process (Daphne, or uvicorn with `--server uvicorn`);
   fan-out: --sockets sockets in rooms of --room-size, one sender per room (--senders), offered
   load stepped up until a step fails p99 <= 100 ms or delivery ratio >= 0.999, then refined;
   idle: a fresh stack, --idle-sockets sockets to one protocol process, RSS delta / count;
3. the reference server (the Channels tutorial consumer on channels-redis defaults, Daphne,
   loadtest/reference/) measured the same way;
4. prints a table for both and, last, one machine-readable line for Parley:
   `fanout_ratio=<x> delivery_ratio=<y> p99_ms=<z> idle_kb_per_conn=<w> max_sockets=<n>`.

Every process it starts is stopped on exit, on Ctrl-C and on errors. Logs and raw results go to
var/bench/<run>/. See loadtest/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOADTEST = REPO / "loadtest"
BUILD = REPO / "build"
CLIENT_SRC = LOADTEST / "client" / "main.go"
CLIENT_BIN = BUILD / "loadclient"
VAR = REPO / "var" / "bench"
GOPATH = "/usr/share/gocode"
GORILLA = Path(GOPATH) / "src" / "github.com" / "gorilla" / "websocket"
POSTGRES_ADMIN = os.environ.get("PARLEY_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")

sys.path.insert(0, str(REPO / "tools"))
from embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from stack import Stack  # noqa: E402

DEFAULT_STEPS = "250,500,1000,2000,4000,8000,12000,16000,24000,32000,48000,64000"
QUICK_STEPS = "500,2000,8000,16000"
EXIT_NO_GO = 3


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


def migrate_and_seed(db_url: str, users: int, room_size: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, **parley_env(db_url), "PYTHON": sys.executable}
    start = time.monotonic()
    subprocess.run([str(REPO / "bin" / "parley"), "manage", "migrate_locked", "--verbosity", "0"],
                   env=env, check=True, cwd=REPO, timeout=300)
    migrated = time.monotonic()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_seed", "--users", str(users),
                    "--room-size", str(room_size), "--out", str(out)], env=env, check=True, cwd=REPO, timeout=600)
    seeded = time.monotonic()
    log(f"database ready: migrate {migrated - start:.1f}s, "
        f"{users} users/tokens/memberships in {seeded - migrated:.1f}s")
    return {"migrate_seconds": round(migrated - start, 2), "seed_seconds": round(seeded - migrated, 2)}


def seed(users: int, room_size: int, out: Path) -> None:
    """(Subprocess, Django set up.) Users with unusable passwords, tokens, public rooms, memberships."""
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
        Membership.objects.bulk_create(
            [Membership(room=rooms[i // room_size], user=u) for i, u in enumerate(made)], batch_size=5000
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens))
    (out / "rooms.txt").write_text("".join(f"{r.pk}\n" for r in rooms))


# --- measurement helpers ------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


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


def client_base(args: argparse.Namespace, proto: str, urls: list[str], files: Path | None) -> list[str]:
    cmd = [str(CLIENT_BIN), "-proto", proto, "-urls", ",".join(urls), "-room-size", str(args.room_size),
           "-concurrency", str(args.concurrency), "-procs", str(args.client_procs)]
    if proto == "parley" and files is not None:
        cmd += ["-tokens", str(files / "tokens.txt"), "-room-ids", str(files / "rooms.txt")]
    return cmd


def run_fanout(args: argparse.Namespace, proto: str, urls: list[str], files: Path | None,
               pids: dict[str, int], nprocs: int) -> dict[str, Any]:
    cmd = [
        *client_base(args, proto, urls, files),
        "-mode", "fanout", "-sockets", str(args.sockets), "-senders", str(args.senders),
        "-steps", args.steps, "-step-seconds", str(args.step_seconds), "-drain-seconds", str(args.drain_seconds),
        "-refine", str(args.refine), "-body-bytes", str(args.body_bytes),
        "-max-p99-ms", str(args.max_p99_ms), "-min-ratio", str(args.min_ratio),
        "-pids", ",".join(f"{k}={v}" for k, v in pids.items()), "-timeout", str(args.client_timeout),
        "-root-pid", str(os.getpid()), "-noise-retry-pct", str(args.noise_retry_pct),
    ]
    background = check_background("the fan-out run")
    events: list[dict[str, Any]] = []
    proc = spawn(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    deadline = time.monotonic() + args.client_timeout + 30
    try:
        while read_event(proc, None, deadline, events) is not None:
            pass
        proc.wait(timeout=30)
    finally:
        CLEANUP.stop_proc(proc)
    setup = next((e for e in events if e.get("event") == "setup"), {})
    steps = [e for e in events if e.get("event") == "step"]
    done = next((e for e in events if e.get("event") == "done"), {})
    for step, late in zip(steps, done.get("late_by_step", []), strict=False):
        step["late"] = late
    for step, after in itertools.pairwise(steps):
        # A failure retried because other programs loaded the machine is superseded by its retry.
        step["superseded"] = bool(after.get("retry")) and not step["pass"]
    passing = [s for s in steps if s["pass"]]
    best = max(passing, key=lambda s: s["delivered_per_s"]) if passing else None
    log(f"  setup: {setup.get('ready', 0)}/{args.sockets} sockets ready, "
        f"connect {setup.get('connect_rate', 0):.0f}/s, errors {setup.get('connect_errors', '?')}"
        + (f", join errors {setup.get('join_errors')}" if "join_errors" in setup else ""))
    return {
        "background_busy_pct": background,
        "setup": setup,
        "steps": steps,
        "done": done,
        "best": best,
        "best_per_process": (best["delivered_per_s"] / nprocs) if best else 0.0,
    }


def run_idle(args: argparse.Namespace, proto: str, url: str, files: Path | None, pid: int) -> dict[str, Any]:
    cmd = [
        *client_base(args, proto, [url], files),
        "-mode", "idle", "-sockets", str(args.idle_sockets), "-warm", str(args.idle_warm),
        "-join=" + ("false" if args.idle_no_join else "true"), "-timeout", str(args.client_timeout),
    ]
    events: list[dict[str, Any]] = []
    background = check_background("the idle run")
    proc = spawn(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdin is not None
    deadline = time.monotonic() + args.client_timeout
    try:
        warm = read_event(proc, "warm", deadline, events) or {}
        time.sleep(args.settle_seconds)
        base = rss_kb(pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ready = read_event(proc, "ready", deadline, events) or {}
        time.sleep(args.settle_seconds)
        loaded = rss_kb(pid)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        alive = read_event(proc, "alive", deadline, events) or {}
        proc.wait(timeout=60)
    finally:
        CLEANUP.stop_proc(proc)
    added = ready.get("ready", 0)
    per_conn = (loaded - base) / added if added else float("nan")
    errors = (warm.get("connect_errors", 0) + ready.get("connect_errors", 0)
              + warm.get("join_errors", 0) + ready.get("join_errors", 0))
    closed = sum(alive.get("server_close_kinds", {}).values())
    result = {
        "background_busy_pct": background,
        "warm": warm, "ready": ready, "alive": alive,
        "rss_base_kb": base, "rss_loaded_kb": loaded, "kb_per_conn": round(per_conn, 2),
        "open": alive.get("open", 0), "errors": errors, "closed_by_server": closed,
        "connect_rate": ready.get("connect_rate", 0),
    }
    log(f"  idle: {alive.get('open', 0)} of {args.idle_sockets} sockets open; RSS {base / 1024:.0f} -> "
        f"{loaded / 1024:.0f} MiB = {per_conn:.1f} KB/connection; connect {ready.get('connect_rate', 0):.0f}/s; "
        f"errors {errors}, closed by server {closed}")
    return result


LOG_LINE = re.compile(r"(ERROR|CRITICAL|WARNING|Traceback|Exception|Error:)")


def scan_logs(log_dir: Path) -> dict[str, Any]:
    """Warnings and errors the servers logged, grouped (timestamps and numbers blanked)."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not LOG_LINE.search(line):
                continue
            key = re.sub(r"\d+", "N", re.sub(r"^\S+ \S+ ", "", line))[:200]
            counts[f"{path.name}: {key}"] += 1
            examples.setdefault(f"{path.name}: {key}", line[:300])
    return {"lines": sum(counts.values()),
            "top": [{"count": n, "example": examples[k]} for k, n in counts.most_common(8)]}


# --- the servers ------------------------------------------------------------------------------

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


def run_parley(args: argparse.Namespace, db_url: str, files: Path, run_dir: Path) -> dict[str, Any]:
    server = args.server
    result: dict[str, Any] = {"name": f"Parley ({server})"}
    log(f"Parley under {server}: fan-out, {args.sockets} sockets in rooms of {args.room_size}")
    log_dir = run_dir / f"parley-{server}-fanout"
    stack, ports, pids = parley_stack(db_url, server, log_dir, args)
    try:
        result["fanout"] = run_fanout(args, "parley", [f"ws://127.0.0.1:{p}" for p in ports], files, pids, len(ports))
    finally:
        CLEANUP.stop_stack(stack)
    result["fanout_logs"] = scan_logs(log_dir)
    if not args.skip_idle:
        log(f"Parley under {server}: {args.idle_sockets} idle sockets to one protocol process")
        log_dir = run_dir / f"parley-{server}-idle"
        idle_args = argparse.Namespace(**{**vars(args), "protocols": 1})
        stack, ports, pids = parley_stack(db_url, server, log_dir, idle_args)
        try:
            result["idle"] = run_idle(args, "parley", f"ws://127.0.0.1:{ports[0]}", files, pids["protocol"])
        finally:
            CLEANUP.stop_stack(stack)
        result["idle_logs"] = scan_logs(log_dir)
    return result


def start_reference(log_dir: Path) -> tuple[EmbeddedRedis, subprocess.Popen[Any], int, dict[str, int]]:
    redis = EmbeddedRedis().start()
    CLEANUP.redis.append(redis)
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REDIS_URL": redis.url, "DJANGO_SETTINGS_MODULE": "reference.settings"}
    with open(log_dir / "reference.log", "ab") as out:
        proc = spawn([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "reference.asgi:application"],
                     cwd=LOADTEST, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return redis, proc, port, {"redis": redis.process.pid, "protocol": proc.pid}  # type: ignore[union-attr]


def run_reference(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"name": "Reference (tutorial, Daphne)"}
    log(f"Reference (Channels tutorial on RedisChannelLayer, Daphne): fan-out, {args.sockets} sockets")
    log_dir = run_dir / "reference-fanout"
    redis, proc, port, pids = start_reference(log_dir)
    try:
        result["fanout"] = run_fanout(args, "tutorial", [f"ws://127.0.0.1:{port}"], None, pids, 1)
    finally:
        CLEANUP.stop_proc(proc)
        CLEANUP.stop_redis(redis)
    result["fanout_logs"] = scan_logs(log_dir)
    if not args.skip_idle:
        log(f"Reference: {args.idle_sockets} idle sockets")
        log_dir = run_dir / "reference-idle"
        redis, proc, port, pids = start_reference(log_dir)
        try:
            result["idle"] = run_idle(args, "tutorial", f"ws://127.0.0.1:{port}", None, proc.pid)
        finally:
            CLEANUP.stop_proc(proc)
            CLEANUP.stop_redis(redis)
        result["idle_logs"] = scan_logs(log_dir)
    return result


# --- report -----------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def summary_rows(r: dict[str, Any]) -> dict[str, str]:
    fan = r.get("fanout", {})
    best = fan.get("best")
    steps = fan.get("steps", [])
    shown = best or (steps[0] if steps else {})
    idle = r.get("idle", {})
    return {
        "deliveries/s per protocol process (p99 <= 100 ms, ratio >= 0.999)": fmt(fan.get("best_per_process")),
        "offered load of that step (deliveries/s)": fmt(shown.get("offered_deliveries_per_s"))
        + ("" if best else " (none passed; first step shown)"),
        "p50 / p95 / p99 latency at that step (ms)": " / ".join(
            fmt(shown.get(k), ".1f") for k in ("p50_ms", "p95_ms", "p99_ms")),
        "delivery ratio at that step": fmt(shown.get("delivery_ratio"), ".4f"),
        "first failing step: offered, delivered/s, ratio, p99 ms": next(
            (f"{s['offered_deliveries_per_s']:.0f}, {s['delivered_per_s']:.0f}, "
             f"{s['delivery_ratio']:.4f}, {s['p99_ms']:.0f}"
             for s in steps if not s["pass"] and not s.get("superseded")), "none failed"),
        "fan-out sockets ready / connect errors": f"{fan.get('setup', {}).get('ready', 'n/a')} / "
                                                   f"{fan.get('setup', {}).get('connect_errors', 'n/a')}",
        "connect rate, idle run (connections/s)": fmt(idle.get("connect_rate")),
        "resident memory per idle connection (KB)": fmt(idle.get("kb_per_conn"), ".1f"),
        "idle sockets open / errors / closed by server": (f"{idle.get('open')} / {idle.get('errors')} / "
                                                          f"{idle.get('closed_by_server')}" if idle else "n/a"),
        "server log warnings+errors (fan-out, idle)": f"{r.get('fanout_logs', {}).get('lines', 0)}, "
                                                       f"{r.get('idle_logs', {}).get('lines', 0)}",
        "steps with other programs using > 10 % of a core": f"{sum(1 for s in steps if noisy(s))} of {len(steps)}",
    }


def noisy(step: dict[str, Any]) -> bool:
    return step.get("cpu_groups", {}).get("other", 0) > 10


def markdown_table(results: list[dict[str, Any]]) -> str:
    rows = [summary_rows(r) for r in results]
    head = "| metric | " + " | ".join(r["name"] for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for key in rows[0]:
        lines.append(f"| {key} | " + " | ".join(row[key] for row in rows) + " |")
    return "\n".join(lines)


def final_line(parley: dict[str, Any], reference: dict[str, Any] | None, args: argparse.Namespace) -> str:
    fan = parley.get("fanout", {})
    best = fan.get("best")
    steps = fan.get("steps", [])
    shown = best or (steps[0] if steps else {})
    mine = fan.get("best_per_process", 0.0)
    if reference is None:
        ratio = "nan"
    else:
        theirs = reference.get("fanout", {}).get("best_per_process", 0.0)
        ratio = f"{mine / theirs:.2f}" if theirs > 0 else ("inf" if mine > 0 else "nan")
    idle = parley.get("idle", {})
    kb = idle.get("kb_per_conn", float("nan"))
    # max_sockets: sockets held open at once by one protocol process with no connect/join error.
    max_sockets = idle.get("open", 0) if idle else 0
    return (f"fanout_ratio={ratio} delivery_ratio={shown.get('delivery_ratio', 0):.4f} "
            f"p99_ms={shown.get('p99_ms', -1):.1f} idle_kb_per_conn={kb:.1f} max_sockets={max_sockets}")


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", choices=["daphne", "uvicorn"], default="daphne", help="Parley's protocol server")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer sockets, fewer and shorter steps")
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
    p.add_argument("--idle-sockets", type=int, help="idle sockets to one protocol process (default 10000; quick 1000)")
    p.add_argument("--idle-warm", type=int, default=20, help="sockets connected before the RSS baseline")
    p.add_argument("--idle-no-join", action="store_true", help="idle Parley sockets do not join a room")
    p.add_argument("--skip-idle", action="store_true")
    p.add_argument("--skip-reference", action="store_true", help="no reference run (fanout_ratio=nan)")
    p.add_argument("--protocols", type=int, default=1, help="Parley protocol processes in the fan-out run")
    p.add_argument("--workers", type=int, default=1, help="Parley worker processes")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent handshakes and joins")
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
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, short in (("sockets", 2000, 400), ("steps", DEFAULT_STEPS, QUICK_STEPS),
                              ("step_seconds", 6.0, 2.0), ("drain_seconds", 3.0, 2.0), ("refine", 2, 0),
                              ("idle_sockets", 10000, 1000)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_seed"]:
        p = argparse.ArgumentParser()
        p.add_argument("--users", type=int, required=True)
        p.add_argument("--room-size", type=int, required=True)
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        seed(a.users, a.room_size, a.out)
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
        if args.idle_sockets + 1000 > nofile:
            log(f"warning: open-files limit {nofile} is low for {args.idle_sockets} sockets")
        run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{args.server}"
        run_dir = VAR / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        db_url, db_desc = prepare_database(args.db, args.db_name)
        try:
            users = max(args.sockets, 0 if args.skip_idle else args.idle_sockets)
            seeding = migrate_and_seed(db_url, users, args.room_size, run_dir / "fixtures")
            parley = run_parley(args, db_url, run_dir / "fixtures", run_dir)
        finally:
            if not args.keep_db:
                drop_database(db_url)
        reference = None if args.skip_reference else run_reference(args, run_dir)
        results = [parley] + ([reference] if reference else [])
        elapsed = time.monotonic() - started
        meta = {
            "command": " ".join(["loadtest/bench.py", *argv]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"nproc={os.cpu_count()}, Python {platform.python_version()}, {platform.platform()}",
            "database": db_desc, "seeding": seeding, "elapsed_seconds": round(elapsed, 1),
            "sockets": args.sockets, "room_size": args.room_size, "senders_per_room": args.senders,
            "idle_sockets": args.idle_sockets, "protocols": args.protocols, "workers": args.workers,
            "client_procs": args.client_procs, "run_dir": str(run_dir.relative_to(REPO)),
        }
        (run_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print()
        print(f"# {meta['command']}  ({meta['date']}; {meta['machine']}; {db_desc}; {elapsed:.0f} s)")
        print(f"# {args.sockets} sockets in rooms of {args.room_size}, {args.senders} sender(s) per room, "
              f"{args.protocols} protocol process(es), {args.workers} worker(s); idle: {args.idle_sockets} sockets")
        print(f"# logs and raw results: {meta['run_dir']}/")
        print()
        print(markdown_table(results))
        for r in results:
            for kind in ("fanout_logs", "idle_logs"):
                for item in r.get(kind, {}).get("top", [])[:4]:
                    print(f"# {r['name']} {kind.split('_')[0]} log x{item['count']}: {item['example']}")
        print()
        print(final_line(parley, reference, args), flush=True)
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping every process")
        return 130
    finally:
        CLEANUP.all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
