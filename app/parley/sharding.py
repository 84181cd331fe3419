"""Rendezvous (highest-random-weight) hashing over the Redis shards.

Every key is owned by the shard whose hash of (shard URL, key) is highest. Adding a shard moves
only the keys the new shard wins (about 1/n of them); removing one moves only its own keys.
Shards are identified by URL, not by position, so reordering `REDIS_URLS` moves nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _weight(shard: str, key: str) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_index(shards: Sequence[str], key: str) -> int:
    """Index in `shards` of the shard that owns `key`."""
    if len(shards) == 1:
        return 0
    return max(range(len(shards)), key=lambda i: _weight(shards[i], key))


def inbox_key(channel: str) -> str:
    """The part of a channel name that decides its shard.

    A process-specific channel `specific.<process>!<consumer>` lives in its process inbox
    `specific.<process>!`; sending must hash what receiving hashes (channels-redis 4.3.0 hashes
    the full name on send and the inbox on receive, so half the sends land on the wrong shard).
    """
    bang = channel.find("!")
    return channel if bang < 0 else channel[: bang + 1]
