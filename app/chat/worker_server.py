"""The worker process: Channels' Worker plus metrics, heartbeat and pull-side backpressure."""

from __future__ import annotations

import asyncio
import logging
import time

from asgiref.compatibility import guarantee_single_callable
from channels.worker import Worker
from prometheus_client import start_http_server

from chat import metrics
from chat.process import ensure_heartbeat
from parley.config import CONFIG

log = logging.getLogger(__name__)

# Messages handed to the application but not yet taken: beyond this the worker stops pulling,
# leaving work in Redis where the operator can see it (and another worker can take it).
MAX_LOCAL_BACKLOG = 50


class QueueDepthProbe:
    """Refreshes the queue-depth gauges of the channels this worker consumes."""

    def __init__(self, layer: object, channels: list[str]) -> None:
        self.layer = layer
        self.channels = channels

    async def beat(self) -> None:
        layer = self.layer
        for channel in self.channels:
            index = layer.consistent_hash(channel)  # type: ignore[attr-defined]
            connection = layer.connection(index)  # type: ignore[attr-defined]
            since = time.time() - layer.expiry  # type: ignore[attr-defined]
            depth = await connection.zcount(layer.prefix + channel, since, "+inf")  # type: ignore[attr-defined]
            metrics.QUEUE_DEPTH.labels(channel=channel).set(depth)


class ParleyWorker(Worker):
    async def handle(self) -> None:
        if CONFIG.metrics_port:
            start_http_server(CONFIG.metrics_port)
        ensure_heartbeat("worker", QueueDepthProbe(self.channel_layer, self.channels))
        log.info("worker consuming %s", ", ".join(self.channels))
        await super().handle()

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
