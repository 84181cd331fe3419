"""The ChatPlatform spec as typed Python, with the same defaults as the CRD's OpenAPI schema.

A real API server applies the schema's defaults before the operator sees an object; the
defaults are repeated here so that an object which skipped defaulting (an older CRD, a test
server) behaves identically. `tests/operator/test_crd.py` keeps the two sets equal.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from parley_operator import quantity, scaling

DEFAULT_CHANNELS = ("chat.persist", "chat.bot")


class SpecError(ValueError):
    """The spec is inconsistent in a way the OpenAPI schema alone cannot express."""


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class RedisSpec:
    urls: tuple[str, ...] = ()
    secret_ref: SecretKeyRef | None = None  # a key holding comma-separated URLs
    channel_prefix: str = "asgi"  # resolved: the spec's value or default_channel_prefix()
    expiry_seconds: int = 60


@dataclass(frozen=True)
class DatabaseSpec:
    secret_name: str
    url_key: str = "url"
    secret_key_key: str = "secret-key"


@dataclass(frozen=True)
class RoleSpec:
    min_replicas: int
    max_replicas: int
    target: int  # connections per pod (protocol) or queued messages per replica (worker)
    resources: Mapping[str, Any] = field(default_factory=dict)
    channels: tuple[str, ...] = ()  # worker only
    activation: int = 0  # worker only: queue depth that wakes workers from zero must exceed this
    cooldown_seconds: int = 0  # worker only: seconds without load before going to zero
    ceiling: int | None = None  # protocol only: most connections one pod may have to hold


@dataclass(frozen=True)
class FallbackSpec:
    """`spec.scaling.fallback` (KEDA's fallback): replicas to go up to after `failure_threshold`
    failed readings of Redis in a row. A floor, never a scale-down: a role above it is held."""

    failure_threshold: int = 3
    protocol_replicas: int | None = None
    worker_replicas: int | None = None

    @property
    def enabled(self) -> bool:
        return self.protocol_replicas is not None or self.worker_replicas is not None


@dataclass(frozen=True)
class ScalingSpec:
    poll_interval_seconds: int = 15
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300
    max_scale_up_step: int = 10
    max_scale_down_step: int = 2
    tolerance_percent: int = 10
    fallback: FallbackSpec = FallbackSpec()


@dataclass(frozen=True)
class HandshakeLimitSpec:
    """`spec.handshakeLimit`: only what the spec sets. None / empty: the app's own default
    (`app/parley/config.py`), so the defaults live in one place."""

    per_second: float | None = None  # PARLEY_HANDSHAKES_PER_SECOND
    burst: int | None = None  # PARLEY_HANDSHAKE_BURST
    exempt: tuple[str, ...] = ()  # CIDRs exempt besides loopback (PARLEY_HANDSHAKE_EXEMPT)


@dataclass(frozen=True)
class PlatformSpec:
    image: str
    image_pull_policy: str
    allowed_hosts: tuple[str, ...]
    allowed_origins: tuple[str, ...]
    trusted_proxies: tuple[str, ...]
    redis: RedisSpec
    database: DatabaseSpec
    protocol: RoleSpec
    worker: RoleSpec
    scaling: ScalingSpec
    drain_grace_seconds: int
    server: str = "daphne"  # PARLEY_SERVER of the protocol pods: daphne or uvicorn
    handshake_limit: HandshakeLimitSpec = HandshakeLimitSpec()

    @property
    def fallback(self) -> FallbackSpec:
        return self.scaling.fallback

    def policy(self, role: str) -> scaling.Policy:
        r = self.protocol if role == "protocol" else self.worker
        s = self.scaling
        return scaling.Policy(
            min_replicas=r.min_replicas,
            max_replicas=r.max_replicas,
            target=float(r.target),
            tolerance=s.tolerance_percent / 100.0,
            up_window=float(s.scale_up_stabilization_seconds),
            down_window=float(s.scale_down_stabilization_seconds),
            max_step_up=s.max_scale_up_step,
            max_step_down=s.max_scale_down_step,
            metric="connections" if role == "protocol" else "queue depth",
            activation=float(r.activation),
            # Work below the activation threshold still wakes a worker once it has waited half
            # the channel expiry: the other half is for a poll and a worker's start-up.
            activation_max_wait=self.redis.expiry_seconds / 2,
            cooldown=float(r.cooldown_seconds),
            ceiling=None if r.ceiling is None else float(r.ceiling),
            fallback_replicas=s.fallback.protocol_replicas if role == "protocol" else s.fallback.worker_replicas,
            fallback_after=s.fallback.failure_threshold,
        )


DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    "protocol": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
    "worker": {"requests": {"cpu": "100m", "memory": "192Mi"}, "limits": {"memory": "384Mi"}},
}

# The defaults as they appear in the CRD (camelCase paths), compared with the CRD by a test.
DEFAULTS: dict[str, Any] = {
    "imagePullPolicy": "IfNotPresent",
    "redis.expirySeconds": 60,
    "redis.secretRef.key": "urls",
    "database.secretRef.urlKey": "url",
    "database.secretRef.secretKeyKey": "secret-key",
    "protocol.minReplicas": 2,
    "protocol.maxReplicas": 10,
    "protocol.targetConnectionsPerPod": 5000,
    "protocol.server": "daphne",
    "protocol.resources": DEFAULT_RESOURCES["protocol"],
    "worker.minReplicas": 1,
    "worker.maxReplicas": 10,
    "worker.channels": list(DEFAULT_CHANNELS),
    "worker.targetQueueDepthPerReplica": 100,
    "worker.activationQueueDepth": 0,
    "worker.scaleToZeroCooldownSeconds": 0,
    "worker.resources": DEFAULT_RESOURCES["worker"],
    "scaling.pollIntervalSeconds": 15,
    "scaling.scaleUpStabilizationSeconds": 0,
    "scaling.scaleDownStabilizationSeconds": 300,
    "scaling.maxScaleUpStep": 10,
    "scaling.maxScaleDownStep": 2,
    "scaling.tolerancePercent": 10,
    "scaling.fallback.failureThreshold": 3,
    "drain.gracePeriodSeconds": 30,
}


ORIGIN_RE = re.compile(r"^https?://[^/*\s]+$")
# The lowest `handshakeLimit.perSecond` (as in the CRD): above 0, which would switch the limit off
# for every address (exempt the addresses that need it instead); at 0.1 an address that spent its
# burst still gets a handshake every 10 s.
MIN_HANDSHAKES_PER_SECOND = 0.1


def default_channel_prefix(namespace: str, name: str) -> str:
    """The Redis key prefix of a platform whose spec sets none: unique per ChatPlatform.

    Every Redis key of the platform starts with it (`<prefix>chat.persist`, `<prefix>:proc:<pid>`,
    ...), so two platforms sharing one Redis never read or write each other's keys.
    """
    return f"parley.{namespace}.{name}."


def _get(spec: Mapping[str, Any], path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return DEFAULTS[path]
        node = node[part]
    return node


def _check_cidr(where: str, cidr: Any) -> None:
    # ipaddress also takes integers (5 is 0.0.0.5/32): only a string is a CIDR here.
    try:
        if not isinstance(cidr, str):
            raise ValueError(cidr)
        ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise SpecError(f"{where}: {cidr!r} is not a CIDR") from exc


def _handshake_limit(spec: Mapping[str, Any]) -> HandshakeLimitSpec:
    """`spec.handshakeLimit`, checked here as well as by the CRD: an object that skipped the
    schema must fail with a message, not give the pods an environment they crash-loop on."""
    limit = spec.get("handshakeLimit")
    if limit is None:
        return HandshakeLimitSpec()
    if not isinstance(limit, Mapping):
        raise SpecError(f"spec.handshakeLimit: {limit!r} is not an object {{perSecond, burst, exempt}}")
    per_second = limit.get("perSecond")
    if per_second is not None and (
        isinstance(per_second, bool) or not isinstance(per_second, int | float)
        or not math.isfinite(per_second) or per_second < MIN_HANDSHAKES_PER_SECOND
    ):
        raise SpecError(f"spec.handshakeLimit.perSecond: {per_second!r} is not a number of handshakes "
                        f"per second of at least {MIN_HANDSHAKES_PER_SECOND}")
    burst = limit.get("burst")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise SpecError(f"spec.handshakeLimit.burst: {burst!r} is not a whole number of handshakes of at least 1")
    exempt = limit.get("exempt")
    if exempt is None:
        exempt = []
    if not isinstance(exempt, list | tuple):
        raise SpecError(f"spec.handshakeLimit.exempt: {exempt!r} is not a list of CIDRs")
    for cidr in exempt:
        _check_cidr("spec.handshakeLimit.exempt", cidr)
    return HandshakeLimitSpec(per_second=per_second, burst=burst, exempt=tuple(exempt))


def _fallback(spec: Mapping[str, Any]) -> FallbackSpec:
    raw = (spec.get("scaling") or {}).get("fallback")
    if not raw:
        return FallbackSpec()
    fallback = FallbackSpec(
        failure_threshold=_get(spec, "scaling.fallback.failureThreshold"),
        protocol_replicas=raw.get("protocolReplicas"),
        worker_replicas=raw.get("workerReplicas"),
    )
    if not fallback.enabled:
        raise SpecError("spec.scaling.fallback: set protocolReplicas, workerReplicas or both")
    return fallback


def _resources(where: str, value: Any) -> Mapping[str, Any]:
    """Container resources, checked here as well as by the CRD: a quantity the API server would
    reject (`"1Gb"`, `0.5`) must fail with a message here, not as a 422 on the Deployment."""
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: {value!r} is not an object {{requests, limits}}")
    for kind in ("requests", "limits"):
        amounts = value.get(kind) or {}
        if not isinstance(amounts, Mapping):
            raise SpecError(f"{where}.{kind}: {amounts!r} is not a map of quantities")
        for name, amount in amounts.items():
            try:
                quantity.parse(amount)
            except quantity.QuantityError as exc:
                raise SpecError(f"{where}.{kind}.{name}: {exc}") from exc
    return value


def parse_body(body: Mapping[str, Any]) -> PlatformSpec:
    """parse() of a whole ChatPlatform object (its name and namespace give the default prefix)."""
    meta = body.get("metadata") or {}
    return parse(body.get("spec") or {}, namespace=meta.get("namespace"), name=meta.get("name"))


def parse(spec: Mapping[str, Any], namespace: str | None = None, name: str | None = None) -> PlatformSpec:
    """Turn `.spec` into a PlatformSpec, or raise SpecError on cross-field mistakes.

    `namespace` and `name` are the ChatPlatform's: without `spec.redis.channelPrefix` they make
    the platform's own prefix (default_channel_prefix).
    """
    image = spec.get("image")
    if not image:
        raise SpecError("spec.image is required")

    hosts = tuple(spec.get("allowedHosts") or ())
    if not hosts:
        raise SpecError("spec.allowedHosts is required: the host names the platform serves")
    origins = tuple(spec.get("allowedOrigins") or ())
    if "*" in hosts and not origins:
        # Origins are never derived from a wildcard: a cross-site page could then open a socket
        # with a user's cookie.
        raise SpecError('spec.allowedOrigins is required when spec.allowedHosts contains "*"')
    for origin in origins:
        if not ORIGIN_RE.match(origin):
            raise SpecError(f"spec.allowedOrigins: {origin!r} is not an origin like https://chat.example.com")
    proxies = tuple(spec.get("trustedProxies") or ())
    for cidr in proxies:
        _check_cidr("spec.trustedProxies", cidr)

    redis = spec.get("redis") or {}
    prefix = redis.get("channelPrefix")
    if not prefix:
        if not namespace or not name:
            raise SpecError("spec.redis.channelPrefix is unset and the ChatPlatform's name is unknown")
        prefix = default_channel_prefix(namespace, name)
    urls = tuple(redis.get("urls") or ())
    redis_ref = None
    if redis.get("secretRef"):
        redis_ref = SecretKeyRef(redis["secretRef"]["name"], _get(spec, "redis.secretRef.key"))
    if bool(urls) == bool(redis_ref):
        raise SpecError("set exactly one of spec.redis.urls and spec.redis.secretRef")

    db_ref = (spec.get("database") or {}).get("secretRef") or {}
    if not db_ref.get("name"):
        raise SpecError("spec.database.secretRef.name is required")

    def role(role_name: str, target_field: str) -> RoleSpec:
        lo, hi = _get(spec, f"{role_name}.minReplicas"), _get(spec, f"{role_name}.maxReplicas")
        if lo > hi:
            raise SpecError(f"spec.{role_name}.minReplicas ({lo}) exceeds maxReplicas ({hi})")
        target = _get(spec, f"{role_name}.{target_field}")
        ceiling = (spec.get("protocol") or {}).get("maxConnectionsPerPod") if role_name == "protocol" else None
        if ceiling is not None and ceiling < target:
            raise SpecError(f"spec.protocol.maxConnectionsPerPod ({ceiling}) is below "
                            f"targetConnectionsPerPod ({target})")
        return RoleSpec(
            min_replicas=lo,
            max_replicas=hi,
            target=_get(spec, f"{role_name}.{target_field}"),
            resources=_resources(f"spec.{role_name}.resources", _get(spec, f"{role_name}.resources")),
            channels=tuple(_get(spec, "worker.channels")) if role_name == "worker" else (),
            activation=_get(spec, "worker.activationQueueDepth") if role_name == "worker" else 0,
            cooldown_seconds=_get(spec, "worker.scaleToZeroCooldownSeconds") if role_name == "worker" else 0,
            ceiling=ceiling,
        )

    return PlatformSpec(
        image=image,
        image_pull_policy=_get(spec, "imagePullPolicy"),
        allowed_hosts=hosts,
        allowed_origins=origins,
        trusted_proxies=proxies,
        redis=RedisSpec(
            urls=urls,
            secret_ref=redis_ref,
            channel_prefix=prefix,
            expiry_seconds=_get(spec, "redis.expirySeconds"),
        ),
        database=DatabaseSpec(
            secret_name=db_ref["name"],
            url_key=_get(spec, "database.secretRef.urlKey"),
            secret_key_key=_get(spec, "database.secretRef.secretKeyKey"),
        ),
        protocol=role("protocol", "targetConnectionsPerPod"),
        worker=role("worker", "targetQueueDepthPerReplica"),
        scaling=ScalingSpec(
            poll_interval_seconds=_get(spec, "scaling.pollIntervalSeconds"),
            scale_up_stabilization_seconds=_get(spec, "scaling.scaleUpStabilizationSeconds"),
            scale_down_stabilization_seconds=_get(spec, "scaling.scaleDownStabilizationSeconds"),
            max_scale_up_step=_get(spec, "scaling.maxScaleUpStep"),
            max_scale_down_step=_get(spec, "scaling.maxScaleDownStep"),
            tolerance_percent=_get(spec, "scaling.tolerancePercent"),
            fallback=_fallback(spec),
        ),
        drain_grace_seconds=_get(spec, "drain.gracePeriodSeconds"),
        server=_get(spec, "protocol.server"),
        handshake_limit=_handshake_limit(spec),
    )
