"""What every client sent, was acked and received during a case: the history the checker reads.

Jepsen's total-queue checker and Kafka's produce-consume-validate tests keep the same record: each
message is numbered by its sender (per sender, per room), so a loss, a duplicate or a reordering
names the message concerned. All clients of a case run in one process and one event loop, so the
history is plain dicts and counters, written without locks.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Send:
    """One message a client wants stored, however many times it was sent."""

    client_msg_id: str
    room: int
    sender: int
    number: int  # the sender's count in this room: 1, 2, 3, ...
    body: str
    first_sent: float  # monotonic
    attempts: int = 0
    acked_at: float | None = None
    seq: int | None = None
    duplicate_acks: int = 0  # acks that said `duplicate: true` (a retry of something stored)
    mismatched: int = 0  # a later ack gave another seq
    refused: str | None = None  # an error code that means "never retry this"


@dataclass
class RoomView:
    """One client's view of one room's sequence, across all its connections."""

    have: int = 0  # every seq in (start, have] received
    received: dict[int, str] = field(default_factory=dict)  # seq -> client_msg_id
    ahead: set[int] = field(default_factory=set)  # received beyond have + 1 (only after a gap)
    duplicates: int = 0
    gaps: int = 0
    reordered: int = 0
    reloaded: int = 0  # seqs filled from `history` after a `reload`
    # sender -> highest number seen from that sender here; a lower one later broke sender order.
    sender_last: dict[int, int] = field(default_factory=dict)
    sender_order: int = 0

    def receive(self, seq: int, client_msg_id: str, sender: int, number: int | None) -> None:
        if seq in self.received:
            self.duplicates += 1
            return
        self.received[seq] = client_msg_id
        if number is not None:
            if number < self.sender_last.get(sender, 0):
                self.sender_order += 1
            self.sender_last[sender] = max(number, self.sender_last.get(sender, 0))
        if seq <= self.have:
            self.reordered += 1  # a hole below what this client already had, filled late
        elif seq == self.have + 1:
            self.have = seq
            while self.have + 1 in self.ahead:
                self.have += 1
                self.ahead.discard(self.have)
        else:
            if not self.ahead or seq > max(self.ahead) + 1:
                self.gaps += 1  # a seq past the next one: the server promised never to do this
            elif seq < max(self.ahead):
                self.reordered += 1
            self.ahead.add(seq)


@dataclass
class History:
    sends: dict[str, Send] = field(default_factory=dict)
    views: dict[tuple[str, int], RoomView] = field(default_factory=dict)
    members: dict[int, set[str]] = field(default_factory=dict)  # room -> client names in it
    closes: Counter[str] = field(default_factory=Counter)  # close codes seen by clients
    errors: Counter[str] = field(default_factory=Counter)  # error frames by code
    events: Counter[str] = field(default_factory=Counter)  # connects, reconnects, resumes, reloads
    connect_failures: int = 0
    # Send-to-delivery seconds of each live delivery (from the message's first attempt, so a
    # fault's retries count).
    latencies: list[float] = field(default_factory=list)

    def view(self, client: str, room: int) -> RoomView:
        found = self.views.get((client, room))
        if found is None:
            found = self.views[(client, room)] = RoomView()
            self.members.setdefault(room, set()).add(client)
        return found

    def new_send(self, client_msg_id: str, room: int, sender: int, number: int, body: str) -> Send:
        send = self.sends[client_msg_id] = Send(client_msg_id, room, sender, number, body, time.monotonic())
        return send

    def retries(self) -> int:
        """Sends beyond each message's first attempt, over the whole history."""
        return sum(max(0, send.attempts - 1) for send in self.sends.values())

    def acked(self, client_msg_id: str, room: int, seq: int, duplicate: bool) -> Send | None:
        send = self.sends.get(client_msg_id)
        if send is None:
            return None
        if send.seq is not None and send.seq != seq:
            send.mismatched += 1
        if send.acked_at is None:
            send.acked_at = time.monotonic()
            send.seq = seq
        if duplicate:
            send.duplicate_acks += 1
        return send
