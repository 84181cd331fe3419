"""The promise, checked against a case's history and the database.

- **received ⊇ acked**: every acked message reached every member of its room (each client was a
  member from before the first send). What a member had only after the final `resume` is *late*
  (allowed: "live or through resume"); what it never got is *lost*. An acked message missing from
  the database, or stored under another seq than its ack said, is lost too.
- **stored once**: no two rows share (sender, client_msg_id), and no body is stored twice;
  no member got a seq twice. Both count as *duplicated*.
- **no gap**: each room's stored seqs are 1..last_seq; no member saw a seq jump past the next
  one (*gaps*) or a lower seq after a higher one (*reordered*).
- **unacked**: sends never acked when the case ended. Not losses (the sender was never told
  "stored"), but reported, as are those among them that were stored anyway.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from faults.history import History

StoredRow = tuple[int, int, int, str, str]  # room, seq, sender, client_msg_id, body


@dataclass
class Result:
    case: str
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    gaps: int = 0
    reordered: int = 0
    unacked: int = 0
    recovery_s: float | None = None
    # Beyond the line: what explains a failure, or shows how the promise was kept.
    late: int = 0
    sender_order: int = 0
    mismatched: int = 0
    refused: int = 0
    stored_unacked: int = 0
    deliveries: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    seed: int | None = None
    duration_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.gaps or self.reordered or self.mismatched
                    or self.problems)

    def line(self) -> str:
        recovery = "none" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return (f"case={self.case} acked={self.acked} lost={self.lost} duplicated={self.duplicated} "
                f"gaps={self.gaps} reordered={self.reordered} unacked={self.unacked} recovery_s={recovery} "
                f"late={self.late} sender_order={self.sender_order} p99_ms={self.latency_p99_ms} "
                f"result={'PASS' if self.ok else 'FAIL'}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check(
    case: str,
    history: History,
    before_final: dict[tuple[str, int], set[int]],
    stored: Iterable[StoredRow],
    latencies: list[float],
) -> Result:
    result = Result(case)
    rows = list(stored)
    by_room_seq: dict[tuple[int, int], StoredRow] = {}
    seq_counts: Counter[tuple[int, int]] = Counter()
    id_counts: Counter[tuple[int, str]] = Counter()
    body_counts: Counter[tuple[int, str]] = Counter()
    for row in rows:
        room, seq, sender, client_msg_id, body = row
        by_room_seq[(room, seq)] = row
        seq_counts[(room, seq)] += 1
        id_counts[(sender, client_msg_id)] += 1
        body_counts[(room, body)] += 1
    stored_twice = sum(n - 1 for n in id_counts.values() if n > 1)
    stored_twice += sum(n - 1 for n in body_counts.values() if n > 1)
    # Seqs per room: 1..max, each once.
    db_gaps = 0
    rooms = {room for room, _ in by_room_seq}
    for room in rooms:
        seqs = {seq for r, seq in by_room_seq if r == room}
        db_gaps += max(seqs) - len(seqs)
    db_gaps += sum(n - 1 for n in seq_counts.values() if n > 1)

    missing_members: Counter[str] = Counter()
    for send in history.sends.values():
        if send.refused is not None:
            result.refused += 1
            continue
        if send.acked_at is None:
            result.unacked += 1
            if (send.sender, send.client_msg_id) in id_counts:
                result.stored_unacked += 1
            continue
        result.acked += 1
        result.mismatched += send.mismatched
        assert send.seq is not None
        row = by_room_seq.get((send.room, send.seq))
        lost = row is None or row[3] != send.client_msg_id
        if lost:
            result.problems.append(f"acked {send.client_msg_id} at seq {send.seq} is not stored there")
        for member in sorted(history.members.get(send.room, ())):
            view = history.views[(member, send.room)]
            got = view.received.get(send.seq)
            if got is None:
                lost = True
                missing_members[member] += 1
            elif got != send.client_msg_id:
                result.mismatched += 1
            elif send.seq not in before_final.get((member, send.room), set()):
                result.late += 1
        result.lost += lost
    if missing_members:
        result.details["missing_by_member"] = dict(missing_members.most_common(10))

    client_duplicates = sum(v.duplicates for v in history.views.values())
    result.duplicated = stored_twice + client_duplicates
    result.gaps = db_gaps + sum(v.gaps for v in history.views.values())
    result.reordered = sum(v.reordered for v in history.views.values())
    result.sender_order = sum(v.sender_order for v in history.views.values())
    result.deliveries = sum(len(v.received) for v in history.views.values())
    if latencies:
        ordered = sorted(latencies)
        result.latency_p50_ms = round(statistics.median(ordered) * 1000, 1)
        result.latency_p99_ms = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)
    result.details.update({
        "stored_rows": len(rows), "stored_twice": stored_twice, "client_duplicates": client_duplicates,
        "db_gaps": db_gaps, "closes": dict(history.closes), "errors": dict(history.errors),
        "events": dict(history.events), "connect_failures": history.connect_failures,
        "reloaded": sum(v.reloaded for v in history.views.values()),
        "retries": history.retries(),
        "duplicate_acks": sum(s.duplicate_acks for s in history.sends.values()),
    })
    return result


def recovery_seconds(history: History, healed_at: float | None) -> float | None:
    """After the fault ended, how long until every sender had a message acked that it first sent
    after that moment: the time the service took to work again for everyone. None if some sender
    never did (or no sender sent after the fault)."""
    if healed_at is None:
        return 0.0
    first_ack: dict[int, float | None] = {}
    for send in history.sends.values():
        if send.first_sent < healed_at or send.refused is not None:
            continue
        acked = send.acked_at
        best = first_ack.get(send.sender)
        if send.sender not in first_ack:
            first_ack[send.sender] = acked
        elif acked is not None and (best is None or acked < best):
            first_ack[send.sender] = acked
    if not first_ack or any(at is None for at in first_ack.values()):
        return None
    return round(max(at for at in first_ack.values() if at is not None) - healed_at, 2)
