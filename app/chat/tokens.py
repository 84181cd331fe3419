"""API tokens: how they are made, found and revoked.

A token is 256 random bits shown to its owner once; the database keeps only its SHA-256
(`ApiToken.key_hash`). It expires `PARLEY_TOKEN_TTL_DAYS` after creation, a user holds at most
`PARLEY_MAX_TOKENS_PER_USER` live ones (creating one more drops the oldest), and `last_used` is
written at most once an hour.

Lookups (every WebSocket handshake and every token-authenticated HTTP request) go through a
small per-process cache, hash -> answer, found or not, for `PARLEY_TOKEN_CACHE_SECONDS`: a storm
of handshakes repeating one token costs one query. Revoking in this process forgets the entry
at once; other processes forget it when their entry expires (that bound is the setting) or when
the control topic tells them (`forget_token`, `forget_user`), and their live sockets are closed
through the control topic (`chat.control`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from chat import control
from chat.models import ApiToken
from parley.config import CONFIG

log = logging.getLogger(__name__)

# 256 bits: guessing one of even millions of live tokens stays hopeless, so a plain (unsalted,
# fast) hash is enough to store them, unlike passwords.
TOKEN_BYTES = 32
# `last_used` answers "is this token still in use?" when a user reviews or revokes tokens; an
# hour's precision is plenty, and a write per request would turn every read into a write.
LAST_USED_PRECISION = timedelta(hours=1)
# Cache entries per process. ~200 bytes each, so ~2 MB at most; the handshake limit keeps a
# storm of distinct random tokens far below this in one cache period anyway.
CACHE_MAX_ENTRIES = 10_000
# What a token can look like: ours are 43 URL-safe characters (older ones, such as the
# benchmark's, 32). Anything else is refused before it costs a hash, a cache slot or a query.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{20,128}")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a lookup tells: whose token it is, until when."""

    token_id: int
    key_hash: str
    user_id: int
    username: str
    expires_at: datetime


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def ttl() -> timedelta:
    return timedelta(days=CONFIG.token_ttl_days)


