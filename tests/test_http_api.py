"""The JSON HTTP API: tokens, registration, rooms, DMs, history, health, CSRF."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat import views
from chat.models import Membership, Room
from chat.services import create_group, store_batch
from tests.helpers import make_user

pytestmark = pytest.mark.django_db


def api(client: Client, method: str, path: str, token: str | None = None, body: object = None, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    data = json.dumps(body) if body is not None else None
    response = getattr(client, method)(path, data=data, content_type="application/json", **headers, **extra)
    return response.status_code, response.json()


@pytest.fixture
def client() -> Client:
    return Client(enforce_csrf_checks=True)


def test_token_is_issued_for_good_credentials_only(client):
    make_user("alice", "correct-horse")
    status, body = api(client, "post", "/api/auth/token", body={"username": "alice", "password": "correct-horse"})
    assert status == 200 and len(body["token"]) > 30 and body["user"]["username"] == "alice"
    status, body = api(client, "post", "/api/auth/token", body={"username": "alice", "password": "wrong"})
    assert status == 401 and body["error"]["code"] == "bad_credentials"
    status, body = api(client, "post", "/api/auth/token", body={"username": "alice"})
    assert status == 400 and "password" in body["error"]["message"]
    response = client.post("/api/auth/token", data="{nope", content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_frame"


def test_registration_follows_the_setting(client, monkeypatch):
    import dataclasses

    monkeypatch.setattr(views, "CONFIG", dataclasses.replace(views.CONFIG, open_registration=False))
    status, body = api(client, "post", "/api/auth/register", body={"username": "new", "password": "long-enough-1"})
    assert status == 403 and body["error"]["code"] == "registration_closed"

    monkeypatch.setattr(views, "CONFIG", dataclasses.replace(views.CONFIG, open_registration=True))
    status, body = api(client, "post", "/api/auth/register", body={"username": "new", "password": "long-enough-1"})
    assert status == 201 and body["token"]
    status, body = api(client, "post", "/api/auth/register", body={"username": "new", "password": "long-enough-1"})
    assert status == 409 and body["error"]["code"] == "username_taken"
    status, body = api(client, "post", "/api/auth/register", body={"username": "x y", "password": "short"})
    assert status == 400


def test_rooms_are_created_listed_and_joinable(client):
    _, alice = make_user("alice")
    _, bob = make_user("bob")
    status, room = api(client, "post", "/api/rooms", alice, {"name": "general", "kind": "group", "private": False})
    assert status == 201 and room["kind"] == "group" and room["id"] > 0
    status, secret = api(client, "post", "/api/rooms", alice, {"name": "secret", "private": True})
    assert status == 201 and secret["private"] is True
    status, body = api(client, "get", "/api/rooms", bob)
    assert [r["name"] for r in body["public"]] == ["general"]  # bob sees the public room only
    assert body["rooms"] == []
    status, body = api(client, "post", "/api/rooms", alice, {"name": "x", "kind": "dm"})
    assert status == 400
    status, body = api(client, "post", "/api/rooms", alice, {"name": "x", "private": "yes"})
    assert status == 400


def test_private_rooms_take_invitations_from_members_only(client):
    alice_user, alice = make_user("alice")
    _, bob = make_user("bob")
    make_user("carol")
    room = create_group(alice_user, "secret", True)
    status, _ = api(client, "post", f"/api/rooms/{room.pk}/members", bob, {"user": "carol"})
    assert status == 403
    status, _ = api(client, "post", f"/api/rooms/{room.pk}/members", alice, {"user": "bob"})
    assert status == 200
    assert Membership.objects.filter(room=room, user__username="bob").exists()
    status, _ = api(client, "post", f"/api/rooms/{room.pk}/members", alice, {"user": "nobody"})
    assert status == 404


def test_opening_a_dm_twice_returns_the_same_room(client):
    _, alice = make_user("alice")
    _, bob = make_user("bob")
    status, first = api(client, "post", "/api/dms", alice, {"user": "bob"})
    assert status == 200 and first["kind"] == "dm" and first["peer"]["username"] == "bob"
    status, second = api(client, "post", "/api/dms", bob, {"user": "alice"})
    assert second["id"] == first["id"] and second["peer"]["username"] == "alice"
    assert Room.objects.filter(kind="dm").count() == 1
    assert api(client, "post", "/api/dms", alice, {"user": "alice"})[0] == 403
    assert api(client, "post", "/api/dms", alice, {"user": "ghost"})[0] == 404


def test_history_is_paginated_and_members_only(client):
    alice_user, alice = make_user("alice")
    _, eve = make_user("eve")
    room = create_group(alice_user, "team", True)
    store_batch([
        {"room": room.pk, "sender": alice_user.pk, "body": str(n), "client_msg_id": f"c{n}"} for n in range(7)
    ])
    status, body = api(client, "get", f"/api/rooms/{room.pk}/messages?limit=3", alice)
    assert status == 200 and [m["seq"] for m in body["messages"]] == [5, 6, 7] and body["has_more"]
    status, body = api(client, "get", f"/api/rooms/{room.pk}/messages?limit=3&before_seq=5", alice)
    assert [m["seq"] for m in body["messages"]] == [2, 3, 4]
    assert api(client, "get", f"/api/rooms/{room.pk}/messages", eve)[0] == 403
    assert api(client, "get", f"/api/rooms/{room.pk}/messages?limit=abc", alice)[0] == 400
    assert api(client, "get", f"/api/rooms/{room.pk}/messages?limit=0", alice)[0] == 400
    assert api(client, "get", "/api/rooms/999999/messages", alice)[0] == 404


def test_unauthenticated_and_wrong_method_get_json_errors(client):
    status, body = api(client, "get", "/api/rooms")
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    assert api(client, "get", "/api/rooms", "bogus-token")[0] == 401
    _, token = make_user("alice")
    assert api(client, "delete", "/api/rooms", token)[0] == 405


def test_session_posts_need_the_csrf_token(client):
    make_user("alice", "correct-horse")
    assert client.login(username="alice", password="correct-horse")
    response = client.post("/api/rooms", data=json.dumps({"name": "x"}), content_type="application/json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
    client.get("/")  # the page sets the csrftoken cookie
    csrf = client.cookies["csrftoken"].value
    response = client.post(
        "/api/rooms", data=json.dumps({"name": "x"}), content_type="application/json", HTTP_X_CSRFTOKEN=csrf
    )
    assert response.status_code == 201


def test_login_page_and_redirect(client):
    assert client.get("/").status_code == 302
    assert client.get("/login/").status_code == 200
