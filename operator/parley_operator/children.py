"""Create or converge the children of a ChatPlatform: Deployments, Services, PDBs.

Idempotent: an object that already matches is not written. Drift is judged only on the fields
the operator sets (`resources.is_subset`), because the API server adds defaults we never set.
A Deployment's replica count belongs to the autoscaler, not to this module, except that it is
kept inside the spec's min/max.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from parley_operator import resources
from parley_operator.kube import Kube, NotFound, path
from parley_operator.spec import PlatformSpec

log = logging.getLogger(__name__)


def _owned_by(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _check_owner(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> None:
    if not _owned_by(obj, owner):
        kind, name = obj.get("kind", "object"), obj["metadata"]["name"]
        # Never adopt what someone else made: it may be another team's Deployment.
        raise kopf.TemporaryError(f"{kind} {name} exists and is not owned by this ChatPlatform", delay=30)


async def _get_or_create(kube: Kube, collection: str, desired: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    try:
        return await kube.get(f"{collection}/{desired['metadata']['name']}"), False
    except NotFound:
        created = await kube.create(collection, desired)
        log.info("created %s %s", desired["kind"], desired["metadata"]["name"])
        return created, True


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

    actual_spec = actual.get("spec") or {}
    if not resources.is_subset(desired["spec"]["template"], actual_spec.get("template")):
        # Replace the whole template rather than merge: a merge patch would keep fields someone
        # added by hand (an extra annotation, a nodeSelector), and those would survive forever.
        actual = await kube.json_patch(url, [
            {"op": "replace", "path": "/spec/template", "value": desired["spec"]["template"]},
        ])
        if spec_changed:
            kopf.event(owner, type="Normal", reason="RollingOut",
                       message=f"{role} Deployment template updated from the spec")
        else:
            kopf.event(owner, type="Warning", reason="DriftReverted",
                       message=f"{role} Deployment template was edited by hand; restored from the spec")
        log.info("patched the %s Deployment template (spec_changed=%s)", role, spec_changed)

    patch: dict[str, Any] = {}
    for key in ("strategy", "revisionHistoryLimit"):
        if not resources.is_subset(desired["spec"][key], actual_spec.get(key)):
            patch.setdefault("spec", {})[key] = desired["spec"][key]
    if not resources.is_subset(desired["metadata"]["labels"], actual["metadata"].get("labels")):
        patch["metadata"] = {"labels": desired["metadata"]["labels"]}
    replicas = actual_spec.get("replicas", 1)
    clamped = max(bounds.min_replicas, min(bounds.max_replicas, replicas))
    if clamped != replicas:
        patch.setdefault("spec", {})["replicas"] = clamped
        kopf.event(owner, type="Normal", reason="ScaledToBounds",
                   message=f"{role}: {replicas} -> {clamped} to fit min/max {bounds.min_replicas}/"
                           f"{bounds.max_replicas}")
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


async def ensure_children(
    kube: Kube, owner: Mapping[str, Any], spec: PlatformSpec, spec_changed: bool = False,
) -> dict[str, dict[str, Any]]:
    """Converge every child; return the Deployments by role as the API server has them now."""
    deployments: dict[str, dict[str, Any]] = {}
    for role in resources.ROLES:
        deployments[role] = await ensure_deployment(kube, owner, spec, role, spec_changed)
        await ensure_simple(kube, owner, resources.service(owner, role), "services")
        await ensure_simple(kube, owner, resources.pod_disruption_budget(owner, role), "poddisruptionbudgets")
    return deployments
