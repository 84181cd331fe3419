"""A child the API server rejects or rewrites: the operator keeps scaling and does not flood Events.

The emulator here is taught two things a real API server does to a Deployment write: it stores
resource quantities in their canonical form (`cpu: 1` -> "1", "0.5" -> "500m", "1024Mi" -> "1Gi"),
and it can answer 422 (e.g. requests above limits). A third: a mutating webhook that rewrites
every protocol template (a registry mirror), which no converge can ever undo.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import kmock
import pytest
from op_testkit import Cluster, chat_platform, eventually
from test_integration import FAST, fill_queue

from parley_operator import quantity

Handler = Callable[[Any, Any], Awaitable[Any]]
PLATFORM_URL = "/apis/parley.dev/v1alpha1/namespaces/ns/chatplatforms/chat"


def canonical(value: Any) -> str:
    """A quantity as the API server stores it (enough of resource.Quantity's canonical form)."""
    exact = quantity.parse(value)
    if isinstance(value, str) and value.endswith("i") and exact.denominator == 1:
        for suffix, power in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
            if exact % 2**power == 0:
                return f"{exact // 2**power}{suffix}"
        return str(exact)
    for suffix, exponent in (("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3), ("", 0),
                             ("m", -3), ("u", -6), ("n", -9)):
        scaled = exact / Fraction(10) ** exponent
        if scaled.denominator == 1:
            return f"{scaled}{suffix}"
    raise AssertionError(value)


def _templates(request: Any) -> list[dict[str, Any]]:
    """The pod templates a Deployment write carries (a create, or the operator's JSON patch)."""
    if request.resource is None or str(request.resource.plural) != "deployments" or request.subresource:
        return []
    if request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
        return []
    data = request.data
    if isinstance(data, dict):
        template = (data.get("spec") or {}).get("template")
        return [template] if isinstance(template, dict) else []
    if isinstance(data, list):
        return [op["value"] for op in data if isinstance(op, dict) and op.get("path") == "/spec/template"]
    return []


def intercept(monkeypatch: pytest.MonkeyPatch, k8s: kmock.KubernetesEmulator,
              before: Callable[[Any], None]) -> None:
    """Run `before(request)` on every request, ahead of the emulator (it may raise or rewrite)."""
    cls = type(k8s)
    original: Handler = cls._handle

    async def _handle(self: Any, request: Any) -> Any:
        before(request)
        return await original(self, request)

    monkeypatch.setattr(cls, "_handle", _handle)


def store_canonical_quantities(request: Any) -> None:
    for template in _templates(request):
        for container in template.get("spec", {}).get("containers", []):
            for amounts in (container.get("resources") or {}).values():
                for name, amount in amounts.items():
                    amounts[name] = canonical(amount)


async def test_non_canonical_quantities_are_not_drift(
    k8s: kmock.KubernetesEmulator, cluster: Cluster, operator: None, redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    intercept(monkeypatch, k8s, store_canonical_quantities)
    await cluster.create_platform(chat_platform(
        redis={"urls": [redis_url]}, scaling=FAST,
        protocol={"resources": {"requests": {"cpu": 1, "memory": "1024Mi"}, "limits": {"cpu": "0.5"}}}))
    await eventually(lambda: cluster.platform().raw.get("status", {}).get("worker"))
    deployment = cluster.obj("apps/v1/deployments", "chat-protocol")
    assert deployment.raw["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "1", "memory": "1Gi"}  # what a real API server keeps
    versions = len(deployment.history)
    await asyncio.sleep(3.5)  # three more polls
    assert len(deployment.history) == versions, "the template was rewritten although only its spelling differs"
    assert not cluster.events("DriftReverted")


async def test_a_rejected_child_does_not_stop_the_other_role_from_scaling(
    k8s: kmock.KubernetesEmulator, cluster: Cluster, operator: None, redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rejecting = False

    def reject_protocol_templates(request: Any) -> None:
        if rejecting and request.name == "chat-protocol" and _templates(request):
            raise kmock.KubernetesError(
                status=422, reason="Invalid",
                message='Deployment.apps "chat-protocol" is invalid: spec.template.spec.containers[0].'
                        'resources.requests: Invalid value: "2": must be less than or equal to cpu limit')

    intercept(monkeypatch, k8s, reject_protocol_templates)
    await cluster.create_platform(chat_platform(
        redis={"urls": [redis_url]}, scaling=FAST, worker={"targetQueueDepthPerReplica": 10}))
    await eventually(lambda: cluster.platform().raw.get("status", {}).get("worker"))

    rejecting = True  # the next template of the protocol Deployment is refused, every time
    await cluster.patch(PLATFORM_URL, {"spec": {"protocol": {
        "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}}})
    condition = await eventually(lambda: (c := cluster.condition("Ready"))["reason"] == "ConvergeFailed" and c)
    assert condition["message"].startswith("protocol: ")
    assert "must be less than or equal to cpu limit" in condition["message"]

    fill_queue(redis_url, 35)
    await eventually(lambda: cluster.replicas("worker") == 4)  # ceil(35 / 10): workers still scale
    # The rejected spec is not claimed as observed, and the failure is one Event, not one per poll.
    assert cluster.platform().raw["status"].get("observedGeneration") == 1
    await asyncio.sleep(2)
    assert len(cluster.events("ConvergeFailed")) == 1


async def test_a_drift_that_comes_back_every_poll_is_one_event(
    k8s: kmock.KubernetesEmulator, cluster: Cluster, operator: None, redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def registry_mirror_webhook(request: Any) -> None:
        if request.name == "chat-protocol" or (isinstance(request.data, dict) and request.data.get(
                "metadata", {}).get("name") == "chat-protocol"):
            for template in _templates(request):
                for container in template["spec"]["containers"]:
                    container["image"] = container["image"].replace("registry.example", "mirror.example")

    intercept(monkeypatch, k8s, registry_mirror_webhook)
    await cluster.create_platform(chat_platform(redis={"urls": [redis_url]}, scaling=FAST))
    await eventually(lambda: cluster.events("DriftReverted"))
    deployment = cluster.obj("apps/v1/deployments", "chat-protocol")
    versions = len(deployment.history)
    await eventually(lambda: len(deployment.history) >= versions + 3, timeout=6)  # it keeps coming back
    assert len(cluster.events("DriftReverted")) == 1
