"""Locust against a locally started Parley: `make loadtest-smoke`, and the larger local runs.

Starts Redis (embedded unless REDIS_URL(S) is set), migrates the database (DATABASE_URL, else
SQLite as `make run`), starts `--protocols` protocol processes and one worker, mints `--users`
users with `loadtest_users`, runs `loadtest/locustfile.py` headless against them (spread over the
protocol processes; `--processes N` Locust worker processes), and exits with Locust's exit code:
non-zero on any lost message, gap, duplicate, error frame or failed connect.

While Locust runs, it samples the CPU and memory of each part (protocol processes, worker, Redis,
PostgreSQL, Locust) from /proc; `--record` adds the run to docs/loadtest.json, which
`python -m loadtest.capacity` reads. Reports (CSV with full history, HTML, logs) go to `--out`.

    make loadtest-smoke                    # 300 users, the chatty smoke profile, tens of seconds
    .venv/bin/python loadtest/local_run.py --profile default --users 20000 --protocols 2 \\
        --processes 2 --ramp-rate 200 --hold-seconds 120 --source-addresses 127.0.0.2-127.0.0.9 --record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from bench import drop_database, prepare_database  # noqa: E402

from stack import Stack  # noqa: E402

LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
RESULTS = REPO / "docs" / "loadtest.json"
# The smoke profile: everything a run does, quickly. Chatty users (30 messages a minute), a
# reconnect and a history read every ~10 s per user, so that tens of seconds exercise sends,
# acks, deliveries, resumes and history reads of a few hundred users. Every delivery is timed.
SMOKE_ARGS = ["--mix", "idle=40,group=30,dm=20,bot=10", "--message-rate", "30",
              "--reconnects-per-hour", "360", "--history-per-hour", "360", "--delivery-sample", "1"]
# /proc's CPU ticks per second.
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    returncode: int
    output: str
    out_dir: Path
    usage: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def last_line(self) -> str:
        lines = [line for line in self.output.splitlines() if line.startswith("parley_loadtest ")]
        return lines[-1] if lines else ""

    def figures(self) -> dict[str, str]:
        return dict(part.split("=", 1) for part in self.last_line.split()[1:] if "=" in part)


# --- resource sampling ------------------------------------------------------------------------------


def _proc(pid: int) -> tuple[int, int, int] | None:
    """(CPU ticks, resident bytes, shared-memory bytes) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        memory = {}
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "RssShmem:")):
                    memory[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        return None
    return int(fields[11]) + int(fields[12]), memory.get("VmRSS", 0), memory.get("RssShmem", 0)


def _resident(procs: object) -> int:
    """What a group of processes holds in memory: each one's RSS, its shared memory counted once
    (PostgreSQL's backends all map its shared buffers; summing their RSS would count those once
    per backend)."""
    found = list(procs)  # type: ignore[call-overload]
    return sum(rss - shared for _, rss, shared in found) + max((shared for _, _, shared in found), default=0)


def _children(pid: int) -> list[int]:
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                for child in handle.read().split():
                    found.extend(_children(int(child)))
    except OSError:
        pass
    return found


def _postgres_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as handle:
                    if handle.read().strip() == "postgres":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


class Sampler:
    """CPU (cores) and RSS (MB) per part, over a window the caller marks."""

    def __init__(self, parts: dict[str, object]) -> None:
        self.parts = parts  # name -> callable giving the part's pids now
        # (time, {part: {pid: (CPU ticks, RSS, shared memory)}}): per process, so that processes
        # coming and going (PostgreSQL backends) count only the ticks they spent inside the window.
        self.samples: list[tuple[float, dict[str, dict[int, tuple[int, int, int]]]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(2.0):
            now = time.monotonic()
            parts: dict[str, dict[int, tuple[int, int, int]]] = {}
            for name, pids in self.parts.items():
                parts[name] = {pid: got for pid in pids() if (got := _proc(pid))}  # type: ignore[operator]
            self.samples.append((now, parts))

    def usage(self, start: float, end: float) -> dict[str, dict[str, float]]:
        window = [s for s in self.samples if start <= s[0] <= end]
        if len(window) < 2:
            return {}
        (t0, first), (t1, last) = window[0], window[-1]
        found: dict[str, dict[str, float]] = {}
        for name, procs in last.items():
            ticks = sum(now[0] - first[name].get(pid, (0, 0, 0))[0] for pid, now in procs.items())
            rss = max(_resident(sample[name].values()) for _, sample in window)
            found[name] = {"cpu_cores": round(ticks / TICKS / (t1 - t0), 3), "rss_mb": round(rss / 2**20, 1)}
        return found


# --- running -----------------------------------------------------------------------------------------


def run_locust(hosts: list[str], users_file: Path, out_dir: Path, users: int, ramp_rate: float,
               hold_seconds: float, extra: list[str] | None = None, timeout: float = 600.0,
               profile: str = "smoke", stack: Stack | None = None) -> Run:
    """Locust headless against `hosts` (one URL each; users spread over them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless",
        "--host", ",".join(hosts), "--token-file", str(users_file),
        "--target-users", str(users), "--ramp-rate", str(ramp_rate), "--hold-seconds", str(hold_seconds),
        "--settle-seconds", "20", "--csv", str(out_dir / "run"), "--csv-full-history",
        "--html", str(out_dir / "run.html"), "--loglevel", "INFO",
        *(SMOKE_ARGS if profile == "smoke" else []), *(extra or []),
    ]
    started = time.monotonic()
    with open(out_dir / "locust.log", "w") as log:
        locust = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(_parts(stack, locust.pid))
        sampler.thread.start()
        try:
            returncode = locust.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            locust.kill()
            returncode = locust.wait()
        sampler.stop.set()
    output = (out_dir / "locust.log").read_text()
    # The hold: from the end of the ramp (plus a few seconds for the last joins) to its end.
    hold_start = started + users / ramp_rate + 5
    usage = sampler.usage(hold_start, hold_start + max(hold_seconds - 6, 2))
    print(f"locust exited {returncode} after {time.monotonic() - started:.0f} s; log {out_dir / 'locust.log'}",
          file=sys.stderr)
    return Run(returncode, output, out_dir, usage)


def _parts(stack: Stack | None, locust_pid: int) -> dict[str, object]:
    def of(prefix: str) -> object:
        return lambda: [pid for proc in (stack.processes if stack else []) if _name(proc).startswith(prefix)
                        for pid in _children(proc.pid)]

    return {
        "protocol": of("protocol"),
        "worker": of("worker"),
        "redis": lambda: [r.process.pid for r in (stack.redis if stack else []) if getattr(r, "process", None)],
        "postgres": _postgres_pids,
        "locust": lambda: _children(locust_pid),
    }


def _name(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    return "protocol" if "protocol" in args else "worker" if "worker" in args else ""


def start_platform(stack: Stack, protocols: int, **env: str) -> list[str]:
    """Protocol processes and one worker on the stack's database and Redis; their URLs."""
    stack.start_worker()
    return [f"http://127.0.0.1:{stack.start_protocol(**env)}" for _ in range(protocols)]


def record(run: Run, args: argparse.Namespace, command: str) -> None:
    """Add the run to docs/loadtest.json (the capacity model's measured input)."""
    figures = run.figures()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    entry = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "command": command, "git": _git(),
        "users": args.users, "profile": args.profile, "protocol_processes": args.protocols, "worker_processes": 1,
        "locust_processes": max(1, args.processes), "result": figures.get("result"),
        "acked": int(figures.get("acked", 0)), "deliveries": int(figures.get("deliveries", 0)),
        "lost": int(figures.get("lost", -1)), "errors": int(figures.get("error_frames", -1)),
        "delivery_p99_ms": float(figures.get("delivery_p99_ms", "nan")),
        "cpu_cores": {name: part["cpu_cores"] for name, part in run.usage.items()},
        "rss_mb": {name: part["rss_mb"] for name, part in run.usage.items()},
    }
    hold = args.hold_seconds
    stats = run.out_dir / "run_stats.csv"
    if stats.exists():
        import csv

        with open(stats) as handle:
            rows = {row["Name"]: row for row in csv.DictReader(handle)}
        entry["messages_per_s"] = round(float(rows.get("ack", {}).get("Requests/s", 0) or 0), 1)
        entry["deliveries_per_s"] = round(entry["deliveries"] / max(hold + args.users / args.ramp_rate, 1), 1)
    runs = [r for r in data.get("runs", []) if not (r.get("users") == args.users and r.get("profile") == args.profile)]
    data["runs"] = sorted([*runs, entry], key=lambda r: r["users"])
    if args.record_locust and run.usage.get("locust"):
        per_process = args.users / max(1, args.processes)
        data["locust"] = {
            "when": entry["when"], "command": command, "git": entry["git"],
            "users_per_process": int(per_process),
            "cpu_cores_per_1000_users": round(run.usage["locust"]["cpu_cores"] / (args.users / 1000), 4),
            "rss_mb_per_1000_users": round(run.usage["locust"]["rss_mb"] / (args.users / 1000), 1),
        }
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"recorded in {RESULTS}", file=sys.stderr)


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--protocols", type=int, default=1, help="protocol processes")
    parser.add_argument("--processes", type=int, default=0, help="Locust worker processes (0: one local process)")
    parser.add_argument("--ramp-rate", type=float, default=100.0)
    parser.add_argument("--hold-seconds", type=float, default=15.0)
    parser.add_argument("--profile", choices=("smoke", "default"), default="smoke")
    parser.add_argument("--out", type=Path, default=REPO / "var" / "loadtest" / "local")
    parser.add_argument("--record", action="store_true", help="add the run to docs/loadtest.json")
    parser.add_argument("--record-locust", action="store_true",
                        help="also record its Locust figures (users per process, CPU and memory per 1,000 users)")
    args, extra = parser.parse_known_args()
    args.out = args.out.resolve()  # the manage commands run in app/
    if args.processes:
        extra = ["--processes", str(args.processes), *extra]
    env: dict[str, str] = {}
    created = ""
    if not os.environ.get("DATABASE_URL"):
        # PostgreSQL when it answers, as make bench: a throwaway database; SQLite otherwise.
        created, description = prepare_database("auto", "parley_loadtest")
        env["DATABASE_URL"] = created
        print(f"database: {description}", file=sys.stderr)
    if (env.get("DATABASE_URL") or os.environ["DATABASE_URL"]).startswith("sqlite"):
        # SQLite serialises every write: it runs `make run`, not load. The smoke still checks the
        # promise on it (no loss, gap or error), at a fifth of the rate and with a latency bound
        # that fits a single-writer database.
        extra = ["--message-rate", "6", "--max-delivery-p99-ms", "5000", *extra]
    stack = Stack(env=env, log_dir=args.out / "logs")
    try:
        stack.ensure_redis()
        stack.manage("migrate_locked", "--verbosity", "0")
        args.out.mkdir(parents=True, exist_ok=True)
        users_file = args.out / "users.jsonl"
        stack.manage("loadtest_users", "--count", str(args.users), "--out", str(users_file), "--prefix", "lt",
                     "--replace")
        # Rate limits sized for people, not for a load client's users sharing few addresses.
        hosts = start_platform(stack, args.protocols, PARLEY_HANDSHAKE_EXEMPT="127.0.0.0/8,::1/128")
        run = run_locust(hosts, users_file, args.out, args.users, args.ramp_rate, args.hold_seconds, extra,
                         timeout=args.users / args.ramp_rate * 2 + args.hold_seconds + 300,
                         profile=args.profile, stack=stack)
        print(run.last_line or run.output[-3000:])
        print(json.dumps(run.usage))
        if args.record:
            record(run, args, " ".join(["loadtest/local_run.py", *sys.argv[1:]]))
        return run.returncode
    finally:
        stack.stop()
        if created:
            drop_database(created)


if __name__ == "__main__":
    os.environ.setdefault("PARLEY_DEV", "1")
    raise SystemExit(main())
