"""Tell every protocol process to close sockets whose credentials are gone.

Published on `<prefix>:control` on shard 0, which every protocol process subscribes to
(`chat.control_receiver` does the closing, 4001):

- `{"kick_user": <user id>}`: all of the user's sockets (logout everywhere, deactivation).
- `{"kick_token": "<sha256 hex>"}`: the sockets authenticated with that token (logout).
- `{"leave_room": <room>, "user": <user id>}`: the user's sockets stop receiving the room (left
  over HTTP, removed by the room's creator).

The change itself is already in the database when this is sent, so a Redis outage costs only
the immediacy: it is logged, and the sockets lose their rights at their next handshake.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from redis import asyncio as aioredis

from chat.contract import control_topic
from parley.config import CONFIG

log = logging.getLogger(__name__)

# Seconds to wait for Redis: a logout or an admin's save must not hang on an unreachable Redis.
TIMEOUT = 2.0


def _payload(command: dict[str, Any]) -> str:
    return json.dumps(command)


def publish_sync(command: dict[str, Any]) -> None:
    client = redis.Redis.from_url(CONFIG.redis_urls[0], socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    try:
        client.publish(control_topic(), _payload(command))
    except redis.RedisError as exc:
        log.warning("control command %s not published: %s", sorted(command), type(exc).__name__)
    finally:
        client.close()


async def publish(command: dict[str, Any]) -> None:
    client = aioredis.Redis.from_url(CONFIG.redis_urls[0], socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    try:
        await client.publish(control_topic(), _payload(command))
    except redis.RedisError as exc:
        log.warning("control command %s not published: %s", sorted(command), type(exc).__name__)
    finally:
        await client.aclose()


def kick_user_sync(user_id: int) -> None:
    publish_sync({"kick_user": user_id})


async def kick_user(user_id: int) -> None:
    await publish({"kick_user": user_id})


def kick_token_sync(key_hash: str) -> None:
    publish_sync({"kick_token": key_hash})


async def kick_token(key_hash: str) -> None:
    await publish({"kick_token": key_hash})
