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
