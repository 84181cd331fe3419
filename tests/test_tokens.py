"""Tokens and credentials (issue 9, item 8, and the handshake half of item 6).

Each test names the hole it keeps closed; every one fails on a7b58dd (plaintext tokens that
never expire, no logout, a query per handshake, no throttles, one password validator, login
CSRF through register). Real Redis (the runner's REDIS_URLS) and the real ASGI application.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from chat import contract, reads, throttle, tokens, views
from chat.models import ApiToken
from chat.throttle import HandshakeLimiter, Verdict, address_key
from parley.asgi import application
from tests.helpers import make_user, record_statements

pytestmark = pytest.mark.django_db(transaction=True)

REMOTE = ("203.0.113.7", 40000)  # TEST-NET-3: not loopback, so the handshake limit applies


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Iterator[None]:
    """No cache, bucket or Redis back-off carried over from another test; fast password hashes
    (the throttle tests fail many logins)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    tokens.CACHE.clear()
    monkeypatch.setattr(throttle, "HANDSHAKES", HandshakeLimiter(10.0, 50, ["127.0.0.0/8", "::1/128"]))
    monkeypatch.setattr(throttle, "_skip_until", 0.0)
    monkeypatch.setattr(throttle, "_client", None)
    yield
    tokens.CACHE.clear()


