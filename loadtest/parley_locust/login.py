"""Users without a users file: log in with a password, and learn the rooms from the HTTP API.

For platforms whose test accounts exist already (`--login lt:secret` logs in as `lt0000000`,
`lt0000001`, ... with that password): `POST /api/auth/token`, then `GET /api/rooms`. The users
file is the faster way (no login storm at the start of a run: the platform throttles failed
logins per account and address, and each login is a password hash on the server).
"""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlsplit

from parley_locust.users_file import RoomRef, UserRecord

# Usernames the mint makes: <prefix><index, 7 digits>.
INDEX_DIGITS = 7
# Member count assumed for rooms (the API does not list sizes): only weights which group a
# chatting user talks in.
ASSUMED_ROOM_SIZE = 20
TIMEOUT_S = 30.0


def parse_login(text: str) -> tuple[str, str]:
    prefix, sep, password = text.partition(":")
    if not sep or not prefix or not password:
        raise ValueError("--login is <username prefix>:<password>")
    return prefix, password


def _call(base: str, method: str, path: str, body: dict[str, object] | None = None,
          token: str | None = None) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def log_in(host: str, prefix: str, password: str, index: int) -> UserRecord:
    """The record of user `index`: its token from a login, its rooms from the API."""
    parts = urlsplit(host if "://" in host else f"http://{host}")
    base = f"{'https' if parts.scheme in ('https', 'wss') else 'http'}://{parts.netloc}"
    username = f"{prefix}{index:0{INDEX_DIGITS}d}"
    answer = _call(base, "POST", "/api/auth/token", {"username": username, "password": password, "name": "loadtest"})
    token, user = str(answer["token"]), answer["user"]
    assert isinstance(user, dict)
    listed = _call(base, "GET", "/api/rooms", token=token).get("rooms") or []
    rooms = tuple(RoomRef(int(room["id"]), str(room["kind"]), 2 if room["kind"] in ("dm", "bot") else ASSUMED_ROOM_SIZE)
                  for room in listed if isinstance(room, dict))
    return UserRecord(index, int(user["id"]), username, token, rooms)
