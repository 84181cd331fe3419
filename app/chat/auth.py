"""WebSocket authentication: bearer token for programs, session cookie (and Origin check) for browsers.

A token can come as `?token=` or an `Authorization: Bearer` header. A socket that sends an
Origin header (every browser does) must come from an allowed origin, else it is refused at the
handshake (HTTP 403): that stops cross-site WebSocket hijacking with the user's cookie. Token
clients and non-browser clients need no Origin. An unauthenticated socket is accepted and closed with 4001 by the
consumer, so clients can tell "log in again" from a network failure.

Before any of that, every handshake takes a token from its client address's bucket
(`chat.throttle.HANDSHAKES`): over `PARLEY_HANDSHAKES_PER_SECOND` the socket is accepted, told
`rate_limited` and closed with 4029, without a query; further handshakes from that address in
the same second are refused before the upgrade (HTTP 403), the cheapest answer a storm can get.
Token lookups are cached briefly (`chat.tokens`), found or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import OriginValidator, WebsocketDenier
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser

from chat import reads, throttle, tokens
from chat.protocol import CloseCode, ErrorCode, dumps, error_frame
from parley.config import CONFIG

log = logging.getLogger(__name__)


def token_from_scope(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    tokens = query.get("token")
    return tokens[0] if tokens else None


@dataclass(frozen=True, slots=True)
class SocketUser:
    """Who a token-authenticated socket belongs to: ids only, not a model instance (memory)."""

    pk: int
    username: str
    # The SHA-256 of the token the socket was opened with: revoking that token closes it.
    token_hash: str | None = None
    is_authenticated: bool = True

    def get_username(self) -> str:
        return self.username


def socket_user(info: tokens.TokenInfo | None) -> SocketUser | AnonymousUser:
    if info is None:
        return AnonymousUser()
    return SocketUser(info.user_id, info.username, info.key_hash)


def user_for_token(key: str) -> Any:
    """The active user of a live token (a model instance: views need one), else anonymous."""
    info = tokens.find_token(key)
    if info is None:
        return AnonymousUser()
    # By primary key, checked again: a cached answer may predate a deactivation elsewhere.
    user = get_user_model().objects.filter(pk=info.user_id, is_active=True).first()
    return user if user is not None else AnonymousUser()


async def refuse_handshake(receive: Any, send: Any) -> None:
    """Accept, say `rate_limited`, close 4029: the client learns to wait instead of retrying
    at once, as it would after a bare refusal (which looks like a network failure)."""
    await _refuse(receive, send, ErrorCode.RATE_LIMITED,
                  "too many handshakes from your address; retry in a few seconds", CloseCode.TOO_MANY_HANDSHAKES)


async def _refuse(receive: Any, send: Any, error: ErrorCode, message: str, code: int) -> None:
    """Accept, send one error frame, close with `code`: before any consumer exists."""
    event = await receive()
    if event.get("type") != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": dumps(error_frame(error, message))})
    await send({"type": "websocket.close", "code": code})


async def refuse_unavailable(receive: Any, send: Any) -> None:
    """The token could not be checked (database unreachable): say so, close 4013, so the client
    reconnects after a delay instead of logging its user out."""
    await _refuse(receive, send, ErrorCode.UNAVAILABLE, "cannot check your credentials right now; reconnect shortly",
                  CloseCode.UNAVAILABLE)


# What a connected socket's consumer needs of its handshake scope.
CONNECTION_SCOPE_KEYS = ("type", "asgi", "path", "root_path", "client", "server", "subprotocols", "extensions")


def connection_scope(scope: dict[str, Any], user: Any) -> dict[str, Any]:
    slim = {key: scope[key] for key in CONNECTION_SCOPE_KEYS if key in scope}
    slim["user"] = user
    return slim


class TokenOrSessionAuth:
    """Authenticates the socket, and serves only `/ws/` (a URLRouter would cost every idle
    socket another coroutine frame for one string comparison)."""

    path = "/ws/"

    def __init__(self, inner: Any) -> None:
        self.token_app = inner
        self.session_app = AuthMiddlewareStack(inner)
        self.browser_app = OriginValidator(self.session_app, CONFIG.origins)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope.get("path") != self.path:
            # Same answer as an unknown HTTP path would get: refuse the handshake.
            return await WebsocketDenier()(scope, receive, send)
        client = scope.get("client")
        verdict = throttle.HANDSHAKES.check(client[0] if client else None)
        if verdict is throttle.Verdict.EXPLAIN:
            return await refuse_handshake(receive, send)
        if verdict is throttle.Verdict.REJECT:
            return await WebsocketDenier()(scope, receive, send)
        key = token_from_scope(scope)
        if key is not None:
            try:
                info = await reads.find_token(key)
            except reads.DatabaseUnavailable as exc:
                log.warning("token check failed: %s", exc)
                return await refuse_unavailable(receive, send)
            user = socket_user(info)
            # Rebinding drops this frame's hold on the handshake scope: the socket keeps only
            # what the consumer reads, not the request headers (cookies, user agent, ...).
            scope = connection_scope(scope, user)
            return await self.token_app(scope, receive, send)
        if any(name == b"origin" for name, _ in scope.get("headers", [])):
            # Browsers always send Origin: check it, or any site could ride the user's cookie.
            return await self.browser_app(scope, receive, send)
        # No Origin means no browser, so no cross-site risk; the cookie (if any) decides.
        return await self.session_app(scope, receive, send)
