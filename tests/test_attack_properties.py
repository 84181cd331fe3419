"""Attack suite, property-based: hostile input to the frame parser and to a live consumer.

Issue 9, "The attack suite", first bullet. Whatever a client sends, the answer is a validated
frame, an `error` frame with a code documented in docs/protocol.md (or in the issue-9 security
contract, /work/notes/contract.md), or a documented close code. No exception escapes the parser or
the consumer, and a well-behaved socket of another user in the same room keeps working.

Generated input: valid frames of every client type, then mutated (a field replaced by any JSON
value, removed, added, the type changed), JSON nested deeper than the interpreter can repr, huge
numbers (`1e400`, 2**70, 400 digits, NaN, Infinity), integral floats where ids go, lone surrogates
as JSON escapes and as undecodable bytes, NUL and C0 control characters in bodies, oversize
strings and frames, and binary frames.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator

from chat.protocol import (
    CLIENT_TYPES,
    SCHEMA_PATH,
    ErrorCode,
    ProtocolError,
    dumps,
    error_frame,
    max_frame_chars,
    parse,
)
from chat.services import create_group, open_dm
from parley.asgi import application
from parley.config import CONFIG
from tests.helpers import make_user

# --- what is documented ------------------------------------------------------------------------

# docs/protocol.md "Error codes", plus the contract's new ones (too_many_rooms, conflict).
DOCUMENTED_ERROR_CODES = frozenset({
    "bad_json", "unknown_type", "invalid_frame", "too_large", "binary_unsupported", "rate_limited",
    "not_found", "forbidden", "not_joined", "busy", "unavailable", "internal",
    "too_many_rooms", "conflict",
})
# What a hostile frame may legitimately cause. `internal` is documented, but as "a server bug":
# a hostile frame that reaches it found an exception in a handler.
HOSTILE_ERROR_CODES = DOCUMENTED_ERROR_CODES - {"internal"}
# docs/protocol.md "Close codes" (4001, 4008, 4012) and the contract's (1009, 4009, 4011, 4029).
DOCUMENTED_CLOSE_CODES = frozenset({1009, 4001, 4008, 4009, 4011, 4012, 4029})
# docs/protocol.md "Server -> client".
SERVER_FRAME_TYPES = frozenset({
    "hello", "joined", "left", "message", "ack", "typing", "presence", "read", "history", "resumed",
    "reload", "reconnect", "error", "pong",
})
# Issue 9 item 2: NUL and the other C0 controls except tab and newline are refused in bodies.
FORBIDDEN_BODY_CHARS = frozenset(chr(c) for c in range(0x20)) - {"\t", "\n"}
INT_FIELDS = ("room", "seq", "before_seq", "limit")

SCHEMA = json.loads(SCHEMA_PATH.read_text())
SCHEMA_DEFS = SCHEMA["$defs"]
VALIDATORS = {
    kind: Draft7Validator({"$schema": SCHEMA["$schema"], "$defs": SCHEMA_DEFS, "$ref": f"#/$defs/{kind}"})
    for kind in CLIENT_TYPES
}

# A literal spliced into the JSON text where this marker string was (json.dumps cannot write them).
HUGE = "\x00HUGE\x00"
HUGE_LITERALS = (
    "1e400", "-1e400", "1E400", str(2**63), str(2**70), str(-(2**70)), "9" * 400, "NaN", "Infinity",
    "-Infinity", "-0", "1.0", "5.0", "1e18", "0.5", "1e-400", "9223372036854775807.0",
)

# --- strategies ----------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([HUGE, "\ud800", "\udfff", "\x00", "", "1", "join"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONTROL_CHARS = st.sampled_from(sorted(FORBIDDEN_BODY_CHARS))
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
# Bodies: ordinary text with NUL/C0 controls and lone surrogates mixed in, sometimes oversize.
BODIES = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.one_of(st.characters(), CONTROL_CHARS, SURROGATES), min_size=1, max_size=40).map("".join),
    st.integers(CONFIG.max_body_bytes - 2, CONFIG.max_body_bytes + 2).map(lambda n: "x" * n),
    st.integers(CONFIG.max_body_bytes // 2 - 1, CONFIG.max_body_bytes // 2 + 1).map(lambda n: "é" * n),
)
# What a well-behaved client sends: no controls (DEL neither), no surrogates, under the bound.
CLEAN_BODIES = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
)
CLIENT_MSG_IDS = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
REFS = st.text(max_size=64) | st.sampled_from(["\ud800", "r" * 65, "ok-ref"])


def room_ids(known: list[int] | None = None) -> st.SearchStrategy[int]:
    edges = st.sampled_from([1, 0, -1, 2**63 - 1, 2**63, 2**70])
    ids = st.integers(1, 10**6) | edges
    return st.sampled_from(known) | ids if known else ids


def valid_frames(
    rooms: st.SearchStrategy[int],
    bodies: st.SearchStrategy[str] = BODIES,
    refs: st.SearchStrategy[str] = REFS,
) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of every client type as a client would send them (bodies and refs may be hostile)."""
    room = st.fixed_dictionaries({"room": rooms})
    by_type: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "join": room,
        "leave": room,
        "typing": room,
        "send": st.fixed_dictionaries({"room": rooms, "body": bodies, "client_msg_id": CLIENT_MSG_IDS}),
        "read": st.fixed_dictionaries({"room": rooms, "seq": st.integers(0, 2**20)}),
        "history": st.fixed_dictionaries(
            {"room": rooms},
            optional={"before_seq": st.integers(1, 2**20), "limit": st.integers(1, 200)},
        ),
        "resume": st.fixed_dictionaries({
            "rooms": st.dictionaries(rooms.map(str), st.integers(0, 2**20), max_size=5),
        }),
        "ping": st.fixed_dictionaries({}),
    }
    assert set(by_type) == set(CLIENT_TYPES)

    def build(kind: str) -> st.SearchStrategy[dict[str, Any]]:
        return st.tuples(by_type[kind], st.none() | refs).map(
            lambda pair, kind=kind: {"type": kind, **pair[0], **({"ref": pair[1]} if pair[1] is not None else {})}
        )

    return st.sampled_from(CLIENT_TYPES).flatmap(build)


