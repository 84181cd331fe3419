"""Builders of the child objects of a ChatPlatform: plain dicts, no API calls.

Every child carries an ownerReference to the ChatPlatform (controller=true), so deleting the
ChatPlatform lets the Kubernetes garbage collector delete the children.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from parley_operator.spec import PlatformSpec

GROUP = "parley.dev"
VERSION = "v1alpha1"
PLURAL = "chatplatforms"
KIND = "ChatPlatform"

ROLES = ("protocol", "worker")
PROTOCOL_PORT = 8000
METRICS_PORT = 9100  # PARLEY_METRICS_PORT: Prometheus /metrics of every role, apart from the public port
WORKER_METRICS_PORT = METRICS_PORT
# The image's numeric non-root user (Dockerfile `USER 10001:10001`); numeric so that the kubelet can
# check runAsNonRoot without reading /etc/passwd.
APP_UID = 10001
TMP_VOLUME = "tmp"  # the only writable path: read-only root filesystem, emptyDir on /tmp
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# PARLEY_HANDSHAKE_EXEMPT's default in app/parley/config.py. The variable replaces that default,
# so when the spec adds CIDRs the operator writes loopback in front of them: a same-host peer is
# exempt whatever the spec adds, as without it (docs/security.md, "Throttles").
# tests/test_handshake_exempt.py keeps the two equal.
LOOPBACK_EXEMPT = ("127.0.0.0/8", "::1/128")

Obj = dict[str, Any]


def labels(name: str, role: str | None = None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "parley",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "parley-operator",
    }
    if role:
        result["app.kubernetes.io/component"] = role
    return result


def selector(name: str, role: str) -> dict[str, str]:
    """The immutable part of the labels: a Deployment's selector can never change."""
    return {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": role}


def selector_string(name: str, role: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(name, role).items())


def child_name(name: str, role: str) -> str:
    return f"{name}-{role}"


def owner_reference(owner: Mapping[str, Any]) -> Obj:
    meta = owner["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(owner: Mapping[str, Any], role: str, suffix: str = "") -> Obj:
    name = owner["metadata"]["name"]
    return {
        "name": child_name(name, role) + suffix,
        "namespace": owner["metadata"]["namespace"],
        "labels": labels(name, role),
        "ownerReferences": [owner_reference(owner)],
    }


def environment(spec: PlatformSpec, owner_name: str) -> list[Obj]:
    redis_env: Obj
    if spec.redis.secret_ref is not None:
        ref = spec.redis.secret_ref
        redis_env = {"name": "REDIS_URLS", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    else:
        redis_env = {"name": "REDIS_URLS", "value": ",".join(spec.redis.urls)}
    db = spec.database
    return [
        redis_env,
        {"name": "PARLEY_CHANNEL_PREFIX", "value": spec.redis.channel_prefix},
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": db.secret_name, "key": db.url_key}}},
        {"name": "SECRET_KEY",
         "valueFrom": {"secretKeyRef": {"name": db.secret_name, "key": db.secret_key_key}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "PARLEY_DRAIN_SECONDS", "value": str(spec.drain_grace_seconds)},
        {"name": "ALLOWED_HOSTS", "value": ",".join(spec.allowed_hosts)},
        *([{"name": "PARLEY_ALLOWED_ORIGINS", "value": ",".join(spec.allowed_origins)}]
          if spec.allowed_origins else []),
        *([{"name": "PARLEY_TRUSTED_PROXIES", "value": ",".join(spec.trusted_proxies)}]
          if spec.trusted_proxies else []),
        {"name": "PARLEY_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "PARLEY_SERVER", "value": spec.server},
        {"name": "PARLEY_PLATFORM", "value": owner_name},
    ]


def handshake_environment(spec: PlatformSpec) -> list[Obj]:
    """The handshake limit's variables, each only when the spec sets it (the app's defaults
    otherwise). Protocol containers only: workers take no handshakes, and changing the limit for
    a load test then rolls the protocol pods alone."""
    limit = spec.handshake_limit
    env: list[Obj] = []
    if limit.per_second is not None:
        env.append({"name": "PARLEY_HANDSHAKES_PER_SECOND", "value": str(limit.per_second)})
    if limit.burst is not None:
        env.append({"name": "PARLEY_HANDSHAKE_BURST", "value": str(limit.burst)})
    if limit.exempt:
        cidrs = dict.fromkeys([*LOOPBACK_EXEMPT, *limit.exempt])  # in order, each once
        env.append({"name": "PARLEY_HANDSHAKE_EXEMPT", "value": ",".join(cidrs)})
    return env


def _migrate_init_container(spec: PlatformSpec, env: list[Obj]) -> Obj:
    # `parley migrate` holds a PostgreSQL advisory lock, so every pod may run it: the first one
    # migrates, the others wait and find nothing to do. No separate Job to order against.
    return {
        "name": "migrate",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["parley", "migrate"],
        "env": env,
        "resources": copy.deepcopy(dict(spec.worker.resources)),
        "securityContext": _container_security(),
        "volumeMounts": _tmp_mount(),
    }


def _pod_security() -> Obj:
    # Pod Security Standard "restricted", with a numeric uid/gid.
    return {"runAsNonRoot": True, "runAsUser": APP_UID, "runAsGroup": APP_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def _tmp_volumes() -> list[Obj]:
    # /tmp holds the protocol process's admin socket (`parley drain` talks to it) and Python's
    # temporary files; nothing else in the image is written at run time.
    return [{"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}}]


def _tmp_mount() -> list[Obj]:
    return [{"name": TMP_VOLUME, "mountPath": "/tmp"}]


def protocol_template(owner: Mapping[str, Any], spec: PlatformSpec) -> Obj:
    name = owner["metadata"]["name"]
    env = environment(spec, name)
    http = {"port": "http"}
    return {
        "metadata": {"labels": labels(name, "protocol")},
        "spec": {
            # The preStop drain needs its whole grace period, plus a margin for Daphne to exit
            # after SIGTERM; otherwise the kubelet SIGKILLs a pod that is still draining.
            "terminationGracePeriodSeconds": spec.termination_grace_seconds,
            "securityContext": _pod_security(),
            "volumes": _tmp_volumes(),
            "initContainers": [_migrate_init_container(spec, env)],
            "containers": [{
                "name": "protocol",
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": ["parley", "protocol"],
                "ports": [{"name": "http", "containerPort": PROTOCOL_PORT, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                "env": [*env, *handshake_environment(spec)],
                "resources": copy.deepcopy(dict(spec.protocol.resources)),
                "securityContext": _container_security(),
                "volumeMounts": _tmp_mount(),
                "readinessProbe": {"httpGet": {"path": "/readyz", **http}, "periodSeconds": 5,
                                   "failureThreshold": 1},
                "livenessProbe": {"httpGet": {"path": "/healthz", **http}, "periodSeconds": 10,
                                  "failureThreshold": 3},
                # Daphne cancels every consumer at once on SIGTERM (daphne#177), so the graceful
                # part happens here, before SIGTERM: stop accepting (readyz -> 503), tell clients
                # to reconnect with jitter, wait for connections to reach 0 or the drain deadline.
                "lifecycle": {"preStop": {"exec": {"command": ["parley", "drain"]}}},
            }],
        },
    }


def worker_template(owner: Mapping[str, Any], spec: PlatformSpec) -> Obj:
    name = owner["metadata"]["name"]
    env = environment(spec, name)
    metrics = {"port": "metrics"}
    return {
        "metadata": {"labels": labels(name, "worker")},
        "spec": {
            # `parley worker` stops receiving on SIGTERM and finishes the message in hand within
            # this grace; a message popped but not yet acknowledged stays in `<channel>$inflight`
            # and channels-redis puts it back on the queue for the next worker.
            "terminationGracePeriodSeconds": spec.termination_grace_seconds,
            "securityContext": _pod_security(),
            "volumes": _tmp_volumes(),
            "initContainers": [_migrate_init_container(spec, env)],
            "containers": [{
                "name": "worker",
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": ["parley", "worker", *spec.worker.channels],
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                "env": env,
                "resources": copy.deepcopy(dict(spec.worker.resources)),
                "securityContext": _container_security(),
                "volumeMounts": _tmp_mount(),
                "livenessProbe": {"httpGet": {"path": "/metrics", **metrics}, "periodSeconds": 15,
                                  "failureThreshold": 3},
            }],
        },
    }


def deployment(owner: Mapping[str, Any], spec: PlatformSpec, role: str, replicas: int) -> Obj:
    name = owner["metadata"]["name"]
    template = protocol_template(owner, spec) if role == "protocol" else worker_template(owner, spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name, role)},
            # Never below the current capacity during a rollout: new pods come up before old
            # ones drain, so a spec change does not drop a batch of WebSockets at once.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
            "revisionHistoryLimit": 5,
            "template": template,
        },
    }


def service(owner: Mapping[str, Any], role: str) -> Obj:
    name = owner["metadata"]["name"]
    if role == "protocol":
        spec: Obj = {
            "type": "ClusterIP",
            "selector": selector(name, role),
            # `metrics` for a ServiceMonitor; NetworkPolicies decide who may reach either port.
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        }
    else:
        # Workers serve no traffic; the headless Service only lets Prometheus find /metrics.
        spec = {
            "clusterIP": "None",
            "selector": selector(name, role),
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics",
                       "protocol": "TCP"}],
        }
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(owner, role), "spec": spec}


def pod_disruption_budget(owner: Mapping[str, Any], role: str) -> Obj:
    name = owner["metadata"]["name"]
    # One pod at a time: a node drain then moves WebSockets in small batches, never all at once.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, role),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name, role)}},
    }


def is_subset(desired: Any, actual: Any) -> bool:
    """Whether every field we set is present and equal in `actual`.

    The API server adds defaults (imagePullPolicy, terminationMessagePath, ...), so exact
    equality would see drift on every poll. Lists must match in length, so an added container
    or env var is drift too.
    """
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and is_subset(v, actual[k]) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(desired) == len(actual)
                and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True)))
    return bool(desired == actual)
