"""A ChatPlatform's `handshakeLimit` as the protocol process applies it (issue 12: in-cluster load tests).

Each Locust worker pod is one client address opening thousands of sockets; the platform engineer
exempts the load pods' CIDR. These tests take the environment the operator writes for such a
spec, load the app's settings from it the way a protocol pod does, and open sockets through the
real ASGI application: the exempt CIDR is never throttled, loopback still is exempt, and every
other address still is limited.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from chat import throttle, tokens
from chat.throttle import HandshakeLimiter
from parley import config, proxies
from parley.asgi import application
from parley_operator import resources
from parley_operator.spec import parse
from tests.helpers import amake_user

pytestmark = pytest.mark.django_db(transaction=True)

LOAD_POD = ("10.244.3.7", 40000)  # in the load test's pod CIDR below
INGRESS_POD = ("10.244.9.9", 40000)  # the ingress controller: same pod CIDR
PUBLIC = ("203.0.113.7", 40000)  # TEST-NET-3: anyone else
# A low limit, so that "would have been refused" shows within a few handshakes.
BURST = 3


def protocol_environment(handshake_limit: dict[str, Any]) -> dict[str, str]:
    """The PARLEY_HANDSHAKE* variables of the protocol container the operator builds."""
    spec = parse({"image": "parley:test", "allowedHosts": ["chat.example.com"],
                  "redis": {"urls": ["redis://127.0.0.1:6379/0"]}, "database": {"secretRef": {"name": "db"}},
                  "handshakeLimit": handshake_limit}, namespace="ns", name="chat")
    owner = {"metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat"}}
    (container,) = resources.deployment(owner, spec, "protocol", replicas=1)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("PARLEY_HANDSHAKE")}


def limiter_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> HandshakeLimiter:
    """The limiter a protocol process started with `env` builds (as `chat.throttle` does at import)."""
    for name in ("PARLEY_HANDSHAKES_PER_SECOND", "PARLEY_HANDSHAKE_BURST", "PARLEY_HANDSHAKE_EXEMPT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = config.load()
    return HandshakeLimiter(settings.handshakes_per_second, settings.handshake_burst, settings.handshake_exempt)


@pytest.fixture
def load_test_platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[HandshakeLimiter]:
    """Protocol processes of a platform whose spec exempts the load pods' CIDR."""
    env = protocol_environment({"perSecond": 0.1, "burst": BURST, "exempt": ["10.244.0.0/16"]})
    limiter = limiter_from(env, monkeypatch)
    tokens.CACHE.clear()
    monkeypatch.setattr(throttle, "HANDSHAKES", limiter)
    yield limiter
    tokens.CACHE.clear()


def trust_proxies(monkeypatch: pytest.MonkeyPatch, cidrs: list[str]) -> None:
    monkeypatch.setattr(proxies, "CONFIG", dataclasses.replace(proxies.CONFIG, trusted_proxies=cidrs))
    proxies.trusted_networks.cache_clear()


@pytest.fixture(autouse=True)
def _forget_trusted_proxies() -> Iterator[None]:
    proxies.trusted_networks.cache_clear()
    yield
    proxies.trusted_networks.cache_clear()


async def handshake(token: str, client: tuple[str, int], forwarded_for: str | None = None) -> str | int:
    """"hello" when admitted, else the close code (4029) or "rejected" (HTTP 403 before the upgrade)."""
    headers = [(b"x-forwarded-for", forwarded_for.encode())] if forwarded_for else []
    comm = WebsocketCommunicator(application, f"/ws/?token={token}", headers=headers)
    comm.scope["client"] = client
    try:
        connected, _ = await comm.connect()
        if not connected:
            return "rejected"
        first = json.loads(await comm.receive_from())
        if first["type"] == "hello":
            return "hello"
        closed = await comm.receive_output()
        return closed["code"]
    finally:
        # Gone, as a real client is after its socket closes: a refused handshake's consumer would
        # otherwise wait for more events, and outlive the test (hanging the loop's teardown).
        await comm.disconnect()


def test_the_operators_loopback_is_the_apps_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # The operator writes loopback itself in front of the spec's CIDRs (the variable replaces the
    # default): if config.py's default changes, this is where the two would part.
    monkeypatch.delenv("PARLEY_HANDSHAKE_EXEMPT", raising=False)
    assert config.load().handshake_exempt == list(resources.LOOPBACK_EXEMPT)


def test_the_operators_environment_is_what_the_app_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = protocol_environment({"perSecond": 2.5, "burst": 500, "exempt": ["10.244.0.0/16", "fd00:10::/64"]})
    limiter = limiter_from(env, monkeypatch)
    assert (limiter.rate, limiter.burst) == (2.5, 500)
    assert [str(net) for net in limiter.exempt] == ["127.0.0.0/8", "::1/128", "10.244.0.0/16", "fd00:10::/64"]
    # Nothing given: the app's defaults.
    assert protocol_environment({}) == {}
    default = limiter_from({}, monkeypatch)
    assert (default.rate, default.burst) == (10.0, 50)


async def test_an_exempt_cidr_is_never_throttled_and_others_still_are(load_test_platform: HandshakeLimiter) -> None:
    _, token = await amake_user("loadtest-user")
    # A load pod opens many times its burst at once: every one is admitted, none counted.
    assert [await handshake(token, LOAD_POD) for _ in range(BURST * 5)] == ["hello"] * (BURST * 5)
    assert load_test_platform.buckets == {}
    # Loopback stays exempt although the spec named only the pod CIDR.
    assert {await handshake(token, ("127.0.0.1", 1)) for _ in range(BURST * 2)} == {"hello"}
    # Anyone else: the burst, then 4029 (told why), then refused before the upgrade.
    answers = [await handshake(token, PUBLIC) for _ in range(BURST + 2)]
    assert answers == ["hello"] * BURST + [4029, "rejected"]


async def test_behind_trusted_proxies_the_client_not_the_ingress_is_judged(
    load_test_platform: HandshakeLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingress controller's pods are in the exempt pod CIDR too. With trustedProxies set, a
    public client coming through it is judged by its own address, so it is still limited."""
    _, token = await amake_user("someone")
    trust_proxies(monkeypatch, ["10.244.0.0/16"])
    answers = [await handshake(token, INGRESS_POD, forwarded_for=PUBLIC[0]) for _ in range(BURST + 1)]
    assert answers == ["hello"] * BURST + [4029]
    # A load pod reaching the platform through the same ingress is still exempt.
    assert {await handshake(token, INGRESS_POD, forwarded_for=LOAD_POD[0]) for _ in range(BURST * 2)} == {"hello"}


async def test_without_trusted_proxies_exempting_the_ingress_exempts_everyone(
    load_test_platform: HandshakeLimiter,
) -> None:
    """The risk docs/security.md names: without trustedProxies every client through the ingress
    has the ingress pod's address, and an exempt CIDR covering it lifts the limit for all."""
    _, token = await amake_user("someone")
    answers = {await handshake(token, INGRESS_POD, forwarded_for=PUBLIC[0]) for _ in range(BURST * 3)}
    assert answers == {"hello"}
