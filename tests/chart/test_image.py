"""The image's promise without a Docker engine: built with the Dockerfile's own steps, every role
starts and serves as uid 10001 with a read-only root and only /tmp writable (tests/chart/imagekit.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded_redis import EmbeddedRedis, free_port

from . import imagekit

pytestmark = pytest.mark.slow
PREFIX = "parley.test.chat."


@pytest.fixture(scope="module")
def image() -> Path:
    return imagekit.build()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = EmbeddedRedis().start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One directory as /tmp for every role, so they share the SQLite database (a stand-in for
    # PostgreSQL) and, like a protocol pod's containers, the drain's admin socket.
    path = tmp_path_factory.mktemp("image-tmp")
    path.chmod(0o777)
    return path


def role_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **imagekit.image_env(),
        "SECRET_KEY": "image-test-" + "k" * 40,  # no PARLEY_DEV: the production start-up path
        "DATABASE_URL": "sqlite:////tmp/parley.sqlite3",
        "REDIS_URLS": redis_url,
        "ALLOWED_HOSTS": "chat.example.com",
        "PARLEY_CHANNEL_PREFIX": PREFIX,
        "POD_NAME": "chat-protocol-abc-1",
        **extra,
    }


def run(image: Path, tmp_dir: Path, env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    uid, gid = imagekit.image_user()
    return imagekit.sandbox([*imagekit.entrypoint(), *args], image, env=env, cwd="/opt/parley/app",
                            uid=uid, gid=gid, tmp=tmp_dir, timeout=timeout)


@contextlib.contextmanager
def serving(image: Path, tmp_dir: Path, env: dict[str, str], *args: str) -> Iterator[Path]:
    uid, gid = imagekit.image_user()
    log = tmp_dir.parent / f"{args[0]}-{time.monotonic_ns()}.log"
    proc = imagekit.sandbox([*imagekit.entrypoint(), *args], image, env=env, cwd="/opt/parley/app",
                            uid=uid, gid=gid, tmp=tmp_dir, background=True, log=log)
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except Exception:
            proc.kill()
            proc.wait(10)
        text = log.read_text()
        assert "Read-only file system" not in text, text[-3000:]


def get(port: int, path: str, host: str, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=5) as rsp:
                return rsp.status, rsp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_the_build_follows_the_dockerfile(image: Path) -> None:
    assert (image / "venv" / "bin" / "python").exists()
    assert (image / "parley" / "bin" / "parley").exists()
    assert (image / "parley" / "operator" / "parley_operator" / "handlers.py").exists()
    assert list((image / "parley" / "app" / "staticfiles").rglob("*")), "collectstatic ran at build time"
    assert not (image / "parley" / "app" / "chat" / "tests").exists()
    assert not list((image / "parley").rglob("*.sqlite3"))
    # No compiler in the image's dependencies: they are wheels.
    assert not list((image / "venv" / "bin").glob("gcc*"))
    assert imagekit.image_user() == (10001, 10001)


def test_migrate_protocol_worker_start_and_serve(image: Path, tmp_dir: Path, redis_url: str) -> None:
    migrated = run(image, tmp_dir, role_env(redis_url), "migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr

    port, metrics, worker_metrics = free_port(), free_port(), free_port()
    protocol_env = role_env(redis_url, PORT=str(port), PARLEY_METRICS_PORT=str(metrics))
    worker_env = role_env(redis_url, PARLEY_METRICS_PORT=str(worker_metrics), POD_NAME="chat-worker-abc-1")
    with serving(image, tmp_dir, protocol_env, "protocol") as protocol_log, \
            serving(image, tmp_dir, worker_env, "worker") as worker_log:
        # Probes come with the pod IP as Host; ALLOWED_HOSTS is restrictive.
        status, body = get(port, "/healthz", "10.244.3.7:8000")
        assert status == 200, (body, protocol_log.read_text()[-2000:])
        status, body = get(port, "/readyz", "10.244.3.7:8000")
        assert status == 200, (body, protocol_log.read_text()[-2000:])
        assert set(json.loads(body)["checks"].values()) <= {"ok"}
        assert get(port, "/", "evil.example.com")[0] == 400  # host validation still on for the rest
        status, text = get(port, "/", "chat.example.com")
        assert status == 200 and "<html" in text.lower()
        status, text = get(metrics, "/metrics", "10.244.3.7:9100")
        assert status == 200 and "parley_connections" in text
        assert get(port, "/metrics", "chat.example.com")[0] == 404  # not on the public port
        status, text = get(worker_metrics, "/metrics", "10.244.3.8:9100")
        assert status == 200 and "parley_messages_stored_total" in text, worker_log.read_text()[-2000:]

        # The helm test's script, from the image, against the running protocol + worker.
        smoke = run(image, tmp_dir, role_env(redis_url), "manage", "smoketest",
                    f"--url=ws://127.0.0.1:{port}/ws/", "--host=chat.example.com", "--timeout=60")
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr + protocol_log.read_text()[-2000:]
        result = json.loads(smoke.stdout.strip().splitlines()[-1])
        assert result["ok"] is True and result["seq"] >= 1

        # Heartbeats under the platform's prefix: what the operator scans.
        import redis

        keys = redis.Redis.from_url(redis_url).keys(f"{PREFIX}:proc:*")
        assert keys, "no heartbeat under the prefix"

        # The preStop hook works from inside the same sandbox (admin socket in /tmp).
        drained = run(image, tmp_dir, protocol_env, "drain", timeout=90)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert get(port, "/readyz", "10.244.3.7:8000")[0] == 503


def test_the_operator_runs_from_the_image(image: Path, tmp_dir: Path) -> None:
    env = {**imagekit.image_env(), "PYTHONPATH": "/opt/parley/operator"}
    uid, gid = imagekit.image_user()
    result = imagekit.sandbox(["python", "-m", "parley_operator", "--help"], image, env=env,
                              cwd="/opt/parley/app", uid=uid, gid=gid, tmp=tmp_dir, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--namespace" in result.stdout


def test_without_a_secret_key_every_role_refuses_to_start(image: Path, tmp_dir: Path, redis_url: str) -> None:
    env = role_env(redis_url)
    del env["SECRET_KEY"]
    result = run(image, tmp_dir, env, "migrate", timeout=60)
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stdout + result.stderr
