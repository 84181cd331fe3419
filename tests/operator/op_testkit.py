"""Helpers shared by the operator tests: the CRD as the API server would use it, and waiting."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kmock
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "helm" / "parley-operator" / "crds" / "chatplatforms.parley.dev.yaml"
CHATPLATFORMS = "parley.dev/v1alpha1/chatplatforms"


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(node_schema: dict[str, Any], value: Any) -> Any:
    """Apply OpenAPI `default`s the way the API server does (nested objects included)."""
    if not isinstance(value, dict) or node_schema.get("type") != "object":
        return value
    result = dict(value)
    for key, sub in (node_schema.get("properties") or {}).items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
        if key in result:
            result[key] = apply_defaults(sub, result[key])
    return result


def validate(obj: dict[str, Any]) -> None:
    """Structural validation as the API server does it (CEL rules are checked by parse())."""
    jsonschema.validate(obj, schema(), cls=jsonschema.Draft7Validator)


def admit(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server would store for `obj`: defaulted, then validated."""
    defaulted = apply_defaults(schema(), obj)
    validate(defaulted)
    return defaulted


def chat_platform(name: str = "chat", namespace: str = "ns", **spec: Any) -> dict[str, Any]:
    base_spec: dict[str, Any] = {
        "image": "registry.example/parley:1.0",
        "allowedHosts": ["chat.example.com"],
        "redis": {"urls": ["redis://127.0.0.1:6379/0"]},
        "database": {"secretRef": {"name": "parley-db"}},
    }
    base_spec.update(spec)
    return {
        "apiVersion": "parley.dev/v1alpha1",
        "kind": "ChatPlatform",
        "metadata": {
            "name": name,
            "namespace": namespace,
            # kmock assigns none of these; kopf and owner references need them.
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": base_spec,
    }


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Wait until `check()` returns a truthy value (and return it); fail with its last error."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last_error = None
        except (KeyError, AssertionError, ValueError, TypeError) as exc:
            last_error = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s") from last_error


class Cluster:
    """Test-side API calls over HTTP, as kubectl would make them."""

    def __init__(self, k8s: kmock.KubernetesEmulator, session: aiohttp.ClientSession) -> None:
        self.k8s = k8s
        self.session = session

    async def create_platform(self, body: dict[str, Any]) -> dict[str, Any]:
        stored = admit(body)  # defaults + schema, as the real API server would
        ns = body["metadata"]["namespace"]
        url = f"/apis/parley.dev/v1alpha1/namespaces/{ns}/chatplatforms"
        async with self.session.post(url, json=stored) as rsp:
            assert rsp.status < 300, await rsp.text()
            return await rsp.json()

    async def patch(self, url: str, patch: Any) -> dict[str, Any]:
        async with self.session.patch(url, json=patch,
                                      headers={"Content-Type": "application/merge-patch+json"}) as rsp:
            assert rsp.status < 300, await rsp.text()
            return await rsp.json()

    async def create(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(url, json=body) as rsp:
            assert rsp.status < 300, await rsp.text()
            return await rsp.json()

    def obj(self, resource: str, name: str, namespace: str | None = "ns") -> Any:
        return self.k8s.objects[resource, namespace, name]

    def exists(self, resource: str, name: str, namespace: str | None = "ns") -> bool:
        # Not `key in k8s.objects`: kmock 0.8's ObjectsArray answers False even for stored keys.
        try:
            return not self.k8s.objects[resource, namespace, name].deleted
        except KeyError:
            return False

    def platform(self, name: str = "chat") -> Any:
        return self.obj(CHATPLATFORMS, name)

    def condition(self, type_: str, name: str = "chat") -> dict[str, Any]:
        conditions = self.platform(name).raw.get("status", {}).get("conditions", [])
        for condition in conditions:
            if condition["type"] == type_:
                return condition
        raise KeyError(type_)

    def replicas(self, role: str, name: str = "chat") -> int:
        return int(self.obj("apps/v1/deployments", f"{name}-{role}").raw["spec"]["replicas"])

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [obj.raw for (res, _ns, _name), obj in self.k8s.objects.items()
                if res == "v1/events" and not obj.deleted and obj.raw.get("reason") == reason]