@st.composite
def mutated_frames(draw: st.DrawFn, rooms: st.SearchStrategy[int]) -> dict[str, Any]:
    frame = draw(valid_frames(rooms))
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["replace", "delete", "add", "retype", "huge", "surrogate", "control"]))
        fields = sorted(frame)
        if operation == "replace" and fields:
            frame[draw(st.sampled_from(fields))] = draw(JSON_VALUES)
        elif operation == "delete" and fields:
            del frame[draw(st.sampled_from(fields))]
        elif operation == "add":
            name = draw(st.sampled_from(["extra", "Type", "room", "body", "seq", "rooms", "ref", "__proto__", ""]))
            frame[name] = draw(JSON_VALUES)
        elif operation == "retype":
            frame["type"] = draw(st.sampled_from([*CLIENT_TYPES, "JOIN", "join ", "shout", "", None, 1, ["join"]]))
        elif operation == "huge":
            frame[draw(st.sampled_from(["room", "seq", "before_seq", "limit", "ref"]))] = HUGE
        elif operation == "surrogate":
            name = draw(st.sampled_from(["body", "ref", "client_msg_id", "type"]))
            frame[name] = draw(st.text(max_size=5)) + draw(SURROGATES) + draw(st.text(max_size=5))
        elif operation == "control":
            frame["body"] = draw(st.text(max_size=5)) + draw(CONTROL_CHARS) + draw(st.text(max_size=5))
    return frame


def _wire_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def frame_texts(draw: st.DrawFn, frames: st.SearchStrategy[Any]) -> str:
    """JSON text of a frame: \\u escapes or raw characters, huge number literals spliced in.

    Only text a WebSocket can carry: a text frame is valid UTF-8 (Daphne and uvicorn refuse
    others), so a lone surrogate reaches the parser only as a JSON escape.
    """
    value = draw(frames)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if not _wire_text(text):
        text = json.dumps(value, ensure_ascii=True)
    marker = json.dumps(HUGE)  # NUL is always escaped: the same with or without ensure_ascii
    while marker in text:
        text = text.replace(marker, draw(st.sampled_from(HUGE_LITERALS)), 1)
    return text


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    """Nesting around the interpreter's recursion limit, at the top or inside a frame's field."""
    depth = draw(st.integers(1, 3000) | st.integers(900, 1100))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + draw(st.sampled_from(["1", "null", '"x"', "[]"])) + closer * depth
    where = draw(st.sampled_from(["top", "room", "ref", "extra", "rooms", "seq", "unclosed"]))
    if where == "top":
        return nested
    if where == "unclosed":
        return opener * depth
    if where == "rooms":
        return '{"type":"resume","rooms":{"1":' + nested + "}}"
    kind = draw(st.sampled_from(["join", "read", "send", "ping"]))
    return json.dumps({"type": kind, "room": 1})[:-1] + f',"{where}":' + nested + "}"


