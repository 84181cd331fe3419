"""Shared fixtures. `make test` (tools/run_tests.py) provides REDIS_URLS and DATABASE_URL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

from stack import Stack

LOG_DIR = Path(__file__).resolve().parent.parent / "var" / "test-logs"


def test_database_url() -> str:
    """URL of the database pytest-django created, for server processes started by a test."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or "postgres"
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings['NAME']}"


@pytest.fixture
def live_stack(transactional_db: None, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Real Parley processes (start them with .start_protocol()/.start_worker()) on the test DB."""
    env = {
        "DATABASE_URL": test_database_url(),
        "REDIS_URLS": os.environ.get("REDIS_URLS", "redis://127.0.0.1:6379/0"),
        "PARLEY_OPEN_REGISTRATION": "1",
        "PARLEY_HEARTBEAT_SECONDS": "1",
    }
    stack = Stack(env=env, log_dir=LOG_DIR / request.node.name)
    yield stack
    stack.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if connection.vendor == "postgresql":
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL (run `make test` where 127.0.0.1:5432 answers)")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_redis() -> Iterator[None]:
    """Each test starts with an empty throwaway Redis (never a shared one: see run_tests.py)."""
    import redis

    for url in os.environ.get("REDIS_URLS", "").split(","):
        if url and os.environ.get("PARLEY_TEST_REDIS_URL") is None:
            client = redis.Redis.from_url(url)
            # Clients of earlier tests' closed event loops can still sit in a blocking BZPOPMIN
            # (their sockets were never closed) and would swallow this test's work: kill them.
            for kind in ("normal", "pubsub"):
                client.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
            client.flushall()
            client.close()
    yield


@pytest.fixture(scope="session", autouse=True)
def _close_stray_db_sessions(django_db_setup: None, django_db_blocker) -> Iterator[None]:
    """Threads of async tests keep connections open; the test database cannot be dropped then."""
    yield
    from django.db import OperationalError

    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            try:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
            except OperationalError:
                pass  # no test database was created in this session (no database tests ran)


@pytest.fixture
async def worker(transactional_db: None):
    """The real chat.persist/chat.bot worker, running in the test's event loop."""
    import asyncio

    from channels.layers import get_channel_layer

    from chat.worker_server import ParleyWorker
    from parley.asgi import application

    server = ParleyWorker(application=application, channels=["chat.persist", "chat.bot"],
                          channel_layer=get_channel_layer())
    task = asyncio.get_running_loop().create_task(server.handle())
    yield server
    task.cancel()
    for instance in list(server.application_instances.values()):
        instance["future"].cancel()
    await asyncio.gather(task, *(i["future"] for i in server.application_instances.values()),
                         return_exceptions=True)
