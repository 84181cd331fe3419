"""The CRD the Helm chart installs: defaults, validation, printer columns."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from op_testkit import admit, chat_platform, load_crd, schema

from parley_operator import spec as specmod


def spec_schema() -> dict[str, Any]:
    return schema()["properties"]["spec"]


def schema_defaults(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, sub in (node.get("properties") or {}).items():
        path = f"{prefix}{key}"
        if "default" in sub and sub["default"] != {}:  # `{}` only lets nested defaults apply
            found[path] = sub["default"]
        found.update(schema_defaults(sub, f"{path}."))
    return found


def test_crd_defaults_are_the_operators_defaults() -> None:
    assert schema_defaults(spec_schema()) == specmod.DEFAULTS


def test_a_minimal_spec_is_complete_after_defaulting() -> None:
    stored = admit(chat_platform())
    assert stored["spec"]["worker"]["channels"] == ["chat.persist", "chat.bot"]
    assert stored["spec"]["scaling"]["pollIntervalSeconds"] == 15
    # Parsing the defaulted and the raw spec gives the same platform: no behaviour depends on
    # whether the API server defaulted the object.
    assert specmod.parse_body(stored) == specmod.parse_body(chat_platform())


BAD_SPECS = [
    ("no image", {"image": None}),
    ("empty image", {"image": ""}),
    ("redis url without scheme", {"redis": {"urls": ["10.0.0.1:6379"]}}),
    ("no redis shard", {"redis": {"urls": []}}),
    ("no database secret", {"database": {}}),
    ("zero protocol pods", {"protocol": {"minReplicas": 0}}),
    ("negative workers", {"worker": {"minReplicas": -1}}),
    ("worker without channels", {"worker": {"channels": []}}),
    ("channel name with a space", {"worker": {"channels": ["chat persist"]}}),
    ("zero target", {"worker": {"targetQueueDepthPerReplica": 0}}),
    ("poll interval zero", {"scaling": {"pollIntervalSeconds": 0}}),
    ("tolerance as a fraction", {"scaling": {"tolerancePercent": 0.1}}),
    ("unknown pull policy", {"imagePullPolicy": "Sometimes"}),
    ("drain of zero seconds", {"drain": {"gracePeriodSeconds": 0}}),
    ("replicas as a string", {"protocol": {"maxReplicas": "10"}}),
    ("no allowed hosts", {"allowedHosts": None}),
    ("empty allowed hosts", {"allowedHosts": []}),
    ("origin with a path", {"allowedOrigins": ["https://chat.example.com/app"]}),
    ("origin without scheme", {"allowedOrigins": ["chat.example.com"]}),
    ("wildcard origin", {"allowedOrigins": ["https://*.example.com"]}),
    ("proxy that is a host name", {"trustedProxies": ["ingress-nginx"]}),
    ("exempt address that is a host name", {"handshakeLimit": {"exempt": ["locust-worker"]}}),
    ("exempt addresses as one string", {"handshakeLimit": {"exempt": "10.0.0.0/8"}}),
    ("handshake rate of zero", {"handshakeLimit": {"perSecond": 0}}),
    ("handshake rate as a string", {"handshakeLimit": {"perSecond": "10"}}),
    ("handshake burst as a fraction", {"handshakeLimit": {"burst": 2.5}}),
    ("handshake burst of zero", {"handshakeLimit": {"burst": 0}}),
    ("handshake limit as a number", {"handshakeLimit": 10}),
    ("prefix with a space", {"redis": {"urls": ["redis://r"], "channelPrefix": "my app"}}),
    ("prefix with a glob", {"redis": {"urls": ["redis://r"], "channelPrefix": "a*"}}),
]


@pytest.mark.parametrize(("name", "change"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_are_rejected_by_the_schema(name: str, change: dict[str, Any]) -> None:
    body = chat_platform()
    body["spec"].update(change)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    with pytest.raises(jsonschema.ValidationError):
        admit(body)


@pytest.mark.parametrize(("change", "message"), [
    ({"protocol": {"minReplicas": 5, "maxReplicas": 3}}, "protocol.minReplicas"),
    ({"worker": {"minReplicas": 4, "maxReplicas": 2}}, "worker.minReplicas"),
    ({"redis": {"urls": ["redis://a"], "secretRef": {"name": "r"}}}, "exactly one"),
    ({"allowedHosts": ["*"]}, "allowedOrigins is required when"),
    ({"allowedHosts": ["chat.example.com", "*"], "allowedOrigins": []},
     "allowedOrigins is required when"),
])
def test_cross_field_rules_exist_in_cel_and_in_the_operator(change: dict[str, Any], message: str) -> None:
    rules = [r["message"] for r in spec_schema()["x-kubernetes-validations"]]
    rules += [r["message"] for r in spec_schema()["properties"]["redis"]["x-kubernetes-validations"]]
    assert any(message in r for r in rules)
    body = admit({**chat_platform(), "spec": {**chat_platform()["spec"], **change}})
    with pytest.raises(specmod.SpecError, match=message):
        specmod.parse_body(body)


def test_the_wildcard_rule_in_cel_says_what_parse_says() -> None:
    (rule,) = [r for r in spec_schema()["x-kubernetes-validations"] if "'*'" in r["rule"]]
    assert rule["rule"] == "!('*' in self.allowedHosts) || (has(self.allowedOrigins) && size(self.allowedOrigins) > 0)"
    ok = chat_platform(allowedHosts=["*"], allowedOrigins=["https://chat.example.com"])
    assert specmod.parse_body(admit(ok)).allowed_origins == ("https://chat.example.com",)


def test_the_default_redis_prefix_is_per_platform() -> None:
    assert "default" not in spec_schema()["properties"]["redis"]["properties"]["channelPrefix"]
    a = specmod.parse_body(admit(chat_platform(name="chat", namespace="team-a")))
    b = specmod.parse_body(admit(chat_platform(name="chat", namespace="team-b")))
    assert a.redis.channel_prefix == "parley.team-a.chat."
    assert b.redis.channel_prefix == "parley.team-b.chat."
    with pytest.raises(specmod.SpecError, match="channelPrefix"):
        specmod.parse(chat_platform()["spec"])  # no name to derive it from
    # A derived prefix always satisfies the schema's pattern for an explicit one.
    pattern = spec_schema()["properties"]["redis"]["properties"]["channelPrefix"]["pattern"]
    assert re.match(pattern, a.redis.channel_prefix)


def test_trusted_proxies_must_be_networks() -> None:
    body = admit(chat_platform(trustedProxies=["10.0.0.0/33"]))  # matches the pattern, not a network
    with pytest.raises(specmod.SpecError, match="trustedProxies"):
        specmod.parse_body(body)


def test_the_handshake_limit_is_optional_and_typed() -> None:
    assert specmod.parse_body(admit(chat_platform())).handshake_limit == specmod.HandshakeLimitSpec()
    body = admit(chat_platform(handshakeLimit={"perSecond": 25, "burst": 500,
                                               "exempt": ["10.244.0.0/16", "fd00::/8", "198.51.100.7"]}))
    assert "default" not in spec_schema()["properties"]["handshakeLimit"]  # absent stays absent
    assert specmod.parse_body(body).handshake_limit == specmod.HandshakeLimitSpec(
        per_second=25, burst=500, exempt=("10.244.0.0/16", "fd00::/8", "198.51.100.7"))
    fraction = admit(chat_platform(handshakeLimit={"perSecond": 0.5}))
    assert specmod.parse_body(fraction).handshake_limit.per_second == 0.5
    # The schema's minimum is the operator's.
    assert spec_schema()["properties"]["handshakeLimit"]["properties"]["perSecond"]["minimum"] == (
        specmod.MIN_HANDSHAKES_PER_SECOND)


def test_exempt_addresses_must_be_networks() -> None:
    body = admit(chat_platform(handshakeLimit={"exempt": ["10.0.0.0/8", "10.0.0.0/33"]}))  # the pattern's fine
    with pytest.raises(specmod.SpecError, match=r"spec\.handshakeLimit\.exempt: '10\.0\.0\.0/33' is not a CIDR"):
        specmod.parse_body(body)


@pytest.mark.parametrize(("limit", "message"), [
    ("fast", r"spec\.handshakeLimit: 'fast' is not an object"),
    ({"perSecond": "10"}, r"perSecond: '10' is not a number"),
    ({"perSecond": True}, r"perSecond: True is not a number"),
    ({"perSecond": 0}, r"perSecond: 0 is not a number .* at least 0\.1"),
    ({"perSecond": float("nan")}, r"perSecond: nan"),
    ({"burst": 2.5}, r"burst: 2\.5 is not a whole number"),
    ({"burst": "50"}, r"burst: '50' is not a whole number"),
    ({"burst": 0}, r"burst: 0 is not a whole number .* at least 1"),
    ({"exempt": "10.0.0.0/8"}, r"exempt: '10\.0\.0\.0/8' is not a list of CIDRs"),
    ({"exempt": [5]}, r"exempt: 5 is not a CIDR"),
    ({"exempt": ["10.0.0.0/8", "locust-worker"]}, r"exempt: 'locust-worker' is not a CIDR"),
])
def test_a_handshake_limit_that_skipped_the_schema_is_refused_by_name(limit: Any, message: str) -> None:
    # An object the API server did not validate (an older CRD, a test server) gets the same
    # verdict from the operator, naming the bad entry, instead of pods that fail to start.
    with pytest.raises(specmod.SpecError, match=message):
        specmod.parse_body(chat_platform(handshakeLimit=limit))


def test_redis_urls_may_come_from_a_secret() -> None:
    body = chat_platform()
    body["spec"]["redis"] = {"secretRef": {"name": "parley-redis"}}
    parsed = specmod.parse_body(admit(body))
    assert parsed.redis.secret_ref == specmod.SecretKeyRef("parley-redis", "urls")


def test_kubectl_get_shows_the_health_columns() -> None:
    version = load_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Protocol"] == ".status.summary.protocol"
    assert columns["Workers"] == ".status.summary.worker"
    assert columns["Queue"] == ".status.totalQueueDepth"
    assert columns["Connections"] == ".status.connections"
    assert columns["Age"] == ".metadata.creationTimestamp"
