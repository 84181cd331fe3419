"""The operator at the edges (issue 14): restarts, partial metrics, ghost heartbeats, coverage.

Each scenario runs `autoscaler.poll` against kmock's Kubernetes emulator over HTTP and a real
Redis, with the clock passed in, so a 5-minute window takes no wall time: a poll here is exactly
one pass of the operator's daemon, and a "restart" is a new PlatformState (what a restarted
process or a new leader starts with).
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
import redis
from op_testkit import Cluster, chat_platform

from embedded_redis import free_port
from parley_operator import autoscaler
from parley_operator.kube import Kube
from parley_operator.spec import parse_body

PREFIX = "parley.ns.chat."
DEPLOYMENTS = "/apis/apps/v1/namespaces/ns/deployments"
LABELS = {"app.kubernetes.io/instance": "chat"}


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """kopf.event() outside a running operator: collect the Events instead of posting them."""
    posted: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda _owner, **event: posted.append(event))
    return posted


@pytest.fixture
async def kube(k8s: Any, events: Any) -> AsyncIterator[Kube]:
    client = Kube(lambda: kopf.ConnectionInfo(server=str(k8s.url).rstrip("/")))
    yield client
    await client.close()


class Platform:
    """One ChatPlatform, polled by hand."""

    def __init__(self, cluster: Cluster, kube: Kube, redis_url: str) -> None:
        self.cluster, self.kube, self.redis_url = cluster, kube, redis_url
        self.state = autoscaler.PlatformState()

    async def create(self, **spec: Any) -> None:
        spec.setdefault("redis", {"urls": [self.redis_url]})
        await self.cluster.create_platform(chat_platform(**spec))

    def body(self) -> dict[str, Any]:
        return self.cluster.platform().raw

    async def poll(self, now: float) -> dict[str, Any]:
        body = self.body()
        return await autoscaler.poll(self.kube, body, parse_body(body), self.state, now=now)

    def restart(self) -> None:
        """A new operator process (or a new leader): nothing in memory."""
        self.state = autoscaler.PlatformState()

    async def scale(self, role: str, replicas: int) -> None:
        await self.cluster.patch(f"{DEPLOYMENTS}/chat-{role}", {"spec": {"replicas": replicas}})

    async def pods(self, role: str, names: list[str]) -> None:
        for name in names:
            await self.cluster.create("/api/v1/namespaces/ns/pods", {
                "apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": name, "namespace": "ns", "resourceVersion": "1",
                    "labels": {**LABELS, "app.kubernetes.io/component": role}}})

    def beat(self, pod: str, connections: int, ts: float, role: str = "protocol", **extra: Any) -> None:
        client = redis.Redis.from_url(self.redis_url)
        key = f"{PREFIX}:proc:{pod}-1-abc"
        client.hset(key, mapping={"role": role, "pod": pod, "connections": connections, "inbox": 0,
                                  "draining": 0, "ts": ts, **extra})
        client.expire(key, 60)
        client.close()

    def cost(self, pod: str) -> int:
        return int(self.cluster.obj("v1/pods", pod).raw["metadata"]["annotations"][
            "controller.kubernetes.io/pod-deletion-cost"])

    def status(self) -> dict[str, Any]:
        return self.body()["status"]

    def condition(self, type_: str) -> dict[str, Any]:
        return self.cluster.condition(type_)


@pytest.fixture
def platform(cluster: Cluster, kube: Kube, redis_url: str) -> Platform:
    return Platform(cluster, kube, redis_url)


PROTOCOL_10 = {"minReplicas": 2, "maxReplicas": 20, "targetConnectionsPerPod": 100}


async def ten_protocol_pods(platform: Platform, t0: float, **spec: Any) -> list[str]:
    """Ten protocol pods, scaled up to by the operator a minute before t0 (1000 connections)."""
    await platform.create(protocol=PROTOCOL_10, **spec)
    await platform.poll(t0 - 61)  # creates the children, at minReplicas
    names = [f"chat-protocol-{i}" for i in range(10)]
    await platform.pods("protocol", names)
    for name in names:
        platform.beat(name, 100, ts=t0 - 60)
    await platform.poll(t0 - 60)
    assert platform.cluster.replicas("protocol") == 10
    return names


# --- 1. a restart keeps the scale-down protection ------------------------------------------------


async def test_a_restart_during_a_dip_does_not_take_ten_pods_to_four(platform: Platform) -> None:
    t0 = time.time()
    names = await ten_protocol_pods(platform, t0)
    replicas = []
    for t in (t0, t0 + 15, t0 + 30):
        platform.restart()  # the worst case: every poll by a freshly started operator
        for name in names:
            platform.beat(name, 40, ts=t)  # 400 connections: 4 pods' worth, a dip
        await platform.poll(t)
        replicas.append(platform.cluster.replicas("protocol"))
    assert replicas == [10, 10, 10]
    assert platform.status()["protocol"]["reason"] == "ScaleDownStabilizing"


async def test_a_new_leader_inherits_the_window_from_the_status(platform: Platform) -> None:
    t0 = time.time()
    names = await ten_protocol_pods(platform, t0)

    def beats(t: float, each: int) -> None:
        for name in names:
            platform.beat(name, each, ts=t)

    beats(t0 + 15, 40)  # the dip starts
    await platform.poll(t0 + 15)
    assert [r["replicas"] for r in platform.status()["recommendations"]["protocol"]][-1] == 4

    platform.restart()  # a failover 100 s into the window: the busy samples are inherited
    beats(t0 + 100, 40)
    await platform.poll(t0 + 100)
    assert platform.cluster.replicas("protocol") == 10

    platform.restart()  # another, once the busy samples have left the 300 s window
    beats(t0 + 241, 40)
    await platform.poll(t0 + 241)
    # The dip has lasted a whole window: the new leader scales down now, one step (-2), not
    # after a window of its own (which a seeded empty history would make it wait).
    assert platform.cluster.replicas("protocol") == 8


# --- 2. partial metrics, a lost Secret, fallback --------------------------------------------------


async def test_one_shard_down_still_wakes_workers_but_never_scales_down(
    platform: Platform, events: list[dict[str, Any]],
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    t0 = time.time()
    names = await ten_protocol_pods(platform, t0, redis={"urls": [platform.redis_url, dead]},
                                    worker={"minReplicas": 0, "targetQueueDepthPerReplica": 10},
                                    scaling={"scaleDownStabilizationSeconds": 0})
    await platform.scale("worker", 0)
    redis.Redis.from_url(platform.redis_url).zadd(PREFIX + "chat.persist", {f"m{i}": t0 for i in range(5)})
    for name in names:
        platform.beat(name, 10, ts=t0)  # what the live shard shows: 100 connections of 1000

    await platform.poll(t0)
    assert platform.cluster.replicas("worker") == 1  # woken from zero on a lower bound
    assert platform.cluster.replicas("protocol") == 10  # a lower bound never scales down
    condition = platform.condition("MetricsAvailable")
    assert (condition["status"], condition["reason"]) == ("False", "PartialMetrics")
    assert dead.removeprefix("redis://") in condition["message"]
    assert platform.status()["protocol"]["reason"] == "PartialMetrics"
    assert [e["reason"] for e in events if e["type"] == "Warning"] == ["PartialMetrics"]


async def test_a_missing_secret_is_a_failed_reading_then_fallback(platform: Platform) -> None:
    await platform.create(
        redis={"secretRef": {"name": "redis-urls"}},
        scaling={"fallback": {"failureThreshold": 2, "protocolReplicas": 4, "workerReplicas": 3}})
    t0 = time.time()
    await platform.poll(t0)  # no exception: the poll goes on and says why
    condition = platform.condition("MetricsAvailable")
    assert (condition["status"], condition["reason"]) == ("False", "RedisSecretUnavailable")
    assert "redis-urls" in condition["message"] and "1 failed reading(s)" in condition["message"]
    assert (platform.cluster.replicas("protocol"), platform.cluster.replicas("worker")) == (2, 1)

    platform.restart()  # the count lives in the status: a restart does not reset it
    await platform.poll(t0 + 15)
    assert platform.status()["failedReadings"] == 2
    assert (platform.cluster.replicas("protocol"), platform.cluster.replicas("worker")) == (4, 3)
    assert platform.status()["worker"]["reason"] == "FallbackReplicas"

    # The Secret appears: readings resume, the count resets.
    url = base64.b64encode(platform.redis_url.encode()).decode()
    await platform.cluster.create("/api/v1/namespaces/ns/secrets", {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "redis-urls", "namespace": "ns", "resourceVersion": "1"},
        "data": {"urls": url}})
    await platform.poll(t0 + 30)
    assert platform.status()["failedReadings"] == 0
    assert platform.condition("MetricsAvailable")["reason"] == "NoProtocolHeartbeats"


# --- 3. ghost heartbeats ---------------------------------------------------------------------------


async def test_heartbeats_of_gone_and_draining_pods_are_not_counted_twice(platform: Platform) -> None:
    t0 = time.time()
    names = await ten_protocol_pods(platform, t0, scaling={"scaleDownStabilizationSeconds": 0})
    await platform.poll(t0)
    # chat-protocol-9 was evicted and is gone; chat-protocol-8 drains. Their 200 clients
    # reconnected to the 8 others (1000 in all: 10 pods' worth). Their last heartbeats are
    # still fresh: counted, they would make it 1200 and add 2 pods for clients nobody has.
    await platform.cluster.session.delete("/api/v1/namespaces/ns/pods/chat-protocol-9")
    for name in names[:8]:
        platform.beat(name, 125, ts=t0 + 15)
    platform.beat("chat-protocol-8", 100, ts=t0 + 15, draining=1)
    platform.beat("chat-protocol-9", 100, ts=t0 + 15)
    await platform.poll(t0 + 15)
    assert platform.cluster.replicas("protocol") == 10
    assert platform.status()["connections"] == 1000
    assert "1 of gone or terminating pods ignored" in platform.condition("MetricsAvailable")["message"]


# --- 4. coverage -------------------------------------------------------------------------------------


async def test_a_pod_with_a_late_heartbeat_is_assumed_busy_and_never_deleted_first(platform: Platform) -> None:
    await platform.create(protocol={"minReplicas": 1, "maxReplicas": 10, "targetConnectionsPerPod": 1000},
                          scaling={"scaleDownStabilizationSeconds": 0, "maxScaleDownStep": 10})
    t0 = time.time()
    await platform.poll(t0 - 1)
    await platform.pods("protocol", ["chat-protocol-a", "chat-protocol-b", "chat-protocol-c", "chat-protocol-d"])
    await platform.scale("protocol", 4)
    platform.beat("chat-protocol-a", 900, ts=t0 - 20)  # busy, its heartbeat late (stale)
    for pod in ("chat-protocol-b", "chat-protocol-c", "chat-protocol-d"):
        platform.beat(pod, 100, ts=t0)

    await platform.poll(t0)
    # 300 known + the unknown pod at target (1000) = 1300: 2 pods, not 1.
    assert platform.cluster.replicas("protocol") == 2
    others = [platform.cost(p) for p in ("chat-protocol-b", "chat-protocol-c", "chat-protocol-d")]
    assert platform.cost("chat-protocol-a") > max(others)  # never the cheapest to delete


# --- Also: observedGeneration --------------------------------------------------------------------


async def test_observed_generation_is_the_generation_of_the_spec_applied(platform: Platform) -> None:
    await platform.create()
    body = platform.body()
    spec = parse_body(body)  # parsed at generation 1
    body = {**body, "metadata": {**body["metadata"], "generation": 2}}  # an edit lands mid-poll
    await autoscaler.poll(platform.kube, body, spec, platform.state, now=time.time(), generation=1)
    assert platform.status()["observedGeneration"] == 1
