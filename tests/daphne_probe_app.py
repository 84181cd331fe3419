"""An ASGI app for tests/test_daphne_server.py: echoes WebSocket text, reports live objects over HTTP.

Run by `python -m parley.daphne_server tests.daphne_probe_app:app` in a child process, so the
test can see what the lean Daphne keeps per open socket from the server's own heap.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from typing import Any

from parley.daphne_server import HANDSHAKE_ONLY, LeanWebSocketProtocol

FLOOD = {"sent": 0}
WATCHED = {"HTTPChannel", "WebRequest", "LeanWebSocketProtocol", "Queue", "ApplicationInbox"}


def live_objects() -> dict[str, Any]:
    unreachable = gc.collect()
    counts: Counter[str] = Counter()
    sample: LeanWebSocketProtocol | None = None
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in WATCHED:
            counts[name] += 1
            if isinstance(obj, LeanWebSocketProtocol) and getattr(obj, "state", None) == obj.STATE_OPEN:
                sample = obj
    held = set(vars(sample)) if sample is not None else set()
    return {
        "counts": dict(counts),
        "open_sample": sample is not None,
        "options_in_instance": sorted(held & set(LeanWebSocketProtocol.CONFIG_ATTRS)),
        "handshake_data_in_instance": sorted(held & set(HANDSHAKE_ONLY)),
        "send_queue_in_instance": "send_queue" in held,
        "producer_is_protocol": sample is not None and sample.transport.producer is sample,
        "flood_sent": FLOOD["sent"],
        # Objects in reference cycles nothing else held: what only the collector would free.
        "unreachable_found": unreachable,
    }


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            text = message.get("text") or ""
            if text.startswith("flood:"):
                # Write far more than the socket can hold; each send waits while the buffer is full.
                count, size = (int(n) for n in text[6:].split(","))
                for n in range(count):
                    await send({"type": "websocket.send", "text": f"{n}:" + "x" * size})
                    FLOOD["sent"] = n + 1
                await send({"type": "websocket.send", "text": "flood done"})
            else:
                await send({"type": "websocket.send", "text": text})
    elif scope["type"] == "http":
        await receive()
        body = json.dumps(live_objects()).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
