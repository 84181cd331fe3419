"""The chart's objects, applied the way `helm install` would, to kmock with the real operator.

`helm install` itself cannot run against kmock 0.8 (docs/operations.md, "Helm against kmock"
lists exactly what stops it), so this test applies what `helm template` renders for the
ChatPlatform and the Secrets it references, in Helm's order, and checks that the operator,
started with the chart's arguments, makes the Deployments the chart's NetworkPolicies and
Ingress point at, and reads Redis through the chart's Secret.
"""

from __future__ import annotations

import time

import redis
from op_testkit import CHATPLATFORMS, Cluster, admit, eventually

from tests.chart.chartkit import of_kind, one, render


async def test_rendered_chart_objects_become_a_running_platform(cluster: Cluster, operator: None,
                                                                redis_url: str) -> None:
    docs = render("--namespace", "ns", "--set", "redis.enabled=false", "--set", f"externalRedis.urls[0]={redis_url}",
                  "--set", "postgresql.enabled=false", "--set", "database.url=postgres://p:pw@db:5432/parley",
                  "--set", "scaling.pollIntervalSeconds=1")
    # Into the emulator's namespace, ns, in Helm's order: Secrets, then the ChatPlatform.
    for secret in of_kind(docs, "Secret"):
        secret["metadata"]["namespace"] = "ns"
        await cluster.create("/api/v1/namespaces/ns/secrets", secret)
    platform = one(docs, "ChatPlatform")
    platform["metadata"].update(namespace="ns", uid="uid-chat", resourceVersion="1", generation=1,
                                creationTimestamp="2026-01-01T00:00:00Z")
    await cluster.create_platform(admit(platform))

    deployments = {}
    for role in ("protocol", "worker"):
        deployments[role] = await eventually(lambda role=role: cluster.obj("apps/v1/deployments", f"chat-{role}").raw)
    env = {e["name"]: e for e in deployments["protocol"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_URLS"]["valueFrom"]["secretKeyRef"] == {"name": "chat-redis", "key": "urls"}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "chat-app", "key": "url"}
    assert env["PARLEY_CHANNEL_PREFIX"]["value"] == "parley.ns.chat."
    # The Ingress' backend and the NetworkPolicies' selectors match what the operator made.
    ingress = one(docs, "Ingress")
    assert cluster.exists("v1/services", ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"])
    policy = one(docs, "NetworkPolicy", "chat-protocol")
    labels = deployments["protocol"]["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())

    # The operator reads the Redis URLs from the chart's Secret and the heartbeats under the prefix
    # (of pods that exist: a gone pod's last heartbeat is a ghost).
    await cluster.create("/api/v1/namespaces/ns/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "chat-protocol-a", "namespace": "ns", "resourceVersion": "1",
            "labels": {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "protocol"}}})
    client = redis.Redis.from_url(redis_url)
    client.hset("parley.ns.chat.:proc:chat-protocol-a-1-abc", mapping={
        "role": "protocol", "pod": "chat-protocol-a", "connections": 42, "inbox": 0, "draining": 0, "ts": time.time()})
    client.expire("parley.ns.chat.:proc:chat-protocol-a-1-abc", 60)
    await eventually(lambda: cluster.condition("MetricsAvailable")["status"] == "True", timeout=15)
    assert cluster.obj(CHATPLATFORMS, "chat").raw["status"]["connections"] == 42
