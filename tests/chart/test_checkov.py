"""checkov on the rendered manifests (the operator's children included) and on the Dockerfile;
hadolint on the Dockerfile. Each skipped check says why; each scan must really have run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .chartkit import ROOT, TOOLS, VARIANTS, operator_children, render, tool

CHECKOV = TOOLS.parent / "checkov" / "bin" / "checkov"

# Skipped Kubernetes checks, with the reason each does not apply.
K8S_SKIPS = {
    # CPU limits throttle a latency-bound WebSocket server (CFS quota) without protecting anyone:
    # requests reserve CPU for scheduling; memory limits are set on every container.
    "CKV_K8S_11": "no CPU limits on purpose; requests + memory limits are set",
    # Tags are pinned (and a digest can be given: global.image.digest, redis/postgresql.image.digest);
    # Always would make every pod start depend on the registry.
    "CKV_K8S_15": "pinned tags/digests with IfNotPresent",
    # A digest is supported for every image but no default one can be known before your build.
    "CKV_K8S_43": "digest supported via values, not defaultable",
    # The app reads DATABASE_URL, SECRET_KEY and REDIS_URLS from the environment (security
    # contract, app/parley/config.py); they come from secretKeyRef, never from plain values.
    # Redis and PostgreSQL read theirs from mounted files.
    "CKV_K8S_35": "the app's contract is env from secretKeyRef",
    # The operator talks to the API server: it needs its token (and only it gets one).
    "CKV_K8S_38": "the operator must mount its service-account token",
    # The operator's only endpoint is kopf's liveness; it receives no traffic to be ready for.
    # The helm test Pod runs to completion.
    "CKV_K8S_9": "operator and helm test receive no traffic",
    "CKV_K8S_8": "the helm test Pod runs to completion in seconds",
}
DOCKER_SKIPS = {
    # One image for several roles with different ports (protocol 8000, worker 9100, operator 8080);
    # Kubernetes probes each role itself (liveness /healthz, readiness /readyz).
    "CKV_DOCKER_2": "roles differ; Kubernetes probes them",
}


def checkov(target: Path, framework: str, skips: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail("checkov not installed: run `make helm-deps`")
    result = subprocess.run(
        [str(CHECKOV), "-f", str(target), "--framework", framework, "--skip-check", ",".join(skips),
         "-o", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    data = json.loads(result.stdout)
    report = data[0] if isinstance(data, list) else data
    failed = [(f["check_id"], f["resource"], f["check_name"]) for f in report["results"]["failed_checks"]]
    assert not failed, "\n".join(map(str, failed))
    assert result.returncode == 0, result.stderr
    return report


@pytest.mark.parametrize("variant", ["default", "400k", "everything-on"])
def test_checkov_passes_on_the_rendered_manifests(variant: str, tmp_path: Path) -> None:
    docs = render(*VARIANTS[variant])
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all([*docs, *operator_children(docs)]))
    report = checkov(manifest, "kubernetes", K8S_SKIPS, tmp_path)
    summary = report["summary"]
    # The scan really ran: it read every object and ran hundreds of checks on them.
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= len(docs)
    assert summary["passed"] >= 300
    checked = {c["resource"].split(".")[0] for c in report["results"]["passed_checks"]}
    assert {"Deployment", "StatefulSet", "Job", "Pod"} <= checked
    # Skipped ones are reported as skipped, not silently passed.
    assert {c["check_id"] for c in report["results"]["skipped_checks"]} <= set(K8S_SKIPS)


def test_checkov_passes_on_the_dockerfile(tmp_path: Path) -> None:
    report = checkov(ROOT / "Dockerfile", "dockerfile", DOCKER_SKIPS, tmp_path)
    assert report["summary"]["resource_count"] == 1
    assert report["summary"]["passed"] >= 20
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    assert "CKV_DOCKER_3" in passed  # a USER that is not root
    assert "CKV_DOCKER_8" in passed


def test_hadolint_is_clean() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", "Dockerfile"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and it really lints: a bad Dockerfile fails.
    bad = subprocess.run([tool("hadolint"), "--no-color", "-"], input="FROM python:latest\nRUN cd /x && ls\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout


def test_the_dockerfile_keeps_its_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) == 2 and all("${PYTHON_VERSION}-slim-bookworm${BASE_DIGEST}" in f for f in froms)
    assert "ARG PYTHON_VERSION=3.11." in text and 'ARG BASE_DIGEST=""' in text
    assert "USER 10001:10001" in text
    assert 'ENTRYPOINT ["parley"]' in text
    assert "collectstatic" in text
    final = text.rsplit(froms[1] + "\n", 1)[1]
    assert "apt-get" not in final and "gcc" not in final and "pip install" not in final
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for path in (".venv/", "var/", "build/", "tests/"):
        assert path in ignored
