"""Resource quantities: compared by value with what the API server stores, validated up front.

A spec that writes `cpu: 1` or `"0.5"` gets back `"1"` and `"500m"` from the API server; read as
strings they never matched, so every poll rewrote the template and posted DriftReverted.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from op_testkit import admit, chat_platform, schema

from parley_operator import children, quantity, resources
from parley_operator import spec as specmod

# (as a spec may write it, as the API server stores it)
SAME_VALUE = [
    (1, "1"),
    ("1", "1000m"),
    ("0.5", "500m"),
    (".5", "500m"),
    ("1024Mi", "1Gi"),
    ("1536Mi", "1536Mi"),
    ("1e3", "1k"),
    ("1000M", "1G"),
    ("0.1", "100m"),
    ("1.5Gi", "1536Mi"),
]


@pytest.mark.parametrize(("written", "stored"), SAME_VALUE, ids=[f"{w}={s}" for w, s in SAME_VALUE])
def test_spellings_of_one_quantity_have_one_value(written: Any, stored: str) -> None:
    assert quantity.parse(written) == quantity.parse(stored)


@pytest.mark.parametrize(("a", "b"), [("1", "1001m"), ("1Gi", "1G"), ("500m", "5"), (1, "1Ki")])
def test_different_quantities_differ(a: Any, b: str) -> None:
    assert quantity.parse(a) != quantity.parse(b)


@pytest.mark.parametrize("bad", ["1Gb", "lots", "", "1.2.3", "-1", "1 Gi", 0.5, True, None, "1e1.5"])
def test_what_the_api_server_rejects_is_not_a_quantity(bad: Any) -> None:
    with pytest.raises(quantity.QuantityError):
        quantity.parse(bad)


def test_precision_below_a_nano_rounds_up_as_the_api_server_does() -> None:
    assert quantity.parse("0.0000000001") == quantity.parse("1n")


def _stored(template: dict[str, Any], canonical: dict[str, str]) -> dict[str, Any]:
    """The template as the API server returns it: the protocol container's quantities canonical,
    defaults added."""
    stored = copy.deepcopy(template)
    for container in stored["spec"]["containers"]:
        container["terminationMessagePath"] = "/dev/termination-log"
        for kind in ("requests", "limits"):
            amounts = container["resources"].get(kind, {})
            for name, amount in amounts.items():
                amounts[name] = canonical.get(f"{kind}.{name}", amount)
    return stored


def _template(protocol_resources: dict[str, Any]) -> dict[str, Any]:
    body = chat_platform(protocol={"resources": protocol_resources})
    return resources.protocol_template(body, specmod.parse_body(body))


def test_a_template_with_non_canonical_quantities_matches_what_the_server_stored() -> None:
    desired = _template({"requests": {"cpu": 1, "memory": "1024Mi"}, "limits": {"cpu": "0.5"}})
    stored = _stored(desired, {"requests.cpu": "1", "requests.memory": "1Gi", "limits.cpu": "500m"})
    assert stored != desired  # as strings they differ ...
    assert children.template_matches(desired, stored)  # ... as quantities they do not


def test_a_changed_quantity_is_still_drift() -> None:
    desired = _template({"requests": {"cpu": 1, "memory": "1024Mi"}})
    stored = _stored(desired, {"requests.cpu": "2", "requests.memory": "1Gi"})
    assert not children.template_matches(desired, stored)


GOOD_RESOURCES = [
    {"requests": {"cpu": 1, "memory": "1024Mi"}},
    {"requests": {"cpu": "0.5", "memory": "256Mi", "ephemeral-storage": "1G"}, "limits": {"memory": "1e9"}},
    {"limits": {"cpu": "500m"}},
]
BAD_RESOURCES = [
    ("unit typo", {"requests": {"memory": "1Gb"}}),
    ("a word", {"limits": {"cpu": "lots"}}),
    ("a float", {"requests": {"cpu": 0.5}}),
    ("negative", {"requests": {"cpu": -1}}),
    ("negative string", {"requests": {"cpu": "-1"}}),
    ("a list", {"requests": {"cpu": ["1"]}}),
    ("requests as a string", {"requests": "1"}),
]


@pytest.mark.parametrize("value", GOOD_RESOURCES)
@pytest.mark.parametrize("role", ["protocol", "worker"])
def test_quantities_as_kubernetes_writes_them_are_accepted(role: str, value: dict[str, Any]) -> None:
    stored = admit(chat_platform(**{role: {"resources": value}}))
    parsed = specmod.parse_body(stored)
    assert (parsed.protocol if role == "protocol" else parsed.worker).resources == value


@pytest.mark.parametrize(("name", "value"), BAD_RESOURCES, ids=[b[0] for b in BAD_RESOURCES])
@pytest.mark.parametrize("role", ["protocol", "worker"])
def test_bad_quantities_are_rejected_by_the_schema_and_by_the_operator(
    role: str, name: str, value: dict[str, Any],
) -> None:
    body = chat_platform(**{role: {"resources": value}})
    with pytest.raises(jsonschema.ValidationError):
        admit(body)
    # An object that skipped the schema (an older CRD) fails with a message, not with a 422
    # on its Deployment at every poll.
    with pytest.raises(specmod.SpecError, match=f"spec.{role}.resources"):
        specmod.parse_body(body)


def test_the_crd_and_the_operator_use_one_quantity_pattern() -> None:
    for role in ("protocol", "worker"):
        res = schema()["properties"]["spec"]["properties"][role]["properties"]["resources"]
        for kind in ("requests", "limits"):
            item = res["properties"][kind]["additionalProperties"]
            assert item["pattern"] == quantity.PATTERN
            assert item["x-kubernetes-int-or-string"] is True
