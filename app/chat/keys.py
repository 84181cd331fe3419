"""Every Redis key and pub/sub topic Parley's processes share, defined once.

All are namespaced by the platform's channel prefix (`PARLEY_CHANNEL_PREFIX`, the same prefix
channels-redis puts on the worker channels), so two platforms on one Redis never deliver each
other's messages or count each other's pods. The operator reads heartbeats with the same
layout (`parley_operator.metrics`, tested against `heartbeat_key`).

| key or topic                  | type        | written by            | read by                    |
|-------------------------------|-------------|-----------------------|----------------------------|
| `<prefix>:room:<room id>`     | topic       | workers, protocol     | protocol (room bus)        |
| `<prefix>:process:<pid>`      | topic       | workers (acks/errors) | that protocol process      |
| `<prefix>:control`            | topic       | HTTP views, admin     | every protocol process     |
| `<prefix>:presence:<room id>` | sorted set  | protocol              | protocol                   |
| `<prefix>:proc:<pid>`         | hash + TTL  | every process         | the operator               |
"""

from __future__ import annotations

from parley.config import CONFIG


def room_topic(room: int) -> str:
    return CONFIG.key(f"room:{room}")


def room_topic_prefix() -> str:
    return CONFIG.key("room:")


def room_of_topic(name: str | bytes) -> int | None:
    """The room id of a room topic, or None for any other (or malformed) topic name."""
    if isinstance(name, bytes):
        try:
            name = name.decode()
        except UnicodeDecodeError:
            return None
    prefix = room_topic_prefix()
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix):]
    return int(digits) if digits.isdigit() and len(digits) <= 19 else None


def process_topic(pid: str) -> str:
    return CONFIG.key(f"process:{pid}")


def control_topic() -> str:
    return CONFIG.key("control")


def presence_key(room: int) -> str:
    return CONFIG.key(f"presence:{room}")


def heartbeat_key(pid: str) -> str:
    return CONFIG.key(f"proc:{pid}")


def heartbeat_pattern() -> str:
    return CONFIG.key("proc:*")
