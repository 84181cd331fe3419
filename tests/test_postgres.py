"""Production-database behaviour: several workers writing at once, concurrent migrations."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from channels.db import database_sync_to_async

from chat.models import Message
from chat.services import create_group
from stack import PARLEY
from tests.helpers import WsClient, amake_user, messages_in

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


async def test_two_workers_assign_gapless_seqs_in_every_room(live_stack):
    users = [await amake_user(f"user{i}") for i in range(4)]
    rooms = [await database_sync_to_async(create_group)(users[0][0], f"room{r}", False) for r in range(3)]
    port = live_stack.start_protocol(PARLEY_RATE_PER_SECOND="1000", PARLEY_RATE_BURST="1000")
    # Two workers with tiny batches: they interleave on the same rooms as much as possible.
    live_stack.start_worker(PARLEY_BATCH_MAX="3", PARLEY_BATCH_WAIT_MS="1")
    live_stack.start_worker(PARLEY_BATCH_MAX="3", PARLEY_BATCH_WAIT_MS="1")
    clients = [await WsClient.connect(port, token) for _, token in users]
    for client in clients:
        for room in rooms:
            await client.join(room.pk)

    per_client = 30
    for n in range(per_client):
        for i, client in enumerate(clients):
            room = rooms[(n + i) % len(rooms)]
            frame = {"type": "send", "room": room.pk, "body": f"{i}:{n}", "client_msg_id": f"u{i}-{n}"}
            await client.send(frame)
    total = per_client * len(clients)
    watcher = clients[0]
    while sum(len(messages_in(watcher.frames, r.pk)) for r in rooms) < total:
        await watcher.expect(lambda f: f["type"] == "message", timeout=20)
    for room in rooms:
        seqs = messages_in(watcher.frames, room.pk)
        assert seqs == list(range(1, len(seqs) + 1))
    assert await database_sync_to_async(Message.objects.count)() == total
    await asyncio.gather(*(c.close() for c in clients))


def test_concurrent_migrations_on_an_empty_database_all_succeed(live_stack):
    """Every pod runs `parley migrate` as an initContainer; on a new database they start together."""
    import psycopg

    base = live_stack.env["DATABASE_URL"]
    server, _, name = base.rpartition("/")
    fresh = f"{name}_migrate"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{fresh}"')
        admin.execute(f'CREATE DATABASE "{fresh}"')
    try:
        env = {**live_stack.env, "DATABASE_URL": f"{server}/{fresh}"}
        runs = [
            subprocess.Popen([PARLEY, "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(3)
        ]
        outputs = [run.communicate(timeout=180)[0].decode() for run in runs]
        assert [run.returncode for run in runs] == [0, 0, 0], outputs
        with psycopg.connect(f"{server}/{fresh}") as db:
            applied = db.execute("SELECT count(*) FROM django_migrations WHERE app = 'chat'").fetchone()[0]
        assert applied >= 1
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