RAW_TEXTS = st.one_of(
    st.text(max_size=60),
    # Invalid UTF-8 as a lenient transport would hand it over (binary frames: see the consumer).
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "replace")),
    st.sampled_from([
        "", " ", "null", "true", "1", "1e400", "[]", "{}", '"join"', "{", '{"type":', "\ufeff{}",
        '{"type":"ping"}garbage', '{"type":"ping","type":"join","room":1}', '{"type":"ping"} ',
        '{"type":"join","room":1,"room":"x"}', '{"type":"\\u0000"}', '{"type":"pi\\u006eg"}',
    ]),
    st.integers(max_frame_chars() - 2, max_frame_chars() + 2).map(
        lambda n: '{"type":"send","room":1,"client_msg_id":"c","body":"' + "y" * (n - 54) + '"}'
    ),
)
PARSER_INPUT = st.one_of(
    frame_texts(valid_frames(room_ids())),
    frame_texts(mutated_frames(room_ids())),
    frame_texts(JSON_VALUES),
    deep_json(),
    RAW_TEXTS,
)

# --- the parser ----------------------------------------------------------------------------------

PARSER_SETTINGS = settings(max_examples=200, deadline=None, database=None)


def check_parse(text: str) -> dict[str, Any] | ProtocolError:
    """parse() answers a validated frame or a documented ProtocolError; anything else escapes."""
    try:
        frame = parse(text)
    except ProtocolError as exc:
        assert str(exc.code) in DOCUMENTED_ERROR_CODES and exc.code in set(ErrorCode), exc.code
        assert exc.message
        assert exc.ref is None or (isinstance(exc.ref, str) and len(exc.ref) <= 64), exc.ref
        # The error frame echoing the ref must be sendable as a UTF-8 text frame.
        dumps(error_frame(exc.code, exc.message, exc.ref)).encode("utf-8")
        return exc
    assert isinstance(frame, dict) and frame["type"] in CLIENT_TYPES
    assert not list(VALIDATORS[frame["type"]].iter_errors(frame)), frame
    dumps(frame).encode("utf-8")  # no lone surrogate reaches a handler, the database or an echo
    for name in INT_FIELDS:
        if name in frame:
            # An integral float (`5.0`) is an integer to JSON Schema, but not to the handlers
            # (`history` slices with `limit`, rooms are dict keys): it must arrive as an int.
            assert type(frame[name]) is int, f"{name}={frame[name]!r} accepted as {type(frame[name]).__name__}"
    for value in frame.get("rooms", {}).values():
        assert type(value) is int, f"resume seq {value!r} accepted as {type(value).__name__}"
    if frame["type"] == "send":
        assert 1 <= len(frame["body"].encode()) <= CONFIG.max_body_bytes
        assert not FORBIDDEN_BODY_CHARS & set(frame["body"]), "a C0 control character was accepted in a body"
    return frame


@PARSER_SETTINGS
@given(PARSER_INPUT)
def test_parser_answers_any_text_with_a_valid_frame_or_a_documented_error(text: str) -> None:
    check_parse(text)


VALID_ROOMS = st.integers(1, 2**63 - 1)


@PARSER_SETTINGS
@given(valid_frames(VALID_ROOMS, CLEAN_BODIES, st.text(st.characters(blacklist_categories=("Cs",)), max_size=64)),
       st.booleans())
def test_valid_frames_of_every_type_are_accepted_unchanged(frame: dict[str, Any], ascii_only: bool) -> None:
    assert check_parse(json.dumps(frame, ensure_ascii=ascii_only)) == frame


@PARSER_SETTINGS
@given(frame_texts(JSON_VALUES.filter(lambda v: not isinstance(v, dict))))
def test_json_that_is_not_an_object_is_bad_json(text: str) -> None:
    answer = check_parse(text)
    assert isinstance(answer, ProtocolError) and answer.code == ErrorCode.BAD_JSON


