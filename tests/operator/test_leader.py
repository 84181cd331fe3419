"""Leader election on a Lease, against kmock's emulator over HTTP: one writer at a time.

kopf peering, as the operator used it, froze both operators when their priorities were equal
(the default) and elected nobody. The Lease elects exactly one, hands over when the leader dies
or leaves, and fences the old leader's writes before anyone else may take over.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from op_testkit import ROOT, Cluster, chat_platform, eventually

from parley_operator import leader
from parley_operator.kube import API_URL_ENV, Kube, NotLeader

LEASES = "coordination.k8s.io/v1/leases"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
TIMING = leader.Timing(lease_duration=15, renew_deadline=10, retry_period=2)


class Clock:
    """A hand-moved clock: the electors' notion of time, independent of the test's speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def declare_leases(k8s: kmock.KubernetesEmulator) -> None:
    k8s.resources[LEASES] = kmock.ResourceInfo(kind="Lease", namespaced=True, verbs=VERBS)


@pytest.fixture
async def kube(k8s: kmock.KubernetesEmulator) -> AsyncIterator[Kube]:
    declare_leases(k8s)
    client = Kube(lambda: kopf.ConnectionInfo(server=str(k8s.url).rstrip("/")))
    yield client
    await client.close()


def elector(kube: Kube, identity: str, clock: Clock) -> leader.LeaderElector:
    return leader.LeaderElector(kube, "ns", "parley-operator", identity=identity, timing=TIMING, clock=clock)


def holder(k8s: kmock.KubernetesEmulator) -> str:
    return str(k8s.objects[LEASES, "ns", "parley-operator"].raw["spec"]["holderIdentity"])


async def test_two_candidates_with_equal_standing_elect_exactly_one(kube: Kube, k8s: kmock.KubernetesEmulator) -> None:
    clock = Clock()
    a, b = elector(kube, "op-a", clock), elector(kube, "op-b", clock)
    won = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
    assert sorted(won) == [False, True]  # both tried at once, on no Lease: one create wins
    first, second = (a, b) if won[0] else (b, a)
    assert holder(k8s) == first.identity
    assert first.leading() and not second.leading()
    # The loser keeps standing by while the winner renews.
    for _ in range(10):
        clock.now += TIMING.retry_period
        assert await first.try_acquire_or_renew()
        assert not await second.try_acquire_or_renew()
    assert holder(k8s) == first.identity


