"""What the rendered manifests must guarantee: PSS restricted, network isolation, probes, secrets."""

from __future__ import annotations

from typing import Any

import pytest

from .chartkit import VARIANTS, of_kind, one, operator_children, pods, render, secret_values

FORBIDDEN_CAPS_OK: set[str] = set()  # PSS restricted: drop ALL, add nothing (NET_BIND_SERVICE not needed)


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_meets_pod_security_restricted(variant: str) -> None:
    seen = []
    for where, pod in pods(render(*VARIANTS[variant])):
        seen.append(where)
        spec = pod["spec"]
        psc = spec.get("securityContext") or {}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"emptyDir", "secret", "configMap", "persistentVolumeClaim",
                                              "projected", "downwardAPI", "ephemeral"}, (where, volume)
        assert (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        # A numeric non-root uid at pod level: runAsNonRoot can be verified without /etc/passwd.
        assert psc.get("runAsNonRoot") is True, where
        assert isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0, where
        mounts_tmp = False
        for c in containers(pod):
            sc = c.get("securityContext") or {}
            name = f"{where}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("privileged") in (None, False), name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert set(sc.get("capabilities", {}).get("add", [])) <= FORBIDDEN_CAPS_OK, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("runAsUser", psc["runAsUser"]) != 0, name
            assert not c.get("ports") or all("hostPort" not in p for p in c["ports"]), name
            resources = c.get("resources") or {}
            assert resources.get("requests", {}).get("cpu") and resources["requests"].get("memory"), name
            assert resources.get("limits", {}).get("memory"), name
            mounts_tmp |= any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", []))
        assert mounts_tmp, f"{where}: no writable /tmp under a read-only root"
    assert any("chat-protocol" in w for w in seen) and any("chat-worker" in w for w in seen)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def _pod_labels(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {where: pod["metadata"]["labels"] for where, pod in pods(docs)}


def _selected(policy: dict[str, Any], labels: dict[str, dict[str, str]]) -> set[str]:
    return {w for w, lab in labels.items() if _matches(policy["spec"]["podSelector"], lab)}


def _allowed(policy: dict[str, Any], labels: dict[str, dict[str, str]], port: int) -> set[str]:
    """Pods of the release namespace allowed in on `port` (peers without namespaceSelector)."""
    allowed: set[str] = set()
    for rule in policy["spec"].get("ingress") or []:
        if not any(p["port"] == port for p in rule.get("ports", [])):
            continue
        for peer in rule.get("from", []):
            if "namespaceSelector" in peer or "ipBlock" in peer:
                continue
            allowed |= {w for w, lab in labels.items() if _matches(peer["podSelector"], lab)}
    return allowed


def _kind(where: str) -> str:
    return where.split("/", 1)[1].removeprefix("chat-")


def test_network_policies_select_the_right_pods() -> None:
    docs = render()
    labels = _pod_labels(docs)
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    assert {_kind(w) for w in _selected(policies["chat-protocol"], labels)} == {"protocol"}
    assert {_kind(w) for w in _selected(policies["chat-worker"], labels)} == {"worker"}
    assert {_kind(w) for w in _selected(policies["chat-redis"], labels)} == {"redis"}
    assert {_kind(w) for w in _selected(policies["chat-postgresql"], labels)} == {"postgresql"}
    assert {_kind(w) for w in _selected(policies["chat-operator"], labels)} == {"operator"}
    assert {_kind(w) for w in _selected(policies["chat-jobs"], labels)} == {"migrate", "smoketest"}
    # Every pod of the release is selected by some policy.
    assert set(labels) == set().union(*(_selected(p, labels) for p in policies.values()))

    # Only Parley's pods reach Redis and PostgreSQL.
    assert {_kind(w) for w in _allowed(policies["chat-redis"], labels, 6379)} == {"protocol", "worker", "operator"}
    assert {_kind(w) for w in _allowed(policies["chat-postgresql"], labels, 5432)} == {
        "protocol", "worker", "migrate", "smoketest"}
    # Only the ingress controller (another namespace) and the helm test reach the protocol port.
    assert {_kind(w) for w in _allowed(policies["chat-protocol"], labels, 8000)} == {"smoketest"}
    ingress_rule = policies["chat-protocol"]["spec"]["ingress"][0]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}} in ingress_rule["from"]
    assert _allowed(policies["chat-worker"], labels, 9100) == set()  # Prometheus' namespace only
    assert _allowed(policies["chat-operator"], labels, 9101) == set()  # Prometheus' namespace only
    assert policies["chat-jobs"]["spec"]["ingress"] == []
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_the_operators_pods_keep_the_labels_the_policies_select() -> None:
    # If resources.labels() changed, the policies would silently stop protecting the pods.
    docs = render()
    for child in operator_children(docs):
        if child["kind"] == "Deployment":
            labels = child["spec"]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "parley"
            assert labels["app.kubernetes.io/instance"] == "chat"


