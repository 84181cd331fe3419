"""Fixtures for the operator tests: a real Redis, kmock's Kubernetes emulator, the real operator."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import pytest
import redis
from op_testkit import Cluster, load_crd

import parley_operator.handlers  # noqa: F401  (registers the handlers in kopf's default registry)
from embedded_redis import EmbeddedRedis
from parley_operator.kube import API_URL_ENV

# Everything the operator reads, writes or that kopf touches. kmock 0.8 serves (and lists in
# discovery) only resources that are declared or already have objects.
CORE_RESOURCES = {
    "v1/namespaces": ("Namespace", False),
    "v1/events": ("Event", True),
    "v1/pods": ("Pod", True),
    "v1/services": ("Service", True),
    "v1/secrets": ("Secret", True),
    "apps/v1/deployments": ("Deployment", True),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    with contextlib.suppress(redis.RedisError):
        client.close()


@attrs.define(kw_only=True)
class VersionedEmulator(kmock.KubernetesEmulator):
    """kmock 0.8's emulator plus what the API server does on every write and kopf relies on.

    kmock never changes metadata.resourceVersion, so kopf's consistency check (wait for the
    version its own patch produced) is satisfied by stale events and kopf re-runs handlers on
    outdated bodies. Here every create/patch gets a new resourceVersion, a spec change bumps
    metadata.generation, `generateName` makes a name, and a failed JSON-patch `test` is a 422,
    as on a real cluster.
    """

    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1000), init=False)
    watched: set[str] = attrs.field(factory=set, init=False)  # plurals someone watches

    def _exists(self, key: tuple[Any, ...]) -> bool:
        try:
            return not self.objects[key].deleted  # type: ignore[index]
        except KeyError:
            return False

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # The request is frozen and answered through its own object, so we amend its body in
        # place rather than replacing the request.
        data = request.data
        if request.resource is not None and request.action == kmock.action.WATCH:
            self.watched.add(str(request.resource.plural))
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            version = str(next(self._versions))
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                if request.action == kmock.action.CREATE and not meta.get("name") and meta.get("generateName"):
                    # kopf posts Events with generateName only; kmock would store them all as None.
                    meta["name"] = f"{meta['generateName']}{version}"
                key = (request.resource, request.namespace, request.name)
                if request.action == kmock.action.UPDATE and "spec" in data and not request.subresource \
                        and self._exists(key):
                    meta["generation"] = int(self.objects[key].get("metadata", {}).get("generation", 1)) + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # kopf's optimistic concurrency: a failed `test` of resourceVersion is a 422 to it.
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc


@pytest.fixture
async def k8s() -> AsyncIterator[VersionedEmulator]:
    """kmock's emulator on a real HTTP port, declared like a cluster with our CRD installed."""
    async with VersionedEmulator() as emulator, kmock.Server(emulator):
        declare(emulator)
        yield emulator


def declare(emulator: kmock.KubernetesEmulator) -> None:
    """Serve our resources: kmock 0.8 serves (and lists in discovery) only declared ones."""
    for res, (kind, namespaced) in CORE_RESOURCES.items():
        emulator.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS)
    crd = load_crd()
    version = crd["spec"]["versions"][0]
    emulator.resources[f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['plural']}"] = (
        kmock.ResourceInfo(
            kind=crd["spec"]["names"]["kind"],
            singular=crd["spec"]["names"]["singular"],
            shortnames=crd["spec"]["names"].get("shortNames", []),
            namespaced=crd["spec"]["scope"] == "Namespaced",
            verbs=VERBS,
            subresources=set(version.get("subresources", {})),
        )
    )
    emulator.objects["v1/namespaces", None, "ns"] = {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "ns", "resourceVersion": "1", "uid": "uid-ns"},
    }


@pytest.fixture
async def cluster(k8s: kmock.KubernetesEmulator) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession(base_url=str(k8s.url)) as session:
        yield Cluster(k8s, session)


@pytest.fixture
async def operator(k8s: VersionedEmulator, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The real operator (all handlers, real HTTP, real login handler), in its own thread.

    Not in the test's event loop: on exit, kopf.operator() cancels every task created in its
    loop after it started, and pytest-asyncio's fixture teardown is such a task.
    """
    # The login handler reads this: plain HTTP to the emulator, like `kubectl proxy`.
    monkeypatch.setenv(API_URL_ENV, str(k8s.url).rstrip("/"))
    settings = kopf.OperatorSettings()
    stop_flag = threading.Event()
    ready_flag = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(
                clusterwide=True,
                standalone=True,  # no KopfPeering resources in the emulator
                settings=settings,
                memo=kopf.Memo(),
                stop_flag=stop_flag,
                ready_flag=ready_flag,
            ))
        except BaseException as exc:  # surfaced by the fixture below
            failure.append(exc)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    # Await, not block: the emulator serves from this loop, and the operator is talking to it.
    # Ready is not enough: wait until kopf watches ChatPlatforms. kmock 0.8 replays existing
    # objects to a new watch and can lose events written while the watch is being set up, so an
    # object created during kopf's list-then-watch may be seen twice and its update missed.
    for _ in range(300):
        if (ready_flag.is_set() and "chatplatforms" in k8s.watched) or failure:
            break
        await asyncio.sleep(0.05)
    if failure:
        raise failure[0]
    await asyncio.sleep(0.2)  # let the watch subscribe to kmock's event bus
    yield
    stop_flag.set()
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "the operator did not stop within 30s"
    if failure:
        raise failure[0]
