"""Who this process is, which connections it holds, whether it is draining, and its heartbeat.

The heartbeat is the operator's view of load without scraping pods: every few seconds each
process writes `<prefix>:proc:<process_id>` (`chat.contract`) (a hash with a short TTL) to Redis,
and registers its id in that shard's registry of live processes (`<prefix>:procs`).

A draining or exiting process deletes its heartbeat and its registration: its clients are
reconnecting elsewhere and are counted there; a heartbeat left behind would count them twice
until its TTL ran out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Protocol

from redis.exceptions import RedisError

from chat import contract
from parley.config import CONFIG

log = logging.getLogger(__name__)

_PROCESS_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def process_id() -> str:
    return _PROCESS_ID


def raise_if_cancelling() -> None:
    """redis-py can turn a cancellation into a connection error; a supervisor loop that
    caught it must still stop, or event-loop shutdown waits for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def heartbeat_key(pid: str | None = None) -> str:
    return contract.heartbeat_key(pid or _PROCESS_ID)


# A drained process exits this long after its drain window closed: time for the preStop hook to
# return and the kubelet's SIGTERM to arrive first in the normal case; in any other case (a drain
# nobody followed with a stop) the container restarts instead of staying drained for ever.
DRAIN_EXIT_MARGIN_SECONDS = 5.0


class Connection(Protocol):
    user_id: int

    def start_drain(self, delay_ms: int) -> None: ...
    def backlog(self) -> int: ...
    def close_for(self, code: int, error: str | None = None) -> None: ...


class ProcessState:
    """Connections held by this process (per event loop), per user, and its drain flag."""

    def __init__(self) -> None:
        # A plain set: consumers remove themselves on disconnect (a WeakSet costs a weakref each).
        self.connections: set[Connection] = set()
        # Sockets per user: the per-user cap, and closing a user's sockets on revocation. Most
        # users hold one socket per process: that one is stored as itself, and a set (~200
        # bytes) only from the second on. At 10,000 sockets that is ~2 MB, a sixth of a KB each.
        self.by_user: dict[int, Connection | set[Connection]] = {}
        self.draining = False
        self.drain_started: float | None = None

    def add(self, conn: Connection, user_id: int) -> bool:
        """Count a socket in; False (and nothing counted) when its user is at the cap."""
        mine = self.by_user.get(user_id)
        held = 0 if mine is None else len(mine) if isinstance(mine, set) else 1
        if held >= CONFIG.max_sockets_per_user:
            return False
        if mine is None:
            self.by_user[user_id] = conn
        elif isinstance(mine, set):
            mine.add(conn)
        elif mine is not conn:
            self.by_user[user_id] = {mine, conn}
        self.connections.add(conn)
        return True

    def remove(self, conn: Connection, user_id: int) -> None:
        self.connections.discard(conn)
        mine = self.by_user.get(user_id)
        if mine is conn:
            del self.by_user[user_id]
        elif isinstance(mine, set):
            mine.discard(conn)
            if len(mine) == 1:
                self.by_user[user_id] = next(iter(mine))
            elif not mine:
                del self.by_user[user_id]

    def of_user(self, user_id: int) -> list[Connection]:
        mine = self.by_user.get(user_id)
        if mine is None:
            return []
        return list(mine) if isinstance(mine, set) else [mine]

    def drain(self) -> int:
        """Stop accepting and ask every client to reconnect elsewhere after a jittered delay."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.time()
            log.info("draining %d connections", len(self.connections))
            _retire_soon()
        for conn in list(self.connections):
            conn.start_drain(random.randint(0, CONFIG.reconnect_jitter_ms))
        return len(self.connections)

    def drain_overdue(self, now: float | None = None) -> bool:
        """Whether the drain window has passed: the process should be gone by now (not live)."""
        if self.drain_started is None:
            return False
        return (now or time.time()) - self.drain_started > CONFIG.drain_seconds


def schedule_exit_after_drain() -> None:
    """Called by the admin listener of a server process (never in-process tests)."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        log.warning("drain window over and no stop came; exiting so the pod restarts undrained")
        os.kill(os.getpid(), signal.SIGTERM)

    loop.call_later(CONFIG.drain_seconds + DRAIN_EXIT_MARGIN_SECONDS, stop)


STATE = ProcessState()


