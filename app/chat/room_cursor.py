"""A connection's position in one room, and the rules that keep its `seq` gap-free.

The consumer (`chat.consumers`) owns the socket, the tasks and the database; this module owns
only the decisions, so they are tested without a socket (`tests/test_room_cursor.py`). The
model is centrifuge's `internal/recovery`: live frames are held while a catch-up from the
database runs, then the two are merged in seq order, each seq delivered once.

A room's frames arrive live from the room bus (`offer`). A frame with the next seq goes out; an
older one was already delivered (a catch-up, or a publish repeated by a retry); a newer one
means frames were missed (pub/sub is at-most-once): it is held and the consumer loads what is
missing from the database (`catch_up`), after which the held frames are offered again in order
(`release`). Ephemeral frames (typing, presence, read: no seq) go out only once the room is
open, that is once its `joined` went out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Offer(enum.Enum):
    """What the consumer does with a live frame."""

    SEND = "send"  # push it now
    DROP = "drop"  # already delivered, or the room is not open for ephemeral frames yet
    HOLD = "hold"  # kept in `pending` until the catch-up in progress is done
    FILL = "fill"  # kept in `pending`, and frames before it are missing: start a catch-up


@dataclass(slots=True)
class Cursor:
    """This connection's position in one room (slots: a socket may hold hundreds of these)."""

    last_seq: int = 0
    filling: bool = True  # live frames wait in `pending` until the database catch-up is done
    pending: list[tuple[int, str]] = field(default_factory=list)
    # False until `joined` went out: ephemeral frames of the room are dropped until then.
    open: bool = False
    # When this connection last fanned out `typing` / `read` in the room (monotonic seconds).
    typed_at: float = -1e9
    read_at: float = -1e9
    read_seq: int | None = None  # a marker waiting for the end of the read interval
    # The room was crowded when joined (`chat.presence.Online.crowded`): this connection's user
    # arrives and leaves unannounced.
    quiet: bool = False

    def offer(self, seq: int | None, text: str) -> Offer:
        """Decide about a live frame; SEND advances the cursor, HOLD and FILL keep the frame."""
        if seq is None:
            return Offer.SEND if self.open else Offer.DROP
        if self.filling:
            self.pending.append((seq, text))
            return Offer.HOLD
        if seq <= self.last_seq:
            return Offer.DROP
        if seq > self.last_seq + 1:
            self.pending.append((seq, text))
            self.filling = True
            return Offer.FILL
        self.last_seq = seq
        return Offer.SEND

    def rewind(self, seq: int) -> bool:
        """Go back to `seq` and fill: a client's `resume`, or (at the current position) a check
        for what a lost subscription missed. False if a fill is running (it delivers from the
        earlier position anyway)."""
        if self.filling:
            return False
        self.last_seq = min(seq, self.last_seq)
        self.filling = True
        return True

    def catch_up(self, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The frames of a catch-up (in seq order) that this connection has not had yet."""
        fresh = []
        for frame in frames:
            if frame["seq"] > self.last_seq:
                self.last_seq = frame["seq"]
                fresh.append(frame)
        return fresh

    def skip_to(self, last_seq: int) -> None:
        """Too far behind to replay (the client reloads): continue from `last_seq`."""
        self.last_seq = last_seq
        self.pending = [(seq, text) for seq, text in self.pending if seq > last_seq]

    def release(self) -> list[tuple[int, str]]:
        """End the catch-up: the held frames, in seq order, to offer again."""
        self.filling = False
        pending, self.pending = sorted(self.pending), []
        return pending
