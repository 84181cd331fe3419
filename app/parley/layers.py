"""The channel layer: channels-redis with sharding that routes correctly and a bounded pool.

What changes against `channels_redis.core.RedisChannelLayer`:
- Shard choice is rendezvous hashing on shard URLs (`parley.sharding`), for process inboxes on the
  inbox name (so a send reaches the shard its receiver reads) and for named worker channels on
  the channel name (a named channel lives on one shard: a worker blocking on one shard never
  waits out a 5 s BZPOPMIN while its work sits on another).
- Each shard gets a `BlockingConnectionPool` sized by `PARLEY_REDIS_POOL_SIZE`: a burst waits for
  a connection instead of failing with MaxConnectionsError; and a socket timeout longer than the
  5 s blocking receive (redis-py 8's default of 5 s breaks idle receives).
- Sends made in one turn of the event loop go out together, one pipeline per shard
  (`SendPipeline`). Sent one by one, every send waiting at once held a connection of its own: a
  protocol process whose loop fell behind for a moment (a collection, a burst of deliveries)
  found dozens of its sockets' `send` frames ready together, and the pool opened a new Redis
  connection for each, ~1 ms of the event loop apiece (redis-py builds each one's client info
  through `importlib.metadata`, then connects and handshakes). That stalled the loop further, so
  more sends piled up behind it: 40-100 new connections within 0.3 s, loop stalls of 100-200 ms,
  deliveries up to 0.5 s late, and `make bench` failing Parley on Daphne at 10,000-16,000
  deliveries/s with the process at 55-60 % of a core (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple

from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat.process import raise_if_cancelling
from chat.redis_pool import drop_idle_connections
from parley.sharding import inbox_key, shard_index

log = logging.getLogger(__name__)

# KEYS[1] channel key; ARGV: payload, capacity, expiry seconds.
# The score is Redis's own clock (TIME), never the sender's: channels-redis scores a message with
# the sending process's time.time() and drops entries older than that process's now - expiry, so
# a process whose clock ran 90 s ahead deleted every other process's queued messages, and one 90 s
# behind had its own deleted by the others' sends (tests/test_layer_sends.py, the clock_skew fault
# case). With one clock, scores follow the order Redis ran the sends in; a send in the same
# microsecond as the newest entry goes one microsecond after it, so ties never reorder.
_SEND_SCRIPT = """
local now = redis.call('TIME')
local seconds = tonumber(now[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, seconds - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
local score = seconds + tonumber(now[2]) / 1000000
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= score then
    score = tonumber(newest[2]) + 0.000001
end
redis.call('ZADD', KEYS[1], string.format('%.6f', score), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# A named channel's live depth by Redis's clock (the same cut-off the send script applies).
_DEPTH_SCRIPT = """
local cutoff = '(' .. (tonumber(redis.call('TIME')[1]) - tonumber(ARGV[1]))
return redis.call('ZCOUNT', KEYS[1], cutoff, '+inf') + redis.call('ZCOUNT', KEYS[2], cutoff, '+inf')
"""
# Sends per pipeline: a protocol process's burst (a `send` frame from each of its sending sockets)
# fits in one; at ~300 bytes a message, a pipeline stays near 150 KB.
SEND_BATCH_MAX = 500


class PendingSend(NamedTuple):
    """One `send`, as the send script takes it."""

    key: str
    payload: bytes
    capacity: int


class SendPipeline:
    """The sends made to one shard in one turn of the event loop, written together at the start
    of the next turn on one connection, each answered with its own result.

    Not `chat.coalesce` (one batch out at a time, the rest wait for its reply): a send never
    waits for an earlier pipeline, so it is written one turn after it is made, as before, and a
    turn that a stall filled with sends costs one connection and one round trip, not one each.
    """

    def __init__(self, run: Callable[[list[PendingSend]], Awaitable[list[Any]]]) -> None:
        self.run = run
        self.waiting: list[tuple[PendingSend, asyncio.Future[Any]]] = []
        # Pipelines being written or waiting for their reply (the loop keeps only weak references).
        self.writing: set[asyncio.Task[None]] = set()

    async def send(self, pending: PendingSend) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.waiting:
            self._start()
        self.waiting.append((pending, future))
        # A sender cancelled meanwhile cancels only its own future: the pipeline still goes out
        # for the others (and may carry its message, as a command already written always could).
        return await future

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._write())
        self.writing.add(task)
        task.add_done_callback(self.writing.discard)

    async def _write(self) -> None:
        batch, self.waiting = self.waiting[:SEND_BATCH_MAX], self.waiting[SEND_BATCH_MAX:]
        if self.waiting:
            self._start()
        try:
            results = await self.run([pending for pending, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # a sender that went away need not have read it: no log
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class ParleyChannelLayer(RedisChannelLayer):
    def __init__(
        self, hosts: list[Any] | None = None, pool_size: int = 100, pool_timeout: float = 5.0,
        socket_timeout: float = 6.0, **kwargs: Any
    ) -> None:
        """`pool_size` connections per shard and event loop; a burst beyond it waits up to
        `pool_timeout` s for one; a command unanswered for `socket_timeout` s fails and its
        connection is dropped (`PARLEY_REDIS_TIMEOUT`). All come from CHANNEL_LAYERS' CONFIG."""
        super().__init__(hosts=hosts, **kwargs)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.socket_timeout = socket_timeout
        # channels-redis' generic receive blocks 5 s in BZPOPMIN; 2 s leaves a socket timeout of a
        # few seconds room above it, so a half-open connection is noticed within that timeout.
        self.brpop_timeout = min(self.brpop_timeout, max(1, int(socket_timeout / 3)))
        self.shard_ids = [str(h.get("address", h)) for h in self.hosts]
        # Named channels have a fixed home shard (see receive_single); no round robin.
        self._receive_index_generator = None
        # Per event loop (as channels-redis' pools), per shard index.
        self._pipelines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, SendPipeline]] = (
            weakref.WeakKeyDictionary()
        )

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        address = host.pop("address", None)
        options = {
            "max_connections": self.pool_size,
            "timeout": self.pool_timeout,
            "health_check_interval": 30,
            "socket_keepalive": True,
            # Above the longest blocking receive (brpop_timeout, a worker's 1 s receive_batch), so
            # only a hung or half-open connection times out.
            "socket_timeout": self.socket_timeout,
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
        """channels-redis' send as one script (it makes four round trips: trim, count, add,
        expire), pipelined with the other sends waiting at the same time (module docstring).

        Same key layout, same capacity and expiry rules, each send answered on its own (a full
        channel refuses only the sends beyond its capacity); a Redis error reaches every send of
        its pipeline. A sender cancelled while waiting may still have its message sent, as one
        cancelled after writing its command always could.
        """
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        assert "__asgi_channel__" not in message
        key_name = channel
        if "!" in channel:
            message = {**message, "__asgi_channel__": channel}
            key_name = self.non_local_name(channel)
        pending = PendingSend(self.prefix + key_name, self.serialize(message), self.get_capacity(channel))
        if not await self._pipeline(self.consistent_hash(channel)).send(pending):
            raise ChannelFull()

    def _pipeline(self, index: int) -> SendPipeline:
        pipelines = self._pipelines.setdefault(asyncio.get_running_loop(), {})
        pipeline = pipelines.get(index)
        if pipeline is None:
            pipeline = pipelines[index] = SendPipeline(partial(self._run_sends, index))
        return pipeline

    async def _run_sends(self, index: int, sends: list[PendingSend]) -> list[Any]:
        """The send script for each of `sends`, in order, in one round trip to shard `index`."""
        connection = self.connection(index)
        expiry = int(self.expiry)
        try:
            if len(sends) == 1:  # a quiet moment: a pipeline of one costs ~30 us more than the call
                send = sends[0]
                return [await connection.eval(_SEND_SCRIPT, 1, *send, expiry)]
            pipe = connection.pipeline(transaction=False)
            for send in sends:
                pipe.eval(_SEND_SCRIPT, 1, *send, expiry)
            return await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await drop_idle_connections(connection)
            raise

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
                await drop_idle_connections(connection)
                delay = await _wait_out_outage(channel, exc, delay)

    async def queue_depth(self, channel: str) -> int:
        """Messages waiting on a named channel, as the operator counts them
        (`parley_operator.metrics`): live entries only (a score newer than the expiry cut-off the
        next send applies, by Redis's clock), plus any left in its backup queue by a receive that
        was killed (the next generic receive puts them back)."""
        key = self.prefix + channel
        connection = self.connection(self.consistent_hash(channel))
        return int(await connection.eval(_DEPTH_SCRIPT, 2, key, key + "$inflight", int(self.expiry)))

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
