"""What each simulated user does: its behaviour (idle, group, dm, bot) and the room it talks in."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from parley_locust.users_file import RoomRef, UserRecord

BEHAVIOURS = ("idle", "group", "dm", "bot")
# Room kinds each chatting behaviour talks in.
TALKS_IN = {"group": "group", "dm": "dm", "bot": "bot"}


def parse_mix(text: str) -> dict[str, float]:
    """`idle=80,group=12,dm=5,bot=3` -> shares summing to 1; a clear error for anything else."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in BEHAVIOURS:
            raise ValueError(f"--mix: {part!r} is not <behaviour>=<percent> with a behaviour among {BEHAVIOURS}")
        try:
            shares[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--mix: {value!r} is not a number") from None
        if shares[name.strip()] < 0:
            raise ValueError(f"--mix: {part!r} is negative")
    total = sum(shares.values())
    if total <= 0:
        raise ValueError("--mix: the shares add up to nothing")
    return {name: shares.get(name, 0.0) / total for name in BEHAVIOURS}


@dataclass(frozen=True)
class Plan:
    behaviour: str
    rooms: tuple[RoomRef, ...]  # rooms it joins (all of its rooms)
    talks_in: tuple[RoomRef, ...]  # rooms it sends to (none for idle)
    weights: tuple[float, ...]  # chance of each room in talks_in


def plan_for(record: UserRecord, mix: dict[str, float], rng: random.Random) -> Plan:
    """The user's behaviour, drawn from the mix. A chatting user whose rooms lack that kind (no DM,
    no bot chat: half and nine tenths of the minted users) chats in its groups instead, so that
    the mix's chatting share, and so the message rate, is what it says."""
    behaviour = rng.choices(BEHAVIOURS, weights=[mix[b] for b in BEHAVIOURS])[0]
    talks_in: Sequence[RoomRef] = ()
    if behaviour != "idle":
        talks_in = [room for room in record.rooms if room.kind == TALKS_IN[behaviour]]
        if not talks_in:
            behaviour = "group"
            talks_in = [room for room in record.rooms if room.kind == "group"]
        if not talks_in:
            behaviour, talks_in = "idle", ()
    # People talk more in small rooms; big rooms are mostly read. Weighting group rooms by 1/size
    # keeps a message's mean fan-out near 10 with the default room sizes, as in a team chat;
    # uniform weights would make the rare 1,000-member rooms carry most deliveries.
    weights = tuple(1.0 / max(room.size, 1) for room in talks_in)
    return Plan(behaviour, tuple(record.rooms), tuple(talks_in), weights)


def pick_room(plan: Plan, rng: random.Random) -> RoomRef:
    return rng.choices(plan.talks_in, weights=plan.weights)[0]
