"""Reads the users file `manage.py loadtest_users` writes: pre-minted users, their tokens and rooms.

JSON Lines, UTF-8: line 1 is the header (`{"format": "parley-loadtest-users", "version": 1,
"count": N, "prefix": ..., "created_at": ..., "params": {...}, "rooms": {...}}`), then one line
per user in index order (`{"i": 0, "id": ..., "username": ..., "token": ..., "rooms": [{"id": ...,
"kind": "group"|"dm"|"bot", "size": ...}, ...]}`).

No Django and no Locust here: the Locust pods have neither Django nor the app, and the tests read
the file without starting Locust.

A distributed run's worker keeps only its slice (`i % shares == share`) of up to 400,000 users,
and it reads past the other slices cheaply: a line's index is read from the line's start, and only
the lines of its slice are parsed as JSON. Each line of the file is parsed by exactly one worker,
so every malformed line is still reported by someone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "parley-loadtest-users"
SUPPORTED_VERSIONS = (1,)
ROOM_KINDS = ("group", "dm", "bot")
# How the minting command writes a user line's start (compact JSON, "i" first). A line that does
# not start like this is parsed in full, whatever its index: the check stays exact, only slower.
INDEX_AT_START = re.compile(rb'\{"i":(\d+),')


@dataclass(frozen=True, slots=True)
class RoomRef:
    """One of a user's rooms: its id, kind ("group", "dm" or "bot") and member count."""

    id: int
    kind: str
    size: int


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One minted user: 0-based index in the file, user id, username, API token, rooms."""

    i: int
    id: int
    username: str
    token: str
    rooms: tuple[RoomRef, ...]


def read_header(path: str | Path) -> dict[str, Any]:
    """The file's header, checked: a users file of a version this reader knows."""
    with open(path, "rb") as file:
        return _header(path, file.readline())


def iter_users(path: str | Path, *, share: int = 0, shares: int = 1) -> Iterator[UserRecord]:
    """The records with `i % shares == share`, in index order, streamed from the file. Checks that
    indexes run 0, 1, 2, ... and that the file holds the header's count: a truncated copy fails
    at its end instead of quietly giving fewer users."""
    if shares < 1 or not 0 <= share < shares:
        raise ValueError(f"share {share} of {shares}: need shares >= 1 and 0 <= share < shares")
    with open(path, "rb") as file:
        header = _header(path, file.readline())
        expected = 0
        for lineno, line in enumerate(file, start=2):
            if not line.strip():
                raise ValueError(f"{path}:{lineno}: empty line where user {expected} should be")
            start = INDEX_AT_START.match(line)
            record: UserRecord | None = None
            if start is not None and int(start.group(1)) % shares != share:
                index = int(start.group(1))  # another worker's user: that worker parses it
            else:
                record = _record(path, lineno, line)
                index = record.i
            if index != expected:
                raise ValueError(f"{path}:{lineno}: user index {index} where {expected} should be (out of order?)")
            if record is not None and index % shares == share:
                yield record
            expected += 1
    if expected != header["count"]:
        raise ValueError(f"{path}: the header says {header['count']} users but the file holds {expected} (truncated?)")


def _header(path: str | Path, line: bytes) -> dict[str, Any]:
    if not line.strip():
        raise ValueError(f"{path}:1: empty file: expected the {FORMAT} header")
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}:1: the header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{path}:1: not a {FORMAT} file (format {found!r})")
    if header.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path}:1: users file version {header.get('version')!r}; this reader knows version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}: mint again, or update the load test"
        )
    count = header.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{path}:1: the header's count is {count!r}, not a number of users")
    return header


def _record(path: str | Path, lineno: int, line: bytes) -> UserRecord:
    where = f"{path}:{lineno}"
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a user line is a JSON object, not {type(data).__name__}")
    for key, kind in (("i", int), ("id", int), ("username", str), ("token", str), ("rooms", list)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ValueError(f"{where}: {key!r} should be {kind.__name__}, found {data.get(key)!r}")
    return UserRecord(
        i=data["i"], id=data["id"], username=data["username"], token=data["token"],
        rooms=tuple(_room(where, room) for room in data["rooms"]),
    )


def _room(where: str, room: Any) -> RoomRef:
    if (
        not isinstance(room, dict)
        or not all(isinstance(room.get(k), int) and not isinstance(room.get(k), bool) for k in ("id", "size"))
        or room.get("kind") not in ROOM_KINDS
    ):
        raise ValueError(f"{where}: room {room!r} is not {{'id': int, 'kind': one of {ROOM_KINDS}, 'size': int}}")
    return RoomRef(id=room["id"], kind=room["kind"], size=room["size"])
