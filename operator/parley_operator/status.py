"""Status conditions in the metav1.Condition shape, with honest lastTransitionTime."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CONDITION_TYPES = ("Ready", "MetricsAvailable", "Scaling")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def now_iso(now: float | None = None) -> str:
    moment = datetime.datetime.now(datetime.UTC) if now is None else datetime.datetime.fromtimestamp(
        now, datetime.UTC)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge_conditions(
    previous: Iterable[Mapping[str, Any]] | None,
    updates: Iterable[Condition],
    generation: int | None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """New condition list: lastTransitionTime moves only when a condition's status flips."""
    by_type = {c.get("type"): dict(c) for c in previous or () if c.get("type")}
    for cond in updates:
        status = "True" if cond.status else "False"
        old = by_type.get(cond.type)
        flipped = old is None or old.get("status") != status
        by_type[cond.type] = {
            "type": cond.type,
            "status": status,
            "reason": cond.reason,
            "message": cond.message[:1024],
            "lastTransitionTime": now_iso(now) if flipped else old.get("lastTransitionTime", now_iso(now)),
            **({"observedGeneration": generation} if generation is not None else {}),
        }
    ordered = [by_type.pop(t) for t in CONDITION_TYPES if t in by_type]
    return ordered + list(by_type.values())


def readiness(deployments: Mapping[str, Mapping[str, Any]]) -> Condition:
    lagging = []
    for role, dep in deployments.items():
        want = (dep.get("spec") or {}).get("replicas", 1)
        ready = (dep.get("status") or {}).get("readyReplicas", 0) or 0
        if ready < want:
            lagging.append(f"{role} {ready}/{want} ready")
    if lagging:
        return Condition("Ready", False, "ReplicasNotReady", "; ".join(lagging))
    return Condition("Ready", True, "AllReplicasReady", "every desired protocol and worker pod is ready")


def summary(deployments: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {
        role: f"{(dep.get('status') or {}).get('readyReplicas', 0) or 0}/{(dep.get('spec') or {}).get('replicas', 1)}"
        for role, dep in deployments.items()
    }
