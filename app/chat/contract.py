"""The contract between Parley's processes, defined once: channels, Redis keys, payloads.

Protocol processes, workers, the operator and the tests all meet here. Nothing in this module
needs Django, so settings can import it too. The operator runs from its own package and checks
its copies of these names in `tests/operator/test_contract.py`.

Worker channels (channels-redis named channels, key `<prefix><name>`):

- `chat.persist`: `PersistMessage`, sent by protocol processes and the bot worker; workers store,
  publish and ack it.
- `chat.bot`: `BotReply`, sent by workers after storing a message to a bot; workers answer it.

Redis keys and pub/sub topics, all namespaced by the platform's channel prefix
(`PARLEY_CHANNEL_PREFIX`, the same prefix channels-redis puts on the worker channels), so two
platforms on one Redis never deliver each other's messages or count each other's pods:

| key or topic                  | type       | payload                                  | written by → read by        |
|-------------------------------|------------|------------------------------------------|-----------------------------|
| `<prefix>:room:<room id>`     | topic      | `<seq>\n<frame JSON>` (`*_room_payload`)  | workers, protocol → protocol|
| `<prefix>:process:<pid>`      | topic      | `<conn key>\n<frame JSON>` pairs (`*_reply_payload`) | workers → it |
| `<prefix>:control`            | topic      | a JSON command (`chat.control`)          | HTTP views → every protocol |
| `<prefix>:presence:<room id>` | sorted set | `<user id>:<username>`, score = expiry   | protocol → protocol         |
| `<prefix>:proc:<pid>`         | hash + TTL | role, pod, connections, inbox, held, draining, ts | all → operator |
| `<prefix>:procs`              | sorted set | `<pid>`, score = its heartbeat's expiry (epoch s) | all → operator |

`<prefix>:procs` is the registry of live processes, one per shard: a process registers in the
shard that holds its heartbeat (the same pipeline), so the operator reads each shard's members
instead of SCANning its keyspace. A member is live while its score is in the future; a killed
process's member is pruned by the next heartbeat of any process on that shard, and a process
that drains or exits removes its heartbeat and its member itself. `held` (workers): messages
taken from Redis and not stored yet, which the operator adds to the worker load.

`<seq>` is empty for ephemeral frames (typing, presence, read) that have no place in the room's
sequence. Redis is a transport, not an authority: `decode_*` raise ValueError on anything Parley
does not write, and readers drop such payloads with a log line.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from parley.config import CONFIG

# --- worker channels -----------------------------------------------------------------------------

PERSIST_CHANNEL = "chat.persist"
BOT_CHANNEL = "chat.bot"
WORKER_CHANNELS = (PERSIST_CHANNEL, BOT_CHANNEL)


class PersistMessage(TypedDict):
    """A message to store (`chat.persist`): from a user's socket, or a bot's answer."""

    type: Literal["persist.message"]
    room: int
    sender: int
    body: str
    kind: NotRequired[str]  # "text" (default) or "bot"
    # Unique per sender: a retry carries the same id and is stored once.
    client_msg_id: str
    # Where the ack goes (`reply_address`); None for a bot's answer (nobody waits for it).
    reply_to: str | None
    # time.time() when the protocol process queued it, for the delivery-latency metric.
    queued_at: NotRequired[float]


class BotReply(TypedDict):
    """A stored message a bot must answer (`chat.bot`)."""

    type: Literal["bot.reply"]
    room: int
    bot: int
    seq: int
    sender: int
    sender_name: str
    body: str


# --- replies to one socket -------------------------------------------------------------------------


def reply_address(pid: str, key: int) -> str:
    """Where a worker sends the ack of a message from connection `key` of process `pid`."""
    return f"{pid}|{key}"


def split_reply_address(address: str) -> tuple[str, str]:
    """(process id, connection key) of a reply address."""
    pid, _, key = address.rpartition("|")
    return pid, key


def encode_reply_payload(replies: list[tuple[str | int, str]]) -> str:
    """Replies to sockets of one process, in one payload: `<key>\n<frame JSON>` per reply, joined
    by newlines (compact JSON never holds a raw newline: json.dumps escapes it). A worker sends
    one PUBLISH per process per batch, not one per ack."""
    return "\n".join(f"{key}\n{frame_json}" for key, frame_json in replies)


def decode_reply_payload(data: bytes) -> list[tuple[int, str]]:
    """(connection key, frame JSON) of each reply in a process topic's payload; ValueError if
    malformed (an odd number of lines, a key that is not a number, a frame that is not an
    object)."""
    lines = data.split(b"\n")
    if len(lines) % 2:
        raise ValueError("a reply payload holds key and frame lines in pairs")
    replies = []
    for key, body in zip(lines[::2], lines[1::2], strict=True):
        if not (body.startswith(b"{") and body.endswith(b"}")):
            raise ValueError("frame is not a JSON object")
        replies.append((int(key), body.decode()))
    return replies


# --- room frames -------------------------------------------------------------------------------------


def encode_room_payload(seq: int | None, frame_json: str) -> str:
    return f"{'' if seq is None else seq}\n{frame_json}"


def decode_room_payload(data: bytes) -> tuple[int | None, str]:
    """(seq or None, frame JSON) of a payload on a room topic; ValueError if malformed."""
    head, _, body = data.partition(b"\n")
    seq = int(head) if head else None
    if seq is not None and seq < 1:
        raise ValueError(f"seq {seq} out of range")
    if not (body.startswith(b"{") and body.endswith(b"}")):
        raise ValueError("frame is not a JSON object")
    return seq, body.decode()


# --- keys and topics ---------------------------------------------------------------------------------


def room_topic(room: int) -> str:
    return CONFIG.key(f"room:{room}")


def room_topic_prefix() -> str:
    return CONFIG.key("room:")


def room_of_topic(name: str | bytes) -> int | None:
    """The room id of a room topic, or None for any other (or malformed) topic name."""
    if isinstance(name, bytes):
        try:
            name = name.decode()
        except UnicodeDecodeError:
            return None
    prefix = room_topic_prefix()
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix):]
    return int(digits) if digits.isdigit() and len(digits) <= 19 else None


def process_topic(pid: str) -> str:
    return CONFIG.key(f"process:{pid}")


def control_topic() -> str:
    return CONFIG.key("control")


def presence_key(room: int) -> str:
    return CONFIG.key(f"presence:{room}")


def heartbeat_key(pid: str) -> str:
    return CONFIG.key(f"proc:{pid}")


def heartbeat_pattern() -> str:
    return CONFIG.key("proc:*")


def registry_key() -> str:
    """The registry of live processes (on each shard, the processes whose heartbeat it holds)."""
    return CONFIG.key("procs")


# --- between the protocol server and the app, in one process -------------------------------------

# ASGI scope extension: a callable `(text) -> bool` that writes a text frame at once when the
# socket can take it without waiting, else returns False (send it through ASGI `send()`).
# Offered by `parley.daphne_server`; the consumer uses it when present.
WRITE_NOW_EXTENSION = "parley.write_now"
