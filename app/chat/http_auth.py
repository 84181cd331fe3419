"""Authentication for the JSON HTTP API: bearer token, or session cookie with a CSRF token."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from chat.auth import user_for_token
from chat.protocol import ErrorCode, ProtocolError
from chat.tokens import hash_token

STATUS = {ErrorCode.NOT_FOUND: 404, ErrorCode.FORBIDDEN: 403, ErrorCode.INVALID_FRAME: 400}


def error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def rate_limited(retry_after: int) -> JsonResponse:
    response = error(429, "rate_limited", f"too many attempts; retry in {retry_after} s")
    response["Retry-After"] = str(retry_after)
    return response


def csrf_rejected(request: HttpRequest) -> bool:
    """Whether a session-riding POST lacks a good CSRF token (cookies ride along cross-site)."""
    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is not None


def json_body(request: HttpRequest) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        data = json.loads(request.body)
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "request body must be a JSON object")
    return data


def _bearer(request: HttpRequest) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def api_view(*methods: str, auth: bool = True) -> Callable:
    """JSON view: allowed methods, token-or-session auth, errors as JSON with proper statuses."""

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            if request.method not in methods:
                return error(405, "method_not_allowed", f"use {' or '.join(methods)}")
            if auth:
                key = _bearer(request)
                if key is not None:
                    request.user = user_for_token(key)
                    # Which token authenticated the request: logout revokes that one.
                    request.token_hash = hash_token(key) if request.user.is_authenticated else None
                elif request.user.is_authenticated and request.method not in ("GET", "HEAD"):
                    # Session cookies ride along on cross-site requests: require the CSRF token.
                    if csrf_rejected(request):
                        return error(403, "csrf_failed", "missing or wrong CSRF token")
                if not request.user.is_authenticated:
                    return error(401, "unauthenticated", "log in or send Authorization: Bearer <token>")
            try:
                return view(request, *args, **kwargs)
            except ProtocolError as exc:
                return error(STATUS.get(exc.code, 400), str(exc.code), exc.message)

        return wrapper

    return decorate
