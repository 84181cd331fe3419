"""`parley manage smoketest`: the chart's `helm test`, runnable against any running platform.

Two users (created if missing, with unusable passwords) share a private room; each opens a
WebSocket through the protocol Service, both join, the first sends one message, and the test
passes only when the sender gets its `ack` and the second socket receives that very message
(same `seq` and `client_msg_id`). The tokens it made are deleted afterwards.

    parley manage smoketest --url ws://chat-protocol.chat.svc/ws/ --host chat.example.com

`--host` is the Host header (one of ALLOWED_HOSTS); the TCP connection goes to `--url`'s address.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

ROOM_NAME = "helm-smoketest"


class Command(BaseCommand):
    help = "Send a message over one WebSocket and check its ack and its delivery to a second one."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--url", default=os.environ.get("PARLEY_SMOKETEST_URL", "ws://127.0.0.1:8000/ws/"))
        parser.add_argument("--host", default=os.environ.get("PARLEY_SMOKETEST_HOST", ""),
                            help="Host header (default: the URL's host)")
        parser.add_argument("--timeout", type=float, default=float(os.environ.get("PARLEY_SMOKETEST_TIMEOUT", "60")),
                            help="seconds to wait for the platform to answer")

    def handle(self, *args: Any, **options: Any) -> None:
        from chat.models import ApiToken, Membership, Room
        from chat.tokens import create_token

        User = get_user_model()
        users = []
        for name in ("smoketest-sender", "smoketest-receiver"):
            user, created = User.objects.get_or_create(username=name)
            if created:
                user.set_unusable_password()
                user.save()
            users.append(user)
        room = Room.objects.filter(name=ROOM_NAME, kind=Room.Kind.GROUP, created_by=users[0]).first()
        if room is None:
            room = Room.objects.create(name=ROOM_NAME, kind=Room.Kind.GROUP, private=True, created_by=users[0])
        for user in users:
            Membership.objects.get_or_create(room=room, user=user)
        tokens = [create_token(user, "smoketest") for user in users]
        try:
            result = asyncio.run(self._exchange(options["url"], options["host"], [key for _, key in tokens],
                                                room.pk, options["timeout"]))
        finally:
            ApiToken.objects.filter(pk__in=[t.pk for t, _ in tokens]).delete()
        self.stdout.write(json.dumps({"ok": True, **result}))

    async def _exchange(self, url: str, host: str, tokens: list[str], room: int, timeout: float) -> dict[str, Any]:
        from websockets.asyncio.client import connect

        parts = urlsplit(url)
        address = {"host": parts.hostname, "port": parts.port or (443 if parts.scheme == "wss" else 80)}
        target = url if not host else parts._replace(netloc=host).geturl()
        deadline = time.monotonic() + timeout

        async def open_socket(token: str) -> Any:
            sep = "&" if "?" in target else "?"
            last: BaseException | None = None
            while time.monotonic() < deadline:
                try:
                    ws = await connect(f"{target}{sep}token={token}", open_timeout=10, **address)
                    hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if hello.get("type") != "hello":
                        raise CommandError(f"expected hello, got {hello}")
                    return ws
                except (TimeoutError, OSError) as exc:
                    last = exc
                    await asyncio.sleep(2)
                except Exception as exc:  # handshake refused (e.g. 400/403: Host not allowed)
                    raise CommandError(f"WebSocket to {url} (Host {host or parts.netloc}) failed: {exc}") from exc
            raise CommandError(f"no WebSocket to {url} within {timeout}s: {last}")

        async def until(ws: Any, want: Any) -> dict[str, Any]:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandError("timed out waiting for a frame")
                frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
                if frame.get("type") == "error":
                    raise CommandError(f"server error: {frame}")
                if want(frame):
                    return frame

        sender, receiver = [await open_socket(t) for t in tokens]
        try:
            for ws in (sender, receiver):
                await ws.send(json.dumps({"type": "join", "room": room, "ref": "j"}))
                await until(ws, lambda f: f.get("type") == "joined" and f.get("room") == room)
            msg_id = f"smoke-{uuid.uuid4().hex[:16]}"
            started = time.monotonic()
            await sender.send(json.dumps({"type": "send", "room": room, "body": "helm test", "client_msg_id": msg_id}))
            ack = await until(sender, lambda f: f.get("type") == "ack" and f.get("client_msg_id") == msg_id)
            acked = time.monotonic() - started
            got = await until(receiver, lambda f: f.get("type") == "message" and f.get("client_msg_id") == msg_id)
            if got["seq"] != ack["seq"]:
                raise CommandError(f"delivered seq {got['seq']} is not the acked seq {ack['seq']}")
            return {"room": room, "seq": ack["seq"], "ack_seconds": round(acked, 3),
                    "delivered_seconds": round(time.monotonic() - started, 3)}
        finally:
            await sender.close()
            await receiver.close()