def test_probes_hit_health_endpoints_that_ignore_the_host_header() -> None:
    # The kubelet sends Host: <pod IP>:<port>. The app answers /healthz and /readyz before host
    # validation (security contract); the probes must therefore not depend on a Host header, and
    # must not carry one that would need to be in ALLOWED_HOSTS. tests/chart/test_image.py checks
    # the app side with a pod-IP Host against a restrictive ALLOWED_HOSTS.
    docs = render("--set", "allowedHosts[0]=chat.example.com")
    for child in operator_children(docs):
        if child["kind"] != "Deployment":
            continue
        (c,) = child["spec"]["template"]["spec"]["containers"]
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = c.get(probe_name)
            if probe is None:
                continue
            get = probe["httpGet"]
            assert "httpHeaders" not in get or all(h["name"].lower() != "host" for h in get["httpHeaders"])
            assert "host" not in get
        if c["name"] == "protocol":
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["lifecycle"]["preStop"]["exec"]["command"] == ["parley", "drain"]
            grace = child["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > one(docs, "ChatPlatform")["spec"]["drain"]["gracePeriodSeconds"]
    # The helm test sends a Host that is allowed.
    test_pod = one(docs, "Pod")
    assert "--host=chat.example.com" in test_pod["spec"]["containers"][0]["args"]


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_value_outside_secrets(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    secrets = {v for v in secret_values(docs) if len(v) >= 8}
    assert secrets, "no generated credential to look for"
    # Passwords alone too (they are embedded in the URLs).
    for obj in [*docs, *operator_children(docs)]:
        if obj["kind"] == "Secret":
            continue
        for path, value in _walk(obj):
            if isinstance(value, str):
                leaked = [s for s in secrets if s in value]
                assert not leaked, f"{obj['kind']}/{obj['metadata']['name']}{path} holds a Secret value"


def test_credentials_reach_containers_only_by_reference() -> None:
    sensitive = {"DATABASE_URL", "SECRET_KEY", "REDIS_URLS"}
    found = set()
    for where, pod in pods(render()):
        for c in containers(pod):
            for env in c.get("env", []):
                if env["name"] in sensitive:
                    found.add(env["name"])
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{where} {env['name']}"
    assert found == sensitive
    # Redis and PostgreSQL read their password from a mounted Secret, never from the environment.
    for where, pod in pods(render()):
        for c in containers(pod):
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {"REDIS_PASSWORD", "REDISCLI_AUTH", "POSTGRES_PASSWORD"}, where


def test_a_second_release_shares_no_name_and_no_redis_keys() -> None:
    a, b = render(), [d for d in __import__("yaml").safe_load_all(
        __import__("tests.chart.chartkit", fromlist=["helm"]).helm(
            "template", "other", ".", "-n", "chat").stdout) if d]
    names_a = {(d["kind"], d["metadata"]["name"]) for d in a}
    names_b = {(d["kind"], d["metadata"]["name"]) for d in b}
    assert not names_a & names_b
    env = {}
    for docs in (a, b):
        for child in operator_children(docs):
            if child["kind"] == "Deployment" and child["metadata"]["name"].endswith("-worker"):
                (c,) = child["spec"]["template"]["spec"]["containers"]
                env[child["metadata"]["name"]] = {e["name"]: e.get("value") for e in c["env"]}
    assert env["chat-worker"]["PARLEY_CHANNEL_PREFIX"] != env["other-worker"]["PARLEY_CHANNEL_PREFIX"]
