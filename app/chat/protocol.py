"""The JSON frame protocol: parsing and validating client frames, building server frames.

`docs/protocol.md` documents every frame and error code defined here; the JSON schema in
`chat/schema/client_frames.json` is what the server validates input against.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft7Validator

from parley.config import CONFIG

SCHEMA_PATH = Path(__file__).parent / "schema" / "client_frames.json"
# C0 controls and DEL, except tab and newline: invisible in every client, and NUL is refused by
# PostgreSQL text columns (a DataError that would fail a whole batch of other users' messages).
FORBIDDEN_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
INTEGER_FIELDS = ("room", "seq", "limit", "before_seq")
CLIENT_TYPES = ("join", "leave", "send", "typing", "read", "history", "resume", "ping")


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FRAME = "invalid_frame"
    TOO_LARGE = "too_large"
    BINARY_UNSUPPORTED = "binary_unsupported"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    NOT_JOINED = "not_joined"
    TOO_MANY_ROOMS = "too_many_rooms"
    CONFLICT = "conflict"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode:
    """WebSocket close codes Parley uses (4000-4999 are for applications)."""

    UNAUTHENTICATED = 4001  # also: token revoked, user deactivated
    TOO_SLOW = 4008
    TOO_MANY_SOCKETS = 4009
    # A frame could not be written to an open socket: reconnect and resume (nothing is lost).
    SEND_FAILED = 4011
    # Draining (the 4xxx twin of 1012 "service restart", which autobahn refuses to send):
    # reconnect after the `reconnect` frame's delay, then resume.
    SERVICE_RESTART = 4012
    # The server cannot check the credentials right now (database unreachable): reconnect after
    # a delay; the credentials are not at fault.
    UNAVAILABLE = 4013
    TOO_MANY_HANDSHAKES = 4029


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _schema_for(frame_type: str) -> dict[str, Any]:
    schema = _schema()
    return {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{frame_type}"}


@cache
def _fast_check(frame_type: str) -> Any:
    # Compiled to Python code: ~30x faster than interpreting the schema on every frame.
    return fastjsonschema.compile(_schema_for(frame_type))


@cache
def _explainer(frame_type: str) -> Draft7Validator:
    # Only for frames that failed the fast check: it names the field in the error message.
    return Draft7Validator(_schema_for(frame_type))


def max_frame_chars() -> int:
    # A body of N bytes needs at most 6N characters as JSON (\uXXXX escapes), plus the envelope.
    return CONFIG.max_body_bytes * 6 + 1024


def parse(text: str) -> dict[str, Any]:
    """Turn one text frame into a validated dict, or raise ProtocolError with a code."""
    if len(text) > max_frame_chars():
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame exceeds {max_frame_chars()} characters")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame must be a JSON object")
    # Errors echo the ref: only a short, encodable one (a refused frame's ref is not validated).
    ref = frame.get("ref")[:64] if isinstance(frame.get("ref"), str) else None
    if ref is None and isinstance(frame.get("client_msg_id"), str):
        ref = frame["client_msg_id"][:64]
    if ref is not None and not _encodable(ref):
        ref = None
    frame_type = frame.get("type")
    if frame_type not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {frame_type!r}", ref)
    try:
        _fast_check(frame_type)(frame)
    except fastjsonschema.JsonSchemaException as fast_error:
        try:
            error = next(iter(sorted(_explainer(frame_type).iter_errors(frame), key=lambda e: e.path)), None)
            where = "/".join(str(p) for p in error.absolute_path) or "frame" if error is not None else ""
            message = f"{where}: {error.message}" if error is not None else fast_error.message
        except RecursionError:
            # json.loads took a deeply nested value; describing it (repr) would not.
            message = "a field is nested too deeply"
        raise ProtocolError(ErrorCode.INVALID_FRAME, message, ref) from None
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "a field is nested too deeply", ref) from None
    for name in INTEGER_FIELDS:
        # JSON Schema draft-07 counts 10.0 as an integer; Python does not (slices, ids).
        if name in frame and type(frame[name]) is not int:
            raise ProtocolError(ErrorCode.INVALID_FRAME, f"{name}: must be an integer without a fraction", ref)
    if frame_type == "resume" and any(type(seq) is not int for seq in frame["rooms"].values()):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "rooms: seqs must be integers without a fraction", ref)
    if "\\u" in text and not _encodable(frame):
        # A lone surrogate ("\\ud800") decodes to a str that cannot become UTF-8 again: it
        # could be neither stored nor echoed back.
        raise ProtocolError(ErrorCode.INVALID_FRAME, "strings must be valid Unicode (no lone surrogates)", None)
    if frame_type == "send":
        body = frame["body"]
        if len(body.encode()) > CONFIG.max_body_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"body exceeds {CONFIG.max_body_bytes} bytes", ref)
        if FORBIDDEN_CONTROLS.search(body):
            raise ProtocolError(ErrorCode.INVALID_FRAME, "body: control characters other than tab and newline", ref)
    return frame


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: str, name: str) -> str:
    """For HTTP string fields: the same rule as message bodies (see FORBIDDEN_CONTROLS)."""
    if not _encodable(value):
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"`{name}` must be valid Unicode")
    if FORBIDDEN_CONTROLS.search(value):
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"`{name}` contains control characters")
    return value


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def error_frame(code: ErrorCode, message: str, ref: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": str(code), "message": message, "ref": ref, **extra}
