"""The operator's own metrics endpoint (the PrometheusRule's ParleyOperatorMetricsUnavailable)."""

from __future__ import annotations

import aiohttp

from embedded_redis import free_port
from parley_operator import exporter


async def test_gauges_per_platform_in_prometheus_text_format() -> None:
    exporter.PLATFORMS.clear()
    exporter.PLATFORMS["ns", "chat"] = exporter.PlatformGauges(
        metrics_available=1, desired={"protocol": 3, "worker": 2}, ready={"protocol": 2, "worker": 2},
        connections=11840, queue_depth=212, rejected_heartbeats=1)
    exporter.PLATFORMS["other", 'we"ird'] = exporter.PlatformGauges()
    port = free_port()
    runner = await exporter.start(port)
    assert runner is not None
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as rsp:
            assert rsp.status == 200
            text = await rsp.text()
    finally:
        await runner.cleanup()
        exporter.PLATFORMS.clear()
    assert 'parley_operator_metrics_available{platform_namespace="ns",platform="chat"} 1' in text
    assert 'parley_operator_metrics_available{platform_namespace="other",platform="we\\"ird"} 0' in text
    assert 'parley_operator_desired_replicas{platform_namespace="ns",platform="chat",role="protocol"} 3' in text
    assert 'parley_operator_ready_replicas{platform_namespace="ns",platform="chat",role="protocol"} 2' in text
    assert "# TYPE parley_operator_connections gauge" in text


async def test_off_without_a_port() -> None:
    assert await exporter.start(0) is None


def test_forget() -> None:
    exporter.PLATFORMS["ns", "gone"] = exporter.PlatformGauges()
    exporter.forget("ns", "gone")
    assert ("ns", "gone") not in exporter.PLATFORMS