class LookupCache:
    """hash -> (monotonic deadline, TokenInfo or None). Lookups run on several threads (the
    database thread of the protocol process, Django's sync threads): a lock guards the dict."""

    def __init__(self, max_entries: int = CACHE_MAX_ENTRIES, clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.entries: dict[str, tuple[float, TokenInfo | None]] = {}
        self.lock = threading.Lock()

    def get(self, key_hash: str) -> tuple[bool, TokenInfo | None]:
        with self.lock:
            entry = self.entries.get(key_hash)
            if entry is None:
                return False, None
            if entry[0] <= self.clock():
                del self.entries[key_hash]
                return False, None
            return True, entry[1]

    def put(self, key_hash: str, info: TokenInfo | None) -> None:
        seconds = CONFIG.token_cache_seconds
        if seconds <= 0:
            return
        with self.lock:
            self.entries.pop(key_hash, None)
            while len(self.entries) >= self.max_entries:
                # Every entry lives equally long, so insertion order is expiry order: the first
                # is the one closest to expiring anyway.
                del self.entries[next(iter(self.entries))]
            self.entries[key_hash] = (self.clock() + seconds, info)

    def forget(self, key_hash: str) -> None:
        with self.lock:
            self.entries.pop(key_hash, None)

    def forget_user(self, user_id: int) -> None:
        with self.lock:
            for key_hash in [h for h, (_, info) in self.entries.items() if info and info.user_id == user_id]:
                del self.entries[key_hash]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


CACHE = LookupCache()


def forget_token(key_hash: str) -> None:
    """Drop a revoked token from this process's cache (also for the control topic's receiver)."""
    CACHE.forget(key_hash)


def forget_user(user_id: int) -> None:
    """Drop a user's tokens from this process's cache (revoked all, or deactivated)."""
    CACHE.forget_user(user_id)


def find_token(plaintext: str) -> TokenInfo | None:
    """The live token of an active user this plaintext is, or None. Cached both ways.
    (`chat.reads.find_token` is the same for the protocol process, async.)"""
    key_hash, hit, info = cached(plaintext)
    if hit or key_hash is None:
        return info
    return lookup(key_hash)


def lookup(key_hash: str) -> TokenInfo | None:
    """A hash the cache did not know: from the database, remembered (the ORM path)."""
    now = timezone.now()
    row = (
        ApiToken.objects.filter(key_hash=key_hash, expires_at__gt=now, user__is_active=True)
        .values_list("pk", "user_id", "user__username", "expires_at", "last_used")
        .first()
    )
    if row is not None and (row[4] is None or row[4] <= stale_before(now)):
        ApiToken.objects.filter(pk=row[0]).update(last_used=now)
    return remember(key_hash, row[:4] if row is not None else None)


def cached(plaintext: Any) -> tuple[str | None, bool, TokenInfo | None]:
    """(hash, found in the cache, the live token): the hash is None for something that cannot
    be a token at all, which is refused before it costs a hash, a cache slot or a query."""
    if not isinstance(plaintext, str) or not TOKEN_SHAPE.fullmatch(plaintext):
        return None, True, None
    key_hash = hash_token(plaintext)
    hit, info = CACHE.get(key_hash)
    if hit and info is not None and info.expires_at <= timezone.now():
        info = None
    return key_hash, hit, info


def remember(key_hash: str, row: tuple[int, int, str, datetime] | None) -> TokenInfo | None:
    """Cache what the database said of a hash: (token id, user id, username, expiry) or None."""
    info = TokenInfo(row[0], key_hash, row[1], row[2], row[3]) if row is not None else None
    CACHE.put(key_hash, info)
    return info


def stale_before(now: datetime) -> datetime:
    """`last_used` older than this is written again on the token's next use."""
    return now - LAST_USED_PRECISION


def create_token(user: Any, name: str = "") -> tuple[ApiToken, str]:
    """A new token for `user`: (the row, the plaintext). The plaintext is not stored anywhere;
    give it to the user now. Drops the user's expired tokens and, beyond the cap, the oldest."""
    plaintext = secrets.token_urlsafe(TOKEN_BYTES)
    now = timezone.now()
    with transaction.atomic():
        # Serialises one user's logins, so two at once cannot both leave cap+1 tokens.
        get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk").first()
        token = ApiToken.objects.create(
            user=user, key_hash=hash_token(plaintext), name=name[:100], expires_at=now + ttl()
        )
        mine = ApiToken.objects.filter(user=user)
        expired = list(mine.filter(expires_at__lte=now).values_list("pk", "key_hash"))
        surplus = list(
            mine.filter(expires_at__gt=now)
            .order_by("-created_at", "-pk")
            .values_list("pk", "key_hash")[max(CONFIG.max_tokens_per_user, 1):]
        )
        if expired or surplus:
            ApiToken.objects.filter(pk__in=[pk for pk, _ in expired + surplus]).delete()
    for _, key_hash in expired + surplus:
        forget_token(key_hash)
    if surplus:
        log.info("user %d over %d tokens: dropped the %d oldest", user.pk, CONFIG.max_tokens_per_user, len(surplus))
        # A dropped token is a revoked one: its live sockets close too.
        for _, key_hash in surplus:
            control.kick_token_sync(key_hash)
    log.info("token %s issued to user %d", token.key_hash[:8], user.pk)
    return token, plaintext


def revoke_token(key_hash: str) -> bool:
    """Revoke one token: gone from the database and this cache; its live sockets are closed."""
    deleted, _ = ApiToken.objects.filter(key_hash=key_hash).delete()
    forget_token(key_hash)
    transaction.on_commit(lambda: control.kick_token_sync(key_hash))
    if deleted:
        log.info("token %s revoked", key_hash[:8])
    return bool(deleted)


def revoke_all(user_id: int) -> int:
    """Revoke every token of a user and close all of the user's live sockets."""
    deleted, _ = ApiToken.objects.filter(user_id=user_id).delete()
    forget_user(user_id)
    transaction.on_commit(lambda: control.kick_user_sync(user_id))
    log.info("all %d tokens of user %d revoked", deleted, user_id)
    return deleted


# --- deactivation --------------------------------------------------------------------------------


def _remember_active(sender: Any, instance: Any, **kwargs: Any) -> None:
    # What `is_active` was when loaded, so a save can tell "went inactive" from "is inactive".
    instance._parley_was_active = instance.__dict__.get("is_active", True)


def _user_saved(sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any) -> None:
    if created or instance.is_active or (update_fields is not None and "is_active" not in update_fields):
        instance._parley_was_active = instance.is_active
        return
    if not getattr(instance, "_parley_was_active", True):
        return  # was inactive already: nothing is connected with its credentials
    instance._parley_was_active = False
    user_id = instance.pk
    forget_user(user_id)
    log.info("user %d deactivated: closing its sockets", user_id)
    # After the commit: a socket that reconnects at once must find the user inactive.
    transaction.on_commit(lambda: control.kick_user_sync(user_id))


def connect_signals() -> None:
    """Deactivating a user (admin, shell, `user.save()`) closes the user's live sockets.
    `QuerySet.update(is_active=False)` sends no signal: call `control.kick_user_sync` after it."""
    from django.db.models.signals import post_init, post_save

    user_model = get_user_model()
    post_init.connect(_remember_active, sender=user_model, dispatch_uid="parley-remember-active")
    post_save.connect(_user_saved, sender=user_model, dispatch_uid="parley-kick-deactivated")
