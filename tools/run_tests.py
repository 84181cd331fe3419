"""`make test`: pick the database, start a throwaway Redis, run pytest, fail on "no tests".

PostgreSQL is used when one answers at PARLEY_TEST_POSTGRES (default 127.0.0.1:5432, user
postgres, trust auth); otherwise the suite runs on SQLite and PostgreSQL-only tests are skipped
with a reason. Redis is always a throwaway server (tests restart it), unless PARLEY_TEST_REDIS_URL
names one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from embedded_redis import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent


def postgres_url() -> str | None:
    url = os.environ.get("PARLEY_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/parley")
    if url in ("", "none", "off"):
        return None
    try:
        import psycopg

        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", connect_timeout=3):
            return url
    except Exception as exc:
        print(f"PostgreSQL not reachable ({exc.__class__.__name__}); running on SQLite", flush=True)
        return None


def main() -> int:
    env = dict(os.environ)
    pg = postgres_url()
    # A name of its own per run: two runs at once (two developers' shells, CI beside a
    # developer) must not create and drop each other's test database.
    run_id = f"{os.getpid()}"
    if pg:
        env["DATABASE_URL"] = f"{pg}_{run_id}"
    else:
        env["DATABASE_URL"] = f"sqlite:///var/test-{run_id}.sqlite3"
    redis = None
    if env.get("PARLEY_TEST_REDIS_URL"):
        env["REDIS_URLS"] = env["PARLEY_TEST_REDIS_URL"]
    else:
        redis = EmbeddedRedis().start()
        env["REDIS_URLS"] = redis.url
    env.pop("REDIS_URL", None)
    # Test threads must not keep connections open: the test database is dropped at the end.
    env.setdefault("PARLEY_DB_CONN_MAX_AGE", "0")
    env.setdefault("PARLEY_METRICS_PORT", "0")
    env.setdefault("PARLEY_DEV", "1")
    print(f"database: {env['DATABASE_URL']}  redis: {env['REDIS_URLS']}", flush=True)
    try:
        code = subprocess.call([sys.executable, "-m", "pytest", *sys.argv[1:]], env=env, cwd=REPO)
    finally:
        if redis is not None:
            redis.stop()
    if code == 5:
        print("pytest collected no tests: that is a failure here", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
