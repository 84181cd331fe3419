"""One case: a cluster, documented clients sending numbered messages at a steady rate, a fault in
the middle, then the check of the promise.

The phases of a case, each bounded in time:
1. every client connects and joins its rooms (members before the first send, so every acked
   message is owed to every member of its room);
2. senders run at `rate` messages per second in all, before, during and after the fault;
3. senders stop taking new messages; unacked ones are retried until acked or `settle_s` passed;
4. every client is connected and resumed, the room quiet for a moment: the *live* snapshot;
5. every client resumes every room once more (what a reconnecting client would get): anything
   new now is *late*, anything still missing *lost*;
6. the database is read and `faults.checker.check` gives the case's line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from faults.checker import Result, StoredRow, check, recovery_seconds
from faults.client import DocumentedClient
from faults.cluster import Cluster
from faults.history import History

log = logging.getLogger("faults")

# A case's traffic: 12 users in 6 public rooms, each user in 3 (so each room has ~6 members and
# lands on either Redis shard), sending 40 messages a second in all. Enough that a fault always
# hits messages in flight (a worker's batch, a send pipeline, a publish), small enough for two
# cores beside four Parley processes.
CLIENTS = 12
ROOMS = 6
ROOMS_PER_CLIENT = 3
RATE = 40.0


@dataclass
class Traffic:
    clients: int = CLIENTS
    rooms: int = ROOMS
    rooms_per_client: int = ROOMS_PER_CLIENT
    rate: float = RATE
    before_s: float = 3.0  # steady sending before the fault
    after_s: float = 4.0  # steady sending after the fault returned
    settle_s: float = 30.0  # retries of the unacked, at most
    ack_timeout: float = 3.0


@dataclass
class Fixture:
    users: list[tuple[int, str]]  # (user id, token)
    rooms: list[int]
    membership: list[list[int]]  # client index -> its rooms


def make_fixture(tag: str, traffic: Traffic, rng: random.Random) -> Fixture:
    """Users with tokens and public rooms, in the database (call where the ORM may run)."""
    from django.contrib.auth import get_user_model

    from chat.models import Membership, Room
    from chat.tokens import create_token

    users = []
    model = get_user_model()
    for index in range(traffic.clients):
        user = model(username=f"{tag}-u{index}")
        user.set_unusable_password()  # tokens only: no password hashing to wait for
        user.save()
        users.append((user.pk, create_token(user, "faults")[1], user))
    rooms = [Room.objects.create(name=f"{tag}-r{n}", kind=Room.Kind.GROUP, private=False,
                                 created_by=users[0][2]).pk for n in range(traffic.rooms)]
    membership = []
    for index in range(traffic.clients):
        # Round robin, so each room gets the same number of members.
        mine = [rooms[(index + k) % len(rooms)] for k in range(traffic.rooms_per_client)]
        membership.append(mine)
        for room in mine:
            Membership.objects.get_or_create(room_id=room, user_id=users[index][0])
    return Fixture([(pk, token) for pk, token, _ in users], rooms, membership)


def stored_rows(rooms: list[int]) -> list[StoredRow]:
    from django.db import connection

    from chat.models import Message

    connection.close()  # a case may have terminated this process's database session too

    return list(Message.objects.filter(room_id__in=rooms).values_list(
        "room_id", "seq", "sender_id", "client_msg_id", "body"))


class CaseRun:
    """What a fault function gets: the cluster, the clients, and marks for the fault's timing."""

    def __init__(self, name: str, cluster: Cluster, fixture: Fixture, traffic: Traffic, rng: random.Random) -> None:
        self.name = name
        self.cluster = cluster
        self.fixture = fixture
        self.traffic = traffic
        self.rng = rng
        self.history = History()
        self.tag = f"{name[:12]}{secrets.token_hex(2)}"
        self.clients = [
            DocumentedClient(f"c{i}", user_id, token, fixture.membership[i], self.history, cluster.endpoints,
                             tag=self.tag, rng=random.Random(rng.random()), ack_timeout=traffic.ack_timeout)
            for i, (user_id, token) in enumerate(fixture.users)
        ]
        self.fault_at: float | None = None
        self.healed_at: float | None = None
        self.sending = True
        self.facts: dict[str, Any] = {}  # what a case measured of its own (drain time, ...)
        self.problems: list[str] = []

    def mark_fault(self) -> None:
        self.fault_at = time.monotonic()

    def mark_healed(self) -> None:
        self.healed_at = time.monotonic()

    async def blocking(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking cluster operation, off the clients' event loop (they must keep running)."""
        return await asyncio.to_thread(function, *args, **kwargs)

    def expect(self, condition: bool, problem: str) -> None:
        """A case-specific requirement; a failed one fails the case with this text."""
        if not condition:
            self.problems.append(problem)

    async def wait_ready(self, timeout: float) -> int:
        """Wait until every client is connected and resumed; the number still not ready."""
        try:
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in self.clients)), timeout)
        except TimeoutError:
            pass
        return sum(not c.ready.is_set() for c in self.clients)

    async def _send_steadily(self) -> None:
        """`rate` new messages a second, round robin over clients and their rooms."""
        interval = 1.0 / self.traffic.rate
        next_at = time.monotonic()
        turn = 0
        pending: set[asyncio.Task[Any]] = set()
        while self.sending:
            client = self.clients[turn % len(self.clients)]
            room = client.rooms[(turn // len(self.clients)) % len(client.rooms)]
            turn += 1
            # A client whose window is full waits without holding up the others.
            task = asyncio.get_running_loop().create_task(client.send_next(room))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        for task in pending:
            task.cancel()

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            for client in self.clients:
                await client.retry_due()


FaultFunction = Callable[[CaseRun], Awaitable[None]]


async def drive(run: CaseRun, fault: FaultFunction) -> tuple[dict[tuple[str, int], set[int]], float]:
    started = time.monotonic()
    for client in run.clients:
        client.start()
    not_ready = await run.wait_ready(30)
    if not_ready:
        raise RuntimeError(f"{not_ready} clients could not connect and join before the case started")
    retries = asyncio.get_running_loop().create_task(run._retry_loop())
    sender = asyncio.get_running_loop().create_task(run._send_steadily())
    try:
        await asyncio.sleep(run.traffic.before_s)
        await fault(run)
        if run.healed_at is None:
            run.mark_healed()
        await asyncio.sleep(run.traffic.after_s)
    finally:
        run.sending = False
        await sender
    # Retry what is unacked until acked, refused, or settle_s passed.
    deadline = time.monotonic() + run.traffic.settle_s
    while time.monotonic() < deadline and any(c.pending for c in run.clients):  # noqa: ASYNC110 (many clients)
        await asyncio.sleep(0.25)
    retries.cancel()
    not_ready = await run.wait_ready(20)
    run.expect(not_ready == 0, f"{not_ready} clients were not connected and resumed at the end")
    await asyncio.sleep(1.5)  # the last deliveries in flight
    live = {key: set(view.received) for key, view in run.history.views.items()}
    finals = await asyncio.gather(*(c.final_resume(20) for c in run.clients))
    run.expect(all(finals), f"{finals.count(False)} clients could not resume at the end")
    for client in run.clients:
        await client.stop()
    return live, time.monotonic() - started


def run_case(
    name: str,
    fault: FaultFunction,
    cluster: Cluster,
    traffic: Traffic | None = None,
    seed: int | None = None,
    setup: Callable[[Cluster], None] | None = None,
    verify: Callable[[CaseRun], None] | None = None,
) -> Result:
    """Start `cluster`, run the case, stop the cluster, check. Blocking; call where the ORM may run."""
    traffic = traffic or Traffic()
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    fixture = make_fixture(f"{name[:14]}-{secrets.token_hex(3)}", traffic, rng)
    cluster.start()
    try:
        if setup is not None:
            setup(cluster)
        run = CaseRun(name, cluster, fixture, traffic, rng)
        live, duration = asyncio.run(drive(run, fault))
    finally:
        cluster.stop()
    if verify is not None:
        verify(run)
    result = check(name, run.history, live, stored_rows(fixture.rooms), run.history.latencies)
    result.recovery_s = recovery_seconds(run.history, run.healed_at)
    result.seed = seed
    result.duration_s = round(duration, 1)
    result.problems.extend(run.problems)
    result.details["facts"] = run.facts
    return result
