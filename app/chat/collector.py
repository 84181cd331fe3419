"""Keeps the garbage collector's full passes from stopping a protocol process for long.

A full (generation 2) pass walks every tracked object of the process: with 2,000 sockets that
stopped the event loop for 120-185 ms several times a minute under load (gc callbacks timed
it; issue 11), and it grows with the sockets held. Those pauses, not the CPU, were what failed
`make bench` steps at low load: every delivery waiting in them is late.

So, every `FREEZE_SECONDS` (5 s), the young generations are collected (cheap: only what was made
since) and everything still alive is frozen (`gc.freeze`): sockets, rooms, cursors leave the
collector's passes, which then cover only what is new. Garbage among frozen objects (a closed
socket's Twisted protocol and transport refer to each other) waits for the full pass that
runs, unfrozen, every `FULL_SECONDS`: one pause of the old kind every ten minutes instead of
several a minute, and at most ten minutes of closed sockets' cycles held meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

# How often what is alive is frozen. Short enough that a connect storm's sockets are frozen
# before the interpreter's own full pass comes round to them (at 30 s, `make bench`'s first
# steps after 2,000 connects still met 140 ms passes); each freeze costs a young collection,
# ~1-10 ms.
FREEZE_SECONDS = 5.0
# How often frozen garbage is reclaimed with a full pass.
FULL_SECONDS = 600.0
# A full pass longer than this is logged at WARNING: the process holds more than it should.
SLOW_FULL_PASS_SECONDS = 0.5

_started: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def ensure_started() -> None:
    """Start the collector's schedule for this event loop once."""
    loop = asyncio.get_running_loop()
    if loop not in _started:
        _started[loop] = loop.create_task(_schedule(), name="parley-gc")


async def _schedule() -> None:
    last_full = time.monotonic()
    while True:
        await asyncio.sleep(FREEZE_SECONDS)
        if time.monotonic() - last_full >= FULL_SECONDS:
            full_pass()
            last_full = time.monotonic()
        else:
            freeze_survivors()


def freeze_survivors() -> None:
    gc.collect(1)
    gc.freeze()


def full_pass() -> float:
    """Unfreeze, collect everything, freeze again; returns the seconds the loop stood still."""
    started = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    seconds = time.perf_counter() - started
    level = logging.WARNING if seconds > SLOW_FULL_PASS_SECONDS else logging.INFO
    log.log(level, "full garbage collection: %d unreachable objects in %.0f ms", found, seconds * 1000)
    return seconds
