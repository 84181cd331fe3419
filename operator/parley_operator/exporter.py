"""The operator's own Prometheus metrics: what it sees and decides, per ChatPlatform.

`parley_operator_metrics_available` is the one signal the platform's pods cannot give: whether
the operator can read Redis and fresh heartbeats (when it cannot, it holds replicas). Served in
the Prometheus text format on PARLEY_OPERATOR_METRICS_PORT (`--metrics-port`; 0: off) by a small
aiohttp server, aiohttp being a dependency already.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)
PORT_ENV = "PARLEY_OPERATOR_METRICS_PORT"


@dataclass
class PlatformGauges:
    metrics_available: int = 0
    desired: dict[str, int] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    queue_depth: int = 0
    rejected_heartbeats: int = 0
    partial: int = 0  # 1 while some Redis shards cannot be read (sums are lower bounds)
    failed_readings: int = 0  # failed readings in a row (the fallback's count)


PLATFORMS: dict[tuple[str, str], PlatformGauges] = {}

HELP = {
    "parley_operator_metrics_available": "1 if the last poll read every Redis shard and fresh protocol heartbeats",
    "parley_operator_desired_replicas": "Replicas the operator wants per role",
    "parley_operator_ready_replicas": "Ready replicas per role, as the Deployment reports them",
    "parley_operator_connections": "Open WebSockets reported by fresh protocol heartbeats",
    "parley_operator_queue_depth": "Messages waiting in the worker channels, all shards",
    "parley_operator_rejected_heartbeats": "Malformed heartbeat hashes ignored at the last poll",
    "parley_operator_partial_metrics": "1 while some Redis shards cannot be read: replicas may go up, not down",
    "parley_operator_failed_readings": "Failed readings of Redis in a row (spec.scaling.fallback counts these)",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render() -> str:
    lines: list[str] = []
    samples: dict[str, list[str]] = {name: [] for name in HELP}
    for (ns, name), g in sorted(PLATFORMS.items()):
        labels = f'platform_namespace="{_escape(ns)}",platform="{_escape(name)}"'
        samples["parley_operator_metrics_available"].append(f"{{{labels}}} {g.metrics_available}")
        for role, n in sorted(g.desired.items()):
            samples["parley_operator_desired_replicas"].append(f'{{{labels},role="{role}"}} {n}')
        for role, n in sorted(g.ready.items()):
            samples["parley_operator_ready_replicas"].append(f'{{{labels},role="{role}"}} {n}')
        samples["parley_operator_connections"].append(f"{{{labels}}} {g.connections}")
        samples["parley_operator_queue_depth"].append(f"{{{labels}}} {g.queue_depth}")
        samples["parley_operator_rejected_heartbeats"].append(f"{{{labels}}} {g.rejected_heartbeats}")
        samples["parley_operator_partial_metrics"].append(f"{{{labels}}} {g.partial}")
        samples["parley_operator_failed_readings"].append(f"{{{labels}}} {g.failed_readings}")
    for metric, help_text in HELP.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        lines += [metric + s for s in samples[metric]]
    return "\n".join(lines) + "\n"


def forget(namespace: str, name: str) -> None:
    PLATFORMS.pop((namespace, name), None)


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(text=render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def start(port: int | None = None) -> web.AppRunner | None:
    port = int(os.environ.get(PORT_ENV, "0") or 0) if port is None else port
    if not port:
        return None
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # every interface of the pod
    log.info("operator metrics on :%d/metrics", port)
    return runner
