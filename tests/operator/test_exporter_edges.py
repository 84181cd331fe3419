"""The operator's gauges for the edges: a partial reading and failed readings in a row."""

from __future__ import annotations

from parley_operator import exporter


def test_partial_metrics_and_failed_readings_are_exported() -> None:
    exporter.PLATFORMS.clear()
    exporter.PLATFORMS["ns", "chat"] = exporter.PlatformGauges(metrics_available=0, partial=1, failed_readings=0)
    exporter.PLATFORMS["ns", "blind"] = exporter.PlatformGauges(failed_readings=4)
    try:
        text = exporter.render()
    finally:
        exporter.PLATFORMS.clear()
    assert 'parley_operator_partial_metrics{platform_namespace="ns",platform="chat"} 1' in text
    assert 'parley_operator_failed_readings{platform_namespace="ns",platform="blind"} 4' in text
    assert "# TYPE parley_operator_failed_readings gauge" in text
