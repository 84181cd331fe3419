"""The protocol process's admin listener: a Unix socket that only the pod itself can reach.

`parley drain` (the preStop hook) asks the process to drain through it. There is no HTTP route
for this: anything on the public listener can be reached through the ingress, and any header
that claims "I am the pod itself" (X-Forwarded-For: 127.0.0.1) can be forged.

Protocol: one command per line (`drain` or `status`), one JSON object per line in reply:
`{"draining": bool, "connections": int}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat

from chat.process import STATE, schedule_exit_after_drain
from parley.config import CONFIG

log = logging.getLogger(__name__)

# A command is one short word; anything longer is not a Parley client.
MAX_COMMAND_BYTES = 64
COMMAND_TIMEOUT = 5.0

# Held for the life of the process (the listener must not be collected).
_server: asyncio.AbstractServer | None = None
# Only a server process (parley.daphne_server, parley.uvicorn_server) listens; the application
# loaded anywhere else (tests, management commands) opens no socket and no port.
_enabled = False
# Started (or tried) once per process: a listener that could not start is logged once, not
# retried on every request.
_started = False


def enable() -> None:
    global _enabled
    _enabled = True


def _status() -> dict[str, object]:
    return {"draining": STATE.draining, "connections": len(STATE.connections)}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), COMMAND_TIMEOUT)
        command = line[:MAX_COMMAND_BYTES].decode("ascii", "replace").strip()
        if command == "drain":
            first = not STATE.draining
            STATE.drain()
            if first:
                schedule_exit_after_drain()
            reply: dict[str, object] = _status()
        elif command == "status":
            reply = _status()
        else:
            reply = {"error": f"unknown command {command[:20]!r}; use drain or status"}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
    except (TimeoutError, OSError) as exc:
        log.debug("admin connection ended: %r", exc)
    finally:
        writer.close()


def _remove_stale(path: str) -> None:
    """A socket file left by a killed process would make bind fail; one still served is not ours
    to take (another process on the same path): refuse to start the listener then."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"another process already serves {path}")


async def _start() -> None:
    global _server
    path = CONFIG.admin_socket
    try:
        await asyncio.to_thread(_remove_stale, path)
        _server = await asyncio.start_unix_server(_handle, path=path)
        os.chmod(path, 0o600)  # the pod's own user only
        log.info("admin listener on %s", path)
    except OSError as exc:
        log.error("admin listener not started on %s: %s (parley drain will not reach this process)", path, exc)


def _start_metrics() -> None:
    # Prometheus scrapes a port of its own: the public listener (the ingress's) serves no metrics.
    if CONFIG.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(CONFIG.metrics_port)
        except OSError as exc:
            log.error("metrics port %d not served: %s", CONFIG.metrics_port, exc)


def ensure_started() -> None:
    """Start the listener (and the metrics port) once (on the first request of a server)."""
    global _started
    if not _enabled or _started:
        return
    _started = True
    _start_metrics()
    task = asyncio.get_running_loop().create_task(_start(), name="parley-admin")
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def call(command: str, path: str | None = None, timeout: float = 5.0) -> dict[str, object]:
    """Client side (blocking): send one command to the listener, return its reply."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path or CONFIG.admin_socket)
        sock.sendall(command.encode() + b"\n")
        data = b""
        with contextlib.suppress(TimeoutError):
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    return json.loads(data)