@PARSER_SETTINGS
@given(valid_frames(st.just(1)), JSON_VALUES.filter(lambda v: v not in CLIENT_TYPES))
def test_a_frame_type_outside_the_client_frames_is_unknown_type(frame: dict[str, Any], kind: Any) -> None:
    frame["type"] = kind
    answer = check_parse(json.dumps(frame))
    assert isinstance(answer, ProtocolError) and answer.code == ErrorCode.UNKNOWN_TYPE


@PARSER_SETTINGS
@given(valid_frames(st.just(1)), st.text(min_size=1, max_size=10), JSON_VALUES)
def test_an_unknown_field_is_invalid_frame_never_ignored(frame: dict[str, Any], name: str, value: Any) -> None:
    if name in SCHEMA_DEFS[frame["type"]]["properties"]:
        name = f"x-{name}"
    frame[name] = value
    answer = check_parse(json.dumps(frame))
    assert isinstance(answer, ProtocolError) and answer.code == ErrorCode.INVALID_FRAME


@PARSER_SETTINGS
@given(valid_frames(st.just(1)), st.sampled_from(["room", "seq", "before_seq", "limit"]),
       st.sampled_from(["1e400", "-1e400", str(2**63), str(2**70), "9" * 400, "NaN", "Infinity", "0.5"]))
def test_huge_or_non_integer_numbers_in_integer_fields_are_invalid_frame(
    frame: dict[str, Any], name: str, literal: str
) -> None:
    if frame["type"] not in ("read", "history") and name != "room":
        name = "room"
    if frame["type"] in ("ping", "resume"):
        frame = {"type": "join", "room": 1}
    # `before_seq` has no documented maximum: only non-integers are wrong there.
    assume(not (name == "before_seq" and literal.lstrip("-").isdigit()))
    text = json.dumps({**frame, name: HUGE}).replace(json.dumps(HUGE), literal)
    answer = check_parse(text)
    assert isinstance(answer, ProtocolError) and answer.code == ErrorCode.INVALID_FRAME, answer


@PARSER_SETTINGS
@given(st.text(max_size=8), CONTROL_CHARS, st.text(max_size=8))
def test_nul_and_c0_controls_in_a_body_are_invalid_frame(before: str, control: str, after: str) -> None:
    """Issue 9 item 2: a NUL fails a whole PostgreSQL batch of other users' messages."""
    text = json.dumps({"type": "send", "room": 1, "body": before + control + after, "client_msg_id": "c-1"})
    answer = check_parse(text)
    assert isinstance(answer, ProtocolError) and answer.code == ErrorCode.INVALID_FRAME, answer


@PARSER_SETTINGS
@given(st.sampled_from(["body", "ref", "client_msg_id", "type", "extra"]), st.text(max_size=6), SURROGATES)
def test_a_lone_surrogate_anywhere_is_invalid_frame_and_never_echoed(name: str, prefix: str, surrogate: str) -> None:
    """Issue 9 item 9: "\\ud800" must be a plain invalid_frame, not an exception in a handler."""
    frame: dict[str, Any] = {"type": "send", "room": 1, "body": "hi", "client_msg_id": "c-1", name: prefix + surrogate}
    answer = check_parse(json.dumps(frame))  # ensure_ascii: the surrogate travels as a \\u escape
    assert isinstance(answer, ProtocolError), answer
    assert answer.code in (ErrorCode.INVALID_FRAME, ErrorCode.UNKNOWN_TYPE), answer.code
    assert answer.ref is None or surrogate not in answer.ref


@PARSER_SETTINGS
@given(deep_json())
def test_deep_json_nesting_is_bad_json_or_invalid_frame_never_a_recursion_error(text: str) -> None:
    answer = check_parse(text)
    assert isinstance(answer, ProtocolError) and answer.code in (
        ErrorCode.BAD_JSON, ErrorCode.UNKNOWN_TYPE, ErrorCode.INVALID_FRAME, ErrorCode.TOO_LARGE,
    ), answer


