"""The child objects: what the pods are told, and how drift is judged."""

from __future__ import annotations

import copy
from typing import Any

from op_testkit import admit, chat_platform

from parley_operator import resources
from parley_operator.spec import parse_body


def owner(**spec: Any) -> dict[str, Any]:
    return admit(chat_platform(**spec))


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_protocol_pods_drain_before_they_die() -> None:
    body = owner(drain={"gracePeriodSeconds": 90})
    dep = resources.deployment(body, parse_body(body), "protocol", replicas=2)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["parley", "drain"]
    assert pod["terminationGracePeriodSeconds"] > 90  # tests/operator/test_drain_resources.py: by how much
    assert env_of(dep)["PARLEY_DRAIN_SECONDS"] == "90"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_pod_checks_migrations_first_and_gets_the_contract_environment() -> None:
    body = owner(allowedHosts=["chat.example.com"],
                 database={"secretRef": {"name": "db", "urlKey": "dsn", "secretKeyKey": "django"}},
                 redis={"urls": ["redis://r0:6379/0", "redis://r1:6379/0"]})
    spec = parse_body(body)
    for role in resources.ROLES:
        dep = resources.deployment(body, spec, role, replicas=1)
        (init,) = dep["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == ["parley", "migrate", "--if-pending"]
        env = env_of(dep)
        assert env["REDIS_URLS"] == "redis://r0:6379/0,redis://r1:6379/0"
        assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "db", "key": "dsn"}}
        assert env["SECRET_KEY"] == {"secretKeyRef": {"name": "db", "key": "django"}}
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["ALLOWED_HOSTS"] == "chat.example.com"
        assert dep["metadata"]["ownerReferences"][0]["controller"] is True


def test_redis_urls_from_a_secret_stay_in_the_secret() -> None:
    body = owner(redis={"secretRef": {"name": "parley-redis", "key": "shards"}})
    env = env_of(resources.deployment(body, parse_body(body), "worker", replicas=1))
    assert env["REDIS_URLS"] == {"secretKeyRef": {"name": "parley-redis", "key": "shards"}}


def test_workers_consume_the_configured_channels() -> None:
    body = owner(worker={"channels": ["chat.persist", "chat.moderate"]})
    dep = resources.deployment(body, parse_body(body), "worker", replicas=0)
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "parley", "worker", "chat.persist", "chat.moderate"]
    assert dep["spec"]["replicas"] == 0


def test_services_and_budgets_select_their_role_only() -> None:
    body = owner()
    protocol = resources.service(body, "protocol")
    assert protocol["spec"]["selector"] == {"app.kubernetes.io/instance": "chat",
                                            "app.kubernetes.io/component": "protocol"}
    assert protocol["spec"]["ports"][0]["targetPort"] == "http"
    assert resources.service(body, "worker")["spec"]["clusterIP"] == "None"
    pdb = resources.pod_disruption_budget(body, "protocol")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": protocol["spec"]["selector"]},
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}


