"""The pods' migrate initContainer checks, and migrates only what is pending.

Migrations run once per rollout (the chart's hook Job, before the ChatPlatform changes), so a
replacement pod must not wait for the migration lock to find nothing to do: with the lock held
elsewhere (another pod queued behind it, a long migration of another release's Job), the pod's
check still returns at once. On an empty database (a first install, the Job not run yet) the
pods apply the migrations themselves, several at once, and none starts before they are in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psycopg
import pytest

from chat.management.commands.migrate_locked import LOCK_ID
from parley_operator import resources
from parley_operator.spec import parse_body
from stack import PARLEY
from tests import conftest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def init_command() -> list[str]:
    """The command of the pods' migrate initContainer, as the operator writes it."""
    body = {"apiVersion": "parley.dev/v1alpha1", "kind": "ChatPlatform",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat"},
            "spec": {"image": "parley:1", "allowedHosts": ["chat.example.com"],
                     "redis": {"urls": ["redis://127.0.0.1:6379/0"]}, "database": {"secretRef": {"name": "db"}}}}
    pods = [resources.deployment(body, parse_body(body), role, 1)["spec"]["template"]["spec"]
            for role in resources.ROLES]
    commands = {tuple(container["command"]) for pod in pods for container in pod["initContainers"]}
    (command,) = commands
    assert command[0] == "parley"
    return [PARLEY, *command[1:]]


def run(database_url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PARLEY_DEV": "1", "PYTHON": sys.executable, "DATABASE_URL": database_url}
    return subprocess.Popen(init_command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_pod_on_a_migrated_database_does_not_wait_for_the_migration_lock(transactional_db: None) -> None:
    url = conftest.test_database_url()
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [LOCK_ID])
        started = time.monotonic()
        pod = run(url)
        try:
            output, _ = pod.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pod.kill()
            output, _ = pod.communicate()
            pytest.fail(f"the initContainer waited for the migration lock: {output[-500:]}")
        took = time.monotonic() - started
    assert pod.returncode == 0, output
    assert "none pending" in output
    assert took < 15


def test_pods_on_an_empty_database_migrate_it_before_they_start(transactional_db: None) -> None:
    base = conftest.test_database_url()
    server, _, name = base.rpartition("/")
    fresh = f"{name}_initcheck"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{fresh}"')
        admin.execute(f'CREATE DATABASE "{fresh}"')
    try:
        pods = [run(f"{server}/{fresh}") for _ in range(3)]
        outputs = [pod.communicate(timeout=180)[0] for pod in pods]
        assert [pod.returncode for pod in pods] == [0, 0, 0], outputs
        # One applied them; the others found them applied once they had the lock.
        assert sum("Applying chat.0001_initial" in output for output in outputs) == 1, outputs
        with psycopg.connect(f"{server}/{fresh}") as db:
            applied = db.execute("SELECT count(*) FROM django_migrations WHERE app = 'chat'").fetchone()[0]
        assert applied >= 1
        # A pod started now only checks.
        again = run(f"{server}/{fresh}")
        output, _ = again.communicate(timeout=60)
        assert again.returncode == 0 and "none pending" in output, output
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
