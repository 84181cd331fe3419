"""The channel layer: channels-redis with sharding that routes correctly and a bounded pool.

What changes against `channels_redis.core.RedisChannelLayer`:
- Shard choice is rendezvous hashing on shard URLs (`parley.sharding`), for process inboxes on the
  inbox name (so a send reaches the shard its receiver reads) and for named worker channels on
  the channel name (a named channel lives on one shard: a worker blocking on one shard never
  waits out a 5 s BZPOPMIN while its work sits on another).
- Each shard gets a `BlockingConnectionPool` sized by `PARLEY_REDIS_POOL_SIZE`: a burst waits for
  a connection instead of failing with MaxConnectionsError; and a socket timeout longer than the
  5 s blocking receive (redis-py 8's default of 5 s breaks idle receives).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat.process import raise_if_cancelling
from parley.sharding import inbox_key, shard_index

log = logging.getLogger(__name__)

# KEYS[1] channel key; ARGV: payload, score, expired-before, capacity, expiry seconds.
_SEND_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class ParleyChannelLayer(RedisChannelLayer):
    def __init__(
        self, hosts: list[Any] | None = None, pool_size: int = 100, pool_timeout: float = 5.0, **kwargs: Any
    ) -> None:
        """`pool_size` connections per shard and event loop; a burst beyond it waits up to
        `pool_timeout` s for one. Both come from CHANNEL_LAYERS' CONFIG, like every other option."""
        super().__init__(hosts=hosts, **kwargs)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.shard_ids = [str(h.get("address", h)) for h in self.hosts]
        # Named channels have a fixed home shard (see receive_single); no round robin.
        self._receive_index_generator = None

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        address = host.pop("address", None)
        options = {
            "max_connections": self.pool_size,
            "timeout": self.pool_timeout,
            "health_check_interval": 30,
            "socket_keepalive": True,
            # redis-py 8 defaults socket_timeout to 5 s: exactly channels-redis' BZPOPMIN timeout,
            # so an idle receive would die with TimeoutError. Give blocking reads headroom.
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            **host,
        }
        if address is None:
            return aioredis.BlockingConnectionPool(**options)
        return aioredis.BlockingConnectionPool.from_url(address, **options)

    def consistent_hash(self, value: str | bytes) -> int:
        if isinstance(value, bytes):
            value = value.decode()
        return shard_index(self.shard_ids, inbox_key(value))

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """channels-redis' send in one round trip (it makes four: trim, count, add, expire).

        Same key layout, same capacity and expiry rules; the protocol process pays it per `send`.
        """
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        assert "__asgi_channel__" not in message
        key_name = channel
        if "!" in channel:
            message = {**message, "__asgi_channel__": channel}
            key_name = self.non_local_name(channel)
        now = time.time()
        added = await self.connection(self.consistent_hash(channel)).eval(
            _SEND_SCRIPT, 1, self.prefix + key_name,
            self.serialize(message), now, int(now) - int(self.expiry), self.get_capacity(channel), int(self.expiry),
        )
        if not added:
            raise ChannelFull()

    async def receive_batch(self, channel: str, limit: int, timeout: float) -> list[dict[str, Any]]:
        """Up to `limit` messages of a named channel in order; [] after `timeout` s with none.

        A worker's receive, in one round trip when messages are waiting (ZPOPMIN) and two when
        none were (then BZPOPMIN for the first to arrive), however many it takes. The generic
        `receive` makes four per message: a clean-up script, BZPOPMIN, and a backup queue
        written and cleared. A Redis outage is waited out, as in `receive`.

        The backup queue is left out on purpose: it protects a message popped by a receive that
        is then cancelled. A worker stops taking by a flag between receives, not by cancelling
        one (`chat.worker_server`); if a process is killed after a pop, that message was never
        acked, and its sender retries it with the same client_msg_id.
        """
        key = self.prefix + channel
        delay = 0.1
        while True:
            try:
                connection = self.connection(self.consistent_hash(channel))
                taken = await connection.zpopmin(key, limit)
                if taken:
                    return [self.deserialize(member) for member, _score in taken]
                popped = await connection.bzpopmin(key, timeout=timeout)
                return [] if popped is None else [self.deserialize(popped[1])]
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                delay = await _wait_out_outage(channel, exc, delay)

    async def queue_depth(self, channel: str, now: float | None = None) -> int:
        """Messages waiting on a named channel, as the operator counts them
        (`parley_operator.metrics`): live entries only (a score newer than the expiry cut-off
        channels-redis applies at the next send), plus any left in its backup queue by a
        receive that was killed (the next generic receive puts them back)."""
        key = self.prefix + channel
        cutoff = f"({int(now if now is not None else time.time()) - int(self.expiry)}"
        pipe = self.connection(self.consistent_hash(channel)).pipeline(transaction=False)
        pipe.zcount(key, cutoff, "+inf")
        pipe.zcount(key + "$inflight", cutoff, "+inf")
        waiting, in_backup = await pipe.execute()
        return int(waiting) + int(in_backup)

    async def receive(self, channel: str) -> dict[str, Any]:
        """Wait out Redis outages instead of raising.

        Channels lets a receive error kill the consumer (a 1011 close for every socket of the
        process) and a worker's listener; during a Redis restart both should simply wait.
        """
        delay = 0.1
        while True:
            try:
                return await super().receive(channel)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                delay = await _wait_out_outage(channel, exc, delay)

    async def receive_single(self, channel: str) -> tuple[str, dict[str, Any]]:
        if "!" not in channel:
            self._receive_index_generator = _Repeat(self.consistent_hash(channel))
        return await super().receive_single(channel)


async def _wait_out_outage(channel: str, exc: BaseException, delay: float) -> float:
    """One step of a receive's retry loop during a Redis outage: the next delay (doubling to 5 s).

    redis-py turns a cancellation that lands in a blocking read into a ConnectionError: a loop
    that waits out Redis outages must not wait out its own cancellation (the task would never
    end, and event-loop shutdown would wait for it forever)."""
    raise_if_cancelling()
    log.warning("channel layer receive on %s failed (%s); retrying in %.1fs", channel, exc, delay)
    await asyncio.sleep(delay)
    return min(delay * 2, 5.0)


class _Repeat:
    """An endless iterator of one value (what `next()` on the index generator must return)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __iter__(self) -> _Repeat:
        return self

    def __next__(self) -> int:
        return self.value
