"""The worker process: Channels' Worker plus metrics, heartbeat and pull-side backpressure."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from typing import Any

from asgiref.compatibility import guarantee_single_callable
from channels.worker import Worker
from prometheus_client import start_http_server

from chat import metrics
from chat.contract import PERSIST_CHANNEL
from chat.process import ensure_heartbeat, retire_heartbeat
from chat.workers import batcher, held_by_batcher
from parley.config import CONFIG

log = logging.getLogger(__name__)

# Messages handed to the application but not yet taken: beyond this the worker stops pulling,
# leaving work in Redis where the operator can see it (and another worker can take it).
MAX_LOCAL_BACKLOG = 200
# A crashed listener is restarted after a pause: short, so a passing fault costs little work
# time; growing to a few seconds, so a fault that repeats does not spin a core or flood the log.
# A listener that ran this long before failing starts again from the short pause.
LISTENER_RESTART_MIN_SECONDS = 0.05
LISTENER_RESTART_MAX_SECONDS = 5.0
LISTENER_HEALTHY_SECONDS = 30.0
# A blocking receive returns empty-handed after this long, so that a listener sees the stop
# flag; so a stopping worker takes at most this long (plus its batches in hand) to stop.
RECEIVE_POLL_SECONDS = 1.0


class QueueDepthProbe:
    """Refreshes the queue-depth gauges of the channels this worker consumes."""

    def __init__(self, layer: object, channels: list[str]) -> None:
        self.layer = layer
        self.channels = channels

    async def beat(self) -> None:
        for channel in self.channels:
            depth = await self.layer.queue_depth(channel)  # type: ignore[attr-defined]
            metrics.QUEUE_DEPTH.labels(channel=channel).set(depth)


class ParleyWorker(Worker):
    # Cleared when the worker is told to stop: listeners finish their receive and take no more.
    taking = True

    async def handle(self) -> None:
        self.taking = True
        if CONFIG.metrics_port:
            start_http_server(CONFIG.metrics_port)
        ensure_heartbeat("worker", QueueDepthProbe(self.channel_layer, self.channels), self.held)
        log.info("worker consuming %s", ", ".join(self.channels))
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def stop_on(sig: signal.Signals) -> None:
            log.info("worker got %s: stopping", sig.name)
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_on, sig)
        listeners = [
            loop.create_task(self.supervised(channel), name=f"parley-listener-{channel}") for channel in self.channels
        ]
        stop = loop.create_task(stopping.wait())
        try:
            await asyncio.wait([*listeners, stop], return_when=asyncio.FIRST_COMPLETED)
            # Stop taking work first, then finish what was taken: on a scale-down or rollout
            # the messages in hand are stored and acked instead of left for the client's retry.
            # Listeners see the flag between receives (a receive is not cancelled: a message
            # it has popped would be lost with it); one stuck past that is cancelled.
            self.taking = False
            _, stuck = await asyncio.wait(listeners, timeout=RECEIVE_POLL_SECONDS + 1)
            for listener in stuck:
                listener.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
            await self.finish_in_hand(CONFIG.drain_seconds)
        finally:
            stop.cancel()
            for listener in listeners:
                listener.cancel()
            await batcher().close()
            # Gone: no heartbeat left behind to be counted for its TTL.
            await retire_heartbeat()

    def held(self) -> int:
        """Messages taken from Redis and not stored yet: in the instances' queues (up to
        MAX_LOCAL_BACKLOG each) and waiting in the batcher. Invisible in Redis, so published in
        the heartbeat for the operator to add to the queue depth."""
        queued = sum(details["input_queue"].qsize() for details in self.application_instances.values())
        return queued + held_by_batcher()

    async def supervised(self, channel: str) -> None:
        """Run the listener of `channel`, restarting it after anything but our own cancellation.

        A listener that ended quietly used to end the whole worker: redis-py can surface a
        CancelledError that nobody asked for (a connection torn down under a blocking read),
        and the worker then stopped consuming while its process stayed up and looked healthy.
        Redis outages are already waited out inside `receive`; what reaches here is logged with
        its cause and retried after a pause that grows while the failures repeat.
        """
        task = asyncio.current_task()
        delay = LISTENER_RESTART_MIN_SECONDS
        while self.taking:
            started = time.monotonic()
            try:
                await self.listener(channel)
                if not self.taking:
                    return
                log.error("listener of %s returned; restarting it", channel)
            except asyncio.CancelledError:
                if task is not None and task.cancelling():
                    raise  # the worker is stopping
                log.error("listener of %s was cancelled by something other than a stop; restarting it", channel)
            except Exception:
                log.exception("listener of %s crashed; restarting it in %.1fs", channel, delay)
            if time.monotonic() - started > LISTENER_HEALTHY_SECONDS:
                delay = LISTENER_RESTART_MIN_SECONDS
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTENER_RESTART_MAX_SECONDS)

    async def finish_in_hand(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # asyncio.Queue has no "became empty" event to wait for: poll briefly.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            details["input_queue"].qsize() for details in self.application_instances.values()
        ):
            await asyncio.sleep(0.01)
        await batcher().flush()
        log.info("worker stopped; messages in hand were stored")

    async def receive(self, channel: str, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` messages of `channel`; [] now and then, so the stop flag is seen."""
        receive_batch = getattr(self.channel_layer, "receive_batch", None)
        if receive_batch is None:  # another channel layer: one message per receive
            return [await self.channel_layer.receive(channel)]
        return await receive_batch(channel, limit, RECEIVE_POLL_SECONDS)

    async def listener(self, channel: str) -> None:
        if channel == PERSIST_CHANNEL:
            await self.persist_listener(channel)
            return
        scope = {"type": "channel", "channel": channel}
        while self.taking:
            queue = self.get_or_create_application_instance(channel, scope)
            # Whatever is waiting, in one round trip, bounded by the queue's room.
            for message in await self.receive(channel, max(1, queue.maxsize - queue.qsize())):
                if not message.get("type"):
                    log.error("dropping a message without type on %s", channel)
                    continue
                await queue.put(message)

    async def persist_listener(self, channel: str) -> None:
        """chat.persist straight into the batcher, a batch per round trip.

        Going through an ASGI instance costs a dispatch (and a task) per message: batches
        stayed at 3-4 messages and one worker topped out near 300/s. `add_many` waits while a
        batch's worth is waiting for a store, which is the backpressure.
        """
        interval = CONFIG.batch_wait_ms / 1000
        taken_at, full = -math.inf, False
        while self.taking:
            # Pacing: a batch costs the same few statements and round trips whatever its size,
            # so a worker busy enough to receive again at once waits out the interval since its
            # last receive, and takes what gathered meanwhile in one batch. A message after a
            # quiet spell is taken at once; a full batch waiting is taken without a pause.
            pause = taken_at + interval - time.monotonic()
            if pause > 0 and not full:
                await asyncio.sleep(pause)
            taken_at = time.monotonic()
            messages = await self.receive(channel, CONFIG.batch_max)
            full = len(messages) >= CONFIG.batch_max
            if messages:
                await batcher().add_many([m for m in messages if m.get("type") == "persist.message"])

    def get_or_create_application_instance(self, scope_id: str, scope: dict) -> asyncio.Queue:
        """Like StatelessServer's, but the instance's queue is bounded.

        A full queue makes the listener's `put` wait, so the worker stops pulling from Redis and
        the backlog stays in the channel, where the operator measures it and another worker can
        take it (asgiref's unbounded queue would drain Redis into this process's memory).
        """
        if scope_id in self.application_instances:
            self.application_instances[scope_id]["last_used"] = time.time()
            return self.application_instances[scope_id]["input_queue"]
        input_queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_LOCAL_BACKLOG)
        instance = guarantee_single_callable(self.application)
        future = asyncio.ensure_future(
            instance(scope=scope, receive=input_queue.get, send=lambda m: self.application_send(scope, m))
        )
        self.application_instances[scope_id] = {
            "input_queue": input_queue, "future": future, "scope": scope, "last_used": time.time(),
        }
        return input_queue