DEEP_TEMPLATES = {
    "room": '{"type":"join","room":%s}',
    "rooms-seq": '{"type":"resume","rooms":{"1":%s}}',
    "extra-field": '{"type":"ping","extra":%s}',
    "ref": '{"type":"ping","ref":%s}',
    "body": '{"type":"send","room":1,"client_msg_id":"c","body":%s}',
    "top": "%s",
}


@pytest.mark.parametrize("where", sorted(DEEP_TEMPLATES))
def test_json_nested_to_every_depth_up_to_the_recursion_limit_never_escapes_the_parser(where: str) -> None:
    """The window where json.loads still parses but repr() of the value (in jsonschema's error
    message) overflows the stack is a few levels wide and moves with the caller's stack depth:
    random depths miss it, so walk every depth."""
    escaped: list[tuple[int, str]] = []
    for depth in range(1, sys.getrecursionlimit() + 50):
        text = DEEP_TEMPLATES[where] % ("[" * depth + "1" + "]" * depth)
        try:
            check_parse(text)
        except RecursionError as exc:
            escaped.append((depth, type(exc).__name__))
    assert not escaped, f"parse() raised at depths {escaped[:3]}...{escaped[-1:]} with nesting in {where}"


@PARSER_SETTINGS
@given(st.integers(1, 5 * max_frame_chars()), st.sampled_from(["x", "é", "\\u0041", " "]))
def test_frames_over_the_size_bound_are_too_large_before_parsing(extra: int, filler: str) -> None:
    text = '{"type":"ping","ref":"' + filler * (max_frame_chars() // len(filler) + extra) + '"}'
    answer = check_parse(text)
    assert isinstance(answer, ProtocolError) and answer.code == ErrorCode.TOO_LARGE


# --- the consumer --------------------------------------------------------------------------------

CONSUMER_SETTINGS = settings(
    # No shrinking: a failing example here can cost its timeouts, and shrinking runs it hundreds of
    # times. The failing example is printed as generated (see the `note`s).
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
END = "end-of-hostile-frames"


@dataclass
class Arena:
    room: int  # public group: hostile and bystander are members
    dm: int  # a DM of the bystander and a third user: hostile is not a member
    private: int  # a private group of the third user
    hostile_token: str
    bystander_token: str


@pytest.fixture
def fast_passwords(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
async def arena(worker: Any, fast_passwords: None) -> Arena:
    def build() -> Arena:
        hostile, hostile_token = make_user("mallory")
        bystander, bystander_token = make_user("bystander")
        third, _ = make_user("third")
        room = create_group(bystander, "square", False)
        room.memberships.get_or_create(user=hostile)
        dm = open_dm(bystander, "third")
        private = create_group(third, "hidden", True)
        return Arena(room.pk, dm.pk, private.pk, hostile_token, bystander_token)

    return await database_sync_to_async(build)()


def _fresh_pair(room: int) -> tuple[str, str]:
    from chat.models import Membership

    n = next(_msg_ids)
    hostile, hostile_token = make_user(f"mallory{n}")
    bystander, bystander_token = make_user(f"bystander{n}")
    Membership.objects.bulk_create([Membership(room_id=room, user=hostile), Membership(room_id=room, user=bystander)])
    return hostile_token, bystander_token


class Socket:
    """A WebsocketCommunicator that records every output (frames and the close)."""

    def __init__(self, token: str) -> None:
        self.comm = WebsocketCommunicator(application, f"/ws/?token={token}")
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.shut_done = False

    async def open(self) -> None:
        connected, _ = await self.comm.connect()
        assert connected
        hello = await self.next(5)
        assert hello is not None and hello["type"] == "hello", hello

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next frame, or None once the server closed the socket."""
        if self.close_code is not None:
            return None
        output = await self.comm.receive_output(timeout)  # re-raises an exception of the consumer
        if output["type"] == "websocket.close":
            self.close_code = output.get("code", 1000)
            return None
        assert output["type"] == "websocket.send", output
        assert output.get("text") is not None, f"the server sent a binary frame: {output!r}"
        frame = json.loads(output["text"])
        self.frames.append(frame)
        return frame

    async def shut(self, check: bool = False) -> None:
        """Disconnect (once). With check, an exception that escaped the consumer is raised here."""
        if self.shut_done:
            return
        self.shut_done = True
        if not check:
            if self.comm.future.done():
                return  # finished, or cancelled by a receive that timed out (asgiref does that)
            try:
                await self.comm.disconnect()
            except Exception:  # cleanup after a failure that is already reported
                pass
            return
        await self.comm.disconnect()
        assert self.comm.future.done() and not self.comm.future.cancelled()
        assert self.comm.future.exception() is None

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict[str, Any]:
        while True:
            frame = await self.next(timeout)
            assert frame is not None, f"closed with {self.close_code} before the expected frame; got {self.frames[-8:]}"
            if predicate(frame):
                return frame


_msg_ids = itertools.count(1)


def hostile_inputs(rooms: list[int]) -> st.SearchStrategy[str | bytes]:
    known = room_ids(rooms)
    texts = st.one_of(
        frame_texts(valid_frames(known)),
        frame_texts(mutated_frames(known)),
        frame_texts(JSON_VALUES),
        deep_json(),
        RAW_TEXTS,
    )
    binary = st.binary(max_size=64) | texts.map(lambda t: t.encode("utf-8", "surrogatepass"))
    return st.one_of(texts, texts, texts, binary)


@CONSUMER_SETTINGS
@given(data=st.data())
async def test_hostile_frames_get_documented_answers_and_spare_other_sockets(
    arena: Arena, data: st.DataObject, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="chat")
    inputs = data.draw(st.lists(hostile_inputs([arena.room, arena.dm, arena.private]), min_size=1, max_size=10))
    note(f"hostile inputs: {inputs!r}")
    # Fresh users per example: one failed example (a cancelled consumer) must not use up the
    # per-user socket cap of the next ones.
    hostile_token, bystander_token = await database_sync_to_async(_fresh_pair)(arena.room)
    hostile, bystander = Socket(hostile_token), Socket(bystander_token)
    try:
        async with asyncio.timeout(15):  # a hang is a failure of this example, not of the run
            await _example(hostile, bystander, inputs, arena, caplog)
    finally:
        note(f"hostile got: {hostile.frames!r} close={hostile.close_code}")
        note(f"bystander got: {bystander.frames!r}")
        await hostile.shut()
        await bystander.shut()


async def _example(
    hostile: Socket, bystander: Socket, inputs: list[str | bytes], arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    await hostile.open()
    await _attack(hostile, inputs, arena)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logged, f"hostile input logged errors: {[r.getMessage() for r in logged]} after {inputs!r}"
    # Another user in the same room is unaffected: ping -> pong, send -> ack and delivery.
    await bystander.open()
    await _behave(bystander, arena.room)


async def _attack(hostile: Socket, inputs: list[str | bytes], arena: Arena) -> None:
    for item in inputs:
        if isinstance(item, bytes):
            await hostile.comm.send_input({"type": "websocket.receive", "bytes": item})
        else:
            await hostile.comm.send_input({"type": "websocket.receive", "text": item})  # "" too
    await hostile.comm.send_to(text_data=json.dumps({"type": "ping", "ref": END}))
    while (frame := await hostile.next(3)) is not None and not (frame["type"] == "pong" and frame["ref"] == END):
        pass
    for frame in hostile.frames:
        assert frame["type"] in SERVER_FRAME_TYPES, frame
        if frame["type"] == "error":
            assert frame["code"] in HOSTILE_ERROR_CODES, f"{frame} after {inputs!r}"
        if frame.get("room") in (arena.dm, arena.private):
            assert frame["type"] in ("error", "left"), f"a frame of a room mallory is not in: {frame}"
    if hostile.close_code is not None:
        assert hostile.close_code in DOCUMENTED_CLOSE_CODES, hostile.close_code
    await hostile.shut(check=True)  # re-raises an exception that escaped the consumer


async def _behave(bystander: Socket, room: int) -> None:
    await bystander.comm.send_to(text_data=json.dumps({"type": "join", "room": room}))
    await bystander.until(lambda f: f["type"] == "joined" and f["room"] == room)
    await bystander.comm.send_to(text_data=json.dumps({"type": "ping", "ref": "calm"}))
    await bystander.until(lambda f: f["type"] == "pong" and f["ref"] == "calm")
    msg_id = f"calm-{next(_msg_ids)}"
    await bystander.comm.send_to(text_data=json.dumps(
        {"type": "send", "room": room, "body": "still here", "client_msg_id": msg_id}
    ))
    # The ack and the delivery of the sender's own message may come in either order.
    seen: set[str] = set()
    while seen != {"ack", "message"}:
        frame = await bystander.until(
            lambda f: f["type"] in ("ack", "error", "message") and msg_id in (f.get("client_msg_id"), f.get("ref"))
        )
        assert frame["type"] != "error", frame
        seen.add(frame["type"])


async def test_binary_frames_of_any_content_are_binary_unsupported_and_the_socket_survives(arena: Arena) -> None:
    hostile = Socket(arena.hostile_token)
    await hostile.open()
    payloads = [b"", b"\x00", b"\xff\xfe", json.dumps({"type": "ping"}).encode(), b"\xed\xa0\x80", b"x" * 70_000]
    for payload in payloads:
        await hostile.comm.send_input({"type": "websocket.receive", "bytes": payload})  # b"" too
        error = await hostile.until(lambda f: f["type"] == "error")
        assert error["code"] == "binary_unsupported", error
    await hostile.comm.send_to(text_data=json.dumps({"type": "ping", "ref": "after-binary"}))
    await hostile.until(lambda f: f["type"] == "pong" and f["ref"] == "after-binary")
    await hostile.comm.disconnect()


@pytest.mark.parametrize("frame", [
    '{"type":"history","room":ROOM,"limit":10.0}',
    '{"type":"history","room":ROOM,"before_seq":5.0}',
    '{"type":"join","room":ROOM.0}',
    '{"type":"read","room":ROOM,"seq":1.0}',
    '{"type":"send","room":ROOM,"body":"\\ud800","client_msg_id":"s-1"}',
    '{"type":"ping","ref":"\\udc00"}',
    '{"type":"send","room":ROOM,"body":"nul \\u0000 here","client_msg_id":"n-1"}',
    '{"type":"resume","rooms":{"ROOM":1e400}}',
    '{"type":"history","room":ROOM,"before_seq":' + str(2**70) + "}",
    '{"type":"history","room":ROOM,"before_seq":' + str(2**63) + "}",
], ids=["history-limit-float", "history-before-float", "join-room-float", "read-seq-float", "send-surrogate",
        "ping-ref-surrogate", "send-nul", "resume-1e400", "history-before-2**70", "history-before-2**63"])
async def test_known_hostile_frames_get_a_documented_error_not_internal(arena: Arena, frame: str) -> None:
    """Shrunk examples of what the property finds, kept as plain regression cases."""
    hostile = Socket(arena.hostile_token)
    await hostile.open()
    await hostile.comm.send_to(text_data=json.dumps({"type": "join", "room": arena.room}))
    await hostile.until(lambda f: f["type"] == "joined")
    await hostile.comm.send_to(text_data=frame.replace("ROOM", str(arena.room)))
    await hostile.comm.send_to(text_data=json.dumps({"type": "ping", "ref": END}))
    while (got := await hostile.next(5)) is not None and got.get("ref") != END:
        pass
    errors = [f for f in hostile.frames if f["type"] == "error"]
    assert all(f["code"] in HOSTILE_ERROR_CODES for f in errors), errors
    await hostile.comm.disconnect()


async def test_deeply_nested_room_values_never_reach_the_internal_error_path(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depth that overflows the stack inside the parser depends on the consumer's own stack
    depth: send every depth around the interpreter's limit. Beyond the rate limit frames are
    dropped unparsed, so this socket gets a limit that parses all 260 of them."""
    import dataclasses

    from chat import consumers

    monkeypatch.setattr(consumers, "CONFIG", dataclasses.replace(consumers.CONFIG, rate_burst=10_000))
    hostile = Socket(arena.hostile_token)
    await hostile.open()
    limit = sys.getrecursionlimit()
    for depth in range(limit - 250, limit + 10):
        nested = "[" * depth + "1" + "]" * depth
        await hostile.comm.send_to(text_data='{"type":"join","room":' + nested + "}")
    await hostile.comm.send_to(text_data=json.dumps({"type": "ping", "ref": END}))
    while (got := await hostile.next(10)) is not None and got.get("ref") != END:
        pass
    codes = sorted({f["code"] for f in hostile.frames if f["type"] == "error"})
    assert set(codes) <= HOSTILE_ERROR_CODES, codes
    await hostile.comm.disconnect()
