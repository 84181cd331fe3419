"""helm lint / helm template for the defaults and every preset; every object validated."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from op_testkit import admit, load_crd

from parley_operator import spec as specmod

from .chartkit import CUSTOM_KINDS, PRESETS, ROOT, VARIANTS, helm, of_kind, one, operator_children, render

K8S_VERSION = "1.33.0"  # the kubectl/helm layer's Kubernetes; kubernetes-validate ships its schemas


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_helm_lint(preset: str | None) -> None:
    args = ["lint", ".", "--strict"] + (["-f", preset] if preset else [])
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid_kubernetes(variant: str) -> None:
    docs = render(*VARIANTS[variant], include_crds=True)
    kinds = {d["kind"] for d in docs}
    assert {"ChatPlatform", "CustomResourceDefinition", "Deployment", "Job", "Pod"} <= kinds
    checked = 0
    for obj in [*docs, *operator_children(docs)]:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any unknown field
        checked += 1
    assert checked >= 15


def test_validation_is_really_strict() -> None:
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}, "dta": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_rendered_chatplatform_validates_against_the_crd(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    platform = one(docs, "ChatPlatform")
    stored = admit(platform)  # the CRD's defaults + openAPIV3Schema, as the API server applies them
    parsed = specmod.parse_body(stored)  # ... and the rules CEL checks (same as the operator's)
    assert parsed.redis.secret_ref is not None  # URLs with passwords never in the spec itself
    assert parsed.redis.channel_prefix == "parley.chat.chat."
    # Pruning: an unknown field would be dropped by the API server; none may be silently lost.
    jsonschema.validate(platform["spec"], _no_unknown_fields(load_crd()))


def _no_unknown_fields(crd: dict[str, Any]) -> dict[str, Any]:
    spec = json.loads(json.dumps(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]))

    def close(node: dict[str, Any]) -> None:
        open_object = node.get("x-kubernetes-preserve-unknown-fields")
        if node.get("type") == "object" and "properties" in node and not open_object:
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            close(sub)
        if isinstance(node.get("items"), dict):
            close(node["items"])

    close(spec)
    return spec


def test_the_crd_ships_with_the_operator_subchart() -> None:
    docs = render(include_crds=True)
    crd = one(docs, "CustomResourceDefinition")
    assert crd == load_crd()
    assert (ROOT / "charts" / "parley-operator").resolve() == ROOT / "helm" / "parley-operator"


def test_the_platform_is_built_from_values() -> None:
    docs = render("--set", "protocol.server=uvicorn", "--set", "protocol.maxReplicas=7",
                  "--set", "worker.minReplicas=0", "--set", "scaling.scaleDownStabilizationSeconds=120",
                  "--set", "drain.gracePeriodSeconds=45", "--set", "global.image.digest=sha256:" + "a" * 64,
                  "--set", "trustedProxies[0]=10.244.0.0/16")
    spec = one(docs, "ChatPlatform")["spec"]
    assert spec["image"] == "parley@sha256:" + "a" * 64
    assert spec["protocol"]["server"] == "uvicorn"
    assert spec["protocol"]["maxReplicas"] == 7
    assert spec["worker"]["minReplicas"] == 0
    assert spec["scaling"]["scaleDownStabilizationSeconds"] == 120
    assert spec["drain"]["gracePeriodSeconds"] == 45
    assert spec["trustedProxies"] == ["10.244.0.0/16"]
    assert spec["allowedHosts"] == ["chat.local", "localhost", "127.0.0.1"]
    assert "allowedOrigins" not in spec  # derived by the app from the (non-wildcard) hosts


def test_the_handshake_limit_goes_from_values_to_the_protocol_pods() -> None:
    docs = render("--set-json", "handshakeLimit.perSecond=2.5", "--set", "handshakeLimit.burst=1000000",
                  "--set", "handshakeLimit.exempt={10.244.0.0/16,fd00::/8}")
    platform = one(docs, "ChatPlatform")
    # A million, not Go's 1e+06, which the CRD's integer would refuse.
    assert platform["spec"]["handshakeLimit"] == {"perSecond": 2.5, "burst": 1000000,
                                                  "exempt": ["10.244.0.0/16", "fd00::/8"]}
    jsonschema.validate(platform["spec"], _no_unknown_fields(load_crd()))
    protocol = one(operator_children(docs), "Deployment", "chat-protocol")
    kubernetes_validate.validate(protocol, K8S_VERSION, strict=True)
    env = {e["name"]: e.get("value") for e in protocol["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PARLEY_HANDSHAKES_PER_SECOND"] == "2.5"
    assert env["PARLEY_HANDSHAKE_BURST"] == "1000000"
    assert env["PARLEY_HANDSHAKE_EXEMPT"] == "127.0.0.0/8,::1/128,10.244.0.0/16,fd00::/8"
    # Only what is given; by default nothing, and the app keeps its own defaults.
    assert one(render("--set", "handshakeLimit.burst=80"), "ChatPlatform")["spec"]["handshakeLimit"] == {"burst": 80}
    assert "handshakeLimit" not in one(render(), "ChatPlatform")["spec"]


def test_the_redis_secret_lists_one_url_per_shard() -> None:
    import base64

    for shards in (1, 3):
        docs = render("--set", f"redis.shards={shards}")
        secret = one(docs, "Secret", "chat-redis")
        urls = base64.b64decode(secret["data"]["urls"]).decode().split(",")
        password = base64.b64decode(secret["data"]["password"]).decode()
        assert urls == [f"redis://:{password}@chat-redis-{i}.chat-redis-headless.chat.svc.cluster.local:6379/0"
                        for i in range(shards)]
        assert one(docs, "StatefulSet", "chat-redis")["spec"]["replicas"] == shards
        app = one(docs, "Secret", "chat-app")
        pg = base64.b64decode(one(docs, "Secret", "chat-postgresql")["data"]["password"]).decode()
        assert base64.b64decode(app["data"]["url"]).decode() == (
            f"postgres://parley:{pg}@chat-postgresql.chat.svc.cluster.local:5432/parley")


def test_external_services_replace_the_built_in_ones() -> None:
    docs = render(*VARIANTS["external-services"])
    assert not [s for s in of_kind(docs, "StatefulSet")]
    import base64

    assert base64.b64decode(one(docs, "Secret", "chat-redis")["data"]["urls"]) == b"rediss://:pw@redis.example:6380/0"
    assert base64.b64decode(one(docs, "Secret", "chat-app")["data"]["url"]) == b"postgres://parley:pw@db.example:5432/parley"
    existing = render("--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=my-redis",
                      "--set", "postgresql.enabled=false", "--set", "database.existingSecret=my-db",
                      "--set", "database.urlKey=dsn")
    spec = one(existing, "ChatPlatform")["spec"]
    assert spec["redis"]["secretRef"] == {"name": "my-redis", "key": "urls"}
    assert spec["database"]["secretRef"] == {"name": "my-db", "urlKey": "dsn", "secretKeyKey": "secret-key"}
    assert of_kind(existing, "Secret") == []


def test_migration_runs_as_a_hook_after_install_and_before_upgrade() -> None:
    job = one(render(), "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["parley", "migrate"]


@pytest.mark.parametrize("variant", ["default", "400k"])
def test_the_operators_pods_check_migrations_drain_within_their_grace_and_tolerate_blips(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    window = one(docs, "ChatPlatform")["spec"]["drain"]["gracePeriodSeconds"]
    children = operator_children(docs)
    protocol = next(d for d in children if d["kind"] == "Deployment" and d["metadata"]["name"] == "chat-protocol")
    pod = protocol["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # One failed probe no longer empties the Service; the app's checks answer within the timeout.
    readiness = container["readinessProbe"]
    assert (readiness["periodSeconds"], readiness["failureThreshold"], readiness["timeoutSeconds"]) == (5, 3, 3)
    liveness = container["livenessProbe"]
    assert (liveness["periodSeconds"], liveness["failureThreshold"], liveness["timeoutSeconds"]) == (10, 3, 5)
    # The hook's start-up (10 s), the window, its overrun (1 s), Daphne's exit (10 s).
    assert pod["terminationGracePeriodSeconds"] == window + 21
    # A rollout's next batch waits for the last one's drain: at most maxSurge pods drain at once.
    assert protocol["spec"]["minReadySeconds"] == window + 11
    assert protocol["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": "25%"}
    # Migrations run in the hook Job; the pods only check (and migrate only what is pending).
    assert [c["command"] for c in pod["initContainers"]] == [["parley", "migrate", "--if-pending"]]
    (job,) = of_kind(docs, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["parley", "migrate"]
    for pdb in of_kind(children, "PodDisruptionBudget"):
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_ingress_has_websocket_timeouts_and_targets_the_operators_service() -> None:
    ingress = one(render(), "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "chat-protocol", "port": {"name": "http"}}
    services = {s["metadata"]["name"]: s for s in operator_children(render()) if s["kind"] == "Service"}
    assert "http" in {p["name"] for p in services["chat-protocol"]["spec"]["ports"]}
    route = one(render(*VARIANTS["everything-on"]), "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "chat-protocol", "port": 80}]
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "0s"}


def test_operator_rbac_is_namespaced_by_default_and_cluster_wide_on_request() -> None:
    docs = render()
    assert not of_kind(docs, "ClusterRole")
    role = one(docs, "Role", "chat-operator")
    assert role["metadata"]["namespace"] == "chat"
    args = one(docs, "Deployment", "chat-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=chat" in args
    secrets = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["chat-redis"]}]

    wide = render("--set", "operator.clusterWide=true")
    # Only the leader election's Role stays namespaced: the Lease lives in the release namespace.
    assert [r["metadata"]["name"] for r in of_kind(wide, "Role")] == ["chat-operator-leader-election"]
    assert one(wide, "ClusterRole")
    wide_args = one(wide, "Deployment", "chat-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in wide_args if a.startswith("--namespace")]


def test_rbac_is_exactly_the_reference_the_operator_documents() -> None:
    reference = [d for d in yaml.safe_load_all((ROOT / "helm/parley-operator/rbac-reference.yaml").read_text()) if d]
    want = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
            for r in one(reference, "ClusterRole")["rules"]}
    got = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
           for r in one(render(), "Role", "chat-operator")["rules"]}
    assert got == want


def test_leader_election_rbac_is_the_reference_and_one_replica_without_it() -> None:
    reference = [d for d in yaml.safe_load_all((ROOT / "helm/parley-operator/rbac-reference.yaml").read_text()) if d]
    want = one(reference, "Role", "parley-operator-leader-election")["rules"]
    for rule in want:
        if "resourceNames" in rule:
            rule["resourceNames"] = ["chat-operator"]  # the Lease is named like the Deployment
    docs = render()
    assert one(docs, "Role", "chat-operator-leader-election")["rules"] == want
    deployment = one(docs, "Deployment", "chat-operator")
    assert deployment["spec"]["replicas"] == 2
    assert "--leader-election=chat-operator" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    alone = render("--set", "operator.leaderElection.enabled=false", "--set", "operator.replicas=3")
    deployment = one(alone, "Deployment", "chat-operator")
    assert deployment["spec"]["replicas"] == 1  # two writers without a Lease: never
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
                if a.startswith("--leader-election")]
    assert [r["metadata"]["name"] for r in of_kind(alone, "Role")] == ["chat-operator"]


def test_notes_say_how_to_reach_watch_and_test() -> None:
    result = helm("install", "chat", ".", "-n", "chat", "--dry-run=client")
    assert "kubectl -n chat get chatplatforms -w" in result.stdout
    assert "helm test chat -n chat" in result.stdout
    assert "port-forward svc/chat-protocol" in result.stdout
