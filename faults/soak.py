"""The soak: one cluster, steady senders, and random faults from the cases, one after another, for
as long as asked; then the same check as a case. The seed picks the faults and their timing, so a
failing soak is replayed with `--seed`.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from faults import cases
from faults.run import CaseRun, Traffic

# The faults a soak draws from: every case that leaves the cluster as it found it. (The clock-skew
# and slow-client cases change how processes start or add a hostile socket; they run as cases.)
SOAK_FAULTS = ("protocol_sigkill", "protocol_drain", "worker_kill", "redis_restart", "redis_pause",
               "shard_loss", "postgres_outage", "redis_network", "rolling_restart")
# Quiet time between two faults, drawn uniformly: enough for clients to recover and for the next
# fault to hit a steady state rather than the tail of the last.
QUIET_S = (3.0, 8.0)


def soak_fault(duration_s: float, faults: tuple[str, ...]) -> Any:
    """A fault function that runs random faults for `duration_s` and records which, and when."""

    async def fault(run: CaseRun) -> None:
        deadline = time.monotonic() + duration_s
        log: list[dict[str, Any]] = []
        run.facts["faults"] = log
        started = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(run.rng.uniform(*QUIET_S))
            if time.monotonic() >= deadline:
                break
            name = run.rng.choice(faults)
            at = round(time.monotonic() - started, 1)
            run.healed_at = None
            await cases.CASES[name].fault(run)
            log.append({"fault": name, "at_s": at, "took_s": round(time.monotonic() - started - at, 1)})
            print(f"soak: {name} at {at}s, took {log[-1]['took_s']}s", flush=True)

    return fault


def soak_traffic(duration_s: float) -> Traffic:
    return Traffic(before_s=3.0, after_s=5.0, settle_s=30.0)


def available(postgres: bool) -> tuple[str, ...]:
    return tuple(name for name in SOAK_FAULTS if postgres or not cases.CASES[name].needs_postgres)


def pick_seed(seed: int | None) -> int:
    return seed if seed is not None else random.SystemRandom().randrange(2**31)