def config(module: Any, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    monkeypatch.setattr(module, "CONFIG", dataclasses.replace(module.CONFIG, **changes))


def api(client: Client, method: str, path: str, token: str | None = None, body: object = None,
        **extra: Any) -> tuple[int, dict, Any]:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    data = json.dumps(body) if body is not None else None
    response = getattr(client, method)(path, data=data, content_type="application/json", **headers, **extra)
    return response.status_code, response.json(), response


def login(client: Client, username: str, password: str, address: str = "198.51.100.1", **body: Any):
    return api(client, "post", "/api/auth/token", body={"username": username, "password": password, **body},
               REMOTE_ADDR=address)


async def handshake(token: str | None, client: tuple[str, int] | None = REMOTE) -> tuple[str, int | None]:
    """Open a socket: ("hello", None) when admitted, ("rejected", _) when refused before the
    upgrade, else (error code, close code)."""
    comm = WebsocketCommunicator(application, f"/ws/?token={token}" if token else "/ws/")
    if client is not None:
        comm.scope["client"] = client
    connected, code = await comm.connect()
    if not connected:
        # Daphne and uvicorn answer a close before accept with HTTP 403.
        return "rejected", code
    first = json.loads(await comm.receive_from())
    if first["type"] == "hello":
        await comm.disconnect()
        return "hello", None
    closed = await comm.receive_output()
    assert closed["type"] == "websocket.close"
    return first["code"], closed["code"]


async def open_socket(token: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, f"/ws/?token={token}")
    assert (await comm.connect())[0]
    assert json.loads(await comm.receive_from())["type"] == "hello"
    return comm


async def closed_with(comm: WebsocketCommunicator, timeout: float = 5) -> int:
    """The close code the server ends this socket with (frames before it are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await comm.receive_output(max(deadline - loop.time(), 0.01))
        if message["type"] == "websocket.close":
            return message["code"]


class QueryCounter:
    """Counts statements touching the token table, on every thread (the handshake's lookups
    run on the database thread, not the test's)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.lock = threading.Lock()

    def note(self, sql: str) -> None:
        if "chat_apitoken" in sql:
            with self.lock:
                self.statements.append(sql)


@pytest.fixture
def token_queries(monkeypatch: pytest.MonkeyPatch) -> QueryCounter:
    """Both read paths: the ORM's cursors (HTTP; handshakes on SQLite) and the protocol
    process's async statements on PostgreSQL (`chat.reads_pg`)."""
    counter = QueryCounter()
    record_statements(monkeypatch, counter.note)
    return counter


# --- how tokens are stored, expire and are capped ---------------------------------------------------


def test_token_is_not_stored_in_plaintext():
    make_user("alice", "correct-horse-9")
    status, body, _ = login(Client(), "alice", "correct-horse-9")
    assert status == 200
    plaintext = body["token"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM chat_apitoken")
        rows = cursor.fetchall()
    assert rows and not any(plaintext in str(value) for row in rows for value in row)
    assert ApiToken.objects.filter(key_hash=hashlib.sha256(plaintext.encode()).hexdigest()).exists()
    # ... and the plaintext still works, on HTTP and on the socket.
    assert api(Client(), "get", "/api/me", plaintext)[0] == 200
    assert asyncio.run(handshake(plaintext, None))[0] == "hello"


def test_token_expires_after_the_configured_ttl(monkeypatch):
    config(tokens, monkeypatch, token_ttl_days=7)
    make_user("alice", "correct-horse-9")
    _, body, _ = login(Client(), "alice", "correct-horse-9")
    expires = ApiToken.objects.latest("created_at").expires_at
    assert abs(expires - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)
    assert body["expires_at"] == expires.isoformat()


def test_expired_token_is_refused_for_http_and_socket_handshake():
    _, token = make_user("alice")
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    status, body, _ = api(Client(), "get", "/api/me", token)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    assert asyncio.run(handshake(token, None)) == ("forbidden", 4001)


def test_cached_token_is_refused_once_it_expires(monkeypatch):
    """A positive cache entry must not outlive the token's own expiry."""
    _, token = make_user("alice")
    assert api(Client(), "get", "/api/me", token)[0] == 200  # cached now
    soon = timezone.now() + timedelta(seconds=1)
    ApiToken.objects.update(expires_at=soon)
    tokens.CACHE.clear()
    assert api(Client(), "get", "/api/me", token)[0] == 200  # cached with the new expiry
    monkeypatch.setattr(tokens.timezone, "now", lambda: soon + timedelta(seconds=1))
    assert api(Client(), "get", "/api/me", token)[0] == 401


def test_last_used_is_written_at_most_once_an_hour(token_queries):
    _, token = make_user("alice")
    assert ApiToken.objects.get().last_used is None
    api(Client(), "get", "/api/me", token)
    first = ApiToken.objects.get().last_used
    assert first is not None
    since = len(token_queries.statements)
    for _ in range(3):
        tokens.CACHE.clear()  # every request a database lookup: still no write
        api(Client(), "get", "/api/me", token)
    assert ApiToken.objects.get().last_used == first
    assert not [s for s in token_queries.statements[since:] if s.lstrip().upper().startswith("UPDATE")]
    ApiToken.objects.update(last_used=first - timedelta(hours=2))
    tokens.CACHE.clear()
    api(Client(), "get", "/api/me", token)
    assert ApiToken.objects.get().last_used > first - timedelta(minutes=1)


def test_logins_do_not_pile_up_tokens_beyond_the_cap(monkeypatch):
    config(tokens, monkeypatch, max_tokens_per_user=3)
    user, _ = make_user("alice", "correct-horse-9")  # make_user's own token is the oldest
    issued = [login(Client(), "alice", "correct-horse-9", name=f"device-{n}")[1]["token"] for n in range(5)]
    assert ApiToken.objects.filter(user=user).count() == 3
    assert sorted(ApiToken.objects.values_list("name", flat=True)) == ["device-2", "device-3", "device-4"]
    assert [api(Client(), "get", "/api/me", t)[0] for t in issued] == [401, 401, 200, 200, 200]


def test_expired_tokens_are_deleted_at_the_next_login():
    user, _ = make_user("alice", "correct-horse-9")
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(days=1))
    login(Client(), "alice", "correct-horse-9")
    assert ApiToken.objects.filter(user=user).count() == 1


def test_token_label_is_kept_and_validated():
    make_user("alice", "correct-horse-9")
    status, body, _ = login(Client(), "alice", "correct-horse-9", name="ci-bot")
    assert status == 200 and body["name"] == "ci-bot"
    assert ApiToken.objects.filter(name="ci-bot").count() == 1
    assert login(Client(), "alice", "correct-horse-9", name="x" * 101)[0] == 400
    assert login(Client(), "alice", "correct-horse-9", name=7)[0] == 400


def test_existing_plaintext_tokens_are_hashed_by_the_migration_and_keep_working():
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.migrate([("chat", "0001_initial")])
    old_apps = executor.loader.project_state([("chat", "0001_initial")]).apps
    user = old_apps.get_model("auth", "User").objects.create(username="legacy", password="!")
    old_apps.get_model("chat", "ApiToken").objects.create(user_id=user.pk, key="legacy-plaintext-token-0123456789")
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes("chat"))
    row = ApiToken.objects.get(user_id=user.pk)
    assert row.key_hash == hashlib.sha256(b"legacy-plaintext-token-0123456789").hexdigest()
    assert row.expires_at > timezone.now() + timedelta(days=1)  # not expired by the upgrade
    assert api(Client(), "get", "/api/me", "legacy-plaintext-token-0123456789")[0] == 200


# --- revocation ----------------------------------------------------------------------------------------


async def _subscribe() -> tuple[aioredis.Redis, Any]:
    client = aioredis.Redis.from_url(os.environ["REDIS_URLS"].split(",")[0])
    pubsub = client.pubsub()
    await pubsub.subscribe(contract.control_topic())
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    return client, pubsub


async def _published(pubsub: Any, timeout: float = 5) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            return json.loads(message["data"])
    raise AssertionError("nothing published on the control topic")


async def test_logout_revokes_token_for_http_and_socket_handshake():
    _, token = await database_sync_to_async(make_user)("alice")
    _, other = await database_sync_to_async(make_user)("bob")
    client = Client()
    assert (await database_sync_to_async(api)(client, "get", "/api/me", token))[0] == 200  # now cached
    live = await open_socket(token)
    redis_client, pubsub = await _subscribe()
    status, body, _ = await database_sync_to_async(api)(client, "post", "/api/auth/logout", token)
    assert status == 200 and body["revoked"] == "token"
    assert await _published(pubsub) == {"kick_token": hashlib.sha256(token.encode()).hexdigest()}
    # The revoking process forgets it at once: no cache window here.
    assert (await database_sync_to_async(api)(client, "get", "/api/me", token))[0] == 401
    assert await handshake(token, None) == ("forbidden", 4001)
    # The socket opened with it is closed by the control topic's receiver.
    assert await closed_with(live) == 4001
    assert (await database_sync_to_async(api)(client, "get", "/api/me", other))[0] == 200
    await pubsub.aclose()
    await redis_client.aclose()


async def test_logout_all_revokes_every_token_and_closes_all_the_users_sockets():
    user, first = await database_sync_to_async(make_user)("alice")
    second = (await database_sync_to_async(tokens.create_token)(user, "laptop"))[1]
    _, bobs = await database_sync_to_async(make_user)("bob")
    sockets = [await open_socket(first), await open_socket(second)]
    bob_socket = await open_socket(bobs)
    redis_client, pubsub = await _subscribe()
    status, body, _ = await database_sync_to_async(api)(Client(), "post", "/api/auth/logout-all", second)
    assert status == 200 and body["tokens"] == 2
    assert await _published(pubsub) == {"kick_user": user.pk}
    for token in (first, second):
        assert (await database_sync_to_async(api)(Client(), "get", "/api/me", token))[0] == 401
    assert [await closed_with(s) for s in sockets] == [4001, 4001]
    await bob_socket.send_to(text_data=json.dumps({"type": "ping"}))
    assert json.loads(await bob_socket.receive_from())["type"] == "pong"
    await bob_socket.disconnect()
    await pubsub.aclose()
    await redis_client.aclose()


def test_session_logout_needs_csrf_and_ends_the_session():
    make_user("alice", "correct-horse-9")
    client = Client(enforce_csrf_checks=True)
    assert client.login(username="alice", password="correct-horse-9")
    assert api(client, "post", "/api/auth/logout")[0] == 403  # a cross-site POST cannot log you out
    client.get("/")
    status, body, _ = api(client, "post", "/api/auth/logout", HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert status == 200 and body["revoked"] == "session"
    assert api(client, "get", "/api/me")[0] == 401


async def test_deactivating_a_user_closes_live_sockets_and_refuses_the_token():
    user, token = await database_sync_to_async(make_user)("alice")
    live = await open_socket(token)
    redis_client, pubsub = await _subscribe()

    def deactivate() -> None:
        fresh = get_user_model().objects.get(pk=user.pk)
        fresh.is_active = False
        fresh.save()

    await database_sync_to_async(deactivate)()
    assert await _published(pubsub) == {"kick_user": user.pk}
    assert await closed_with(live) == 4001
    assert await handshake(token, None) == ("forbidden", 4001)
    # Saving an already inactive user again publishes nothing more.
    await database_sync_to_async(lambda: get_user_model().objects.get(pk=user.pk).save())()
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5) is None
    await pubsub.aclose()
    await redis_client.aclose()


# --- handshakes: cache and rate limit -------------------------------------------------------------------


async def test_random_token_handshake_storm_costs_few_queries(monkeypatch, token_queries):
    monkeypatch.setattr(throttle, "HANDSHAKES", HandshakeLimiter(2.0, 10, []))
    started = time.monotonic()
    answers = [await handshake(secrets.token_urlsafe(32)) for _ in range(200)]
    elapsed = time.monotonic() - started
    admitted = 10 + 2 * elapsed + 1
    assert answers.count(("forbidden", 4001)) <= admitted
    refused = [answer for answer in answers if answer[0] != "forbidden"]
    assert len(refused) >= 200 - admitted
    # Told why at most once a second; the rest of the storm is refused before the upgrade.
    explained = refused.count(("rate_limited", 4029))
    assert 1 <= explained <= elapsed + 1, refused
    assert refused.count(("rejected", 1000)) == len(refused) - explained, refused
    assert len(token_queries.statements) <= admitted, len(token_queries.statements)


async def test_repeated_bad_token_handshakes_cost_one_query(token_queries):
    bad = secrets.token_urlsafe(32)
    # From loopback (exempt from the limit): the negative cache alone must carry this.
    answers = {await handshake(bad, ("127.0.0.1", 5000)) for _ in range(100)}
    assert answers == {("forbidden", 4001)}
    assert len(token_queries.statements) == 1


async def test_garbage_tokens_cost_no_query(token_queries):
    for garbage in ("x", "not a token", "%00" * 10, "a" * 300, "é" * 43):
        assert await handshake(garbage, None) == ("forbidden", 4001)
    assert token_queries.statements == []


async def test_repeated_good_token_handshakes_cost_one_lookup(token_queries):
    _, token = await database_sync_to_async(make_user)("alice")
    before = len(token_queries.statements)
    for _ in range(20):
        assert await handshake(token, None) == ("hello", None)
    lookups = [s for s in token_queries.statements[before:] if not s.lstrip().upper().startswith("UPDATE")]
    assert len(lookups) == 1


async def test_handshakes_over_the_rate_are_closed_4029(monkeypatch, caplog):
    monkeypatch.setattr(throttle, "HANDSHAKES", HandshakeLimiter(0.5, 5, ["127.0.0.0/8"]))
    _, token = await database_sync_to_async(make_user)("alice")
    with caplog.at_level(logging.WARNING, logger="chat.throttle"):
        answers = [await handshake(token) for _ in range(8)]
    # The first refusal says why (4029); the next ones within the second are refused before the
    # upgrade, the cheapest answer there is.
    assert answers == [("hello", None)] * 5 + [("rate_limited", 4029)] + [("rejected", 1000)] * 2
    assert "refused" in caplog.text and "203.0.113.7" in caplog.text
    # A second later the client is told why again, so a client reconnecting in a loop learns it.
    await asyncio.sleep(1.05)
    # Cookie (no token) sockets count too: they cost a session and a user query.
    assert await handshake(None) == ("rate_limited", 4029)
    assert await handshake(None) == ("rejected", 1000)
    # Another address has its own bucket; loopback is exempt.
    assert await handshake(token, ("203.0.113.8", 1)) == ("hello", None)
    assert {await handshake(token, ("127.0.0.1", 1)) for _ in range(10)} == {("hello", None)}
    await asyncio.sleep(2.1)  # 0.5/s: one new handshake after two seconds
    assert await handshake(token) == ("hello", None)


def test_an_address_over_the_rate_is_told_why_once_a_second_and_refused_cheaply_otherwise():
    clock = [0.0]
    limiter = HandshakeLimiter(0.1, 2, [], clock=lambda: clock[0])
    verdicts = [limiter.check("192.0.2.1") for _ in range(5)]
    assert verdicts == [Verdict.ADMIT] * 2 + [Verdict.EXPLAIN] + [Verdict.REJECT] * 2
    clock[0] += 0.5
    assert limiter.check("192.0.2.1") is Verdict.REJECT
    assert limiter.check("192.0.2.2") is Verdict.ADMIT  # an address of its own
    clock[0] += 0.5
    assert limiter.check("192.0.2.1") is Verdict.EXPLAIN


def test_handshake_limiter_memory_is_bounded():
    clock = [0.0]
    limiter = HandshakeLimiter(1.0, 3, [], max_addresses=100, clock=lambda: clock[0])
    for n in range(5000):
        assert limiter.allow(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        clock[0] += 0.001
    assert len(limiter.buckets) <= 100
    assert [limiter.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]


def test_token_cache_is_bounded_in_size_and_time(monkeypatch):
    config(tokens, monkeypatch, token_cache_seconds=3.0)
    clock = [0.0]
    cache = tokens.LookupCache(max_entries=50, clock=lambda: clock[0])
    for n in range(500):
        cache.put(f"h{n}", None)
    assert len(cache.entries) == 50 and cache.get("h499") == (True, None) and cache.get("h0") == (False, None)
    clock[0] += 3.01  # another process's revocation is believed here within this bound
    assert cache.get("h499") == (False, None)


def test_ipv6_clients_share_one_bucket_per_64():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:198.51.100.4") == "198.51.100.4"
    limiter = HandshakeLimiter(0.001, 2, [])
    assert [limiter.allow(f"2001:db8:1:2::{n}") for n in range(1, 4)] == [True, True, False]


# --- login, login page and registration throttles --------------------------------------------------------


def test_login_is_throttled_per_account_with_retry_after(monkeypatch):
    config(throttle, monkeypatch, login_failures_per_account=3, login_window_seconds=120)
    make_user("alice", "correct-horse-9")
    make_user("bob", "correct-horse-9")
    client = Client()
    # From a different address each time: the account's counter is what stops this.
    answers = [login(client, "alice", "wrong", address=f"198.51.100.{n}")[0] for n in range(3)]
    assert answers == [401, 401, 401]
    status, body, response = login(client, "alice", "correct-horse-9", address="198.51.100.99")
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert 1 <= int(response["Retry-After"]) <= 120
    assert login(client, "bob", "correct-horse-9")[0] == 200  # other accounts are unaffected


def test_successful_login_clears_the_accounts_failures_but_guessing_stays_limited(monkeypatch):
    config(throttle, monkeypatch, login_failures_per_account=3)
    make_user("alice", "correct-horse-9")
    client = Client()
    for _ in range(2):
        assert login(client, "alice", "wrong")[0] == 401
    assert login(client, "alice", "correct-horse-9")[0] == 200  # the owner is not locked out
    assert [login(client, "alice", "wrong")[0] for _ in range(4)] == [401, 401, 401, 429]


def test_login_is_throttled_per_client_address(monkeypatch):
    config(throttle, monkeypatch, login_failures_per_address=4)
    make_user("alice", "correct-horse-9")
    client = Client()
    # Credential stuffing: a different account each time, from one address.
    assert [login(client, f"user{n}", "guess", address="198.51.100.5")[0] for n in range(4)] == [401] * 4
    status, _, response = login(client, "alice", "correct-horse-9", address="198.51.100.5")
    assert status == 429 and int(response["Retry-After"]) >= 1
    assert login(client, "alice", "correct-horse-9", address="198.51.100.6")[0] == 200


def test_login_throttle_counters_are_in_redis_under_the_channel_prefix(monkeypatch):
    make_user("alice", "correct-horse-9")
    login(Client(), "alice", "wrong", address="198.51.100.5")
    store = redis.Redis.from_url(os.environ["REDIS_URLS"].split(",")[0])
    found = store.keys(f"{contract.CONFIG.channel_prefix}:throttle:*")
    names = sorted(k.decode() for k in found)
    assert len(names) == 2 and any(":login:address:198.51.100.5" in n for n in names)
    assert not any("alice" in n for n in names)  # usernames are hashed, not put in keys


def test_login_page_is_throttled_with_the_same_counters(monkeypatch):
    config(throttle, monkeypatch, login_failures_per_account=3)
    make_user("alice", "correct-horse-9")
    page = Client()
    for _ in range(2):
        assert page.post("/login/", {"username": "alice", "password": "wrong"}).status_code == 200
    assert login(Client(), "alice", "wrong")[0] == 401  # the API's failure counts for the page too
    response = page.post("/login/", {"username": "alice", "password": "correct-horse-9"})
    assert response.status_code == 429 and int(response["Retry-After"]) >= 1
    assert "_auth_user_id" not in page.session


def test_login_page_counts_failures_and_still_logs_in():
    make_user("alice", "correct-horse-9")
    page = Client()
    assert page.post("/login/", {"username": "alice", "password": "wrong"}).status_code == 200
    store = redis.Redis.from_url(os.environ["REDIS_URLS"].split(",")[0])
    assert len(store.keys("*throttle:login:account:*")) == 1
    response = page.post("/login/", {"username": "alice", "password": "correct-horse-9"})
    assert response.status_code == 302 and page.get("/").status_code == 200
    # The account's failures are forgotten after its login; the address's stay.
    assert store.keys("*throttle:login:account:*") == [] and len(store.keys("*throttle:login:address:*")) == 1


def test_registration_is_throttled_per_client_address(monkeypatch):
    config(views, monkeypatch, open_registration=True)
    config(throttle, monkeypatch, register_per_address=3)
    client = Client()
    statuses = [api(client, "post", "/api/auth/register", body={"username": f"new{n}", "password": "long-enough-1"},
                    REMOTE_ADDR="198.51.100.7")[0] for n in range(4)]
    assert statuses == [201, 201, 201, 429]
    assert api(client, "post", "/api/auth/register", body={"username": "other", "password": "long-enough-1"},
               REMOTE_ADDR="198.51.100.8")[0] == 201


def test_login_throttle_fails_open_with_a_warning_when_redis_is_down(monkeypatch, caplog):
    make_user("alice", "correct-horse-9")
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    monkeypatch.setattr(throttle, "_client", dead)
    with caplog.at_level(logging.WARNING, logger="chat.throttle"):
        started = time.monotonic()
        assert login(Client(), "alice", "wrong")[0] == 401
        assert login(Client(), "alice", "correct-horse-9")[0] == 200
    assert "login throttle off" in caplog.text
    assert time.monotonic() - started < 5  # one timeout, then Redis is skipped for a while


# --- passwords and registration -----------------------------------------------------------------------


def test_weak_passwords_are_refused_at_registration(monkeypatch):
    config(views, monkeypatch, open_registration=True)
    client = Client()
    for username, password in (("carol", "password"), ("carol", "1234567890123"), ("carolinexyz", "carolinexyz1"),
                               ("carol", "short1")):
        status, body, _ = api(client, "post", "/api/auth/register", body={"username": username, "password": password})
        assert status == 400 and body["error"]["code"] == "invalid_request", (username, password)
    assert api(client, "post", "/api/auth/register", body={"username": "carol", "password": "plum-orbit-72"})[0] == 201


def test_demo_password_still_seeds_and_logs_in():
    call_command("seed_demo", stdout=open(os.devnull, "w"))
    assert authenticate(username="alice", password="parley-demo") is not None
    validate_password("parley-demo", get_user_model().objects.get(username="alice"))
    with pytest.raises(ValidationError):
        validate_password("alice123", get_user_model()(username="alice"))


def test_register_with_login_needs_json_and_the_csrf_token(monkeypatch):
    config(views, monkeypatch, open_registration=True)
    browser = Client(enforce_csrf_checks=True)
    body = json.dumps({"username": "victim-of-attacker", "password": "plum-orbit-72", "login": True})
    # A cross-site form can send text/plain without a preflight: that must not log the browser in.
    response = browser.post("/api/auth/register", data=body, content_type="text/plain")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = browser.post("/api/auth/register", data=body, content_type="application/json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
    assert "sessionid" not in browser.cookies and not get_user_model().objects.filter(username="victim-of-attacker")
    browser.get("/signup/")
    response = browser.post("/api/auth/register", data=body, content_type="application/json",
                            HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value)
    assert response.status_code == 201 and "token" not in response.json()  # a session, no token
    assert api(browser, "get", "/api/me")[1]["user"]["username"] == "victim-of-attacker"
    # Programs (no session wanted) need neither the JSON content type nor a CSRF token... JSON
    # they send anyway; a token comes back.
    status, created, _ = api(Client(enforce_csrf_checks=True), "post", "/api/auth/register",
                             body={"username": "program", "password": "plum-orbit-72"})
    assert status == 201 and created["token"] and created["expires_at"]


async def test_a_handshake_whose_token_cannot_be_checked_is_told_to_come_back(monkeypatch):
    """Database unreachable: not 'log in again' (4001), but 'reconnect later' (4013)."""
    _, token = await database_sync_to_async(make_user)("alice")
    tokens.CACHE.clear()

    class Unreachable:
        async def lookup_token(self, key_hash: str) -> None:
            raise reads.DatabaseUnavailable("connection refused")

    monkeypatch.setattr(reads, "backend", lambda: Unreachable())
    assert await handshake(token, None) == ("unavailable", 4013)
    monkeypatch.undo()
    assert await handshake(token, None) == ("hello", None)
