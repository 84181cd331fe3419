"""Create or converge the children of a ChatPlatform: Deployments, Services, PDBs.

Idempotent: an object that already matches is not written. Drift is judged only on the fields
the operator sets (`resources.is_subset`), because the API server adds defaults we never set,
and resource quantities are compared by value, because it rewrites them (`quantity`).

A Deployment's replica count belongs to the autoscaler, not to this module: a Deployment is
created at minReplicas, and after that only the autoscaler's paced, cost-annotated path changes
its replicas, also when a spec edit moves min/max (`scaling.Policy.bound`). Clamping here would
drain 25 of 30 pods in one patch when maxReplicas drops to 5.

One child that cannot be converged (the API server rejects it with a 422, it belongs to someone
else) does not stop the others: each role is converged on its own, and the autoscaler keeps
scaling every Deployment that exists.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from parley_operator import events, quantity, resources
from parley_operator import status as st
from parley_operator.kube import Kube, KubeError, NotFound, path
from parley_operator.spec import PlatformSpec

log = logging.getLogger(__name__)


class ChildError(Exception):
    """A child could not be converged; `current` is the Deployment as it is, if it exists and
    is ours (it can still be scaled)."""

    def __init__(self, message: str, current: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.current = current


@dataclass
class Converged:
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by role; only those that exist
    errors: dict[str, str] = field(default_factory=dict)  # by role: why its children are not as the spec says

    def readiness(self) -> st.Condition:
        if self.errors:
            return st.Condition("Ready", False, "ConvergeFailed", "; ".join(
                f"{role}: {error}" for role, error in self.errors.items()))
        return st.readiness(self.deployments)


def _owned_by(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _check_owner(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> None:
    if not _owned_by(obj, owner):
        kind, name = obj.get("kind", "object"), obj["metadata"]["name"]
        # Never adopt what someone else made: it may be another team's Deployment.
        raise ChildError(f"{kind} {name} exists and is not owned by this ChatPlatform")


async def _get_or_create(kube: Kube, collection: str, desired: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    try:
        return await kube.get(f"{collection}/{desired['metadata']['name']}"), False
    except NotFound:
        created = await kube.create(collection, desired)
        log.info("created %s %s", desired["kind"], desired["metadata"]["name"])
        return created, True


def _comparable(template: Any) -> Any:
    """A pod template with every container's requests/limits as exact values."""
    if not isinstance(template, Mapping):
        return template
    result = copy.deepcopy(dict(template))
    pod = result.get("spec")
    if not isinstance(pod, dict):
        return result
    for key in ("containers", "initContainers"):
        for container in pod.get(key) or []:
            res = container.get("resources") if isinstance(container, dict) else None
            if not isinstance(res, dict):
                continue
            for kind in ("requests", "limits"):
                if isinstance(res.get(kind), dict):
                    res[kind] = {name: quantity.comparable(v) for name, v in res[kind].items()}
    return result


def template_matches(desired: Mapping[str, Any], actual: Any) -> bool:
    """Whether the stored pod template carries every field of ours, quantities by value."""
    return resources.is_subset(_comparable(desired), _comparable(actual))


async def ensure_deployment(
    kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, role: str, spec_changed: bool,
) -> dict[str, Any]:
    ns = owner["metadata"]["namespace"]
    bounds = spec.protocol if role == "protocol" else spec.worker
    desired = resources.deployment(owner, spec, role, replicas=bounds.min_replicas)
    collection = path("apps/v1", "deployments", ns)
    actual, created = await _get_or_create(kube, collection, desired)
    if created:
        return actual
    _check_owner(actual, owner)
    url = f"{collection}/{desired['metadata']['name']}"
    try:
        return await _converge_deployment(kube, owner, url, desired, actual, role, spec_changed)
    except KubeError as exc:
        raise ChildError(str(exc), current=actual) from exc


