"""Rooms, memberships, messages, bots and API tokens. PostgreSQL (or SQLite) is the truth."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models


class Room(models.Model):
    class Kind(models.TextChoices):
        DM = "dm", "Direct message"
        GROUP = "group", "Group"
        BOT = "bot", "Bot chat"

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    private = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # The highest seq handed out; incremented under a row lock in the same transaction that
    # inserts the messages, so seqs never skip or repeat.
    last_seq = models.BigIntegerField(default=0)
    # "<lower user id>:<higher user id>" for DMs and bot chats: opening one twice finds the same room.
    pair_key = models.CharField(max_length=64, null=True, blank=True, unique=True)
    bot = models.ForeignKey("Bot", null=True, blank=True, on_delete=models.CASCADE, related_name="rooms")

    def __str__(self) -> str:
        return f"{self.kind}:{self.pk}:{self.name}"


class Membership(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    joined_at = models.DateTimeField(auto_now_add=True)
    last_read_seq = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["room", "user"], name="membership_room_user")]
        indexes = [models.Index(fields=["user", "room"])]


class Message(models.Model):
    class Kind(models.TextChoices):
        TEXT = "text", "Text"
        BOT = "bot", "Bot"
        SYSTEM = "system", "System"

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.BigIntegerField()
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="messages"
    )
    body = models.TextField()
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.TEXT)
    created_at = models.DateTimeField(auto_now_add=True)
    client_msg_id = models.CharField(max_length=64)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq"),
            # A retried send is stored once: the sender's id for it is unique per sender.
            models.UniqueConstraint(fields=["sender", "client_msg_id"], name="message_sender_client_id"),
        ]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq}"


class Bot(models.Model):
    """A bot is a user that answers in its 1:1 rooms from templates."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="bot")
    description = models.CharField(max_length=200, blank=True)
    default_reply = models.TextField(default="Sorry {user}, I did not understand that.")

    def __str__(self) -> str:
        return self.user.get_username()


class BotTemplate(models.Model):
    class Match(models.TextChoices):
        KEYWORD = "keyword", "Keyword (case-insensitive word match)"
        REGEX = "regex", "Regular expression (named groups become variables)"

    bot = models.ForeignKey(Bot, on_delete=models.CASCADE, related_name="templates")
    match = models.CharField(max_length=8, choices=Match.choices, default=Match.KEYWORD)
    pattern = models.CharField(max_length=200)
    reply = models.TextField()
    priority = models.IntegerField(default=100, help_text="Lower runs first")

    class Meta:
        ordering = ["priority", "id"]


def new_token_key() -> str:
    # Only migration 0001 (plaintext keys) still names this; new tokens come from chat.tokens.
    return secrets.token_urlsafe(32)


class ApiToken(models.Model):
    """A bearer token of a program or device. Only its SHA-256 is stored (`chat.tokens`): a
    leaked database or backup does not hand out live credentials. The plaintext is shown once."""

    # sha256 hex of the token; tokens are 256 random bits, so no salt or slow hash is needed.
    key_hash = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    # What the user called it ("laptop", "ci-bot"), to tell tokens apart when revoking.
    name = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    # Updated at most once an hour (chat.tokens): a write per request would cost more than it tells.
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        # The per-user cap drops a user's oldest tokens: find them without a scan.
        indexes = [models.Index(fields=["user", "created_at"], name="apitoken_user_created")]

    def __str__(self) -> str:
        return f"token {self.key_hash[:8]} of user {self.user_id}"
