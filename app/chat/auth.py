"""WebSocket authentication: bearer token for programs, session cookie (and Origin check) for browsers.

A token can come as `?token=` or an `Authorization: Bearer` header. A socket that sends an
Origin header (every browser does) must come from an allowed origin, else it is refused at the
handshake (HTTP 403): that stops cross-site WebSocket hijacking with the user's cookie. Token
clients and non-browser clients need no Origin. An unauthenticated socket is accepted and closed with 4001 by the
consumer, so clients can tell "log in again" from a network failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator, WebsocketDenier
from django.contrib.auth.models import AnonymousUser

from chat.models import ApiToken
from parley.config import CONFIG


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
    is_authenticated: bool = True

    def get_username(self) -> str:
        return self.username


def socket_user_for_token(key: str) -> SocketUser | AnonymousUser:
    row = (
        ApiToken.objects.filter(key=key, user__is_active=True)
        .values_list("user_id", "user__username")
        .first()
    )
    return SocketUser(*row) if row else AnonymousUser()


def user_for_token(key: str) -> Any:
    token = ApiToken.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


# What a connected socket's consumer needs of its handshake scope.
CONNECTION_SCOPE_KEYS = ("type", "asgi", "path", "root_path", "client", "server", "subprotocols")


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
        key = token_from_scope(scope)
        if key is not None:
            user = await database_sync_to_async(socket_user_for_token)(key)
            # Rebinding drops this frame's hold on the handshake scope: the socket keeps only
            # what the consumer reads, not the request headers (cookies, user agent, ...).
            scope = connection_scope(scope, user)
            return await self.token_app(scope, receive, send)
        if any(name == b"origin" for name, _ in scope.get("headers", [])):
            # Browsers always send Origin: check it, or any site could ride the user's cookie.
            return await self.browser_app(scope, receive, send)
        # No Origin means no browser, so no cross-site risk; the cookie (if any) decides.
        return await self.session_app(scope, receive, send)