async def _converge_deployment(
    kube: Kube, owner: Mapping[str, Any], url: str, desired: Mapping[str, Any], actual: dict[str, Any],
    role: str, spec_changed: bool,
) -> dict[str, Any]:
    actual_spec = actual.get("spec") or {}
    if not template_matches(desired["spec"]["template"], actual_spec.get("template")):
        # Replace the whole template rather than merge: a merge patch would keep fields someone
        # added by hand (an extra annotation, a nodeSelector), and those would survive forever.
        actual = await kube.json_patch(url, [
            {"op": "replace", "path": "/spec/template", "value": desired["spec"]["template"]},
        ])
        if spec_changed:
            events.post(owner, type="Normal", reason="RollingOut",
                        message=f"{role} Deployment template updated from the spec")
        else:
            events.post(owner, type="Warning", reason="DriftReverted",
                        message=f"{role} Deployment template was edited by hand; restored from the spec")
        log.info("patched the %s Deployment template (spec_changed=%s)", role, spec_changed)

    patch: dict[str, Any] = {}
    for key in ("strategy", "revisionHistoryLimit"):
        if not resources.is_subset(desired["spec"][key], actual_spec.get(key)):
            patch.setdefault("spec", {})[key] = desired["spec"][key]
    # What bounds a rollout's concurrent drains (resources.min_ready_seconds) must reach the
    # Deployments made before it existed too. The API server omits it when 0: compare as numbers.
    min_ready = desired["spec"].get("minReadySeconds", 0)
    if actual_spec.get("minReadySeconds", 0) != min_ready:
        patch.setdefault("spec", {})["minReadySeconds"] = min_ready
    if not resources.is_subset(desired["metadata"]["labels"], actual["metadata"].get("labels")):
        patch["metadata"] = {"labels": desired["metadata"]["labels"]}
    if patch:
        actual = await kube.merge_patch(url, patch)
    return actual


async def ensure_simple(kube: Kube, owner: Mapping[str, Any], desired: Mapping[str, Any], plural: str) -> None:
    """Services and PDBs: merge-patch our fields (a Service's clusterIP is the server's)."""
    ns = owner["metadata"]["namespace"]
    collection = path(desired["apiVersion"], plural, ns)
    actual, created = await _get_or_create(kube, collection, desired)
    if created:
        return
    _check_owner(actual, owner)
    if not resources.is_subset(desired["spec"], actual.get("spec")) or not resources.is_subset(
        desired["metadata"]["labels"], actual["metadata"].get("labels")
    ):
        await kube.merge_patch(f"{collection}/{desired['metadata']['name']}",
                               {"metadata": {"labels": desired["metadata"]["labels"]}, "spec": desired["spec"]})
        log.info("patched %s %s", desired["kind"], desired["metadata"]["name"])


async def _ensure_role(kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, role: str, spec_changed: bool,
                       result: Converged) -> None:
    try:
        result.deployments[role] = await ensure_deployment(kube, owner, spec, role, spec_changed)
    except ChildError as exc:
        if exc.current is not None:
            result.deployments[role] = exc.current
        result.errors[role] = str(exc)
    except KubeError as exc:  # the Deployment could be neither read nor created
        result.errors[role] = str(exc)
    for desired, plural in ((resources.service(owner, role), "services"),
                            (resources.pod_disruption_budget(owner, role), "poddisruptionbudgets")):
        try:
            await ensure_simple(kube, owner, desired, plural)
        except (ChildError, KubeError) as exc:
            result.errors[role] = "; ".join(filter(None, (result.errors.get(role), str(exc))))


async def ensure_children(
    kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, spec_changed: bool = False,
) -> Converged:
    """Converge every child, each role on its own; the Deployments as the API server has them
    now, and what could not be converged."""
    result = Converged()
    for role in resources.ROLES:
        await _ensure_role(kube, owner, spec, role, spec_changed, result)
        if role in result.errors:
            events.post(owner, type="Warning", reason="ConvergeFailed",
                        message=f"{role}: {result.errors[role]}"[:1024])
            log.warning("cannot converge the %s children of %s: %s", role,
                        owner["metadata"]["name"], result.errors[role])
    return result
