"""HTTP: the JSON API, health and readiness, metrics, the drain hook and the web page."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate, get_user_model, login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from chat import services
from chat.control_receiver import publish_sync as publish_control
from chat.http_auth import api_view, error, json_body
from chat.models import ApiToken
from chat.protocol import ErrorCode, ProtocolError, check_text
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
    return check_text(value, name).strip()


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
def leave(request: HttpRequest, room_id: int) -> JsonResponse:
    services.leave_room(request.user.pk, room_id)
    # Live sockets of the user stop receiving the room now, not at their next reconnect.
    publish_control({"leave_room": room_id, "user": request.user.pk})
    return JsonResponse({"room": room_id, "left": True})


@api_view("DELETE")
def member(request: HttpRequest, room_id: int, username: str) -> JsonResponse:
    removed = services.remove_member(request.user.pk, room_id, username)
    publish_control({"leave_room": room_id, "user": removed})
    return JsonResponse({"room": room_id, "removed": username})


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


# /healthz and /readyz are answered before Django (chat.health), for any Host; /metrics is on
# its own port (PARLEY_METRICS_PORT), and the drain on a Unix socket (chat.admin): none of them
# is reachable through the public listener.


# --- web page ------------------------------------------------------------------------------------


@login_required
@ensure_csrf_cookie
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/index.html", {"user": request.user})


@ensure_csrf_cookie
def signup(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/signup.html", {"open_registration": CONFIG.open_registration})
