"""Liveness and readiness, answered before Django so that no Host header can break them.

Kubelet probes carry the pod IP as Host, which a restrictive ALLOWED_HOSTS refuses with 400:
pods would never become ready. These two paths say nothing secret, so they are served to any
Host, as plain ASGI, from the protocol process's event loop.

Liveness is about this process alone: it fails only when the process should be gone (a drain
nobody followed with a stop). Readiness is "can this process serve most rooms": the database and
at least half the Redis shards answer, and it is not draining. One shard down takes its rooms
away from every pod alike, so failing readiness for it would only empty the Service (and stall
node drains behind the PodDisruptionBudget) without sending anyone to a better pod. The
kubelet's thresholds (parley_operator.resources) absorb blips of the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

from chat.process import STATE
from chat.redis_pool import clients

log = logging.getLogger(__name__)

PATHS = ("/healthz", "/readyz")


# Each dependency check gets this long, all of them at once, so that a hung backend (a shard
# behind a dropped route, a database that accepts and never answers) costs the probe 1.5 s and
# a 503 naming it, instead of the client's own 5-10 s socket timeouts and a probe timeout that
# says nothing. The readiness probe's timeoutSeconds (parley_operator.resources) is above it.
CHECK_TIMEOUT_SECONDS = 1.5

# The database check runs in a thread (Django's ORM is synchronous): one still running from an
# earlier probe is awaited again instead of stacking another thread behind it.
_database_check: asyncio.Future[None] | None = None


def _database_ok() -> None:
    close_old_connections()
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_database() -> Awaitable[None]:
    global _database_check
    check = _database_check
    if check is None or check.done() or check.get_loop() is not asyncio.get_running_loop():
        check = _database_check = asyncio.ensure_future(sync_to_async(_database_ok)())
        # Its error is reported by whichever probe awaited it in time; one that ended after every
        # probe gave up must not be logged again as "exception never retrieved".
        check.add_done_callback(lambda done: done.cancelled() or done.exception())
    # shield: a check that times out keeps running in its thread, for the next probe to await.
    return asyncio.shield(check)


def liveness() -> tuple[int, dict[str, Any]]:
    # A drain that outlived its window means nobody stopped this process: report it not live,
    # so the kubelet restarts it instead of leaving a pod that refuses every socket.
    if STATE.drain_overdue():
        return 503, {"status": "drained"}
    return 200, {"status": "ok"}


async def _answers(name: str, check: Callable[[], Awaitable[object]]) -> str:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
        return "ok"
    except Exception as exc:
        log.warning("readiness: %s check failed: %s", name, type(exc).__name__)
        return "error"


def enough_shards(answering: int, shards: int) -> bool:
    """At least half of the shards, and at least one: with 2 shards one may be down, with 3 one,
    with 5 two. Fewer than half means most rooms (hashed over the shards) cannot be served."""
    return answering >= 1 and 2 * answering >= shards


async def readiness() -> tuple[int, dict[str, Any]]:
    """Each dependency as `ok` or `error`; the reason goes to the log, never to the caller."""
    shards = clients()
    results = await asyncio.gather(
        _answers("database", _check_database),
        *(_answers(f"Redis shard {index}", client.ping) for index, client in enumerate(shards)),
    )
    checks: dict[str, str] = {"database": results[0]}
    checks.update({f"redis{index}": result for index, result in enumerate(results[1:])})
    answering = sum(result == "ok" for result in results[1:])
    serving = checks["database"] == "ok" and enough_shards(answering, len(shards))
    ready = serving and not STATE.draining
    if STATE.draining:
        status = "draining"
    elif not serving:
        status = "unavailable"
    else:
        status = "ok" if answering == len(shards) else "degraded"
    return (200 if ready else 503), {"status": status, "checks": checks}


async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope.get("method") not in ("GET", "HEAD"):
        status, body = 405, {"error": {"code": "method_not_allowed", "message": "use GET"}}
    elif scope["path"] == "/healthz":
        status, body = liveness()
    else:
        status, body = await readiness()
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"cache-control", b"no-store")],
    })
    await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else payload})
