"""The JSON frame protocol: parsing and validating client frames, building server frames.

`docs/protocol.md` documents every frame and error code defined here; the JSON schema in
`chat/schema/client_frames.json` is what the server validates input against.
"""

from __future__ import annotations

import json
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft7Validator

from parley.config import CONFIG

SCHEMA_PATH = Path(__file__).parent / "schema" / "client_frames.json"
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
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode:
    """WebSocket close codes Parley uses (4000-4999 are for applications)."""

    UNAUTHENTICATED = 4001
    TOO_SLOW = 4008
    # Draining (the 4xxx twin of 1012 "service restart", which autobahn refuses to send):
    # reconnect after the `reconnect` frame's delay, then resume.
    SERVICE_RESTART = 4012


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
    ref = frame.get("ref") if isinstance(frame.get("ref"), str) else None
    if ref is None and isinstance(frame.get("client_msg_id"), str):
        ref = frame["client_msg_id"][:64]
    frame_type = frame.get("type")
    if frame_type not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {frame_type!r}", ref)
    try:
        _fast_check(frame_type)(frame)
    except fastjsonschema.JsonSchemaException as fast_error:
        error = next(iter(sorted(_explainer(frame_type).iter_errors(frame), key=lambda e: e.path)), None)
        if error is None:
            raise ProtocolError(ErrorCode.INVALID_FRAME, fast_error.message, ref) from None
        where = "/".join(str(p) for p in error.absolute_path) or "frame"
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"{where}: {error.message}", ref) from None
    if frame_type == "send" and len(frame["body"].encode()) > CONFIG.max_body_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"body exceeds {CONFIG.max_body_bytes} bytes", ref)
    return frame


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def error_frame(code: ErrorCode, message: str, ref: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": str(code), "message": message, "ref": ref, **extra}
