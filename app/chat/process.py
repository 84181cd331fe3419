"""Who this process is, which connections it holds, whether it is draining, and its heartbeat.

The heartbeat is the operator's view of load without scraping pods: every few seconds each
process writes `<prefix>:proc:<process_id>` (`chat.contract`) (a hash with a short TTL) to Redis.
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


async def heartbeat_loop(role: str, extra: Heartbeat | None = None) -> None:
    """Publish this process's load every `PARLEY_HEARTBEAT_SECONDS` until cancelled."""
    from chat.redis_pool import client_for

    key = heartbeat_key()
    while True:
        try:
            fields = {
                "role": role,
                "pod": CONFIG.pod_name,
                "connections": len(STATE.connections),
                "inbox": outbound_backlog(),
                "draining": int(STATE.draining),
                "ts": time.time(),
            }
            client = client_for(key)
            pipe = client.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, CONFIG.heartbeat_ttl)
            await pipe.execute()
            if extra is not None:
                await extra.beat()
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)
        except Exception:
            log.exception("heartbeat failed")
        raise_if_cancelling()
        await asyncio.sleep(CONFIG.heartbeat_seconds)


class Heartbeat(Protocol):
    async def beat(self) -> None: ...


_started: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def ensure_heartbeat(role: str, extra: Heartbeat | None = None) -> None:
    """Start the heartbeat for this event loop once."""
    loop = asyncio.get_running_loop()
    if loop not in _started:
        _started[loop] = loop.create_task(heartbeat_loop(role, extra), name="parley-heartbeat")
