"""The load test profile's workload, as the capacity model needs it: messages per user per minute
and the members online who receive each message, from a minted users file and the Locust mix.

A Locust user draws its behaviour from `--mix` (`parley_locust.mix.plan_for`): idle, or chatting
in its group rooms, its DM or its bot room at `--message-rate` messages per minute, picking a room
with weight 1/size. A user without a room of the drawn kind chats in its groups instead (idle if
it has none). This module takes the expectation of that over every user of the file (no
sampling), so the plan's workload is the one the Locust run offers; tests/test_capacity.py checks
it against the Locust code's own draws, so a change to `plan_for` fails there until this follows.

Every member of a minted room is a minted user, so in a run that connects the whole file every
member is online, except the bot of a bot room (a server-side user with no socket). A bot's reply
(one more message per message to the bot) is not counted.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

LOADTEST = Path(__file__).resolve().parent
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))  # parley_locust is a top-level package (the load image's /loadtest)

from parley_locust.mix import BEHAVIOURS, TALKS_IN, parse_mix  # noqa: E402
from parley_locust.options import DEFAULT_MESSAGE_RATE, DEFAULT_MIX  # noqa: E402
from parley_locust.users_file import iter_users, read_header  # noqa: E402

__all__ = ["DEFAULT_MESSAGE_RATE", "DEFAULT_MIX", "ProfileWorkload", "profile_workload"]


@dataclass(frozen=True)
class ProfileWorkload:
    messages_per_user_per_minute: float
    room_mix: tuple[tuple[float, float], ...]  # (members online, share of messages)
    users: int  # users in the file
    source: str


def profile_workload(users_file: Path, mix_text: str = DEFAULT_MIX,
                     message_rate: float = DEFAULT_MESSAGE_RATE) -> ProfileWorkload:
    mix = parse_mix(mix_text)
    read_header(users_file)  # a wrong format or version is a clear error before the stream
    per_recipients: dict[float, float] = defaultdict(float)  # members online -> messages/min
    users = 0
    for record in iter_users(users_file):
        users += 1
        for behaviour in BEHAVIOURS:
            if behaviour == "idle" or not mix[behaviour]:
                continue
            talks_in = [room for room in record.rooms if room.kind == TALKS_IN[behaviour]]
            if not talks_in:  # no DM or bot chat: the user chats in its groups
                talks_in = [room for room in record.rooms if room.kind == TALKS_IN["group"]]
            weights = [1.0 / max(room.size, 1) for room in talks_in]
            for room, weight in zip(talks_in, weights, strict=True):
                online = room.size - 1 if room.kind == "bot" else room.size
                per_recipients[float(online)] += mix[behaviour] * message_rate * weight / sum(weights)
    if not users:
        raise ValueError(f"{users_file}: no users")
    total = sum(per_recipients.values())
    if total <= 0:
        raise ValueError(f"{users_file} with --mix {mix_text}: no user sends anything")
    return ProfileWorkload(
        total / users, tuple(sorted((size, rate / total) for size, rate in per_recipients.items())), users,
        f"{users_file} ({users:,} users), Locust --mix {mix_text} --message-rate {message_rate:g}")
