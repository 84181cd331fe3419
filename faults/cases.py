"""The faults a deployment meets, one case each (docs/reliability.md has the table).

A fault function runs while the senders do: it injects the fault, marks when (`mark_fault`) and
when it ended (`mark_healed`, from which recovery is timed), and leaves the cluster whole again
(a killed process replaced, a stopped server started), as Kubernetes would. Each takes tens of
seconds at most. Blocking cluster operations go through `run.blocking`, so the clients go on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from faults.cluster import Cluster, skew_env
from faults.run import CaseRun, FaultFunction, Traffic

# How long a backend stays out in the outage cases: longer than a client's ack timeout (3 s) and
# a pool's connect timeout (5 s), so every retry path runs, short enough for CI.
OUTAGE_S = 10.0
# A paused Redis must outlast the command timeout of Parley's Redis clients (10 s,
# chat.redis_pool) so that the timeouts, not the resume, end the waits.
PAUSE_S = 12.0
# One process's clock is this far off; more than the channel layer's 60 s message expiry, so a
# clock used to expire or order the queue would show.
SKEW_S = 90
# How long the slow-client case floods before calling it a failure: twice what it takes here.
SLOW_CLIENT_LIMIT_S = 45.0


@dataclass
class Case:
    name: str
    fault: FaultFunction
    description: str
    shards: int = 2
    proxy_redis: bool = False
    proxy_postgres: bool = False
    needs_postgres: bool = False
    setup: Callable[[Cluster], None] | None = None
    traffic: Traffic = field(default_factory=Traffic)
    env: dict[str, str] = field(default_factory=dict)  # for every process of the case
    # What this case's own setup must have caused, checked after it (a soak, which runs the fault
    # on a cluster of its own, does not check it).
    verify: Callable[[CaseRun], None] | None = None


# 1. A protocol process killed outright.
async def protocol_sigkill(run: CaseRun) -> None:
    victim = run.cluster.protocols[0]
    run.mark_fault()
    await run.blocking(run.cluster.kill_protocol, victim, signal.SIGKILL)
    run.mark_healed()  # its clients reconnect to the other at once; recovery is theirs
    await run.blocking(run.cluster.start_protocol)  # Kubernetes replaces the pod


# 2. A protocol process removed the way Kubernetes removes a pod: preStop drain, then SIGTERM.
async def protocol_drain(run: CaseRun) -> None:
    await run.blocking(run.cluster.start_protocol)  # the rollout's surge pod first
    victim = run.cluster.protocols[0]
    told_before = run.history.events["told_to_reconnect"]
    run.mark_fault()
    grace = 30.0
    took = await run.blocking(run.cluster.drain_protocol, victim, 10.0, grace)
    run.mark_healed()
    run.facts["exit_after_s"] = round(took, 1)
    run.facts["told_to_reconnect"] = run.history.events["told_to_reconnect"] - told_before
    run.expect(took < grace, f"the drained process took {took:.1f}s, over its {grace:.0f}s grace period")
    run.expect(run.facts["told_to_reconnect"] > 0, "no client was told to reconnect")


def drain_made_clients_reload(run: CaseRun) -> None:
    """The drain case runs with PARLEY_RESUME_MAX 1: clients that missed more while they moved are
    answered `reload` and fill the room from `history`, as the protocol tells them to."""
    run.facts["reloads"] = run.history.events["reloads"]
    run.expect(run.history.events["reloads"] > 0, "no client had to reload: the reload path went untested")


# 3. Workers: one killed mid-batch, one stopped with SIGTERM.
async def worker_kill(run: CaseRun) -> None:
    # A backlog first, so that the kill lands while the worker holds batches (at a trickle it
    # would mostly be waiting in BZPOPMIN, with nothing in hand).
    # Only the victim is let go, so the backlog is in its hands (ZPOPMIN takes it at once) when
    # it is killed a few milliseconds later, storing or publishing.
    victim = run.cluster.workers[0]
    await run.blocking(run.cluster.pause_workers)
    await asyncio.sleep(1.5)
    retries_before = run.history.retries()
    await run.blocking(run.cluster.resume_workers, [victim])
    await asyncio.sleep(0.005)
    run.mark_fault()
    await run.blocking(run.cluster.stop_worker, victim, signal.SIGKILL)
    await run.blocking(run.cluster.resume_workers)  # the other one
    await run.blocking(run.cluster.start_worker)
    await asyncio.sleep(3)
    took = await run.blocking(run.cluster.stop_worker, run.cluster.workers[0], signal.SIGTERM, 30.0)
    run.facts["sigterm_exit_s"] = round(took, 1)
    await run.blocking(run.cluster.start_worker)
    run.mark_healed()
    await asyncio.sleep(run.traffic.ack_timeout + 1)
    # What the killed worker held was lost unacked: its senders had to re-send it.
    run.facts["resent_after_kill"] = run.history.retries() - retries_before


def kill_hit_a_batch(run: CaseRun) -> None:
    """The worker was killed holding work: its senders had to re-send (else the case tested nothing)."""
    run.expect(run.facts.get("resent_after_kill", 0) > 0, "the killed worker held nothing: the kill tested nothing")



# 4. Redis restarted empty: queues, presence, subscriptions all gone.
async def redis_restart(run: CaseRun) -> None:
    run.mark_fault()
    for shard in range(run.cluster.shards):  # the queue's shard and the other, one after the other
        await run.blocking(run.cluster.restart_redis, shard, 1.0)
    run.mark_healed()


# 5. Redis paused (SIGSTOP) past the clients' timeouts, then resumed.
async def redis_pause(run: CaseRun) -> None:
    shard = run.cluster.persist_shard()
    run.mark_fault()
    run.cluster.pause_redis(shard)
    try:
        await asyncio.sleep(PAUSE_S)
    finally:
        await run.blocking(run.cluster.resume_redis, shard)
    run.mark_healed()


# 6. One shard of two lost (not the one with the queue): only its rooms may suffer.
async def shard_loss(run: CaseRun) -> None:
    lost = 1 - run.cluster.persist_shard()
    healthy_rooms = [r for r in run.fixture.rooms if run.cluster.shard_of(r) != lost]
    run.facts["lost_shard_rooms"] = sum(1 for r in run.fixture.rooms if run.cluster.shard_of(r) == lost)
    run.mark_fault()
    await run.blocking(run.cluster.stop_redis, lost)
    window_start = time.monotonic()
    await asyncio.sleep(OUTAGE_S)
    window_end = time.monotonic()
    await run.blocking(run.cluster.start_redis, lost)
    run.mark_healed()
    # The rooms of the healthy shard went on: their sends during the outage were acked promptly.
    during = [s for s in run.history.sends.values()
              if s.room in healthy_rooms and window_start + 1 <= s.first_sent <= window_end - 1]
    prompt = [s for s in during if s.acked_at is not None and s.acked_at - s.first_sent < 1.0]
    run.facts["healthy_room_sends_during"] = len(during)
    run.facts["healthy_room_acked_within_1s"] = len(prompt)
    run.expect(bool(during) and len(prompt) >= 0.95 * len(during),
               f"rooms on the healthy shard suffered: {len(prompt)}/{len(during)} sends acked within 1s")


# 7. PostgreSQL unreachable: connections reset, new ones refused, for OUTAGE_S; and once, every
# backend terminated (what a failover or an admin does).
async def postgres_outage(run: CaseRun) -> None:
    proxy = run.cluster.pg_proxy
    assert proxy is not None
    run.mark_fault()
    ports = await run.blocking(proxy.upstream_ports)
    run.facts["terminated_backends"] = await run.blocking(terminate_backends, run.cluster.database_url, ports)
    run.expect(run.facts["terminated_backends"] > 0, "no Parley database session was there to terminate")
    await asyncio.sleep(2)
    proxy.refuse(True)
    run.facts["connections_reset"] = await run.blocking(proxy.reset_all)
    await asyncio.sleep(OUTAGE_S)
    proxy.heal()
    run.mark_healed()


def terminate_backends(database_url: str, client_ports: list[int]) -> int:
    """pg_terminate_backend on the Parley processes' connections (those through the case's proxy,
    known by their client port): never the harness's own, nor a test runner's on the same database."""
    import psycopg

    name = database_url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(database_url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend' AND client_port = ANY(%s)", (name, client_ports)).fetchall()
    return len(rows)


# 8. The network to Redis: latency, a stall past the timeouts, connections reset mid-stream.
async def redis_network(run: CaseRun) -> None:
    proxies = run.cluster.redis_proxies
    run.mark_fault()
    for proxy in proxies:
        proxy.set_latency(0.2)
    await asyncio.sleep(4)
    for proxy in proxies:
        proxy.heal()
        proxy.stall()
    await asyncio.sleep(PAUSE_S)
    for proxy in proxies:
        proxy.unstall()
    await asyncio.sleep(2)
    resets = 0
    for _ in range(3):
        for proxy in proxies:
            resets += await run.blocking(proxy.reset_all)
        await asyncio.sleep(1)
    run.facts["connections_reset"] = resets
    await asyncio.sleep(2)
    # Half-open: every connection open now goes silent for good; new ones work. Recovery is the
    # time Parley's timeouts and pings take to notice and reconnect.
    blackholed = 0
    for proxy in proxies:
        blackholed += await run.blocking(proxy.blackhole_existing)
    run.facts["connections_blackholed"] = blackholed
    run.mark_healed()


# 9. A client that never reads, in a busy room: it is closed; the room goes on for the others.
async def slow_client(run: CaseRun) -> None:
    from loadtest.floods import masked_frame, raw_websocket

    room = run.fixture.rooms[0]
    port = run.cluster.endpoints()[0]
    # A member who joins and never reads again (its token is a case client's: same user, its own socket).
    _, token = run.fixture.users[0]
    slow = await run.blocking(raw_websocket, port, f"/ws/?token={token}")
    slow.sendall(masked_frame(json.dumps({"type": "join", "room": room}).encode()))
    flooder = run.clients[0]
    run.mark_fault()
    # 4 KB bodies from one member fill the slow socket's buffers within seconds.
    big = "x" * 4000
    started = time.monotonic()
    closed_after = None
    sent = 0
    # The server closes it once PARLEY_SEND_BUFFER (1,000) frames wait beyond what the kernel's
    # buffers took: ~20 s at this flood's ~90 messages a second (one sender's window of 8).
    while time.monotonic() - started < SLOW_CLIENT_LIMIT_S and closed_after is None:
        for _ in range(10):
            await flooder.send_next(room, big)
            sent += 1
        await asyncio.sleep(0.1)
        if await run.blocking(_closed, slow):
            closed_after = time.monotonic() - started
    slow.close()
    run.mark_healed()
    run.facts["flood_messages"] = sent
    run.facts["slow_client_closed_after_s"] = closed_after and round(closed_after, 1)
    run.expect(closed_after is not None,
               f"the client that never read was not closed within {SLOW_CLIENT_LIMIT_S:.0f}s")


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed or reset this socket (read what it sent; never block)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


# 10. One protocol process and one worker with clocks far off (one ahead, one behind).
def skewed_clocks(cluster: Cluster) -> None:
    cluster.kill_protocol(cluster.protocols[0])
    cluster.start_protocol(**skew_env(SKEW_S))
    cluster.stop_worker(cluster.workers[0])
    cluster.start_worker(**skew_env(-SKEW_S))


async def clock_skew(run: CaseRun) -> None:
    run.mark_fault()
    await asyncio.sleep(3)  # the skewed processes serve alongside the others
    # A backlog, as when the workers are busy: every process's sends wait in the queue together,
    # and no clock may decide which of them stay (shorter than the ack timeout: no retries).
    await run.blocking(run.cluster.pause_workers)
    paused_at = time.monotonic()
    try:
        await asyncio.sleep(2.5)
        read_at = time.monotonic()
        queued = await run.blocking(run.cluster.queue_length)
    finally:
        await run.blocking(run.cluster.resume_workers)
    # Sends made while paused, less the last 100 ms (still on their way through a protocol process).
    sent = sum(1 for s in run.history.sends.values() if paused_at <= s.first_sent <= read_at - 0.1 and s.attempts)
    run.facts.update(sent_while_paused=sent, queued_while_paused=queued)
    # A worker stopped inside its BZPOPMIN still takes the first message to arrive: Redis hands it
    # over on the worker's behalf. Beyond one per worker, nothing may leave the queue.
    expected = sent - len(run.cluster.workers)
    run.expect(queued >= expected,
               f"the queue held {queued} of the {sent} messages sent while the workers were paused")
    await asyncio.sleep(3)
    run.mark_healed()


# 11. A rolling restart of every process, one at a time, under steady load.
async def rolling_restart(run: CaseRun) -> None:
    run.mark_fault()
    cluster = run.cluster
    for old in list(cluster.protocols):
        await run.blocking(cluster.start_protocol)
        await run.blocking(cluster.drain_protocol, old, 10.0, 30.0)
    for old_worker in list(cluster.workers):
        await run.blocking(cluster.start_worker)
        await run.blocking(cluster.stop_worker, old_worker, signal.SIGTERM, 30.0)
    run.mark_healed()


CASES: dict[str, Case] = {case.name: case for case in [
    Case("protocol_sigkill", protocol_sigkill, "a protocol process killed (SIGKILL) mid-stream"),
    Case("protocol_drain", protocol_drain,
         "a protocol process drained (preStop) then SIGTERM; resumes beyond 1 missed answered `reload`",
         env={"PARLEY_RESUME_MAX": "1", "PARLEY_RECONNECT_JITTER_MS": "3000"}, verify=drain_made_clients_reload),
    Case("worker_kill", worker_kill, "a worker killed mid-batch (SIGKILL), another stopped (SIGTERM)",
         verify=kill_hit_a_batch),
    Case("redis_restart", redis_restart, "every Redis shard restarted empty, one after the other"),
    Case("redis_pause", redis_pause, f"the queue's Redis shard paused (SIGSTOP) {PAUSE_S:.0f}s"),
    Case("shard_loss", shard_loss, f"one Redis shard of two down {OUTAGE_S:.0f}s, restarted empty"),
    Case("postgres_outage", postgres_outage, f"PostgreSQL backends terminated, then unreachable {OUTAGE_S:.0f}s",
         proxy_postgres=True, needs_postgres=True),
    Case("redis_network", redis_network,
         "Redis behind a proxy: 200 ms latency, a 12 s stall, resets, then every connection black-holed",
         proxy_redis=True),
    Case("slow_client", slow_client, "a member that never reads, in a room flooded with 4 KB messages"),
    Case("clock_skew", clock_skew, f"a protocol process {SKEW_S}s ahead, a worker {SKEW_S}s behind",
         setup=skewed_clocks),
    Case("rolling_restart", rolling_restart, "every protocol process and worker replaced one at a time"),
]}
