"""Liveness and readiness, answered before Django so that no Host header can break them.

Kubelet probes carry the pod IP as Host, which a restrictive ALLOWED_HOSTS refuses with 400:
pods would never become ready. These two paths say nothing secret, so they are served to any
Host, as plain ASGI, from the protocol process's event loop.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

from chat.process import STATE
from chat.redis_pool import clients

log = logging.getLogger(__name__)

PATHS = ("/healthz", "/readyz")


def _database_ok() -> None:
    close_old_connections()
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def liveness() -> tuple[int, dict[str, Any]]:
    # A drain that outlived its window means nobody stopped this process: report it not live,
    # so the kubelet restarts it instead of leaving a pod that refuses every socket.
    if STATE.drain_overdue():
        return 503, {"status": "drained"}
    return 200, {"status": "ok"}


async def readiness() -> tuple[int, dict[str, Any]]:
    """Each dependency as `ok` or `error`; the reason goes to the log, never to the caller."""
    checks: dict[str, str] = {}
    try:
        await sync_to_async(_database_ok)()
        checks["database"] = "ok"
    except Exception as exc:
        log.warning("readiness: database check failed: %s", type(exc).__name__)
        checks["database"] = "error"
    for index, client in enumerate(clients()):
        try:
            await client.ping()
            checks[f"redis{index}"] = "ok"
        except Exception as exc:
            log.warning("readiness: Redis shard %d check failed: %s", index, type(exc).__name__)
            checks[f"redis{index}"] = "error"
    ready = all(v == "ok" for v in checks.values()) and not STATE.draining
    status = "draining" if STATE.draining else ("ok" if ready else "unavailable")
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
