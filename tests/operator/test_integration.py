"""The real operator against kmock's Kubernetes emulator over HTTP, with a real Redis.

Timings are shrunk (1 s polls, seconds-long windows) so each scenario takes a few seconds.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import kmock
import redis
from op_testkit import CHATPLATFORMS, Cluster, chat_platform, eventually

from embedded_redis import EmbeddedRedis

FAST = {"pollIntervalSeconds": 1, "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 3,
        "maxScaleUpStep": 10, "maxScaleDownStep": 10}
# No spec.redis.channelPrefix in these platforms: the operator derives parley.<namespace>.<name>.
PREFIX = "parley.ns.chat."
QUEUE = PREFIX + "chat.persist"


def fill_queue(url: str, count: int, age: float = 0.0, key: str = QUEUE) -> None:
    """Enqueue like channels-redis does: members scored by their enqueue time."""
    client = redis.Redis.from_url(url)
    now = time.time() - age
    client.zadd(key, {f"msg-{age}-{i}".encode(): now for i in range(count)})
    client.close()


def heartbeat(url: str, process_id: str, pod: str, connections: int, age: float = 0.0) -> None:
    client = redis.Redis.from_url(url)
    # The app's key and process id: `<prefix>:proc:<hostname>-<pid>-<random>`, hostname = pod name.
    key = f"{PREFIX}:proc:{pod}-{process_id}"
    client.hset(key, mapping={
        "role": "protocol", "pod": pod, "connections": connections, "inbox": 0, "draining": 0,
        "ts": time.time() - age,
    })
    client.expire(key, 60)
    client.close()


def platform(redis_url: str, **spec: Any) -> dict[str, Any]:
    return chat_platform(redis={"urls": [redis_url]}, scaling=FAST, **spec)


async def test_create_makes_owned_children_and_reports_status(cluster: Cluster, operator: None,
                                                              redis_url: str) -> None:
    await cluster.create_platform(platform(redis_url, drain={"gracePeriodSeconds": 45}))

    for role in ("protocol", "worker"):
        for res in ("apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets"):
            obj = await eventually(lambda res=res, role=role: cluster.obj(res, f"chat-{role}").raw)
            (ref,) = obj["metadata"]["ownerReferences"]
            assert ref == {"apiVersion": "parley.dev/v1alpha1", "kind": "ChatPlatform", "name": "chat",
                           "uid": "uid-chat", "controller": True, "blockOwnerDeletion": True}

    protocol = cluster.obj("apps/v1/deployments", "chat-protocol").raw
    assert protocol["spec"]["replicas"] == 2  # the CRD's default protocol.minReplicas
    pod = protocol["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 45
    (container,) = pod["containers"]
    assert container["command"] == ["parley", "protocol"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["parley", "drain"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_URLS"]["value"] == redis_url
    assert env["PARLEY_DRAIN_SECONDS"]["value"] == "45"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "parley-db", "key": "url"}
    worker = cluster.obj("apps/v1/deployments", "chat-worker").raw
    assert worker["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "parley", "worker", "chat.persist", "chat.bot"]

    status = await eventually(lambda: cluster.platform().raw["status"].get("conditions") and
                              cluster.platform().raw["status"])
    assert status["observedGeneration"] == 1
    await eventually(lambda: cluster.platform().raw["status"]["summary"] == {"protocol": "0/2", "worker": "0/1"})
    assert cluster.condition("Ready")["status"] == "False"  # nothing is running in an emulator

    # Pods becoming ready (the Deployment controller's job) turns Ready=True.
    for role, n in (("protocol", 2), ("worker", 1)):
        await cluster.patch(f"/apis/apps/v1/namespaces/ns/deployments/chat-{role}/status",
                            {"status": {"readyReplicas": n, "replicas": n}})
    await eventually(lambda: cluster.condition("Ready")["status"] == "True")


async def test_reconcile_is_idempotent_and_reverts_hand_edits(cluster: Cluster, operator: None,
                                                              redis_url: str) -> None:
    await cluster.create_platform(platform(redis_url))
    await eventually(lambda: cluster.platform().raw.get("status", {}).get("worker"))
    deployment = cluster.obj("apps/v1/deployments", "chat-protocol")
    versions = len(deployment.history)
    await asyncio.sleep(2.5)  # two more polls, each converging every child
    assert len(deployment.history) == versions, "a converged child must not be written again"

    url = "/apis/apps/v1/namespaces/ns/deployments/chat-protocol"
    edited = dict(deployment.raw["spec"]["template"]["spec"]["containers"][0], image="evil:latest")
    await cluster.patch(url, {"spec": {"template": {"spec": {"containers": [edited]}}}})
    await eventually(lambda: deployment.raw["spec"]["template"]["spec"]["containers"][0]["image"]
                     == "registry.example/parley:1.0", timeout=5)
    await eventually(lambda: cluster.events("DriftReverted"))


async def test_a_deployment_made_before_min_ready_seconds_gets_it(cluster: Cluster, operator: None,
                                                                  redis_url: str) -> None:
    """minReadySeconds bounds a rollout's concurrent drains (docs/operations.md); a Deployment an
    older operator made without it must get it on the next converge, not only new ones."""
    await cluster.create_platform(platform(redis_url))
    await eventually(lambda: cluster.platform().raw.get("status", {}).get("worker"))
    deployment = cluster.obj("apps/v1/deployments", "chat-protocol")
    assert deployment.raw["spec"].get("minReadySeconds", 0) > 0
    wanted = deployment.raw["spec"]["minReadySeconds"]
    await cluster.patch("/apis/apps/v1/namespaces/ns/deployments/chat-protocol", {"spec": {"minReadySeconds": 0}})
    await eventually(lambda: deployment.raw["spec"].get("minReadySeconds") == wanted, timeout=5)


async def test_spec_change_rolls_out(cluster: Cluster, operator: None, redis_url: str) -> None:
    await cluster.create_platform(platform(redis_url))
    await eventually(lambda: cluster.exists("apps/v1/deployments", "chat-worker"))
    await cluster.patch("/apis/parley.dev/v1alpha1/namespaces/ns/chatplatforms/chat",
                        {"spec": {"image": "registry.example/parley:1.1",
                                  "worker": {"channels": ["chat.persist"], "maxReplicas": 10}}})
    worker = cluster.obj("apps/v1/deployments", "chat-worker")
    await eventually(lambda: worker.raw["spec"]["template"]["spec"]["containers"][0]["command"]
                     == ["parley", "worker", "chat.persist"])
    assert worker.raw["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/parley:1.1"
    await eventually(lambda: cluster.platform().raw["status"]["observedGeneration"] == 2)
    await eventually(lambda: cluster.events("RollingOut"))
    assert not cluster.events("DriftReverted")  # a spec change is not reported as a hand edit


async def test_workers_follow_queue_depth_to_zero_and_back(cluster: Cluster, operator: None,
                                                           redis_url: str) -> None:
    await cluster.create_platform(platform(
        redis_url, worker={"minReplicas": 0, "maxReplicas": 8, "targetQueueDepthPerReplica": 10}))
    await eventually(lambda: cluster.exists("apps/v1/deployments", "chat-worker"))
    assert cluster.replicas("worker") == 0

    # Expired messages (older than the 60 s channel expiry) are dead: no worker for them.
    fill_queue(redis_url, 500, age=120)
    await eventually(lambda: cluster.platform().raw["status"].get("totalQueueDepth") == 0
                     and cluster.condition("MetricsAvailable")["reason"] == "NoProtocolHeartbeats")
    assert cluster.replicas("worker") == 0

    fill_queue(redis_url, 35)
    await eventually(lambda: cluster.replicas("worker") == 4)  # ceil(35 / 10)
    # The operator scales first and patches its status right after: wait for the status too
    # (reading it at once raced that patch and saw the previous poll's depth, 0).
    await eventually(lambda: cluster.platform().raw["status"]["queueDepth"]["chat.persist"] == 35)
    status = cluster.platform().raw["status"]
    assert status["lastScaleReason"].startswith("worker: queue depth 35")
    await eventually(lambda: cluster.events("ScaledUp"))

    redis.Redis.from_url(redis_url).delete(QUEUE)
    drained_at = time.monotonic()
    await eventually(lambda: cluster.replicas("worker") == 0, timeout=10)
    # Not before the 3 s scale-down window (less one poll of sampling slack) has passed.
    assert time.monotonic() - drained_at >= 3 - 1 - 0.2
    await eventually(lambda: cluster.events("ScaledDown"))


async def test_redis_outage_holds_replicas_and_recovers(cluster: Cluster, operator: None,
                                                        redis_server: EmbeddedRedis, redis_url: str) -> None:
    await cluster.create_platform(platform(redis_url, worker={"targetQueueDepthPerReplica": 10}))
    fill_queue(redis_url, 30)
    await eventually(lambda: cluster.replicas("worker") == 3)

    assert redis_server.process is not None
    redis_server.process.terminate()
    redis_server.process.wait()
    condition = await eventually(
        lambda: (c := cluster.condition("MetricsAvailable"))["reason"] == "RedisUnavailable" and c)
    assert condition["status"] == "False"
    assert "127.0.0.1" in condition["message"]
    await asyncio.sleep(4)  # longer than the 3 s scale-down window: blindness is not idleness
    assert cluster.replicas("worker") == 3
    assert cluster.condition("Scaling")["reason"] == "MetricsUnavailable"
    assert cluster.platform().raw["status"]["totalQueueDepth"] == 30  # last known, not zero
    await eventually(lambda: cluster.events("MetricsUnavailable"))

    redis_server.restart()  # back, empty: the queue was lost with the server
    await eventually(lambda: cluster.condition("MetricsAvailable")["reason"] == "NoProtocolHeartbeats")
    await eventually(lambda: cluster.replicas("worker") == 1, timeout=10)  # empty queue -> minReplicas
    await eventually(lambda: cluster.events("MetricsRecovered"))


async def test_protocol_scale_down_removes_least_loaded_pods_first(cluster: Cluster, operator: None,
                                                                   redis_url: str) -> None:
    heartbeat(redis_url, "p1", "chat-protocol-a", 500)
    heartbeat(redis_url, "p2", "chat-protocol-b", 10)
    heartbeat(redis_url, "p3", "chat-protocol-c", 150)
    heartbeat(redis_url, "p4", "chat-protocol-c", 50)  # two processes in one pod: summed
    heartbeat(redis_url, "dead", "chat-protocol-b", 9999, age=60)  # a dead process: ignored
    # chat-protocol-d publishes nothing: unknown load, never the cheapest to lose (a busy pod's
    # heartbeat can be late): it ranks above every known pod, and at least at the target.

    await cluster.create_platform(chat_platform(
        redis={"urls": [redis_url]}, scaling={**FAST, "maxScaleDownStep": 1},
        protocol={"minReplicas": 1, "maxReplicas": 5, "targetConnectionsPerPod": 1000}))
    await eventually(lambda: cluster.exists("apps/v1/deployments", "chat-protocol"))
    labels = {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "protocol"}
    for pod in ("chat-protocol-a", "chat-protocol-b", "chat-protocol-c", "chat-protocol-d"):
        await cluster.create("/api/v1/namespaces/ns/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "ns", "labels": labels, "resourceVersion": "1"}})
    await cluster.patch("/apis/apps/v1/namespaces/ns/deployments/chat-protocol", {"spec": {"replicas": 4}})

    await eventually(lambda: cluster.replicas("protocol") < 4)
    costs = {pod: cluster.obj("v1/pods", pod).raw["metadata"]["annotations"][
        "controller.kubernetes.io/pod-deletion-cost"] for pod in
        ("chat-protocol-a", "chat-protocol-b", "chat-protocol-c", "chat-protocol-d")}
    assert costs == {"chat-protocol-a": "500", "chat-protocol-b": "10", "chat-protocol-c": "200",
                     "chat-protocol-d": "1000"}
    assert cluster.replicas("protocol") == 3  # one step at a time (maxScaleDownStep=1)
    # The status is patched right after the scale: wait for it rather than race it.
    await eventually(lambda: cluster.platform().raw["status"].get("connections") == 710)
    assert cluster.condition("MetricsAvailable")["status"] == "True"
    await eventually(lambda: cluster.replicas("protocol") == 1, timeout=10)  # ceil(710 / 1000)


async def test_inconsistent_spec_is_reported_not_applied(cluster: Cluster, operator: None,
                                                         redis_url: str) -> None:
    # The CRD's CEL rule rejects this on a real API server; kmock has no CEL, so it gets through
    # and the operator's own check must hold the line.
    await cluster.create_platform(platform(redis_url, worker={"minReplicas": 5, "maxReplicas": 2}))
    condition = await eventually(lambda: (c := cluster.condition("Ready"))["reason"] == "InvalidSpec" and c)
    assert "worker.minReplicas (5) exceeds maxReplicas (2)" in condition["message"]
    assert not cluster.exists("apps/v1/deployments", "chat-worker")
    assert cluster.exists(CHATPLATFORMS, "chat")


async def test_protocol_pods_are_held_when_they_cannot_be_ranked(
    k8s: kmock.KubernetesEmulator, cluster: Cluster, operator: None, redis_url: str,
) -> None:
    # As if RBAC lacked `list pods`: removing pods blindly could cut the busiest ones. (Not a
    # failing PATCH: kmock applies a PATCH to its stored object even when a reaction answers 403.)
    k8s["get", re.compile(r"/api/v1/namespaces/ns/pods")] << kmock.KubernetesError(
        status=403, reason="Forbidden", message="pods is forbidden")
    # Every replica reports (an unreported one would hold the scale-down by itself, assumed at
    # target), so only the missing pod list holds it.
    for pod in ("chat-protocol-a", "chat-protocol-b", "chat-protocol-c"):
        heartbeat(redis_url, "p1", pod, 10)
    await cluster.create_platform(chat_platform(
        redis={"urls": [redis_url]}, scaling=FAST,
        protocol={"minReplicas": 1, "maxReplicas": 5, "targetConnectionsPerPod": 1000}))
    await eventually(lambda: cluster.exists("apps/v1/deployments", "chat-protocol"))
    await cluster.create("/api/v1/namespaces/ns/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "chat-protocol-a", "namespace": "ns", "resourceVersion": "1",
            "labels": {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "protocol"}}})
    await cluster.patch("/apis/apps/v1/namespaces/ns/deployments/chat-protocol", {"spec": {"replicas": 3}})
    await eventually(lambda: cluster.condition("Scaling")["reason"] == "PodDeletionCostUnavailable")
    await asyncio.sleep(2)
    assert cluster.replicas("protocol") == 3
