"""One poll of one ChatPlatform: converge children, read Redis, decide, scale, report.

The per-object state (Redis clients, the last known metrics state) lives in kopf's per-object
memo. What the decisions depend on across polls does not: the recommendation history and the
count of failed readings are written to the status every poll (`status.recommendations`,
`status.failedReadings`), so a restarted operator or a new leader resumes the scale-down window
and the fallback count where the last one left them (`history.py`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from parley_operator import children, events, exporter, history, resources, scaling
from parley_operator import status as st
from parley_operator.kube import Kube, KubeError, path
from parley_operator.metrics import MetricsUnavailable, RedisMetrics, Snapshot
from parley_operator.spec import PlatformSpec

log = logging.getLogger(__name__)

_UNSET: Any = object()


@dataclass
class PlatformState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    history: dict[str, tuple[scaling.Recommendation, ...]] = field(
        default_factory=lambda: {role: () for role in resources.ROLES})
    metrics: RedisMetrics | None = None
    metrics_key: tuple[Any, ...] = ()
    metrics_ok: bool | None = None  # last known, to post an Event only on transitions
    failed_shards: tuple[str, ...] = ()  # of the last reading, likewise
    last_poll: float = 0.0

    async def close(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None


class SecretUnavailable(MetricsUnavailable):
    """The Secret with the Redis URLs cannot be read (missing, forbidden, no such key)."""


@dataclass(frozen=True)
class Reading:
    snapshot: Snapshot | None
    error: str = ""  # why there is no snapshot
    reason: str = ""  # RedisUnavailable or RedisSecretUnavailable when there is none


async def redis_urls(kube: Kube, namespace: str, spec: PlatformSpec) -> tuple[str, ...]:
    if spec.redis.urls:
        return spec.redis.urls
    ref = spec.redis.secret_ref
    assert ref is not None  # spec.parse guarantees one of the two
    try:
        secret = await kube.get(path("v1", "secrets", namespace, ref.name))
    except KubeError as exc:
        # Missing or forbidden: a failed reading like a down Redis, not an aborted poll.
        raise SecretUnavailable(f"Secret {ref.name}: {exc}") from exc
    raw = (secret.get("data") or {}).get(ref.key)
    if raw is None:
        raise SecretUnavailable(f"Secret {ref.name} has no key {ref.key!r}")
    try:
        urls = tuple(u.strip() for u in base64.b64decode(raw).decode().split(",") if u.strip())
    except (binascii.Error, UnicodeDecodeError):
        raise SecretUnavailable(f"Secret {ref.name} key {ref.key!r} is not base64 UTF-8 text") from None
    if not urls:
        raise SecretUnavailable(f"Secret {ref.name} key {ref.key!r} holds no URL")
    return urls


async def read_metrics(
    kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, state: PlatformState, now: float | None = None,
) -> Reading:
    """A Snapshot, or none and the reason it could not be read."""
    try:
        urls = await redis_urls(kube, owner["metadata"]["namespace"], spec)
        key = (urls, spec.redis.channel_prefix, spec.redis.expiry_seconds)
        if state.metrics is None or state.metrics_key != key:
            await state.close()
            state.metrics = RedisMetrics(urls, prefix=spec.redis.channel_prefix,
                                         expiry_seconds=spec.redis.expiry_seconds)
            state.metrics_key = key
        return Reading(await state.metrics.read(spec.worker.channels, now=now))
    except SecretUnavailable as exc:
        return Reading(None, str(exc), "RedisSecretUnavailable")
    except MetricsUnavailable as exc:
        return Reading(None, str(exc), "RedisUnavailable")


async def list_pods(kube: Kube, owner: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    """The platform's pods that exist and are not terminating, by role; None if they cannot be
    listed. A terminating pod (deleted, evicted by a node drain) is draining: its clients
    reconnect to the others, so its heartbeat must not count them a second time."""
    ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    try:
        items = await kube.list(path("v1", "pods", ns), f"app.kubernetes.io/instance={name}")
    except KubeError as exc:
        log.warning("cannot list the pods of %s/%s: %s", ns, name, exc)
        return None
    pods: dict[str, list[dict[str, Any]]] = {role: [] for role in resources.ROLES}
    for pod in items:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        for role in resources.ROLES:
            # Never count (or annotate) pods that are not ours, whatever the server returned.
            if all(labels.get(k) == v for k, v in resources.selector(name, role).items()) \
                    and not meta.get("deletionTimestamp"):
                pods[role].append(pod)
    return pods


def deletion_costs(pod_names: list[str], snapshot: Snapshot, target: int) -> dict[str, int]:
    """pod-deletion-cost per protocol pod: its connections, so the ReplicaSet removes the idlest.

    A pod with no fresh heartbeat is not known to be idle (a busy pod's heartbeat can be late):
    it ranks above every pod we know and at least at the target, never as the cheapest. A pod
    whose processes all drain serves nobody any more: -1, the first to go.
    """
    per_pod = snapshot.pod_connections
    busiest = max(per_pod.values(), default=-1)
    unknown = max(target, busiest + 1)
    draining = {hb.pod for hb in snapshot.heartbeats if hb.draining} - set(per_pod)
    return {pod: per_pod[pod] if pod in per_pod else -1 if pod in draining else unknown for pod in pod_names}


async def set_deletion_costs(
    kube: Kube, owner: Mapping[str, Any], snapshot: Snapshot | None,
    pods: Mapping[str, list[dict[str, Any]]] | None, target: int,
) -> None:
    """Mark each protocol pod with its pod-deletion-cost (the lowest is deleted first)."""
    if snapshot is None:
        return
    if pods is None:
        raise KubeError(403, "the protocol pods cannot be listed")
    ns = owner["metadata"]["namespace"]
    protocol = pods["protocol"]
    costs = deletion_costs([p["metadata"]["name"] for p in protocol], snapshot, target)
    for pod in protocol:
        pod_name = pod["metadata"]["name"]
        cost = str(costs[pod_name])
        if (pod["metadata"].get("annotations") or {}).get(resources.DELETION_COST) != cost:
            await kube.merge_patch(path("v1", "pods", ns, pod_name),
                                   {"metadata": {"annotations": {resources.DELETION_COST: cost}}})


@dataclass(frozen=True)
class RoleInput:
    """What `scaling.decide` is told about one role at one poll."""

    load: float | None
    unmeasured: int = 0
    lower_bound: bool = False
    waited: float = 0.0  # seconds the oldest queued message has waited


def _inputs(snapshot: Snapshot | None, deployments: Mapping[str, Mapping[str, Any]]) -> dict[str, RoleInput]:
    if snapshot is None:
        return {role: RoleInput(None) for role in resources.ROLES}
    current = int(((deployments.get("protocol") or {}).get("spec") or {}).get("replicas", 1))
    reporting = len(snapshot.pod_connections)
    return {
        "worker": RoleInput(float(snapshot.worker_load), lower_bound=snapshot.partial,
                            waited=snapshot.oldest_wait),
        # No protocol heartbeat at all means the protocol pods are not reporting (starting up,
        # or an app without heartbeats), not that nobody is connected: hold. Some replicas
        # without one are assumed at target on a scale-down (scaling.estimate).
        "protocol": RoleInput(
            float(snapshot.connections) if snapshot.protocol_reporting else None,
            unmeasured=max(0, current - reporting), lower_bound=snapshot.partial),
    }


def _metrics_condition(reading: Reading, failures: int, spec: PlatformSpec) -> st.Condition:
    snapshot = reading.snapshot
    if snapshot is None:
        fallback = spec.fallback
        then = (f"; fallback to protocol {fallback.protocol_replicas} / worker {fallback.worker_replicas} "
                f"replicas after {fallback.failure_threshold} in a row"
                if fallback.enabled else "")
        return st.Condition("MetricsAvailable", False, reading.reason,
                            f"{reading.error}; replicas held until Redis answers again "
                            f"({failures} failed reading(s) in a row{then})")
    counts = (f"{snapshot.shards - len(snapshot.failed_shards)}/{snapshot.shards} Redis shard(s) read; "
              f"{len(snapshot.heartbeats)} fresh heartbeat(s), {snapshot.stale_heartbeats} stale ignored")
    if snapshot.unlisted_heartbeats:
        counts += f", {snapshot.unlisted_heartbeats} of gone or terminating pods ignored"
    if snapshot.rejected_heartbeats:
        counts += f", {snapshot.rejected_heartbeats} malformed rejected"
    if snapshot.partial:
        return st.Condition("MetricsAvailable", False, "PartialMetrics",
                            f"{'; '.join(snapshot.failed_shards)}; {counts}; the sums are lower "
                            "bounds: replicas may go up, not down")
    if not snapshot.protocol_reporting:
        return st.Condition("MetricsAvailable", False, "NoProtocolHeartbeats",
                            f"{counts}; no protocol process published a fresh heartbeat; "
                            "protocol replicas held, workers still scale on queue depth")
    return st.Condition("MetricsAvailable", True, "HeartbeatsFresh", counts)


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
    now: float | None = None, generation: Any = _UNSET,
) -> dict[str, Any]:
    """Run one autoscaling pass and write the status; returns the status written.

    `generation` is the metadata.generation `spec` was parsed from (kopf's body is live and may
    have moved on since): the status claims only a spec that this pass applied.
    """
    meta = owner["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if generation is _UNSET:
        generation = meta.get("generation")
    previous = await current_status(kube, owner)
    # A template that differs from the spec is a rollout if the spec moved since we last
    # converged, and a hand edit being reverted otherwise.
    spec_changed = generation != previous.get("observedGeneration")
    converged = await children.ensure_children(kube, owner, spec, spec_changed)
    # A role whose Deployment cannot be read or created is not scaled; the other one still is.
    deployments = converged.deployments

    reading = await read_metrics(kube, owner, spec, state, now)
    pods = await list_pods(kube, owner)
    # The clock after the reads: heartbeats written while the API server answered are not
    # "from the future", and the decision's time is the time of what it decided on.
    now = time.time() if now is None else now
    snapshot = reading.snapshot
    if snapshot is not None and pods is not None:
        snapshot = snapshot.only_pods({role: [p["metadata"]["name"] for p in pods[role]] for role in pods})
    reading = dataclasses.replace(reading, snapshot=snapshot)

    failures = 0 if snapshot is not None else _stored_failures(previous) + 1
    if (snapshot is not None) != state.metrics_ok:
        if snapshot is None:
            events.post(owner, type="Warning", reason="MetricsUnavailable",
                        message=f"{reading.error}; holding replicas")
            log.warning("metrics unavailable for %s/%s: %s", ns, name, reading.error)
        elif state.metrics_ok is False:
            events.post(owner, type="Normal", reason="MetricsRecovered", message="Redis readable again")
            log.info("metrics recovered for %s/%s", ns, name)
        state.metrics_ok = snapshot is not None
    partial = snapshot.failed_shards if snapshot is not None else ()
    if partial and partial != state.failed_shards:
        events.post(owner, type="Warning", reason="PartialMetrics",
                    message=f"{'; '.join(partial)}; scaling up only until every shard answers")
        log.warning("partial metrics for %s/%s: %s", ns, name, "; ".join(partial))
    state.failed_shards = partial

    inputs = _inputs(snapshot, deployments)
    stored = previous.get("recommendations") if isinstance(previous.get("recommendations"), Mapping) else {}
    decisions: dict[str, scaling.Decision] = {}
    for role in resources.ROLES:
        if role not in deployments:
            continue
        policy = spec.policy(role)
        current = int((deployments[role].get("spec") or {}).get("replicas", 1))
        past = history.merge(state.history[role], history.from_status(stored.get(role), now), policy, now)
        given = inputs[role]
        decision = scaling.decide(policy, current, given.load, now, past, unmeasured=given.unmeasured,
                                  lower_bound=given.lower_bound, failures=failures, waited=given.waited)
        state.history[role] = decision.history
        decisions[role] = decision

    protocol = decisions.get("protocol")
    if protocol is not None and (protocol.recommended < protocol.current or protocol.replicas < protocol.current):
        # Set costs while a scale-down is pending, not only at the instant of it, so the
        # ReplicaSet controller's cache has them when replicas drop.
        try:
            await set_deletion_costs(kube, owner, snapshot, pods, spec.protocol.target)
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
        events.post(owner, type="Normal", reason=decision.reason.value, message=last_scale_reason)
        log.info("%s/%s scaled %s", ns, name, last_scale_reason)

    body_status: dict[str, Any] = {
        # A generation is observed once its spec is applied: not while a child is rejected.
        **({} if converged.errors else {"observedGeneration": generation}),
        "summary": st.summary(deployments),
        **{role: {
            "replicas": int((deployments[role].get("spec") or {}).get("replicas", 1)),
            "readyReplicas": int((deployments[role].get("status") or {}).get("readyReplicas", 0) or 0),
            "desiredReplicas": d.replicas,
            "recommendedReplicas": d.recommended,
            "reason": d.reason.value,
        } for role, d in decisions.items()},
        "recommendations": {role: history.to_status(d.history) for role, d in decisions.items()},
        "failedReadings": failures,
        "lastScaleTime": last_scale_time,
        "lastScaleReason": last_scale_reason,
        "conditions": st.merge_conditions(
            previous.get("conditions"),
            [converged.readiness(), _metrics_condition(reading, failures, spec),
             *([_scaling_condition(decisions)] if decisions else [])],
            generation, now,
        ),
    }
    if snapshot is not None and not snapshot.partial:
        # Only overwrite the observations when we have complete ones: stale numbers stay
        # visible, next to MetricsAvailable=False, rather than turning into misleading zeros.
        body_status.update({
            "queueDepth": _replace_map(previous.get("queueDepth"), snapshot.queue_depth),
            "inFlight": _replace_map(previous.get("inFlight"), snapshot.in_flight),
            "totalQueueDepth": snapshot.total_queue_depth,
            "workerHeld": snapshot.worker_held,
            "connections": snapshot.connections,
            "podConnections": _replace_map(previous.get("podConnections"), snapshot.pod_connections),
            "inboxBacklog": _replace_map(previous.get("inboxBacklog"), snapshot.inbox_backlog),
        })
    await write_status(kube, owner, body_status)
    gauges = exporter.PLATFORMS.setdefault((ns, name), exporter.PlatformGauges())
    gauges.metrics_available = int(snapshot is not None and not snapshot.partial and snapshot.protocol_reporting)
    gauges.partial = int(snapshot is not None and snapshot.partial)
    gauges.failed_readings = failures
    gauges.desired = {role: d.replicas for role, d in decisions.items()}
    gauges.ready = {role: body_status[role]["readyReplicas"] for role in decisions}
    if snapshot is not None and not snapshot.partial:
        gauges.connections = snapshot.connections
        gauges.queue_depth = snapshot.total_queue_depth
        gauges.rejected_heartbeats = snapshot.rejected_heartbeats
    return body_status


def _stored_failures(previous: Mapping[str, Any]) -> int:
    value = previous.get("failedReadings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


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
