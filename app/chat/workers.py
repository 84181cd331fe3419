"""Worker-channel consumers: `chat.persist` stores and fans out, `chat.bot` answers bot chats.

`chat.persist` is the only writer of messages. It stores in batches (at most PARLEY_BATCH_MAX
messages; a busy worker receives at most once per PARLEY_BATCH_WAIT_MS unless a batch is full),
assigns seqs, then publishes every stored message once to its room and acks each sender. On
PostgreSQL up to PARLEY_STORE_CONNECTIONS batches are stored at once (`chat.store_pg`, on the
event loop), a room in at most one of them (`chat.batcher`); on SQLite one batch at a time
through the ORM. A message is acked only after its transaction committed; a crash before that
loses no acked message: the client retries with the same client_msg_id and gets the stored seq.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from chat import bots, fanout, metrics, services
from chat.batcher import Batcher
from chat.contract import BOT_CHANNEL, PERSIST_CHANNEL, BotReply, PersistMessage
from chat.protocol import ErrorCode, dumps, error_frame
from parley.config import CONFIG

log = logging.getLogger(__name__)



Store = Callable[[list[dict[str, Any]]], Awaitable[list[services.Outcome]]]


def make_batcher() -> Batcher[Store]:
    """PARLEY_STORE_CONNECTIONS async PostgreSQL stores (`chat.store_pg`), or the ORM path
    alone (SQLite, or PARLEY_STORE=orm: asgiref's one database thread serialises it anyway)."""
    from django.db import connection

    if connection.vendor != "postgresql" or CONFIG.store == "orm":
        return Batcher([database_sync_to_async(services.store_batch)], store_and_deliver, CONFIG.batch_max)
    from chat.store_pg import PgStore, conninfo_from_django

    stores = [PgStore(conninfo_from_django()) for _ in range(CONFIG.store_connections)]
    return Batcher([store.store_batch for store in stores], store_and_deliver, CONFIG.batch_max,
                   [store.close for store in stores])


def _error(item: dict[str, Any], code: ErrorCode | None, message: str) -> tuple[str, str]:
    frame = error_frame(code or ErrorCode.INTERNAL, message, item["client_msg_id"], room=item["room"])
    return item["reply_to"], dumps(frame)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_valid_item(item: Any) -> bool:
    """Whether a `persist.message` has the shape protocol processes and the bot worker send.

    Redis is a transport, not a trust boundary: whatever else lands on the channel (a foreign
    writer, an old version's payload) is dropped with a log line instead of failing a batch.
    """
    return (
        isinstance(item, dict)
        and _positive_int(item.get("room"))
        and _positive_int(item.get("sender"))
        and isinstance(item.get("body"), str) and 0 < len(item["body"]) <= 65536
        and item.get("kind", "text") in ("text", "bot")
        and isinstance(item.get("client_msg_id"), str) and 0 < len(item["client_msg_id"]) <= 64
        and (item.get("reply_to") is None or isinstance(item.get("reply_to"), str))
    )


async def store_and_deliver(items: list[dict[str, Any]], store: Store) -> None:
    layer = get_channel_layer()
    valid = [item for item in items if is_valid_item(item)]
    if len(valid) != len(items):
        metrics.BAD_PAYLOADS.inc(len(items) - len(valid))
        log.warning("dropped %d malformed persist.message payloads", len(items) - len(valid))
        items = valid
        if not items:
            return
    try:
        outcomes = await store(items)
    except Exception:
        log.exception("storing a batch of %d messages failed; senders will retry", len(items))
        failed = [
            _error(item, ErrorCode.UNAVAILABLE, "could not store the message; retry")
            for item in items if item.get("reply_to")
        ]
        if failed:
            await fanout.publish_replies(failed)
        return
    metrics.BATCH_SIZE.observe(len(items))

    publish: list[tuple[int, int | None, str]] = []
    replies: list[tuple[int | None, str, str]] = []  # (room whose publish it follows, address, frame)
    bot_jobs: list[dict[str, Any]] = []
    now = time.time()
    for outcome in outcomes:
        item = outcome.item
        if outcome.status in ("stored", "duplicate"):
            if outcome.frame is not None and outcome.room is not None:
                # A duplicate is published again: if the first attempt died between commit and
                # publish, this is what delivers it live (members drop seqs they already have).
                publish.append((outcome.room, outcome.seq, dumps(outcome.frame)))
            if outcome.status == "stored":
                metrics.STORED.inc()
                if "queued_at" in item:
                    metrics.DELIVERY_LATENCY.observe(max(0.0, now - item["queued_at"]))
            else:
                metrics.DUPLICATES.inc()
            if item.get("reply_to"):
                replies.append((outcome.room, item["reply_to"], dumps({
                    "type": "ack", "client_msg_id": item["client_msg_id"], "room": outcome.room,
                    "seq": outcome.seq, "duplicate": outcome.status == "duplicate",
                })))
            if outcome.bot_job is not None:
                bot_jobs.append(outcome.bot_job)
        elif item.get("reply_to"):
            replies.append((None, *_error(item, outcome.code, outcome.message)))
    # Published before acked: a sender who sees its ack can count on members having been sent it.
    withheld = await fanout.publish_then_reply(publish, replies)
    if withheld:
        metrics.ACKS_WITHHELD.inc(withheld)
    for job in bot_jobs:
        await send_with_retry(layer, BOT_CHANNEL, job)


async def send_with_retry(layer: Any, channel: str, message: PersistMessage | BotReply, attempts: int = 20) -> None:
    for attempt in range(attempts):
        try:
            await layer.send(channel, message)
            return
        except ChannelFull:
            await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
    log.error("channel %s stayed full; dropped %s", channel, message.get("type"))


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher[Store]] = weakref.WeakKeyDictionary()


def batcher() -> Batcher[Store]:
    """This event loop's batcher (a worker process has one loop; tests one per test)."""
    loop = asyncio.get_running_loop()
    if loop not in _batchers:
        _batchers[loop] = make_batcher()
    return _batchers[loop]


def held_by_batcher() -> int:
    """Messages this loop's batcher holds and has not handed to a store yet (0 if it has none)."""
    found = _batchers.get(asyncio.get_running_loop())
    return len(found.pending) if found is not None else 0


class PersistConsumer(AsyncConsumer):
    async def persist_message(self, message: dict[str, Any]) -> None:
        await batcher().add(message)


class BotConsumer(AsyncConsumer):
    async def bot_reply(self, job: BotReply) -> None:
        try:
            bot_user, reply = await database_sync_to_async(bots.answer)(job["bot"], job["sender_name"], job["body"])
        except Exception:
            log.exception("bot %s could not answer in room %s", job.get("bot"), job.get("room"))
            return
        answer: PersistMessage = {
            "type": "persist.message",
            "room": job["room"],
            "sender": bot_user,
            "body": reply,
            "kind": "bot",
            # Derived from the message answered: a re-delivered job is stored once.
            "client_msg_id": f"bot.{job['room']}.{job['seq']}",
            "reply_to": None,
            "queued_at": time.time(),
        }
        await send_with_retry(self.channel_layer, PERSIST_CHANNEL, answer)
