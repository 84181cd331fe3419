"""values.schema.json turns the mistakes a user makes into a clear error at install time."""

from __future__ import annotations

import pytest

from .chartkit import helm

MISTAKES = [
    ("shard count of 0", ["--set", "redis.shards=0"], "/redis/shards"),
    ("shards as text", ["--set-string", "redis.shards=two"], "/redis/shards"),
    ("replicas as text", ["--set-string", "protocol.minReplicas=2"], "/protocol/minReplicas"),
    ("zero protocol pods", ["--set", "protocol.minReplicas=0"], "/protocol/minReplicas"),
    ("unknown server", ["--set", "protocol.server=gunicorn"], "/protocol/server"),
    ("wildcard hosts without origins", ["--set", "allowedHosts[0]=*"], "allowedOrigins"),
    ("origin without a scheme", ["--set", "allowedOrigins[0]=chat.example.com"], "/allowedOrigins/0"),
    ("origin with a path", ["--set", "allowedOrigins[0]=https://chat.example.com/"], "/allowedOrigins/0"),
    ("proxy as a host name", ["--set", "trustedProxies[0]=ingress-nginx"], "/trustedProxies/0"),
    ("exempt address as a host name", ["--set", "handshakeLimit.exempt[0]=locust-worker"], "/handshakeLimit/exempt/0"),
    ("exempt addresses as one string", ["--set", "handshakeLimit.exempt=10.0.0.0/8"], "/handshakeLimit/exempt"),
    ("handshake rate of zero", ["--set", "handshakeLimit.perSecond=0"], "/handshakeLimit/perSecond"),
    # --set leaves a fraction a string: the message says so at the right path.
    ("handshake rate via --set", ["--set", "handshakeLimit.perSecond=2.5"], "/handshakeLimit/perSecond"),
    ("handshake burst as a fraction", ["--set-json", "handshakeLimit.burst=2.5"], "/handshakeLimit/burst"),
    ("handshake burst of zero", ["--set", "handshakeLimit.burst=0"], "/handshakeLimit/burst"),
    ("misspelt handshake value", ["--set", "handshakeLimit.perSecnd=5"], "perSecnd"),
    ("misspelt top-level value", ["--set", "allowedHost[0]=chat.example.com"], "allowedHost"),
    ("misspelt nested value", ["--set", "protocol.maxReplica=3"], "maxReplica"),
    ("digest that is a tag", ["--set", "global.image.digest=latest"], "/global/image/digest"),
    ("redis URL without scheme", ["--set", "redis.enabled=false", "--set", "externalRedis.urls[0]=redis.example:6379"],
     "/externalRedis/urls/0"),
    ("no database without the built-in one", ["--set", "postgresql.enabled=false"], "database"),
    ("no redis without the built-in one", ["--set", "redis.enabled=false"], "externalRedis"),
    ("drain of zero seconds", ["--set", "drain.gracePeriodSeconds=0"], "/drain/gracePeriodSeconds"),
    ("pull policy typo", ["--set", "global.image.pullPolicy=always"], "/global/image/pullPolicy"),
    ("worker without channels", ["--set-json", "worker.channels=[]"], "/worker/channels"),
]


@pytest.mark.parametrize(("name", "args", "where"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_schema_rejects(name: str, args: list[str], where: str) -> None:
    result = helm("template", "chat", ".", "-n", "chat", *args, check=False)
    assert result.returncode != 0, f"{name}: accepted"
    assert where in result.stderr, result.stderr


ACCEPTED = [
    ("wildcard hosts with origins", ["--set", "allowedHosts[0]=*", "--set", "allowedOrigins[0]=https://chat.example.com"]),
    ("explicit hosts", ["--set", "allowedHosts[0]=chat.example.com", "--set", "allowedHosts[1]=.example.org"]),
    ("IPv6 proxies", ["--set", "trustedProxies[0]=fd00::/8"]),
    ("a handshake limit", ["--set-json", 'handshakeLimit={"perSecond": 0.5, "burst": 5, "exempt": ["10.244.0.0/16"]}']),
    ("IPv6 exempt addresses", ["--set", "handshakeLimit.exempt[0]=fd00::/8"]),
    ("workers at zero", ["--set", "worker.minReplicas=0"]),
    ("a digest", ["--set", "global.image.digest=sha256:" + "0" * 64]),
]


@pytest.mark.parametrize(("name", "args"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_schema_accepts(name: str, args: list[str]) -> None:
    helm("template", "chat", ".", "-n", "chat", *args)


def test_min_above_max_fails_with_a_message() -> None:
    result = helm("template", "chat", ".", "-n", "chat", "--set", "protocol.minReplicas=5",
                  "--set", "protocol.maxReplicas=3", check=False)
    assert result.returncode != 0
    assert "protocol.minReplicas" in result.stderr
