"""Who this process is, which connections it holds, whether it is draining, and its heartbeat.

The heartbeat is the operator's view of load without scraping pods: every few seconds each
process writes `parley:proc:<process_id>` (a hash with a short TTL) to Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
import weakref
from typing import Protocol

from redis.exceptions import RedisError

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
    return f"parley:proc:{pid or _PROCESS_ID}"


class Connection(Protocol):
    def start_drain(self, delay_ms: int) -> None: ...
    def backlog(self) -> int: ...


class ProcessState:
    """Connections held by this process (per event loop) and its drain flag."""

    def __init__(self) -> None:
        # A plain set: consumers remove themselves on disconnect (a WeakSet costs a weakref each).
        self.connections: set[Connection] = set()
        self.draining = False
        self.drain_started: float | None = None

    def drain(self) -> int:
        """Stop accepting and ask every client to reconnect elsewhere after a jittered delay."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.time()
            log.info("draining %d connections", len(self.connections))
        for conn in list(self.connections):
            conn.start_drain(random.randint(0, CONFIG.reconnect_jitter_ms))
        return len(self.connections)


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