async def test_a_silent_leader_is_replaced_only_after_the_lease_duration(kube: Kube,
                                                                          k8s: kmock.KubernetesEmulator) -> None:
    clock = Clock()
    a, b = elector(kube, "op-a", clock), elector(kube, "op-b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()  # b starts watching the record here

    clock.now += TIMING.renew_deadline  # a is silent (hung, partitioned): its own fence closes
    assert not a.leading()
    assert not await b.try_acquire_or_renew()  # but the Lease has not expired for b yet
    clock.now += TIMING.lease_duration - TIMING.renew_deadline
    assert await b.try_acquire_or_renew()
    assert holder(k8s) == "op-b"
    assert k8s.objects[LEASES, "ns", "parley-operator"].raw["spec"]["leaseTransitions"] == 1
    # a comes back: it sees b's Lease and does not take it back.
    assert not await a.try_acquire_or_renew()
    assert not a.leading() and b.leading()


async def test_the_old_leader_cannot_write_once_its_renew_deadline_passed(kube: Kube,
                                                                          k8s: kmock.KubernetesEmulator) -> None:
    clock = Clock()
    a = elector(kube, "op-a", clock)
    assert await a.try_acquire_or_renew()
    fenced = Kube(lambda: kopf.ConnectionInfo(server=str(k8s.url).rstrip("/")), may_write=a.leading)
    try:
        await fenced.create("/api/v1/namespaces/ns/events", {
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": "e1", "namespace": "ns"}})
        clock.now += TIMING.renew_deadline
        with pytest.raises(NotLeader):
            await fenced.merge_patch("/api/v1/namespaces/ns/events/e1", {"message": "late"})
        assert (await fenced.get("/api/v1/namespaces/ns/events/e1"))["metadata"]["name"] == "e1"  # reads go on
    finally:
        await fenced.close()


async def test_a_leader_that_leaves_cleanly_hands_over_at_once(kube: Kube, k8s: kmock.KubernetesEmulator) -> None:
    clock = Clock()
    a, b = elector(kube, "op-a", clock), elector(kube, "op-b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert not a.leading()
    assert await b.try_acquire_or_renew()  # no need to wait out the 15 s
    assert holder(k8s) == "op-b"


async def test_hold_returns_when_the_lease_is_taken(kube: Kube, k8s: kmock.KubernetesEmulator) -> None:
    fast = leader.Timing.for_lease(0.6)
    a = leader.LeaderElector(kube, "ns", "parley-operator", identity="op-a", timing=fast)
    await a.acquire()
    holding = asyncio.create_task(a.hold())
    await asyncio.sleep(0.3)
    assert not holding.done()
    # Someone else writes the Lease (an operator that judged it expired).
    lease = k8s.objects[LEASES, "ns", "parley-operator"].raw
    await kube.merge_patch("/apis/coordination.k8s.io/v1/namespaces/ns/leases/parley-operator", {
        "spec": {**lease["spec"], "holderIdentity": "op-b"}})
    await asyncio.wait_for(holding, 2)
    assert not a.leading()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_operator(k8s: kmock.KubernetesEmulator, pod: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`python -m parley_operator` as the chart runs it, with a 3 s Lease to keep the test short."""
    env = {**os.environ, API_URL_ENV: str(k8s.url).rstrip("/"), "POD_NAME": pod, "POD_NAMESPACE": "ns",
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "app", "tools", "."))}
    return subprocess.Popen(
        [sys.executable, "-m", "parley_operator", "--leader-election", "parley-operator", "--lease-duration", "3",
         f"--liveness=http://127.0.0.1:{port}/healthz", "--log-format", "plain"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


async def _alive(port: int) -> bool:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as rsp:
        return rsp.status == 200


async def test_two_operator_replicas_one_works_and_the_standby_takes_over(
    k8s: kmock.KubernetesEmulator, cluster: Cluster, redis_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    declare_leases(k8s)
    writes: list[tuple[str, str]] = []  # (User-Agent, "METHOD path") of every write
    original = type(k8s)._handle

    async def record(self: kmock.KubernetesEmulator, request: Any) -> Any:
        method = str(request.method.value).upper()
        if method not in ("GET", "HEAD"):
            writes.append((request.headers.get("User-Agent", ""), f"{method} {request.url.path}"))
        return await original(self, request)

    monkeypatch.setattr(type(k8s), "_handle", record)
    ports = {"op-a": _free_port(), "op-b": _free_port()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["op-a"] = _start_operator(k8s, "op-a", ports["op-a"], tmp_path / "op-a.log")
        await eventually(lambda: holder(k8s).startswith("op-a_"), timeout=20)
        procs["op-b"] = _start_operator(k8s, "op-b", ports["op-b"], tmp_path / "op-b.log")
        await eventually(lambda: "standing by" in (tmp_path / "op-b.log").read_text(), timeout=20)
        assert await _alive(ports["op-b"])  # a standby is alive, not crash-looping

        await cluster.create_platform(chat_platform(redis={"urls": [redis_url]},
                                                    scaling={"pollIntervalSeconds": 1}))
        await eventually(lambda: cluster.platform().raw.get("status", {}).get("worker"), timeout=20)
        # Exactly one writer: the standby has not written anything, not even the Lease.
        assert writes and not [w for w in writes if "(op-b)" in w[0]]

        procs["op-a"].kill()  # no clean release: the standby must wait the Lease out
        procs["op-a"].wait()
        killed = time.monotonic()
        url = "/apis/apps/v1/namespaces/ns/deployments/chat-protocol"
        deployment = cluster.obj("apps/v1/deployments", "chat-protocol")
        edited = dict(deployment.raw["spec"]["template"]["spec"]["containers"][0], image="evil:latest")
        await cluster.patch(url, {"spec": {"template": {"spec": {"containers": [edited]}}}})
        await eventually(lambda: holder(k8s).startswith("op-b_"), timeout=20)
        assert time.monotonic() - killed >= 3 - 0.5  # not before the 3 s Lease ran out
        await eventually(lambda: deployment.raw["spec"]["template"]["spec"]["containers"][0]["image"]
                         == "registry.example/parley:1.0", timeout=20)
        assert [w for w in writes if "(op-b)" in w[0] and "deployments" in w[1]]

        procs["op-b"].send_signal(signal.SIGTERM)  # a rollout: leave cleanly, hand the Lease over
        assert await asyncio.to_thread(procs["op-b"].wait, 30) == 0
        assert holder(k8s) == ""
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
