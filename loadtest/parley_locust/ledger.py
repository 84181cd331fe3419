"""What each simulated user saw of its rooms, and the process's totals: Parley's promise, checked.

The promise (README; docs/protocol.md, "Delivery guarantees"): every acked message is stored
once and reaches every member of its room, live or through `resume`, with no gap in the room's
`seq`. Each member checks it for its own rooms, with no shared state between Locust processes:

- `RoomTrack` follows one member's sequence of one room: from the `last_seq` its `joined` gave
  (older messages are history), every later seq must arrive, in order, once. A seq beyond the next
  one is a *gap* (the server promises to fill holes before going on), an earlier missing one
  arriving late is *reordered*, one already seen a *duplicate*.
- Each sender is a member of its own rooms: its `ack` (room, seq, client_msg_id) must match the
  message it receives at that seq. Its own message seen at two seqs was *stored twice*.
- At the end, every member resumes each room from what it has; what the server still cannot give
  (a hole below the room's `last_seq`, or an acked seq above it) is *lost*. What arrived only
  through that final resume arrived *late* (the promise allows it; the report shows it).

Counters are plain integers (no locks: gevent switches only on I/O) in `Totals`, reported to the
Locust master every few seconds and summed there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# How far ahead of the contiguous prefix a member keeps seqs it received out of order. Parley
# never sends beyond the next seq; a client that sees it anyway resumes, so a window of a few
# thousand bounds the memory of a broken run without hiding anything (overflow is counted).
AHEAD_MAX = 5000


@dataclass
class Totals:
    """Counters of one Locust process (summed over processes by the master)."""

    connects: int = 0
    connect_errors: int = 0
    sent: int = 0
    acked: int = 0
    ack_errors: int = 0
    unacked: int = 0  # sends never acked by the end (not a loss: the sender was never told "stored")
    deliveries: int = 0  # message frames received, all rooms, all members
    duplicates: int = 0
    gaps: int = 0
    reordered: int = 0
    lost: int = 0
    late: int = 0  # received only through the final resume
    mismatched: int = 0  # an ack's seq held another message
    stored_twice: int = 0
    reloads: int = 0
    reconnects: int = 0
    resumes: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error frames by code
    closes: dict[str, int] = field(default_factory=dict)  # server closes by code

    def add_error(self, code: str, count: int = 1) -> None:
        self.errors[code] = self.errors.get(code, 0) + count

    def add_close(self, code: int | None) -> None:
        key = str(code)
        self.closes[key] = self.closes.get(key, 0) + 1

    def as_dict(self) -> dict[str, object]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: dict(value) if isinstance(value, dict) else value for name, value in values.items()}

    @staticmethod
    def summed(parts: list[dict[str, object]]) -> dict[str, object]:
        """The sum of several processes' `as_dict()`s."""
        total: dict[str, object] = Totals().as_dict()
        for part in parts:
            for key, value in part.items():
                if isinstance(value, dict):
                    into = total.setdefault(key, {})
                    assert isinstance(into, dict)
                    for code, count in value.items():
                        into[code] = into.get(code, 0) + count
                elif isinstance(value, int):
                    total[key] = int(total.get(key, 0)) + value  # type: ignore[arg-type]
        return total


class RoomTrack:
    """One member's view of one room's sequence."""

    __slots__ = ("ahead", "base", "final", "high", "own")

    def __init__(self, base: int) -> None:
        self.base = base  # the room's last seq when joined: older is history
        self.high = base  # every seq in (base, high] received
        self.ahead: set[int] = set()  # received seqs above high + 1
        self.final = False  # the final resume is under way: what arrives now is late
        # This member's own messages: client_msg_id -> seq it arrived at.
        self.own: dict[str, int] = {}

    def receive(self, seq: int, totals: Totals) -> bool:
        """Count a message at `seq`; False for a duplicate (already received)."""
        if seq <= self.high or seq in self.ahead:
            if not self.final:  # the final resume replays from `high`: what is ahead comes again
                totals.duplicates += 1
            return False
        latest = max(self.ahead) if self.ahead else self.high
        behind_later = seq < latest  # a later seq came first
        if self.final:
            totals.late += 1  # the final resume fills holes: that is what it is for
        elif behind_later:
            totals.reordered += 1
        if seq == self.high + 1:
            self.high = seq
            while self.high + 1 in self.ahead:
                self.high += 1
                self.ahead.discard(self.high)
        else:
            if seq > latest + 1 and not self.final:
                totals.gaps += 1  # past the next seq after everything seen: a new hole opened
            if len(self.ahead) < AHEAD_MAX:
                self.ahead.add(seq)
        totals.deliveries += 1
        return True

    def own_message(self, client_msg_id: str, seq: int, totals: Totals) -> None:
        """This member sent the message at `seq`: one client_msg_id must have one seq."""
        first = self.own.setdefault(client_msg_id, seq)
        if first != seq:
            totals.stored_twice += 1

    def acked(self, client_msg_id: str, seq: int, totals: Totals) -> None:
        """The ack of this member's message: if the message came already, it must be at `seq`."""
        seen = self.own.get(client_msg_id)
        if seen is not None and seen != seq:
            totals.mismatched += 1

    def skip_to(self, last_seq: int, totals: Totals) -> None:
        """`reload`: too far behind to replay; the client reloads history instead (not checked)."""
        totals.reloads += 1
        if last_seq > self.high:
            self.high = last_seq
            self.ahead = {s for s in self.ahead if s > last_seq}

    def settle(self, last_seq: int, acked_seqs: list[int], totals: Totals) -> int:
        """After the final `resume` answered `resumed {last_seq}`: count what is still missing.
        `acked_seqs` are this member's acked sends in the room (an acked seq above the room's
        last seq was acked and never stored). Returns the number lost."""
        missing = max(0, last_seq - self.high - sum(1 for s in self.ahead if s <= last_seq))
        missing += sum(1 for s in acked_seqs if s > last_seq)
        totals.lost += missing
        return missing