def test_drift_ignores_server_defaults_but_not_edits() -> None:
    body = owner()
    desired = resources.protocol_template(body, parse_body(body))
    live = copy.deepcopy(desired)
    live["spec"]["dnsPolicy"] = "ClusterFirst"  # added by the API server
    live["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    assert resources.is_subset(desired, live)

    edited = copy.deepcopy(live)
    edited["spec"]["containers"][0]["image"] = "evil:latest"
    assert not resources.is_subset(desired, edited)

    sidecar = copy.deepcopy(live)
    sidecar["spec"]["containers"].append({"name": "debug", "image": "busybox"})
    assert not resources.is_subset(desired, sidecar)

    extra_env = copy.deepcopy(live)
    extra_env["spec"]["containers"][0]["env"].append({"name": "DEBUG", "value": "1"})
    assert not resources.is_subset(desired, extra_env)


def test_origins_proxies_and_metrics_port_reach_the_pods() -> None:
    body = owner(allowedHosts=["chat.example.com"], allowedOrigins=["https://chat.example.com"],
                 trustedProxies=["10.0.0.0/8", "fd00::/8"])
    spec = parse_body(body)
    protocol = resources.deployment(body, spec, "protocol", replicas=1)
    env = env_of(protocol)
    assert env["PARLEY_ALLOWED_ORIGINS"] == "https://chat.example.com"
    assert env["PARLEY_TRUSTED_PROXIES"] == "10.0.0.0/8,fd00::/8"
    assert env["PARLEY_METRICS_PORT"] == "9100"
    assert env["PARLEY_SERVER"] == "daphne"
    uvicorn = owner(protocol={"server": "uvicorn"})
    assert env_of(resources.deployment(uvicorn, parse_body(uvicorn), "protocol", 1))["PARLEY_SERVER"] == "uvicorn"
    ports = {p["name"]: p["containerPort"]
             for p in protocol["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8000, "metrics": 9100}
    service_ports = {p["name"]: p["port"] for p in resources.service(body, "protocol")["spec"]["ports"]}
    assert service_ports == {"http": 80, "metrics": 9100}
    # Unset lists are not passed at all: the app then derives origins from the hosts and trusts no proxy.
    plain = env_of(resources.deployment(owner(), parse_body(owner()), "protocol", replicas=1))
    assert "PARLEY_ALLOWED_ORIGINS" not in plain and "PARLEY_TRUSTED_PROXIES" not in plain


def handshake_env(body: dict[str, Any], role: str = "protocol") -> dict[str, Any]:
    env = env_of(resources.deployment(body, parse_body(body), role, replicas=1))
    return {name: value for name, value in env.items() if name.startswith("PARLEY_HANDSHAKE")}


def test_the_handshake_limit_reaches_the_protocol_pods() -> None:
    body = owner(handshakeLimit={"perSecond": 2.5, "burst": 500, "exempt": ["10.244.0.0/16", "fd00:10::/64"]})
    assert handshake_env(body) == {
        "PARLEY_HANDSHAKES_PER_SECOND": "2.5",
        "PARLEY_HANDSHAKE_BURST": "500",
        # Added to loopback, which stays exempt: the variable replaces the app's default.
        "PARLEY_HANDSHAKE_EXEMPT": "127.0.0.0/8,::1/128,10.244.0.0/16,fd00:10::/64",
    }
    # Workers take no handshakes: a limit changed for a load test rolls the protocol pods alone.
    assert handshake_env(body, "worker") == {}
    assert resources.is_subset(resources.worker_template(body, parse_body(body)),
                               resources.worker_template(owner(), parse_body(owner())))
    assert not resources.is_subset(resources.protocol_template(body, parse_body(body)),
                                   resources.protocol_template(owner(), parse_body(owner())))


def test_only_the_handshake_settings_given_are_passed() -> None:
    # The app's defaults (app/parley/config.py) fill in the rest; a whole-number rate stays one.
    assert handshake_env(owner(handshakeLimit={"perSecond": 25})) == {"PARLEY_HANDSHAKES_PER_SECOND": "25"}
    assert handshake_env(owner(handshakeLimit={"burst": 200})) == {"PARLEY_HANDSHAKE_BURST": "200"}
    # Loopback named again is written once.
    assert handshake_env(owner(handshakeLimit={"exempt": ["10.0.0.0/8", "127.0.0.0/8"]})) == {
        "PARLEY_HANDSHAKE_EXEMPT": "127.0.0.0/8,::1/128,10.0.0.0/8"}
    for unset in (owner(), owner(handshakeLimit={}), owner(handshakeLimit={"exempt": []})):
        assert handshake_env(unset) == {}


def test_each_platform_gets_its_own_redis_prefix_unless_the_spec_sets_one() -> None:
    a, b = owner(), admit(chat_platform(name="other", namespace="ns"))
    assert env_of(resources.deployment(a, parse_body(a), "worker", 1))["PARLEY_CHANNEL_PREFIX"] == "parley.ns.chat."
    assert env_of(resources.deployment(b, parse_body(b), "worker", 1))["PARLEY_CHANNEL_PREFIX"] == "parley.ns.other."
    legacy = owner(redis={"urls": ["redis://r:6379/0"], "channelPrefix": "asgi"})
    assert env_of(resources.deployment(legacy, parse_body(legacy), "worker", 1))["PARLEY_CHANNEL_PREFIX"] == "asgi"


def test_every_container_is_pss_restricted_with_a_read_only_root() -> None:
    body = owner()
    for role in resources.ROLES:
        pod = resources.deployment(body, parse_body(body), role, replicas=1)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
        for container in pod["initContainers"] + pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
            assert container["resources"]["requests"]
