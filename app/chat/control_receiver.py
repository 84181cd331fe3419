"""What a protocol process does with the platform's control commands (`<prefix>:control`).

Published by `chat.control` (revocations, deactivations, membership changes), received by every
protocol process through the room bus. A command names users or tokens, never sockets, so the
sender needs to know nothing of where they are connected.

| command                                  | effect on this process's sockets                      |
|------------------------------------------|-------------------------------------------------------|
| `{"kick_user": <user id>}`               | every socket of the user: `error forbidden`, close 4001 |
| `{"kick_token": "<token sha256 hex>"}`   | sockets authenticated with that token: likewise         |
| `{"leave_room": <room>, "user": <id>}`   | the user's sockets stop receiving the room: `left`      |
"""

from __future__ import annotations

import logging
from typing import Any

from chat import tokens
from chat.process import STATE
from chat.protocol import CloseCode

log = logging.getLogger(__name__)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def handle_control(command: dict[str, Any]) -> None:
    if (user := _int(command.get("kick_user"))) is not None:
        tokens.forget_user(user)  # this process's lookup cache must not admit the user again
        sockets = STATE.of_user(user)
        for conn in sockets:
            conn.close_for(CloseCode.UNAUTHENTICATED, "your credentials were revoked; log in again")
        if sockets:
            log.info("closed %d sockets of user %d (revoked or deactivated)", len(sockets), user)
    elif isinstance(token := command.get("kick_token"), str):
        tokens.forget_token(token)
        for conn in list(STATE.connections):
            if getattr(conn, "token_hash", None) == token:
                conn.close_for(CloseCode.UNAUTHENTICATED, "this token was revoked; log in again")
    elif (room := _int(command.get("leave_room"))) is not None and (user := _int(command.get("user"))):
        for conn in STATE.of_user(user):
            remove = getattr(conn, "remove_from_room", None)
            if remove is not None:
                remove(room, "membership ended")
    else:
        raise ValueError(f"unknown control command {sorted(command)[:5]}")
