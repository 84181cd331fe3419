"""Rendering the chart with the real helm binary (from `make helm-deps`), and reading the result."""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "var" / "tools" / "bin"
PRESETS = ("values-small.yaml", "values-400k.yaml")
# Every way the chart is meant to be rendered: defaults, each preset, and the optional features.
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "small": ("-f", "values-small.yaml"),
    "400k": ("-f", "values-400k.yaml"),
    "everything-on": ("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
                      "--set", "gateway.enabled=true", "--set", "gateway.parentRefs[0].name=public",
                      "--set", "ingress.tls.enabled=true", "--set", "operator.clusterWide=true"),
    "external-services": ("--set", "redis.enabled=false", "--set", "externalRedis.urls[0]=rediss://:pw@redis.example:6380/0",
                          "--set", "postgresql.enabled=false",
                          "--set", "database.url=postgres://parley:pw@db.example:5432/parley"),
}
# Kinds whose schemas are not Kubernetes' own (CRDs): validated otherwise or not at all.
CUSTOM_KINDS = {"ChatPlatform", "ServiceMonitor", "PrometheusRule", "HTTPRoute"}
POD_KINDS = {"Deployment", "StatefulSet", "Job", "Pod", "DaemonSet", "ReplicaSet"}


def tool(name: str) -> str:
    for candidate in (TOOLS / name, ROOT / ".venv" / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"{name} not found: run `make helm-deps` (installs it into var/tools/bin)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": str(ROOT / "var" / "helm" / "cache"),
           "HELM_CONFIG_HOME": str(ROOT / "var" / "helm" / "config"),
           "HELM_DATA_HOME": str(ROOT / "var" / "helm" / "data")}
    result = subprocess.run([tool("helm"), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


@functools.cache
def render_text(*args: str, include_crds: bool = False) -> str:
    extra = ("--include-crds",) if include_crds else ()
    return helm("template", "chat", ".", "-n", "chat", *extra, *args).stdout


def render(*args: str, include_crds: bool = False) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(*args, include_crds=include_crds)) if d]


def of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod (metadata + spec) an object runs."""
    if obj["kind"] == "Pod":
        return {"metadata": obj["metadata"], "spec": obj["spec"]}
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def operator_children(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments the operator would create from the rendered ChatPlatform (same code)."""
    from op_testkit import admit

    from parley_operator import resources, spec

    platform = one(docs, "ChatPlatform")
    body = admit({**platform, "metadata": {**platform["metadata"], "uid": "uid-rendered"}})
    parsed = spec.parse_body(body)
    out: list[dict[str, Any]] = []
    for role in resources.ROLES:
        out.append(resources.deployment(body, parsed, role, replicas=1))
        out.append(resources.service(body, role))
        out.append(resources.pod_disruption_budget(body, role))
    return out


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(description, pod template) of every pod the release runs, the operator's included."""
    for obj in [*docs, *operator_children(docs)]:
        if obj.get("kind") in POD_KINDS:
            yield f"{obj['kind']}/{obj['metadata']['name']}", pod_template(obj)


def secret_values(docs: Iterable[dict[str, Any]]) -> set[str]:
    values: set[str] = set()
    for secret in of_kind(docs, "Secret"):
        for raw in (secret.get("data") or {}).values():
            values.add(base64.b64decode(raw).decode())
        values.update((secret.get("stringData") or {}).values())
    return values
