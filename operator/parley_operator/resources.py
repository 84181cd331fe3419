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

# Probes of the protocol container (app/chat/health.py says what each path checks).
# Readiness: every 5 s, out of the Service after 3 failures in a row (15 s), so a Redis failover
# or a database blip does not empty the Service; a draining pod needs no probe to leave it (a
# terminating pod's endpoint is not ready, and it turns late arrivals away with `reconnect`).
# The app bounds each dependency check to 1.5 s (health.CHECK_TIMEOUT_SECONDS); the probe waits
# a little longer, so that a slow backend shows as a 503 naming it, not as a probe timeout.
READINESS_PERIOD_SECONDS = 5
READINESS_FAILURE_THRESHOLD = 3
READINESS_TIMEOUT_SECONDS = 3
# Liveness checks the process alone, but is answered by the event loop that also serves
# thousands of sockets: 5 s per answer and 3 misses 10 s apart (30 s) before a restart, so a busy
# loop (a reconnect storm) is never mistaken for a dead one; a restart would drop every socket.
LIVENESS_PERIOD_SECONDS = 10
LIVENESS_FAILURE_THRESHOLD = 3
LIVENESS_TIMEOUT_SECONDS = 5

# terminationGracePeriodSeconds of a protocol pod = these + the spec's drain window. The kubelet
# counts the grace from the moment it runs the preStop hook, and SIGKILLs at its end:
# - the hook (`parley drain`) is a Python process that loads Django before it asks for the drain,
#   and it shares the container's CPU limit with a busy server (0.8 s unthrottled; allow 10 s);
DRAIN_HOOK_STARTUP_SECONDS = 10
# - the hook's window counts from its own start; its last request may end up to
#   drain.REQUEST_FLOOR_SECONDS (0.2 s) past the window, then the interpreter exits: 1 s;
DRAIN_HOOK_OVERRUN_SECONDS = 1
# - then SIGTERM: Daphne cancels the consumers still open (a window that ran out) and each one
#   leaves its rooms and Redis subscriptions before the process exits. Daphne waits for all of
#   them (kill_all_applications, with no timeout of its own): 10 s, as Daphne's own
#   application_close_timeout gives one disconnected consumer.
SHUTDOWN_SECONDS = 10
# A rollout replaces at most this share of the protocol pods at a time (maxUnavailable 0), so
# at most this share drains at once: their clients come back within the reconnect jitter and the
# other pods absorb them (loadtest/capacity_model.py sizes the pods for that storm, and
# tests/test_capacity.py keeps its copy of this number equal).
ROLLOUT_MAX_SURGE = "25%"


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


def termination_grace_seconds(spec: PlatformSpec) -> int:
    """The kubelet's whole budget for a protocol pod's stop: the hook's start-up, the drain
    window, the hook's overrun and the process's exit (the constants above say why each)."""
    return DRAIN_HOOK_STARTUP_SECONDS + spec.drain_grace_seconds + DRAIN_HOOK_OVERRUN_SECONDS + SHUTDOWN_SECONDS


def _migrate_init_container(spec: PlatformSpec, env: list[Obj]) -> Obj:
    # Migrations run once per rollout, from the chart's hook Job (templates/migrate-job.yaml:
    # pre-upgrade, and post-install). A pod only checks that the database has every migration of
    # its image: no advisory lock, no DDL, about a second, so a rollout's replacements are not
    # queued one by one behind the lock. A migration still pending (the post-install Job has not
    # run yet, or nobody ran one: an operator without the chart) is applied by the first pod to
    # take the lock, as before, so no pod ever serves an older schema.
    return {
        "name": "migrate",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["parley", "migrate", "--if-pending"],
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
            # The preStop drain, its start-up and the exit after it (termination_grace_seconds);
            # otherwise the kubelet SIGKILLs a pod that is still draining.
            "terminationGracePeriodSeconds": termination_grace_seconds(spec),
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
                "readinessProbe": {"httpGet": {"path": "/readyz", **http},
                                   "periodSeconds": READINESS_PERIOD_SECONDS,
                                   "failureThreshold": READINESS_FAILURE_THRESHOLD,
                                   "timeoutSeconds": READINESS_TIMEOUT_SECONDS},
                "livenessProbe": {"httpGet": {"path": "/healthz", **http},
                                  "periodSeconds": LIVENESS_PERIOD_SECONDS,
                                  "failureThreshold": LIVENESS_FAILURE_THRESHOLD,
                                  "timeoutSeconds": LIVENESS_TIMEOUT_SECONDS},
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
            # and channels-redis puts it back on the queue for the next worker. (The same budget
            # as a protocol pod's: generous for a batch, and one setting for both.)
            "terminationGracePeriodSeconds": termination_grace_seconds(spec),
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
            # Never below the current capacity during a rollout (maxUnavailable 0): new pods come
            # up before old ones drain, and maxSurge bounds the pods draining at once (with
            # minReadySeconds, below). The PodDisruptionBudget plays no part here: it only gates
            # evictions (node drains), never a Deployment's own scale-downs.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": ROLLOUT_MAX_SURGE}},
            "minReadySeconds": min_ready_seconds(spec, role),
            "revisionHistoryLimit": 5,
            "template": template,
        },
    }


def min_ready_seconds(spec: PlatformSpec, role: str) -> int:
    """How long a rollout's new pod must be ready before it counts as available, and the next
    old pod is deleted. The Deployment controller does not count terminating pods against
    maxSurge (KEP-5882): without this, a batch's replacements are ready within seconds and the
    next batch starts draining while the last one still is, until most of the old pods drain at
    once. Waiting out a whole drain (the hook's start-up, the window, its overrun) keeps it to
    maxSurge. The pods serve as soon as they are ready: only the rollout waits.

    Workers hold no sockets (their stop is a SIGTERM and the batch in hand): nothing to space."""
    if role != "protocol":
        return 0
    return DRAIN_HOOK_STARTUP_SECONDS + spec.drain_grace_seconds + DRAIN_HOOK_OVERRUN_SECONDS


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
    # Evictions (a node drain, the cluster autoscaler) one pod at a time: they move WebSockets in
    # small batches, never a whole node's at once. Rollouts and scale-downs are not evictions:
    # the Deployment's strategy and the operator's scale-down step bound those.
    # unhealthyPodEvictionPolicy AlwaysAllow: a pod that is not ready (crash-looping, stuck in
    # its init container, cut off from the database) takes no new clients, and evicting it still
    # runs its preStop drain for the sockets it holds. With the default (IfHealthyBudget) one
    # such pod uses up the budget, and a node drain waits behind it until it recovers, perhaps
    # for ever (Kubernetes >= 1.27; older API servers drop the field).
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, role),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name, role)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
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
