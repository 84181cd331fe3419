"""ASGI entry point for protocol processes (Daphne or uvicorn) and workers (runworker)."""

import gc
import os
from collections.abc import Awaitable
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.settings")

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

# Django must be set up before the consumers (and their models) are imported.
# The page's JS and CSS are served by the protocol process itself, so one image and one Service
# are the whole deployment; put a CDN or the ingress cache in front for heavy traffic.
django_asgi_app = ASGIStaticFilesHandler(get_asgi_application())

from asgiref.sync import markcoroutinefunction  # noqa: E402
from channels.routing import ChannelNameRouter  # noqa: E402

from chat import admin, health  # noqa: E402
from chat.auth import TokenOrSessionAuth  # noqa: E402
from chat.consumers import ChatConsumer  # noqa: E402
from chat.contract import BOT_CHANNEL, PERSIST_CHANNEL  # noqa: E402
from chat.workers import BotConsumer, PersistConsumer  # noqa: E402
from parley import proxies  # noqa: E402

APPLICATIONS = {
    "http": django_asgi_app,
    "websocket": TokenOrSessionAuth(ChatConsumer.as_asgi()),
    "channel": ChannelNameRouter({PERSIST_CHANNEL: PersistConsumer.as_asgi(), BOT_CHANNEL: BotConsumer.as_asgi()}),
}


@markcoroutinefunction
def application(scope: dict, receive: Any, send: Any) -> Awaitable[None]:
    """Channels' ProtocolTypeRouter without a coroutine frame of its own.

    The router's frame would live as long as each WebSocket and keep the handshake scope, headers
    and all, reachable; returning the chosen application's coroutine leaves nothing behind.
    """
    kind = scope["type"]
    if kind == "http" or kind == "websocket":
        # A server process: its admin listener and metrics port start with the first request
        # (Daphne has no lifespan events; the kubelet's first probe comes within seconds).
        admin.ensure_started()
        proxies.apply(scope)
        if kind == "http" and scope["path"] in health.PATHS:
            return health.serve(scope, receive, send)
    try:
        app = APPLICATIONS[kind]
    except KeyError:
        raise ValueError(f"no application for scope type {kind!r}") from None
    return app(scope, receive, send)


# Everything loaded so far lives as long as the process. Frozen, it is left out of the
# collector's full passes, which otherwise rescan Django's import graph (~50k objects, 40-100 ms
# of a stopped event loop per pass on this 2-core machine) along with the sockets' objects.
gc.collect()
gc.freeze()
