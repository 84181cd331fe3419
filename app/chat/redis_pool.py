"""Redis clients, one per shard and per event loop, with a deliberately sized blocking pool."""

from __future__ import annotations

import asyncio
import weakref
from urllib.parse import urlsplit, urlunsplit

from redis import asyncio as aioredis

from parley.config import CONFIG
from parley.sharding import shard_index

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def redact(url: str) -> str:
    """A Redis URL fit for logs and errors: the password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def shard_urls() -> list[str]:
    return CONFIG.redis_urls


def make_client(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=CONFIG.redis_pool_size,
        timeout=CONFIG.redis_pool_timeout,
        socket_keepalive=True,
        socket_connect_timeout=5,
        socket_timeout=CONFIG.redis_timeout,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


def clients() -> list[aioredis.Redis]:
    """This loop's client for every shard (tests run one loop per test; servers one per process)."""
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None:
        found = _clients[loop] = [make_client(url) for url in shard_urls()]
    return found


def client_for(key: str) -> aioredis.Redis:
    return clients()[shard_index(shard_urls(), key)]


async def drop_idle_connections(client: aioredis.Redis) -> None:
    """After a connection error or timeout: close the pool's idle connections too. A path that
    went half-open took every connection opened before it, and each would otherwise cost its own
    timeout when next used; new ones are opened on demand."""
    await client.connection_pool.disconnect(inuse_connections=False)
