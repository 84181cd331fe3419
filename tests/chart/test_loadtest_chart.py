"""helm/parley-loadtest and loadtest/Dockerfile: linted, rendered, validated and scanned; the load
pods' own commands run for real (a Locust master and worker, the users-file wait, the mint) in a
sandbox laid out like the pods: /loadtest, /users, /reports and /tmp bound, the root read-only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from . import imagekit
from .chartkit import ROOT, helm, of_kind, one, operator_children, pod_template, render, tool
from .test_checkov import checkov
from .test_render import K8S_VERSION

CHART = "helm/parley-loadtest"
VALUES = yaml.safe_load((ROOT / CHART / "values.yaml").read_text())
# Test inputs standing in for the per-1,000-user cost the lead measures (values.yaml holds
# placeholders until then): not measurements.
COST = ("--set", "workers.cost.cpuPer1000Users=0.05", "--set", "workers.cost.memoryMiPer1000Users=40")
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": COST,
    # values-400k.yaml starts the platform with 50 protocol pods.
    "400k": (*COST, "--set", "locust.targetUsers=400000", "--set", "workers.replicas=40",
             "--set", "locust.rampRate=1000", "--set", "platform.protocolPods=50"),
    "existing-claim": (*COST, "--set", "usersFile.persistence.existingClaim=my-users", "--set", "mint.enabled=false"),
    "web-ui": (*COST, "--set", "locust.webUI=true", "--set", "networkPolicy.admitToPlatform=true",
               "--set-json", 'networkPolicy.webUIFrom=[{"podSelector":{"matchLabels":{"role":"sre"}}}]'),
    "web-ui-autostart": (*COST, "--set", "locust.webUI=true", "--set", "locust.autostart=true"),
    "no-users-file": (*COST, "--set", "usersFile.enabled=false", "--set", "mint.enabled=false",
                      "--set", "networkPolicy.enabled=false"),
    "explicit-resources": ("--set-json",
                           'workers.resources={"requests":{"cpu":"900m","memory":"1Gi"},"limits":{"memory":"2Gi"}}'),
}
ALL_OPTIONS = (*VARIANTS["400k"], "--set", "locust.mix=idle=70\\,group=20\\,dm=5\\,bot=5",
               "--set", "locust.messageRate=2.5", "--set", "locust.minConnectSuccess=0.999",
               "--set", "locust.maxDeliveryP99Ms=250", "--set", "locust.holdSeconds=900",
               "--set-json", 'locust.extraArgs=["--settle-seconds","45"]')

# checkov's Kubernetes checks that do not apply to a load generator, each with its reason.
K8S_SKIPS = {
    # A CFS quota throttles the Locust process in bursts, and its timings (connect, ack, delivery
    # latency) would then measure the throttling: requests reserve the CPU, memory is limited.
    "CKV_K8S_11": "no CPU limits on a load generator; requests + memory limits are set",
    # As for the platform chart: pinned tags, a digest can be given (image.digest, mint.image.digest).
    "CKV_K8S_15": "pinned tags/digests with IfNotPresent",
    "CKV_K8S_43": "digest supported via values, not defaultable",
    # The mint runs the Parley image, whose contract is DATABASE_URL/SECRET_KEY from the environment.
    "CKV_K8S_35": "the Parley image's contract is env from secretKeyRef",
    # A liveness restart would lose the run (the master's stats, a worker's users); Locust's own
    # heartbeats (1 s) find a silent peer. Workers serve nothing, so readiness gates no traffic.
    "CKV_K8S_8": "a restart mid-run loses it; Locust's heartbeats watch the processes",
    "CKV_K8S_9": "workers serve nothing (no Service selects them)",
}
DOCKER_SKIPS = {
    # Kubernetes probes the master's port itself; a worker serves nothing to check.
    "CKV_DOCKER_2": "Kubernetes probes the master; a worker serves nothing",
}


def template(*args: str, release: str = "lt", check: bool = True) -> subprocess.CompletedProcess[str]:
    return helm("template", release, CHART, "-n", "chat", *args, check=check)


@functools.cache
def _render_text(*args: str) -> str:
    return template(*args).stdout


def lt_render(*args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render_text(*args)) if d]


def container(docs: list[dict[str, Any]], kind: str, name: str, which: str) -> dict[str, Any]:
    spec = pod_template(one(docs, kind, name))["spec"]
    (found,) = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == which]
    return found


def mint_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = of_kind(docs, "Job")
    return job


def locust_args(c: dict[str, Any]) -> list[str]:
    """What `sh -c SCRIPT NAME ARGS...` hands to `locust "$@"`."""
    assert c["command"] == ["sh", "-c"] and 'locust "$@"' in c["args"][0]
    return c["args"][2:]


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# -- lint, render, validate, scan ------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint(variant: str) -> None:
    result = helm("lint", CHART, "--strict", *VARIANTS[variant], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid_kubernetes(variant: str) -> None:
    docs = lt_render(*VARIANTS[variant])
    for obj in docs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any unknown field
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == 2 and "Service" in kinds
    assert ("Job" in kinds) == (variant not in ("existing-claim", "no-users-file"))
    assert ("PersistentVolumeClaim" in kinds) == (variant not in ("existing-claim", "no-users-file"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_meets_pod_security_restricted(variant: str) -> None:
    docs = lt_render(*VARIANTS[variant])
    pods = [(d["metadata"]["name"], pod_template(d)) for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) >= 2
    for where, pod in pods:
        spec = pod["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim"}, (where, volume)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            name = f"{where}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
            assert c["resources"]["limits"]["memory"], name
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, f"{name}: no writable /tmp"


@pytest.mark.parametrize("variant", ["default", "400k", "web-ui"])
def test_checkov_passes_on_the_rendered_manifests(variant: str, tmp_path: Path) -> None:
    docs = lt_render(*VARIANTS[variant])
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    report = checkov(manifest, "kubernetes", K8S_SKIPS, tmp_path)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= len(docs)
    assert summary["passed"] >= 200  # it really ran its checks on every object
    assert {c["resource"].split(".")[0] for c in report["results"]["passed_checks"]} >= {"Deployment", "Job"}
    assert {c["check_id"] for c in report["results"]["skipped_checks"]} <= set(K8S_SKIPS)


# -- what the values do -----------------------------------------------------------------------------


def test_the_spawn_rate_guard_refuses_more_than_100_per_worker() -> None:
    many_pods = ("--set", "platform.protocolPods=50")  # the handshake guard (below) out of the way
    refused = template(*COST, *many_pods, "--set", "locust.rampRate=201", "--set", "workers.replicas=2", check=False)
    assert refused.returncode != 0
    assert "locust.rampRate 201 users/s over 2 workers is 100.5 spawns/s per worker" in refused.stderr
    assert "workers.replicas >= 3" in refused.stderr
    template(*COST, *many_pods, "--set", "locust.rampRate=200", "--set", "workers.replicas=2")  # exactly 100 each
    template(*COST, *many_pods, "--set", "locust.rampRate=4000", "--set", "workers.replicas=40",
             "--set", "locust.targetUsers=400000")
    refused = template(*COST, *many_pods, "--set", "locust.rampRate=4000.5", "--set", "workers.replicas=40",
                       "--set", "locust.targetUsers=400000", check=False)
    assert refused.returncode != 0 and "spawns/s per worker" in refused.stderr


def test_the_handshake_guard_keeps_each_worker_under_the_platforms_throttle() -> None:
    # One worker pod is one client address; its handshakes spread over the protocol pods, each of
    # which throttles an address at PARLEY_HANDSHAKES_PER_SECOND (10).
    refused = template(*COST, "--set", "locust.rampRate=41", check=False)
    assert refused.returncode != 0
    assert ("locust.rampRate 41 users/s over 2 workers and 2 protocol pods is 10.2 handshakes/s from one "
            "worker's address to one protocol process, above the platform's limit of 10") in refused.stderr
    template(*COST, "--set", "locust.rampRate=40")
    template(*COST, "--set", "locust.rampRate=41", "--set", "platform.protocolPods=3")
    template(*COST, "--set", "locust.rampRate=41", "--set", "platform.handshakesPerSecond=20.5")
    assert template(*COST, "--set", "locust.rampRate=41", "--set", "workers.replicas=3").returncode == 0
    # A platform that exempts the load pods (its handshakeLimit.exempt) does not hold the ramp back.
    assert template(*COST, "--set", "locust.rampRate=200", "--set", "platform.exemptsLoad=true").returncode == 0


def test_workers_are_sized_from_the_measured_cost_per_1000_users() -> None:
    docs = lt_render(*VARIANTS["400k"])
    worker = container(docs, "Deployment", "lt-loadtest-worker", "worker")
    # 400,000 users over 40 workers: 10,000 each. 0.05 cores and 40 MiB per 1,000 (the test's
    # stand-ins) plus the idle worker's 64 MiB; the limit 1.5x the request.
    assert worker["resources"] == {"requests": {"cpu": "500m", "memory": "464Mi"}, "limits": {"memory": "696Mi"}}
    explicit = container(lt_render(*VARIANTS["explicit-resources"]), "Deployment", "lt-loadtest-worker", "worker")
    assert explicit["resources"]["requests"] == {"cpu": "900m", "memory": "1Gi"}
    # More users per worker than one Locust process can drive below 90 % of its core: refused.
    refused = template("--set", "workers.cost.cpuPer1000Users=0.1", "--set", "workers.cost.memoryMiPer1000Users=40",
                       "--set", "locust.targetUsers=400000", "--set", "workers.replicas=40",
                       "--set", "locust.rampRate=1000", "--set", "platform.protocolPods=50", check=False)
    assert refused.returncode != 0 and "10000 users per worker need 1000m CPU" in refused.stderr


def test_the_chart_ships_measured_costs_or_refuses_to_guess() -> None:
    cost = VALUES["workers"]["cost"]
    measured = ROOT / "docs" / "loadtest.json"
    if cost["cpuPer1000Users"] is None or cost["memoryMiPer1000Users"] is None:
        result = template(check=False)
        assert result.returncode != 0
        assert "workers.cost.cpuPer1000Users and workers.cost.memoryMiPer1000Users are placeholders" in result.stderr
        return
    docs = lt_render()
    requests = container(docs, "Deployment", "lt-loadtest-worker", "worker")["resources"]["requests"]
    users = -(-VALUES["locust"]["targetUsers"] // VALUES["workers"]["replicas"])
    assert requests["cpu"] == f"{math.ceil(users * float(cost['cpuPer1000Users']))}m"
    if measured.exists():
        locust = json.loads(measured.read_text()).get("locust", {})
        if "cpu_cores_per_1000_users" in locust:
            assert cost["cpuPer1000Users"] == locust["cpu_cores_per_1000_users"], "values.yaml != docs/loadtest.json"
        if "rss_mb_per_1000_users" in locust:
            assert cost["memoryMiPer1000Users"] == locust["rss_mb_per_1000_users"], "values.yaml != docs/loadtest.json"


def test_more_users_per_worker_than_ephemeral_ports_is_refused_unless_the_range_is_widened() -> None:
    args = (*COST, "--set", "locust.targetUsers=60000", "--set", "workers.replicas=2", "--set", "locust.rampRate=20",
            "--set", "workers.cost.cpuPer1000Users=0.01")
    refused = template(*args, check=False)
    assert refused.returncode != 0 and "30000 users per worker exceed the 28,232 ephemeral ports" in refused.stderr
    sysctl = {"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}
    docs = lt_render(*args, "--set-json", f"workers.sysctls=[{json.dumps(sysctl)}]")
    assert pod_template(one(docs, "Deployment", "lt-loadtest-worker"))["spec"]["securityContext"]["sysctls"] == [sysctl]


def test_master_and_workers_find_each_other_and_the_platform() -> None:
    docs = lt_render(*VARIANTS["400k"])
    master = container(docs, "Deployment", "lt-loadtest-master", "master")
    worker = container(docs, "Deployment", "lt-loadtest-worker", "worker")
    m_args, w_args = locust_args(master), locust_args(worker)
    service = one(docs, "Service", "lt-loadtest-master")
    master_pod = pod_template(one(docs, "Deployment", "lt-loadtest-master"))
    # The Service selects the master, and its 5557 is where the workers go.
    assert service["spec"]["selector"].items() <= master_pod["metadata"]["labels"].items()
    assert flag(w_args, "--master-host") == "lt-loadtest-master" and flag(w_args, "--master-port") == "5557"
    assert {"name": "master", "port": 5557, "targetPort": "master", "protocol": "TCP"} in service["spec"]["ports"]
    assert {"name": "master", "containerPort": 5557, "protocol": "TCP"} in master["ports"]
    assert flag(m_args, "--master-bind-port") == "5557" and "--master" in m_args and "--worker" in w_args
    # The master waits for every worker; headless with reports by default.
    replicas = one(docs, "Deployment", "lt-loadtest-worker")["spec"]["replicas"]
    assert flag(m_args, "--expect-workers") == "40" == str(replicas)
    assert "--headless" in m_args and flag(m_args, "--csv") == "/reports/parley" and "--csv-full-history" in m_args
    assert flag(m_args, "--html") == "/reports/parley.html"
    # Both get the same test options (Locust also forwards them, but a worker reads its share of the
    # users file before the first spawn message).
    for name in ("-f", "--token-file", "--target-users", "--ramp-rate", "--hold-seconds"):
        assert flag(m_args, name) == flag(w_args, name), name
    assert flag(w_args, "--token-file") == "/users/users.jsonl"
    assert flag(w_args, "-f") == VALUES["locust"]["locustfile"]
    # The default target is the platform's protocol Service, as the operator names it (port 80).
    assert flag(m_args, "--host") == "http://chat-protocol.chat.svc.cluster.local"
    platform = render()
    protocol_service = one(operator_children(platform), "Service", "chat-protocol")
    assert 80 in {p["port"] for p in protocol_service["spec"]["ports"]}
    elsewhere = lt_render(*COST, "--set", "platform.release=prod", "--set", "platform.name=parley",
                          "--set", "platform.namespace=apps")
    assert flag(locust_args(container(elsewhere, "Deployment", "lt-loadtest-master", "master")),
                "--host") == "http://parley-protocol.apps.svc.cluster.local"


def test_the_web_ui_is_a_clusterip_port_and_headless_is_the_default() -> None:
    ui = lt_render(*VARIANTS["web-ui"])
    m_args = locust_args(container(ui, "Deployment", "lt-loadtest-master", "master"))
    assert "--headless" not in m_args and "--autostart" not in m_args and flag(m_args, "--web-port") == "8089"
    service = one(ui, "Service", "lt-loadtest-master")
    assert service["spec"]["type"] == "ClusterIP"
    assert {"name": "web", "port": 8089, "targetPort": "web", "protocol": "TCP"} in service["spec"]["ports"]
    autostart = lt_render(*VARIANTS["web-ui-autostart"])
    auto = locust_args(container(autostart, "Deployment", "lt-loadtest-master", "master"))
    assert "--autostart" in auto and "--headless" not in auto
    headless = lt_render(*VARIANTS["default"])
    assert [p["port"] for p in one(headless, "Service", "lt-loadtest-master")["spec"]["ports"]] == [5557]


def test_the_users_file_goes_from_the_mint_to_every_locust_process() -> None:
    docs = lt_render(*VARIANTS["default"])
    pvc = one(docs, "PersistentVolumeClaim", "lt-loadtest-users")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    job = mint_job(docs)
    mint = pod_template(job)["spec"]
    assert mint["containers"][0]["image"] == "parley:0.1.0"
    assert mint["containers"][0]["command"] == ["parley"]
    args = mint["containers"][0]["args"]
    assert args[:2] == ["manage", "loadtest_users"] and flag(args, "--count") == "10000"
    assert flag(args, "--out") == "/users/users.jsonl" and flag(args, "--prefix") == "lt" and "--replace" not in args
    # The mint writes; the master and the workers read, read-only, after waiting for the file.
    readers = [pod_template(one(docs, "Deployment", n))["spec"] for n in ("lt-loadtest-master", "lt-loadtest-worker")]
    for spec in (mint, *readers):
        (users,) = [v for v in spec["volumes"] if v["name"] == "users"]
        assert users["persistentVolumeClaim"]["claimName"] == "lt-loadtest-users"
    for name in ("lt-loadtest-master", "lt-loadtest-worker"):
        spec = pod_template(one(docs, "Deployment", name))["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["wait-for-users"]
        for c in [*spec["initContainers"], *spec["containers"]]:
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "users"]
            assert mount["readOnly"] is True and mount["mountPath"] == "/users"
    # The mint's database credentials: the platform's own Secret, by reference, with its keys.
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in mint["containers"][0]["env"]}
    assert env == {"DATABASE_URL": {"name": "chat-app", "key": "url"},
                   "SECRET_KEY": {"name": "chat-app", "key": "secret-key"}}
    platform_secret = one(render(), "Secret", "chat-app")
    assert {"url", "secret-key"} <= set(platform_secret["data"])
    # The 0600 file: the mint (Parley image) and the Locust pods run as the same uid.
    assert pod_template(job)["spec"]["securityContext"]["runAsUser"] == imagekit.image_user()[0]

    existing = lt_render(*VARIANTS["existing-claim"])
    assert not of_kind(existing, "PersistentVolumeClaim") and not of_kind(existing, "Job")
    for name in ("lt-loadtest-master", "lt-loadtest-worker"):
        volumes = pod_template(one(existing, "Deployment", name))["spec"]["volumes"]
        (users,) = [v for v in volumes if v["name"] == "users"]
        assert users["persistentVolumeClaim"] == {"claimName": "my-users", "readOnly": True}

    none = lt_render(*VARIANTS["no-users-file"])
    for name in ("lt-loadtest-master", "lt-loadtest-worker"):
        spec = pod_template(one(none, "Deployment", name))["spec"]
        assert "initContainers" not in spec and "users" not in {v["name"] for v in spec["volumes"]}
        assert flag(locust_args(spec["containers"][0]), "--token-file") is None
    refused = template(*COST, "--set", "usersFile.enabled=false", check=False)
    assert refused.returncode != 0 and "mint.enabled needs usersFile.enabled" in refused.stderr


def test_the_mint_job_is_renamed_when_its_arguments_change() -> None:
    # A Job's pod template cannot change: new arguments must make a new Job, same ones the same Job.
    name = mint_job(lt_render(*COST))["metadata"]["name"]
    assert name == mint_job(lt_render(*COST, "--set", "locust.holdSeconds=60"))["metadata"]["name"]
    other = mint_job(lt_render(*COST, "--set", "mint.count=20000"))
    assert other["metadata"]["name"] != name and name.startswith("lt-loadtest-mint-")
    assert flag(pod_template(other)["spec"]["containers"][0]["args"], "--count") == "20000"
    replaced = mint_job(lt_render(*COST, "--set", "mint.replace=true",
                                  "--set-json", 'mint.extraArgs=["--seed","7"]'))
    assert pod_template(replaced)["spec"]["containers"][0]["args"][-3:] == ["--replace", "--seed", "7"]


SCHEMA_MISTAKES = [
    ("replicas as text", ["--set-string", "workers.replicas=two"], "/workers/replicas"),
    ("no workers", ["--set", "workers.replicas=0"], "/workers/replicas"),
    ("negative ramp", ["--set", "locust.rampRate=-5"], "/locust/rampRate"),
    ("success ratio above 1", ["--set", "locust.minConnectSuccess=1.5"], "/locust/minConnectSuccess"),
    ("host with a path", ["--set", "locust.host=http://chat/ws/"], "/locust/host"),
    ("misspelt value", ["--set", "workers.replica=3"], "replica"),
    ("file name with a directory", ["--set", "usersFile.fileName=../x"], "/usersFile/fileName"),
    ("prefix with a space", ["--set", "mint.prefix=l t"], "/mint/prefix"),
]


@pytest.mark.parametrize(("name", "args", "where"), SCHEMA_MISTAKES, ids=[m[0] for m in SCHEMA_MISTAKES])
def test_schema_rejects(name: str, args: list[str], where: str) -> None:
    result = template(*COST, *args, check=False)
    assert result.returncode != 0, f"{name}: accepted"
    assert where in result.stderr, result.stderr


# -- network ---------------------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def in_namespace(peer: dict[str, Any], policy_ns: str, ns: str) -> bool:
    """Whether a policy peer covers pods of namespace `ns` (no namespaceSelector: the policy's own)."""
    assert "ipBlock" not in peer, peer
    selector = peer.get("namespaceSelector")
    return ns == policy_ns if selector is None else selects(selector, {"kubernetes.io/metadata.name": ns})


def egress_allows(policy: dict[str, Any], namespace: str, labels: dict[str, str], port: int) -> bool:
    for rule in policy["spec"].get("egress") or []:
        if not any(p["port"] == port for p in rule.get("ports", [])):
            continue
        for peer in rule.get("to", []):
            if in_namespace(peer, policy["metadata"]["namespace"], namespace) and selects(
                    peer.get("podSelector") or {}, labels):
                return True
    return False


def test_network_policies_let_the_load_reach_only_the_master_and_the_platform() -> None:
    docs = lt_render(*VARIANTS["default"])
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    master = pod_template(one(docs, "Deployment", "lt-loadtest-master"))["metadata"]["labels"]
    worker = pod_template(one(docs, "Deployment", "lt-loadtest-worker"))["metadata"]["labels"]
    mint = pod_template(mint_job(docs))["metadata"]["labels"]
    # Each pod has its own policy, with both directions closed by default.
    for name, labels in (("lt-loadtest-master", master), ("lt-loadtest-worker", worker), ("lt-loadtest-mint", mint)):
        assert [n for n, p in policies.items() if selects(p["spec"]["podSelector"], labels)] == [name]
        assert policies[name]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # Into the master: the workers, on 5557 only.
    (rule,) = policies["lt-loadtest-master"]["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5557]
    assert selects(rule["from"][0]["podSelector"], worker) and not selects(rule["from"][0]["podSelector"], mint)
    assert policies["lt-loadtest-master"]["spec"]["egress"] == []
    # Out of the workers: the master, and the pods the operator makes for the platform's protocol
    # tier (their labels, their port), not its workers, Redis or PostgreSQL.
    platform = render()
    children = {c["metadata"]["name"]: c for c in operator_children(platform) if c["kind"] == "Deployment"}
    protocol = pod_template(children["chat-protocol"])
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in protocol["spec"]["containers"][0]["ports"]
    workers_policy = policies["lt-loadtest-worker"]
    assert egress_allows(workers_policy, "chat", master, 5557)
    assert egress_allows(workers_policy, "chat", protocol["metadata"]["labels"], 8000)
    assert not egress_allows(workers_policy, "chat", pod_template(children["chat-worker"])["metadata"]["labels"], 8000)
    postgres = pod_template(one(platform, "StatefulSet", "chat-postgresql"))["metadata"]["labels"]
    redis = pod_template(one(platform, "StatefulSet", "chat-redis"))["metadata"]["labels"]
    assert not egress_allows(workers_policy, "chat", postgres, 5432)
    assert not egress_allows(workers_policy, "chat", redis, 6379)
    assert not egress_allows(workers_policy, "other", protocol["metadata"]["labels"], 8000)
    # Out of the mint: the platform's PostgreSQL only.
    assert egress_allows(policies["lt-loadtest-mint"], "chat", postgres, 5432)
    assert not egress_allows(policies["lt-loadtest-mint"], "chat", protocol["metadata"]["labels"], 8000)
    assert not egress_allows(policies["lt-loadtest-mint"], "chat", redis, 6379)


def notes(*args: str) -> str:
    output = helm("install", "lt", CHART, "-n", "chat", "--dry-run=client", *args).stdout
    assert "\nNOTES:\n" in output
    return output.split("\nNOTES:\n", 1)[1]


def ingress_allows(policies: list[dict[str, Any]], target_ns: str, target: dict[str, str],
                   source_ns: str, source: dict[str, str], port: int) -> bool:
    """Whether the union of `policies` lets `source` into `target` on `port` (the target isolated)."""
    for policy in policies:
        if policy["metadata"]["namespace"] != target_ns or not selects(policy["spec"]["podSelector"], target):
            continue
        for rule in policy["spec"].get("ingress") or []:
            if not any(p["port"] == port for p in rule.get("ports", [])):
                continue
            for peer in rule.get("from", []):
                if in_namespace(peer, target_ns, source_ns) and selects(peer.get("podSelector") or {}, source):
                    return True
    return False


@pytest.mark.parametrize("load_ns", ["chat", "load"])
def test_admit_policies_open_the_platform_to_the_load_pods_only(load_ns: str) -> None:
    platform = render()
    platform_policies = of_kind(platform, "NetworkPolicy")
    protocol = pod_template(one(operator_children(platform), "Deployment", "chat-protocol"))["metadata"]["labels"]
    postgres = pod_template(one(platform, "StatefulSet", "chat-postgresql"))["metadata"]["labels"]
    redis = pod_template(one(platform, "StatefulSet", "chat-redis"))["metadata"]["labels"]
    args = (*COST, "--set", "networkPolicy.admitToPlatform=true", "--set", "platform.namespace=chat")
    docs = [d for d in yaml.safe_load_all(helm("template", "lt", CHART, "-n", load_ns, *args).stdout) if d]
    labels = {c: pod_template(d)["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "Job")
              for c in [d["metadata"]["labels"]["app.kubernetes.io/component"]]}
    admit = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == "chat"
             and p["metadata"]["name"] in ("lt-loadtest-to-protocol", "lt-loadtest-to-postgresql")]
    assert len(admit) == 2
    # The platform's own policies keep the load out; with this release's added, exactly the workers
    # reach the protocol pods and exactly the mint reaches PostgreSQL.
    assert not ingress_allows(platform_policies, "chat", protocol, load_ns, labels["worker"], 8000)
    assert not ingress_allows(platform_policies, "chat", postgres, load_ns, labels["mint"], 5432)
    both = [*platform_policies, *admit]
    assert ingress_allows(both, "chat", protocol, load_ns, labels["worker"], 8000)
    assert ingress_allows(both, "chat", postgres, load_ns, labels["mint"], 5432)
    for component in ("master", "mint"):
        assert not ingress_allows(both, "chat", protocol, load_ns, labels[component], 8000), component
    assert not ingress_allows(both, "chat", postgres, load_ns, labels["worker"], 5432)
    assert not ingress_allows(both, "chat", redis, load_ns, labels["worker"], 6379)
    # From any other namespace, the same labels get nowhere.
    assert not ingress_allows(both, "chat", protocol, "elsewhere", labels["worker"], 8000)


def test_admit_policies_are_added_only_where_the_platform_isolates_its_pods() -> None:
    # "auto" looks the platform's own policies up at install; without a cluster there is none, and a
    # policy on pods that had none would cut them off from everyone else: nothing is added.
    assert not [p for p in of_kind(lt_render(*COST), "NetworkPolicy") if "-to-" in p["metadata"]["name"]]
    assert "adds no NetworkPolicy letting the workers into the platform's protocol pods" in notes(*COST)
    off = lt_render(*COST, "--set", "networkPolicy.admitToPlatform=false", "--set", "networkPolicy.enabled=false")
    assert not of_kind(off, "NetworkPolicy")
    on = lt_render(*COST, "--set", "networkPolicy.admitToPlatform=true")
    assert "adds no NetworkPolicy" not in notes(*COST, "--set", "networkPolicy.admitToPlatform=true")
    assert {p["metadata"]["name"] for p in of_kind(on, "NetworkPolicy")} >= {"lt-loadtest-to-protocol",
                                                                            "lt-loadtest-to-postgresql"}


def test_notes_say_how_to_follow_the_run_and_copy_the_reports() -> None:
    ui = notes(*VARIANTS["web-ui"])
    assert "kubectl -n chat logs -f deploy/lt-loadtest-master" in ui
    assert "kubectl -n chat port-forward svc/lt-loadtest-master 8089:8089" in ui
    assert "kubectl -n chat exec deploy/lt-loadtest-master -- cat /reports/exit-code" in ui
    assert ("kubectl -n chat exec deploy/lt-loadtest-master -- tar cf - -C /reports . "
            "| tar xf - -C loadtest-reports") in ui
    assert "kubectl -n chat exec deploy/lt-loadtest-master -- sh -c 'kill -INT 1'" in ui
    assert "port-forward" not in notes(*COST)  # headless: no web UI to reach


# -- the Locust command lines against the real locustfile ------------------------------------------

PARSE = """
import json, sys
from locust import argument_parser
from locust.util.load_locustfile import load_locustfile
load_locustfile(sys.argv[1])  # registers the locustfile's options, as `locust -f` does
out = []
for args in json.loads(sys.argv[2]):
    opts = argument_parser.get_parser().parse_args(args)
    out.append({k: v for k, v in vars(opts).items() if isinstance(v, (str, int, float, bool, type(None)))})
print(json.dumps(out))
"""


def test_the_locustfile_accepts_every_option_the_chart_passes() -> None:
    locustfile = ROOT / "loadtest" / "locustfile.py"
    assert locustfile.exists(), "the load image runs loadtest/locustfile.py"
    docs = lt_render(*ALL_OPTIONS)
    arg_lists = []
    for deployment, name in (("lt-loadtest-master", "master"), ("lt-loadtest-worker", "worker")):
        args = locust_args(container(docs, "Deployment", deployment, name))
        arg_lists.append([str(locustfile) if a == VALUES["locust"]["locustfile"] else a for a in args])
    result = subprocess.run([sys.executable, "-c", PARSE, str(locustfile), json.dumps(arg_lists)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT / "loadtest")
    assert result.returncode == 0, result.stderr[-3000:]
    master, worker = json.loads(result.stdout.strip().splitlines()[-1])
    for opts in (master, worker):
        assert opts["token_file"] == "/users/users.jsonl"
        assert opts["target_users"] == 400000 and opts["ramp_rate"] == 1000.0 and opts["hold_seconds"] == 900
        assert opts["mix"] == "idle=70,group=20,dm=5,bot=5" and opts["message_rate"] == 2.5
        assert opts["min_connect_success"] == 0.999 and opts["max_delivery_p99_ms"] == 250.0
        assert opts["settle_seconds"] == 45.0
    assert master["master"] and master["headless"] and master["expect_workers"] == 40
    assert master["csv_prefix"] == "/reports/parley" and master["stats_history_enabled"]
    assert master["html_file"] == "/reports/parley.html" and master["host"] == "http://chat-protocol.chat.svc.cluster.local"
    assert worker["worker"] and worker["master_host"] == "lt-loadtest-master" and worker["master_port"] == 5557


# -- the load image ---------------------------------------------------------------------------------

DOCKERFILE = ROOT / "loadtest" / "Dockerfile"


def test_hadolint_is_clean_on_the_load_image() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_passes_on_the_load_image(tmp_path: Path) -> None:
    report = checkov(DOCKERFILE, "dockerfile", DOCKER_SKIPS, tmp_path)
    assert report["summary"]["resource_count"] == 1 and report["summary"]["passed"] >= 20
    assert "CKV_DOCKER_3" in {c["check_id"] for c in report["results"]["passed_checks"]}  # a non-root USER


def _context_admits(rel: str) -> bool:
    """Whether loadtest/Dockerfile.dockerignore lets `rel` into the build context (last match wins)."""
    admitted = True
    for raw in (ROOT / "loadtest" / "Dockerfile.dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "**":
            hit = True
        elif pattern.startswith("**/"):
            parts = rel.split("/")
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = rel == pattern or rel.startswith(pattern + "/") or fnmatch.fnmatch(rel, pattern)
        if hit:
            admitted = negate
    return admitted


def test_the_load_image_holds_what_the_chart_runs() -> None:
    (stage,) = imagekit.parse(DOCKERFILE)
    copies = [rest.split() for instruction, rest in stage.steps if instruction == "COPY"]
    runs = [rest for instruction, rest in stage.steps if instruction == "RUN"]
    sources = {src: dst for src, dst in copies}
    assert set(sources) == {"loadtest/requirements.txt", "loadtest/locustfile.py", "loadtest/parley_locust/"}
    for src in sources:
        path = ROOT / src
        files = [p for p in path.rglob("*.py")] if src.endswith("/") else [path]
        assert files and all(f.exists() for f in files), src
        for f in files:
            assert _context_admits(f.relative_to(ROOT).as_posix()), f"{f} is kept out of the build context"
    for outside in ("app/chat/models.py", "loadtest/bench.py", ".venv/bin/python", "README.md",
                    "loadtest/parley_locust/__pycache__/user.cpython-311.pyc"):
        assert not _context_admits(outside), outside
    # Where the chart looks: the locustfile, with its package beside it (it puts its own directory
    # on sys.path), Locust as the entrypoint, on the uid of the users file's owner.
    assert sources["loadtest/locustfile.py"] == VALUES["locust"]["locustfile"]
    beside = Path(VALUES["locust"]["locustfile"]).parent / "parley_locust"
    assert sources["loadtest/parley_locust/"] == f"{beside}/"
    assert stage.entrypoint == ["locust"]
    assert stage.user == "10001:10001" == "{runAsUser}:{runAsGroup}".format(**VALUES["podSecurityContext"])
    assert imagekit.image_user() == (10001, 10001)  # the Parley image's, which writes the 0600 file
    # Dependencies from loadtest/requirements.txt with the brief's pip flags; the same Python as Parley's image.
    (install,) = [r for r in runs if "pip install" in r]
    assert "--no-cache-dir" in install and f"-r {sources['loadtest/requirements.txt']}" in install
    root_python = re.search(r"^ARG PYTHON_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert root_python and f"ARG PYTHON_VERSION={root_python.group(1)}\n" in DOCKERFILE.read_text()


def _imports(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _installed_modules(requirements: Path) -> set[str]:
    """Top-level modules of the requirements and everything they pull in (their dependency closure)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo = [Requirement(line.split("#")[0].strip()).name for line in requirements.read_text().splitlines()
            if line.split("#")[0].strip()]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for raw in metadata.distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    modules = set()
    for module, dists in metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in seen for d in dists):
            modules.add(module)
    return modules


def test_the_load_image_has_every_module_the_locustfile_imports() -> None:
    # The image holds the locustfile, parley_locust/ and loadtest/requirements.txt, nothing of the
    # app (no Django): an import of anything else would fail only in the cluster.
    code = [ROOT / "loadtest" / "locustfile.py", *(ROOT / "loadtest" / "parley_locust").glob("*.py")]
    available = set(sys.stdlib_module_names) | {"parley_locust", "__future__"} | _installed_modules(
        ROOT / "loadtest" / "requirements.txt")
    assert {"locust", "gevent", "websocket", "zmq"} <= available
    missing = {f"{path.relative_to(ROOT)}: {name}" for path in code for name in _imports(path) - available}
    assert not missing, sorted(missing)


# -- the pods' commands, run for real ---------------------------------------------------------------

# A locustfile standing in for the real one in the run below (that one needs a platform): the real
# command-line options, idle users that record one failure each, and a shape that ramps, holds and
# stops, so the run ends on its own with failures (exit code 1) as a failed threshold would.
STAND_IN_LOCUSTFILE = f"""
import sys
sys.path.insert(0, {str(ROOT / "loadtest")!r})
from locust import LoadTestShape, User, constant, events, task
from parley_locust import options

@events.init_command_line_parser.add_listener
def _options(parser, **_):
    options.add_arguments(parser)

class Idle(User):
    wait_time = constant(0.5)

    @task
    def fail_once(self):
        if not getattr(self, "failed", False):
            self.failed = True
            self.environment.events.request.fire(request_type="WS", name="stand-in", response_time=1,
                                                 response_length=0, exception=RuntimeError("stand-in"), context={{}})

class Shape(LoadTestShape):
    def tick(self):
        o = self.runner.environment.parsed_options
        return (o.target_users, o.ramp_rate) if self.get_run_time() < o.hold_seconds else None
"""


NO_USERS_FILE = ("--set", "usersFile.enabled=false", "--set", "mint.enabled=false")


def sandbox(base: Path, env: dict[str, str], *, net: bool = False, users_writable: bool = False,
            hosts: str = "") -> list[str]:
    """bwrap argv for a pod's container: its volumes at /tmp, /reports, /users and /loadtest (the
    image's code), this machine's /usr and Python standing in for the image's, the root read-only."""
    for name in ("tmp", "reports", "users", "loadtest"):
        (base / name).mkdir(exist_ok=True)
    (base / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")
    argv = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
            "--ro-bind", "/etc", "/etc", "--ro-bind", str(base / "hosts"), "/etc/hosts",
            "--dev", "/dev", "--proc", "/proc",
            "--bind", str(base / "tmp"), "/tmp",
            # After /tmp: a checkout under /tmp (a CI clone) would be hidden by the pod's /tmp.
            "--ro-bind", str(ROOT), str(ROOT), "--ro-bind", str(imagekit.BASE_PYTHON), str(imagekit.BASE_PYTHON),
            "--bind", str(base / "reports"), "/reports",
            "--bind" if users_writable else "--ro-bind", str(base / "users"), "/users",
            "--ro-bind", str(base / "loadtest"), "/loadtest",
            "--remount-ro", "/", *([] if net else ["--unshare-net"]),
            "--die-with-parent", "--chdir", "/tmp", "--clearenv"]
    full_env = {"PATH": f"{ROOT / 'bin'}:{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                "PYTHONDONTWRITEBYTECODE": "1", **env}
    for key, value in full_env.items():
        argv += ["--setenv", key, value]
    return argv


def command(c: dict[str, Any]) -> list[str]:
    return [*c["command"], *c["args"]]


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def limit_open_files(soft: int, hard: int) -> Any:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_worker_refuses_to_start_below_the_open_files_it_needs(tmp_path: Path) -> None:
    worker = container(lt_render(*COST, "--set", "locust.targetUsers=1000", "--set", "workers.replicas=1",
                                 "--set", "locust.rampRate=10"), "Deployment", "lt-loadtest-worker", "worker")
    result = subprocess.run([*sandbox(tmp_path, {}), *command(worker)], capture_output=True, text=True, timeout=60,
                            preexec_fn=limit_open_files(256, 512))
    assert result.returncode == 1
    assert "the open-files hard limit is 512, below the 1200 this pod needs (1000 users x 1 + 200)" in result.stderr
    assert "LimitNOFILE" in result.stderr
    assert "Starting Locust" not in result.stderr + result.stdout  # it never started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate: Any, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in logs.glob("*.log"))
            raise AssertionError(f"timed out waiting for {what}\n{detail}")
        time.sleep(0.2)


@contextlib.contextmanager
def pods_running(base: Path, commands: dict[str, list[str]]) -> Iterator[tuple[dict[str, int], Any]]:
    """Rendered container commands started together in one sandbox (one network namespace, the
    master's Service name in /etc/hosts), each with its log and pid in /tmp, as the pods run them."""
    (base / "loadtest").mkdir(exist_ok=True)
    (base / "loadtest" / "locustfile.py").write_text(STAND_IN_LOCUSTFILE)
    # Each started as a container's PID 1 is: without the SIGINT a shell's background job ignores.
    launcher = "\n".join([*(f"env --default-signal=INT {shlex.join(argv)} > /tmp/{name}.log 2>&1 & "
                             f"echo $! > /tmp/{name}.pid" for name, argv in commands.items()), "wait"])
    proc = subprocess.Popen([*sandbox(base, {}, hosts="127.0.0.1 lt-loadtest-master\n"), "sh", "-c", launcher],
                            preexec_fn=limit_open_files(1024, 4096), start_new_session=True)
    tmp = base / "tmp"
    try:
        _wait_for(lambda: all((tmp / f"{name}.pid").exists() for name in commands), 20, "the pids", tmp)
        time.sleep(0.2)
        yield {name: int((tmp / f"{name}.pid").read_text()) for name in commands}, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def locust_commands(*args: str) -> dict[str, list[str]]:
    docs = lt_render(*COST, *NO_USERS_FILE, "--set", "workers.replicas=1", *args)
    return {"master": command(container(docs, "Deployment", "lt-loadtest-master", "master")),
            "worker": command(container(docs, "Deployment", "lt-loadtest-worker", "worker"))}


@pytest.mark.slow
def test_a_headless_run_writes_reports_and_exit_code_then_master_and_workers_hold(tmp_path: Path) -> None:
    commands = locust_commands("--set", "locust.targetUsers=4", "--set", "locust.rampRate=4",
                               "--set", "locust.holdSeconds=3")
    tmp, reports = tmp_path / "tmp", tmp_path / "reports"
    with pods_running(tmp_path, commands) as (pids, proc):
        _wait_for(lambda: (reports / "exit-code").exists(), 90, "the end of the run", tmp)
        # The stand-in users failed once each: Locust's exit code 1, as for a missed threshold.
        assert (reports / "exit-code").read_text().strip() == "1"
        for name in ("parley.html", "parley_stats.csv", "parley_stats_history.csv", "parley_failures.csv"):
            assert (reports / name).stat().st_size > 0, name
        assert "stand-in" in (reports / "parley_failures.csv").read_text()
        _wait_for(lambda: "the master ended the run" in (tmp / "worker.log").read_text(), 30, "the worker's end", tmp)
        master_log = (tmp / "master.log").read_text()
        assert "open files: soft 4096, hard 4096, needed 201" in master_log  # raised from 1024 to the hard limit
        assert "the run ended with exit code 1" in master_log
        assert "open files: soft 4096, hard 4096, needed 204" in (tmp / "worker.log").read_text()
        # Neither restarts into a second run or a crash loop: both hold, and leave at once when deleted.
        time.sleep(2)
        assert _alive(pids["master"]) and _alive(pids["worker"])
        for name in ("master", "worker"):
            os.kill(pids[name], signal.SIGTERM)
        assert proc.wait(10) == 0


MID_RUN = ("--set", "locust.targetUsers=2", "--set", "locust.rampRate=2", "--set", "locust.holdSeconds=600")


@pytest.mark.slow
def test_stopping_a_run_early_keeps_its_reports_and_verdict(tmp_path: Path) -> None:
    tmp, reports = tmp_path / "tmp", tmp_path / "reports"
    with pods_running(tmp_path, locust_commands(*MID_RUN)) as (pids, proc):
        _wait_for(lambda: "All users spawned" in (tmp / "master.log").read_text(), 60, "the users", tmp)
        # `kubectl exec deploy/<release>-master -- kill -INT 1`: the shell is the container's PID 1.
        os.kill(pids["master"], signal.SIGINT)
        _wait_for(lambda: (reports / "exit-code").exists(), 30, "the end of the run", tmp)
        assert (reports / "exit-code").read_text().strip() == "1"  # the stand-in's failures
        assert (reports / "parley.html").stat().st_size > 0
        assert (reports / "parley_stats_history.csv").stat().st_size > 0
        master_log = (tmp / "master.log").read_text()
        assert "Exiting due to CTRL+C interruption" in master_log and "Shutting down (exit code 1)" in master_log
        time.sleep(1)
        assert _alive(pids["master"])  # holding, reports readable
        for name in ("master", "worker"):
            os.kill(pids[name], signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.mark.slow
def test_deleting_the_master_mid_run_ends_it_with_its_verdict_in_the_log(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    with pods_running(tmp_path, locust_commands(*MID_RUN)) as (pids, _proc):
        _wait_for(lambda: "All users spawned" in (tmp / "master.log").read_text(), 60, "the users", tmp)
        # SIGTERM, as the kubelet sends when the pod is deleted: Locust still stops as from Ctrl-C
        # (its own SIGTERM handler is not installed yet during a shape's run) and prints its stats.
        os.kill(pids["master"], signal.SIGTERM)
        _wait_for(lambda: not _alive(pids["master"]), 20, "the master to end", tmp)
        master_log = (tmp / "master.log").read_text()
        assert "Shutting down (exit code 1)" in master_log and "Aggregated" in master_log
        assert "holding" not in master_log  # a deleted pod ends; only a finished run holds


def _users_file(path: Path, count: int, **header: Any) -> None:
    head = {"format": "parley-loadtest-users", "version": 1, "count": count, "prefix": "lt",
            "created_at": "2026-01-01T00:00:00+00:00", "params": {}, "rooms": {"group": 0, "dm": 0, "bot": 0}, **header}
    path.write_text(json.dumps(head) + "\n")
    path.chmod(0o600)


@pytest.mark.parametrize(("setup", "code", "says"), [
    ("none", 1, "no /users/users.jsonl after 1 s. Is the mint Job done? kubectl -n chat logs -l "
                "app.kubernetes.io/instance=lt,app.kubernetes.io/component=mint"),
    ("not-json", 1, "/users/users.jsonl line 1 is not a users-file header"),
    ("other-format", 1, "is not a parley-loadtest-users file, version 1"),
    ("too-few", 1, "holds 9 users, fewer than locust.targetUsers=10: mint more (mint.count)"),
    ("good", 0, "/users/users.jsonl: 10 users, prefix 'lt'"),
], ids=["no-file", "not-json", "other-format", "too-few", "good"])
def test_the_users_file_wait(setup: str, code: int, says: str, tmp_path: Path) -> None:
    docs = lt_render(*COST, "--set", "locust.targetUsers=10", "--set", "usersFile.waitSeconds=1")
    wait = container(docs, "Deployment", "lt-loadtest-worker", "wait-for-users")
    argv = sandbox(tmp_path, plain_env(wait))
    users = tmp_path / "users" / "users.jsonl"
    if setup == "not-json":
        users.write_text("lt0000000 not json\n")
    elif setup == "other-format":
        _users_file(users, 10, format="something-else")
    elif setup == "too-few":
        _users_file(users, 9)
    elif setup == "good":
        _users_file(users, 10)
    started = time.monotonic()
    result = subprocess.run([*argv, *command(wait)], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert says in result.stdout + result.stderr
    assert time.monotonic() - started < 20  # bounded


@pytest.mark.slow
@pytest.mark.postgres
def test_the_mint_job_writes_a_file_the_locust_pods_accept(transactional_db: None, tmp_path: Path) -> None:
    from tests.conftest import test_database_url

    docs = lt_render(*COST, "--set", "locust.targetUsers=24", "--set", "usersFile.waitSeconds=1",
                     "--set-json", 'mint.extraArgs=["--seed","1"]')
    mint = pod_template(mint_job(docs))["spec"]["containers"][0]
    # The Secret's values, as the kubelet would put them in the environment.
    env = {"DATABASE_URL": test_database_url(), "SECRET_KEY": "loadtest-chart-test-" + "k" * 40}
    assert {e["name"] for e in mint["env"]} == set(env)
    result = subprocess.run([*sandbox(tmp_path, env, net=True, users_writable=True), *command(mint)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    users = tmp_path / "users" / "users.jsonl"
    assert users.stat().st_mode & 0o777 == 0o600
    header = json.loads(users.read_text().splitlines()[0])
    assert header["count"] == 24 and header["prefix"] == "lt"
    assert len(users.read_text().splitlines()) == 25
    # The master's and the workers' wait accepts it.
    for name in ("lt-loadtest-master", "lt-loadtest-worker"):
        wait = container(docs, "Deployment", name, "wait-for-users")
        checked = subprocess.run([*sandbox(tmp_path, plain_env(wait)), *command(wait)],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "/users/users.jsonl: 24 users, prefix 'lt'" in checked.stdout
