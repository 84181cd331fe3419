"""The recommendation history kept in the ChatPlatform's status, so that a new leader inherits it.

The scale-down window is only as good as its memory: an operator that restarts (a rollout, an
OOM kill, a failover to another replica) with an empty history could remove pods on its first
poll. `scaling.decide` seeds an empty history with the current count (the HPA does the same);
keeping the history in `status.recommendations` does better: the next leader resumes the
window where the last one left it, neither forgetting it nor waiting a whole new window.

Status shape, per role, oldest first (compacted by `scaling.compact`, so a few entries):

    recommendations:
      protocol: [{at: 1765100000.0, replicas: 10}, {at: 1765100015.0, replicas: 8, seeded: true}]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from parley_operator import scaling

# Entries beyond this are dropped from the status: compaction keeps a handful, so more is a
# hand edit or garbage, and must not grow the object towards etcd's size limit.
MAX_ENTRIES = 256


def to_status(history: Iterable[scaling.Recommendation]) -> list[dict[str, Any]]:
    return [
        {"at": round(r.at, 3), "replicas": r.replicas, **({"seeded": True} if r.seeded else {})}
        for r in history
    ][-MAX_ENTRIES:]


def from_status(raw: Any, now: float) -> tuple[scaling.Recommendation, ...]:
    """Recommendations read back from the status; malformed entries are skipped.

    A time ahead of our clock (another leader's clock ran ahead) is taken as now: an entry
    "from the future" would otherwise stay in the window longer than its real age.
    """
    if not isinstance(raw, list):
        return ()
    out = []
    for entry in raw[-MAX_ENTRIES:]:
        if not isinstance(entry, Mapping):
            continue
        at, replicas = entry.get("at"), entry.get("replicas")
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            continue
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            continue
        out.append(scaling.Recommendation(min(float(at), now), replicas, seeded=entry.get("seeded") is True))
    return tuple(out)


def merge(
    mine: Iterable[scaling.Recommendation], stored: Iterable[scaling.Recommendation],
    policy: scaling.Policy, now: float,
) -> tuple[scaling.Recommendation, ...]:
    """What this process remembers and what the status holds, as one history.

    Usually the two are the same. They differ after a restart (ours is empty), after a failed
    status write (ours has more) or when another leader wrote since (the status has more). The
    union is the cautious choice for both windows: a higher scale-down ceiling and a lower
    scale-up floor can only slow a change, never cause one.
    """
    union = sorted(set(mine) | set(stored), key=lambda r: (r.at, r.seeded))
    return scaling.compact(union, policy, now)
