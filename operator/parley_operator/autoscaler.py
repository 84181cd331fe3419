"""One poll of one ChatPlatform: converge children, read Redis, decide, scale, report.

The per-object state (recommendation history, Redis clients) lives in kopf's per-object memo,
so it is lost on an operator restart. That costs at most one stabilization window of caution
(the first decisions after a restart see a short history), never a wrong scale-down: with an
empty history the scale-down window only holds *more* conservatively what the samples say.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from parley_operator import children, exporter, resources, scaling
from parley_operator import status as st
from parley_operator.kube import Kube, KubeError, path
from parley_operator.metrics import MetricsUnavailable, RedisMetrics, Snapshot
from parley_operator.spec import PlatformSpec

log = logging.getLogger(__name__)


@dataclass
class PlatformState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    history: dict[str, tuple[scaling.Recommendation, ...]] = field(
        default_factory=lambda: {role: () for role in resources.ROLES})
    metrics: RedisMetrics | None = None
    metrics_key: tuple[Any, ...] = ()
    metrics_ok: bool | None = None  # last known, to post an Event only on transitions
    last_poll: float = 0.0

    async def close(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None


async def redis_urls(kube: Kube, namespace: str, spec: PlatformSpec) -> tuple[str, ...]:
    if spec.redis.urls:
        return spec.redis.urls
    ref = spec.redis.secret_ref
    assert ref is not None  # spec.parse guarantees one of the two
    secret = await kube.get(path("v1", "secrets", namespace, ref.name))
    raw = (secret.get("data") or {}).get(ref.key)
    if raw is None:
        raise MetricsUnavailable(f"Secret {ref.name} has no key {ref.key!r}")
    return tuple(u.strip() for u in base64.b64decode(raw).decode().split(",") if u.strip())


async def read_metrics(
    kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, state: PlatformState, now: float,
) -> tuple[Snapshot | None, str]:
    """A Snapshot, or None and the reason it could not be read."""
    try:
        urls = await redis_urls(kube, owner["metadata"]["namespace"], spec)
        key = (urls, spec.redis.channel_prefix, spec.redis.expiry_seconds)
        if state.metrics is None or state.metrics_key != key:
            await state.close()
            state.metrics = RedisMetrics(urls, prefix=spec.redis.channel_prefix,
                                         expiry_seconds=spec.redis.expiry_seconds)
            state.metrics_key = key
        return await state.metrics.read(spec.worker.channels, now=now), ""
    except MetricsUnavailable as exc:
        return None, str(exc)


async def set_deletion_costs(
    kube: Kube, owner: Mapping[str, Any], snapshot: Snapshot | None,
) -> None:
    """Mark each protocol pod with its connection count so the ReplicaSet removes the idlest.

    The ReplicaSet controller deletes pods with the lowest pod-deletion-cost first. A pod with
    no fresh heartbeat gets -1: it serves nothing we know of, so it is the cheapest to lose.
    """
    if snapshot is None:
        return
    ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    wanted = resources.selector(name, "protocol")
    pods = await kube.list(path("v1", "pods", ns), resources.selector_string(name, "protocol"))
    per_pod = snapshot.pod_connections
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            continue  # never annotate pods that are not ours, whatever the server returned
        pod_name = pod["metadata"]["name"]
        cost = str(per_pod.get(pod_name, -1))
        if (pod["metadata"].get("annotations") or {}).get(resources.DELETION_COST) != cost:
            await kube.merge_patch(path("v1", "pods", ns, pod_name),
                                   {"metadata": {"annotations": {resources.DELETION_COST: cost}}})


def _loads(snapshot: Snapshot | None) -> dict[str, float | None]:
    if snapshot is None:
        return dict.fromkeys(resources.ROLES)
    return {
        "worker": float(snapshot.worker_load),
        # No protocol heartbeat at all means the protocol pods are not reporting (starting up,
        # or an app without heartbeats), not that nobody is connected: hold.
        "protocol": float(snapshot.connections) if snapshot.protocol_reporting else None,
    }


def _metrics_condition(snapshot: Snapshot | None, error: str) -> st.Condition:
    if snapshot is None:
        return st.Condition("MetricsAvailable", False, "RedisUnavailable",
                            f"{error}; replicas held until Redis answers again")
    if not snapshot.protocol_reporting:
        return st.Condition("MetricsAvailable", False, "NoProtocolHeartbeats",
                            "Redis is readable but no protocol process published a fresh heartbeat; "
                            "protocol replicas held, workers still scale on queue depth")
    return st.Condition(
        "MetricsAvailable", True, "HeartbeatsFresh",
        f"{snapshot.shards} Redis shard(s) read; {len(snapshot.heartbeats)} fresh heartbeat(s), "
        f"{snapshot.stale_heartbeats} stale ignored"
        + (f", {snapshot.rejected_heartbeats} malformed rejected" if snapshot.rejected_heartbeats else ""),
    )



def _scaling_condition(decisions: Mapping[str, scaling.Decision]) -> st.Condition:
    active = (scaling.Reason.SCALE_UP, scaling.Reason.SCALE_DOWN,
              scaling.Reason.UP_STABILIZING, scaling.Reason.DOWN_STABILIZING)
    moving = {role: d for role, d in decisions.items() if d.reason in active}
    message = "; ".join(f"{role}: {d.message}" for role, d in decisions.items())
    if moving:
        first = next(iter(moving.values()))
        return st.Condition("Scaling", True, first.reason.value, message)
    held = [d for d in decisions.values() if d.reason == scaling.Reason.NO_METRICS]
    reason = held[0].reason.value if held else next(iter(decisions.values())).reason.value
    return st.Condition("Scaling", False, reason, message)


async def poll(
    kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, state: PlatformState,
    now: float | None = None,
) -> dict[str, Any]:
    """Run one autoscaling pass and write the status; returns the status written."""
    now = time.time() if now is None else now
    meta = owner["metadata"]
    ns, name = meta["namespace"], meta["name"]
    previous = await current_status(kube, owner)
    # A template that differs from the spec is a rollout if the spec moved since we last
    # converged, and a hand edit being reverted otherwise.
    spec_changed = meta.get("generation") != previous.get("observedGeneration")
    deployments = await children.ensure_children(kube, owner, spec, spec_changed)

    snapshot, error = await read_metrics(kube, owner, spec, state, now)
    if (snapshot is not None) != state.metrics_ok:
        if snapshot is None:
            kopf.event(owner, type="Warning", reason="MetricsUnavailable", message=f"{error}; holding replicas")
            log.warning("metrics unavailable for %s/%s: %s", ns, name, error)
        elif state.metrics_ok is False:
            kopf.event(owner, type="Normal", reason="MetricsRecovered", message="Redis readable again")
            log.info("metrics recovered for %s/%s", ns, name)
        state.metrics_ok = snapshot is not None

    loads = _loads(snapshot)
    decisions: dict[str, scaling.Decision] = {}
    for role in resources.ROLES:
        current = int((deployments[role].get("spec") or {}).get("replicas", 1))
        decision = scaling.decide(spec.policy(role), current, loads[role], now, state.history[role])
        state.history[role] = decision.history
        decisions[role] = decision

    protocol = decisions["protocol"]
    if protocol.recommended < protocol.current or protocol.replicas < protocol.current:
        # Set costs while a scale-down is pending, not only at the instant of it, so the
        # ReplicaSet controller's cache has them when replicas drop.
        try:
            await set_deletion_costs(kube, owner, snapshot)
        except KubeError as exc:
            # Removing protocol pods blindly would cut the busiest ones as readily as idle ones:
            # better to keep them until the annotations can be written (workers still scale).
            log.warning("cannot set pod-deletion-cost on %s/%s: %s", ns, name, exc)
            if protocol.changed and protocol.replicas < protocol.current:
                decisions["protocol"] = dataclasses.replace(
                    protocol, replicas=protocol.current, reason=scaling.Reason.DELETION_COST_UNAVAILABLE,
                    message=f"cannot set pod-deletion-cost ({exc.status}): holding {protocol.current}")

    last_scale_time = previous.get("lastScaleTime")
    last_scale_reason = previous.get("lastScaleReason")
    for role, decision in decisions.items():
        if not decision.changed:
            continue
        url = path("apps/v1", "deployments", ns, resources.child_name(name, role))
        deployments[role] = await kube.merge_patch(url, {"spec": {"replicas": decision.replicas}})
        last_scale_time = st.now_iso(now)
        last_scale_reason = f"{role}: {decision.message}"
        kopf.event(owner, type="Normal", reason=decision.reason.value, message=last_scale_reason)
        log.info("%s/%s scaled %s", ns, name, last_scale_reason)

    body_status: dict[str, Any] = {
        "observedGeneration": meta.get("generation"),
        "summary": st.summary(deployments),
        **{role: {
            "replicas": int((deployments[role].get("spec") or {}).get("replicas", 1)),
            "readyReplicas": int((deployments[role].get("status") or {}).get("readyReplicas", 0) or 0),
            "desiredReplicas": d.replicas,
            "recommendedReplicas": d.recommended,
            "reason": d.reason.value,
        } for role, d in decisions.items()},
        "lastScaleTime": last_scale_time,
        "lastScaleReason": last_scale_reason,
        "conditions": st.merge_conditions(
            previous.get("conditions"),
            [st.readiness(deployments), _metrics_condition(snapshot, error), _scaling_condition(decisions)],
            meta.get("generation"), now,
        ),
    }
    if snapshot is not None:
        # Only overwrite the observations when we have new ones: stale numbers stay visible,
        # next to MetricsAvailable=False, rather than turning into misleading zeros.
        body_status.update({
            "queueDepth": _replace_map(previous.get("queueDepth"), snapshot.queue_depth),
            "inFlight": _replace_map(previous.get("inFlight"), snapshot.in_flight),
            "totalQueueDepth": snapshot.total_queue_depth,
            "connections": snapshot.connections,
            "podConnections": _replace_map(previous.get("podConnections"), snapshot.pod_connections),
            "inboxBacklog": _replace_map(previous.get("inboxBacklog"), snapshot.inbox_backlog),
        })
    await write_status(kube, owner, body_status)
    gauges = exporter.PLATFORMS.setdefault((ns, name), exporter.PlatformGauges())
    gauges.metrics_available = int(snapshot is not None and snapshot.protocol_reporting)
    gauges.desired = {role: d.replicas for role, d in decisions.items()}
    gauges.ready = {role: body_status[role]["readyReplicas"] for role in decisions}
    if snapshot is not None:
        gauges.connections = snapshot.connections
        gauges.queue_depth = snapshot.total_queue_depth
        gauges.rejected_heartbeats = snapshot.rejected_heartbeats
    return body_status


def _replace_map(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that replaces a map: keys that disappeared (gone pods) are nulled."""
    return {**dict.fromkeys(old or {}), **new}


def _platform_url(owner: Mapping[str, Any], subresource: str | None = None) -> str:
    meta = owner["metadata"]
    return path(f"{resources.GROUP}/{resources.VERSION}", resources.PLURAL, meta["namespace"], meta["name"],
                subresource)


async def current_status(kube: Kube, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The status as stored now. A merge patch replaces lists (conditions) whole, so merging
    into kopf's possibly older copy of the body could drop a condition another writer just set."""
    return dict((await kube.get(_platform_url(owner))).get("status") or {})


async def write_status(kube: Kube, owner: Mapping[str, Any], status: Mapping[str, Any]) -> None:
    await kube.merge_patch(_platform_url(owner, "status"), {"status": dict(status)})
