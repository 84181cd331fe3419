"""`python -m faults`: run fault cases, or a soak, against real Parley processes.

    python -m faults                       # every case, one line each
    python -m faults --case redis_pause    # one case (repeat --case for more)
    python -m faults --soak 600 --seed 42  # random faults for 600 s (`make soak DURATION=600`)
    python -m faults --record              # also write docs/reliability.json and its table

The database: DATABASE_URL if set, else PostgreSQL's `parley_faults` on 127.0.0.1:5432 when it
answers (created and migrated here), else SQLite (var/faults.sqlite3; the PostgreSQL case is then
skipped). Redis: servers of the run's own, started and stopped here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "app"), str(REPO / "tools"), str(REPO)]

from faults import cases, report, soak  # noqa: E402
from faults.checker import Result  # noqa: E402
from faults.cluster import Cluster  # noqa: E402
from faults.run import run_case  # noqa: E402

POSTGRES = "postgres://postgres@127.0.0.1:5432/parley_faults"


def choose_database() -> str:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    try:
        import psycopg

        with psycopg.connect(POSTGRES.rsplit("/", 1)[0] + "/postgres", autocommit=True, connect_timeout=3) as db:
            if not db.execute("SELECT 1 FROM pg_database WHERE datname = 'parley_faults'").fetchone():
                db.execute("CREATE DATABASE parley_faults")
        return POSTGRES
    except Exception as exc:
        print(f"PostgreSQL not reachable ({type(exc).__name__}); running on SQLite", flush=True)
        (REPO / "var").mkdir(exist_ok=True)
        return f"sqlite:///{REPO / 'var' / 'faults.sqlite3'}"


def prepare(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("PARLEY_DEV", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.settings")
    subprocess.run([str(REPO / "bin" / "parley"), "manage", "migrate_locked", "--verbosity", "0"],
                   env={**os.environ, "PYTHON": sys.executable}, check=True, cwd=REPO)
    import django

    django.setup()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(cases.CASES), help="run this case")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="random faults for this long")
    parser.add_argument("--seed", type=int, help="the seed (printed on every run, for replay)")
    parser.add_argument("--record", action="store_true", help="write docs/reliability.json and its table")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per cluster")
    parser.add_argument("--logs", default=str(REPO / "var" / "faults"), help="process logs go here")
    args = parser.parse_args()
    # `timeout`, `kill`, a CI runner: stop the cluster's processes too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started in the background

    database_url = choose_database()
    prepare(database_url)
    postgres = database_url.startswith("postgres")
    command = "python -m faults " + " ".join(sys.argv[1:])
    results: list[Result] = []
    if args.soak:
        seed = soak.pick_seed(args.seed)
        faults = soak.available(postgres)
        print(f"soak: seed={seed} duration_s={args.soak:.0f} faults={','.join(faults)}", flush=True)
        cluster = Cluster(database_url, Path(args.logs) / f"soak-{seed}", proxy_redis=True,
                          proxy_postgres=postgres, worker_count=args.workers)
        result = run_case("soak", soak.soak_fault(args.soak, faults), cluster, soak.soak_traffic(args.soak), seed)
        results.append(result)
        print(result.line(), flush=True)
        if not result.ok:
            print(json.dumps(result.as_dict(), indent=1, default=str)[:6000], flush=True)
    else:
        for name in args.case or list(cases.CASES):
            case = cases.CASES[name]
            if case.needs_postgres and not postgres:
                print(f"case={name} skipped: needs PostgreSQL", flush=True)
                continue
            cluster = Cluster(database_url, Path(args.logs) / f"{name}-{int(time.time())}", shards=case.shards,
                              proxy_redis=case.proxy_redis, proxy_postgres=case.proxy_postgres, env=case.env,
                              worker_count=args.workers)
            result = run_case(name, case.fault, cluster, case.traffic, args.seed, case.setup, case.verify)
            results.append(result)
            print(result.line(), flush=True)
            print(f"  facts={json.dumps(result.details.get('facts', {}), default=str)}", flush=True)
            if not result.ok:
                print(json.dumps(result.as_dict(), indent=1, default=str)[:4000], flush=True)
    if args.record:
        report.record(results, command)
    return 0 if all(r.ok for r in results) and results else 1


if __name__ == "__main__":
    sys.exit(main())
