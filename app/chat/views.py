"""HTTP: the JSON API, health and readiness, metrics, the drain hook and the web page."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate, get_user_model, login, logout
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from chat import services, throttle
from chat.control import publish_sync as publish_control
from chat.http_auth import api_view, csrf_rejected, error, json_body, rate_limited
from chat.protocol import ErrorCode, ProtocolError, check_text
from chat.tokens import create_token, revoke_all, revoke_token
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


def _client_address(request: HttpRequest) -> str | None:
    # Already the real client behind trusted proxies (parley.proxies rewrote the scope).
    return request.META.get("REMOTE_ADDR") or None


def _token_name(data: dict[str, Any]) -> str:
    return _str_field(data, "name", 100) if data.get("name") is not None else ""


@api_view("POST", auth=False)
def issue_token(request: HttpRequest) -> JsonResponse:
    data = json_body(request)
    username = _str_field(data, "username")
    password = _str_field(data, "password", 4096)
    name = _token_name(data)
    address = _client_address(request)
    if (retry := throttle.blocked("login", account=username, address=address)) is not None:
        return rate_limited(retry)
    user = authenticate(request, username=username, password=password)
    if user is None:
        throttle.record("login", account=username, address=address)
        return error(401, "bad_credentials", "wrong username or password")
    throttle.clear_account("login", username)
    token, plaintext = create_token(user, name)
    return JsonResponse({"token": plaintext, "user": _user(user), "name": token.name,
                         "expires_at": token.expires_at.isoformat()})


@api_view("POST", auth=False)
def register(request: HttpRequest) -> JsonResponse:
    if not CONFIG.open_registration:
        return error(403, "registration_closed", "open registration is off (PARLEY_OPEN_REGISTRATION)")
    address = _client_address(request)
    if (retry := throttle.blocked("register", address=address)) is not None:
        return rate_limited(retry)
    # Every attempt counts, not just failures: each success is a new account.
    throttle.record("register", address=address)
    data = json_body(request)
    wants_session = data.get("login") is True
    if wants_session:
        # A session-creating POST: a cross-site form (any content type, no preflight) must not
        # log the victim's browser into an account of the attacker's (login CSRF).
        if request.content_type != "application/json":
            return error(415, "unsupported_media_type", "send the body as application/json")
        if csrf_rejected(request):
            return error(403, "csrf_failed", "missing or wrong CSRF token")
    username = _str_field(data, "username")
    password = _str_field(data, "password", 4096)
    name = _token_name(data)
    try:
        User.username_validator(username)
        validate_password(password, User(username=username))
    except ValidationError as exc:
        return error(400, "invalid_request", " ".join(exc.messages))
    try:
        user = User.objects.create_user(username=username, password=password)
    except IntegrityError:
        return error(409, "username_taken", f"the username {username!r} is taken")
    if wants_session:
        # The browser gets its session and no token: a credential nobody keeps can only leak.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return JsonResponse({"user": _user(user)}, status=201)
    token, plaintext = create_token(user, name)
    return JsonResponse({"token": plaintext, "user": _user(user), "name": token.name,
                         "expires_at": token.expires_at.isoformat()}, status=201)


@api_view("POST")
def logout_view(request: HttpRequest) -> JsonResponse:
    """Revoke the token this request came with, or end the session it came with."""
    token_hash = getattr(request, "token_hash", None)
    if token_hash is not None:
        revoke_token(token_hash)
        return JsonResponse({"revoked": "token"})
    logout(request)
    return JsonResponse({"revoked": "session"})


@api_view("POST")
def logout_all(request: HttpRequest) -> JsonResponse:
    """Revoke every token of the user and close all of the user's live sockets (this browser's
    session ends too; other browsers' sessions last until they log out or expire)."""
    count = revoke_all(request.user.pk)
    if getattr(request, "token_hash", None) is None:
        logout(request)
    return JsonResponse({"revoked": "all", "tokens": count})


class ThrottledLoginView(auth_views.LoginView):
    """Django's login page, throttled like `/api/auth/token` (the same counters)."""

    template_name = "chat/login.html"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = str(request.POST.get("username", ""))[:150]
        if (retry := throttle.blocked("login", account=username, address=_client_address(request))) is not None:
            response = HttpResponse(f"Too many login attempts. Try again in {retry} seconds.\n",
                                    status=429, content_type="text/plain")
            response["Retry-After"] = str(retry)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form: Any) -> HttpResponse:
        username = str(self.request.POST.get("username", ""))[:150]
        throttle.record("login", account=username, address=_client_address(self.request))
        return super().form_invalid(form)

    def form_valid(self, form: Any) -> HttpResponse:
        throttle.clear_account("login", form.get_user().get_username())
        return super().form_valid(form)


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
