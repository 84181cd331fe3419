"""Prometheus metrics of a protocol or worker process (served at /metrics or on a worker port)."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

__all__ = ["REGISTRY"]

CONNECTIONS = Gauge("parley_connections", "Open WebSocket connections in this process")
FRAMES_IN = Counter("parley_frames_in_total", "Frames received from clients", ["type"])
MESSAGES_IN = Counter("parley_messages_in_total", "send frames accepted and handed to chat.persist")
DELIVERIES = Counter("parley_deliveries_total", "Frames queued for delivery to a client")
FANOUT_IN = Counter("parley_fanout_in_total", "Frames received from room subscriptions")
ERRORS_OUT = Counter("parley_errors_total", "error frames sent to clients", ["code"])
SLOW_CLOSES = Counter("parley_slow_client_closes_total", "Connections closed because they fell behind")
SUBSCRIBED_ROOMS = Gauge("parley_subscribed_rooms", "Rooms this process is subscribed to")
BUS_RECONNECTS = Counter("parley_bus_reconnects_total", "Room-bus shard reconnects (followed by catch-up)")
CATCHUPS = Counter("parley_catchups_total", "Gap or reconnect catch-ups served from the database")
DELIVERY_LATENCY = Histogram(
    "parley_delivery_latency_seconds",
    "From a send reaching the worker channel to the stored message being published",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STORED = Counter("parley_messages_stored_total", "Messages stored by persistence workers")
DUPLICATES = Counter("parley_duplicate_sends_total", "Retried sends answered with the stored seq")
BATCH_SIZE = Histogram(
    "parley_persist_batch_size", "Messages stored per batch", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
)
QUEUE_DEPTH = Gauge("parley_channel_queue_depth", "Messages waiting in a worker channel", ["channel"])
BAD_PAYLOADS = Counter("parley_bad_payloads_total", "Pub/sub payloads dropped as malformed (not written by Parley)")
SEND_FAILURES = Counter(
    "parley_send_failures_total", "Frames the server failed to write to an open socket (closed 4011)"
)
DROPPED_FRAMES = Counter("parley_dropped_frames_total", "Client frames dropped unread beyond the rate limit")
ACKS_WITHHELD = Counter(
    "parley_acks_withheld_total", "Acks not sent because the room's shard refused the message's frame (sender retries)"
)
LOST_REPLIES = Counter("parley_lost_replies_total", "Replies (acks, errors) no Redis shard accepted (sender retries)")