def outbound_backlog() -> int:
    """Frames queued in this process for clients that have not taken them yet."""
    return sum(conn.backlog() for conn in list(STATE.connections))


# A dead process's registration is pruned once its score is this far in the past (by Redis's
# clock, as every score is): well past its heartbeat's TTL, so the operator has long stopped
# counting it, and generous to an operator whose own clock runs behind Redis's.
REGISTRY_PRUNE_MARGIN_SECONDS = 60.0
# Deleting the heartbeat at exit is best effort, bounded so that it never delays a shutdown.
RETIRE_TIMEOUT_SECONDS = 1.0


# KEYS: heartbeat hash, registry; ARGV: process id, TTL, prune margin, then field, value pairs.
# `ts` and the registry's scores are Redis's clock, not this process's: a process whose clock
# is off (the fault suite's clock_skew case runs one 90 s ahead) would otherwise look stale or
# from the future to the operator, or prune the other processes' registrations as expired.
_HEARTBEAT_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'ts', string.format('%.6f', now), unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], string.format('%.6f', now + ttl), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%.6f', now - tonumber(ARGV[3])))
return 1
"""


async def publish_heartbeat(role: str, held: Callable[[], int] | None = None) -> None:
    """Write this process's heartbeat and registration (one script, on the heartbeat's shard)."""
    from chat.redis_pool import client_for

    key = heartbeat_key()
    fields = {
        "role": role,
        "pod": CONFIG.pod_name,
        "connections": len(STATE.connections),
        "inbox": outbound_backlog(),
        "held": held() if held is not None else 0,
        "draining": int(STATE.draining),
    }
    pairs = [str(item) for field in fields.items() for item in field]
    await client_for(key).eval(_HEARTBEAT_SCRIPT, 2, key, contract.registry_key(), _PROCESS_ID,
                               CONFIG.heartbeat_ttl, REGISTRY_PRUNE_MARGIN_SECONDS, *pairs)


async def retire_heartbeat() -> None:
    """Delete this process's heartbeat and registration (drain, exit); best effort, bounded."""
    from chat.redis_pool import client_for

    key = heartbeat_key()
    try:
        async with asyncio.timeout(RETIRE_TIMEOUT_SECONDS):
            pipe = client_for(key).pipeline(transaction=True)
            pipe.delete(key)
            pipe.zrem(contract.registry_key(), _PROCESS_ID)
            await pipe.execute()
    except (RedisError, OSError, TimeoutError) as exc:
        # The TTL removes it anyway; the operator also ignores draining and gone pods.
        log.warning("could not delete the heartbeat: %s", exc)


_retiring: set[asyncio.Task[None]] = set()


def _retire_soon() -> None:
    """From drain() (sync): delete the heartbeat now rather than at the next beat."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop (a test, a management command): the heartbeat loop does it
    task = loop.create_task(retire_heartbeat(), name="parley-heartbeat-retire")
    _retiring.add(task)
    task.add_done_callback(_retiring.discard)


async def heartbeat_loop(role: str, extra: Heartbeat | None = None, held: Callable[[], int] | None = None) -> None:
    """Publish this process's load every `PARLEY_HEARTBEAT_SECONDS` until cancelled; once
    draining, publish nothing (the heartbeat was deleted); when cancelled, delete it."""
    try:
        while True:
            try:
                if not STATE.draining:
                    await publish_heartbeat(role, held)
                    if STATE.draining:
                        # The drain began while this beat was in flight, and its delete may have
                        # run first: the beat must not outlive it.
                        await retire_heartbeat()
                if extra is not None:
                    await extra.beat()
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            raise_if_cancelling()
            await asyncio.sleep(CONFIG.heartbeat_seconds)
    except asyncio.CancelledError:
        await retire_heartbeat()
        raise


class Heartbeat(Protocol):
    async def beat(self) -> None: ...


_started: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def ensure_heartbeat(role: str, extra: Heartbeat | None = None, held: Callable[[], int] | None = None) -> None:
    """Start the heartbeat for this event loop once. `held`: messages this process took from
    Redis and has not handled yet (workers), published so the operator counts them as load."""
    loop = asyncio.get_running_loop()
    if loop not in _started:
        _started[loop] = loop.create_task(heartbeat_loop(role, extra, held), name="parley-heartbeat")
