"""HTTP: the JSON API, health and readiness, metrics, the drain hook and the web page."""

from __future__ import annotations

import ipaddress
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth import authenticate, get_user_model, login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chat import metrics, services
from chat.http_auth import api_view, error, json_body
from chat.models import ApiToken
from chat.process import STATE
from chat.protocol import ErrorCode, ProtocolError
from chat.redis_pool import clients
from parley.config import CONFIG

User = get_user_model()


def _user(user: Any) -> dict[str, Any]:
    return {"id": user.pk, "username": user.get_username()}


def _str_field(data: dict[str, Any], name: str, max_length: int = 150) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"`{name}` is required and must be a non-empty string")
    if len(value) > max_length:
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"`{name}` is longer than {max_length} characters")
    return value.strip()


# --- auth ----------------------------------------------------------------------------------------


@api_view("POST", auth=False)
def issue_token(request: HttpRequest) -> JsonResponse:
    data = json_body(request)
    user = authenticate(
        request, username=_str_field(data, "username"), password=_str_field(data, "password", 4096)
    )
    if user is None:
        return error(401, "bad_credentials", "wrong username or password")
    token = ApiToken.objects.create(user=user)
    return JsonResponse({"token": token.key, "user": _user(user)})


@api_view("POST", auth=False)
def register(request: HttpRequest) -> JsonResponse:
    if not CONFIG.open_registration:
        return error(403, "registration_closed", "open registration is off (PARLEY_OPEN_REGISTRATION)")
    data = json_body(request)
    username = _str_field(data, "username")
    password = _str_field(data, "password", 4096)
    try:
        User.username_validator(username)
        validate_password(password)
    except ValidationError as exc:
        return error(400, "invalid_request", " ".join(exc.messages))
    try:
        user = User.objects.create_user(username=username, password=password)
    except IntegrityError:
        return error(409, "username_taken", f"the username {username!r} is taken")
    if data.get("login"):
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    token = ApiToken.objects.create(user=user)
    return JsonResponse({"token": token.key, "user": _user(user)}, status=201)


@api_view("GET")
def me(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user": _user(request.user)})


# --- rooms ---------------------------------------------------------------------------------------


@api_view("GET", "POST")
def rooms(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        return JsonResponse(
            {"rooms": services.rooms_for(request.user.pk), "public": services.public_rooms(request.user.pk)}
        )
    data = json_body(request)
    name = _str_field(data, "name", 100)
    if data.get("kind", "group") != "group":
        raise ProtocolError(ErrorCode.INVALID_FRAME, "`kind` must be \"group\" (open DMs with /api/dms)")
    private = data.get("private", False)
    if not isinstance(private, bool):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "`private` must be true or false")
    room = services.create_group(request.user, name, private)
    return JsonResponse(services.room_dict(room, request.user.pk), status=201)


@api_view("POST")
def members(request: HttpRequest, room_id: int) -> JsonResponse:
    room = services.invite(request.user.pk, room_id, _str_field(json_body(request), "user"))
    return JsonResponse(services.room_dict(room, request.user.pk))


@api_view("POST")
def dms(request: HttpRequest) -> JsonResponse:
    room = services.open_dm(request.user, _str_field(json_body(request), "user"))
    return JsonResponse(services.room_dict(room, request.user.pk))


@api_view("GET")
def messages(request: HttpRequest, room_id: int) -> JsonResponse:
    try:
        before = int(request.GET["before_seq"]) if "before_seq" in request.GET else None
        limit = int(request.GET.get("limit", 50))
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "before_seq and limit must be integers") from None
    if not 1 <= limit <= CONFIG.history_max or (before is not None and before < 1):
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"limit must be 1..{CONFIG.history_max}, before_seq >= 1")
    page, has_more = services.history(request.user.pk, room_id, before, limit)
    return JsonResponse({"room": room_id, "messages": page, "has_more": has_more})


# --- operations ----------------------------------------------------------------------------------


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database_ok() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    try:
        await sync_to_async(_database_ok)()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc}"
    for index, client in enumerate(clients()):
        try:
            await client.ping()
            checks[f"redis{index}"] = "ok"
        except Exception as exc:
            checks[f"redis{index}"] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values()) and not STATE.draining
    status = "draining" if STATE.draining else ("ok" if ready else "unavailable")
    return JsonResponse({"status": status, "checks": checks}, status=200 if ready else 503)


def metrics_view(request: HttpRequest) -> HttpResponse:
    # The collectors live in chat.metrics; the default registry holds them once it is imported.
    return HttpResponse(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST)


def _is_loopback(request: HttpRequest) -> bool:
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


@csrf_exempt
async def drain(request: HttpRequest) -> JsonResponse:
    """preStop hook target (`parley drain`): loopback only, so only the pod itself can drain it."""
    if not _is_loopback(request):
        return error(403, "forbidden", "drain is only accepted from the pod itself")
    if request.method == "POST":
        STATE.drain()
    return JsonResponse({"draining": STATE.draining, "connections": len(STATE.connections)})


# --- web page ------------------------------------------------------------------------------------


@login_required
@ensure_csrf_cookie
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/index.html", {"user": request.user})


@ensure_csrf_cookie
def signup(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/signup.html", {"open_registration": CONFIG.open_registration})
