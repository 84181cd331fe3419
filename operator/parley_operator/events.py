"""Events on a ChatPlatform, rate-limited the way client-go's EventCorrelator limits them.

A condition that repeats every poll (a drift the operator cannot revert, a child the API server
keeps rejecting) would otherwise post one Event per poll: 5,760 a day per platform at 15 s.
client-go folds identical Events into one with a count, and after 10 similar Events (same
object and reason, other messages) in 10 minutes combines the rest. Here, per object, type and
reason, within a window:

* the first Event is posted;
* an identical one (same message) is not posted again, only counted;
* differing messages are posted up to MAX_SIMILAR per window, then only counted;
* the first Event posted after the window says how many were folded (not posted) before it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

# client-go's defaultAggregateIntervalInSeconds and defaultAggregateMaxEvents.
WINDOW_SECONDS = 600.0
MAX_SIMILAR = 10

Key = tuple[str, str, str]  # object uid, type, reason


@dataclass
class _Window:
    started: float
    messages: set[str] = field(default_factory=set)
    folded: int = 0  # Events counted but not posted in this window


@dataclass
class EventLimiter:
    window: float = WINDOW_SECONDS
    max_similar: int = MAX_SIMILAR
    _windows: dict[Key, _Window] = field(default_factory=dict)

    def admit(self, key: Key, message: str, now: float) -> str | None:
        """The message to post, or None when this Event is folded into one already posted."""
        current = self._windows.get(key)
        folded_before = 0
        if current is not None and now - current.started >= self.window:
            folded_before = current.folded
            current = None
        if current is None:
            self._forget_expired(now)
            self._windows[key] = _Window(started=now, messages={message})
            if folded_before:
                return f"{message} ({folded_before} similar Event(s) before this one were not posted)"
            return message
        if message in current.messages or len(current.messages) >= self.max_similar:
            current.folded += 1
            return None
        current.messages.add(message)
        return message

    def _forget_expired(self, now: float) -> None:
        # Keeps memory bounded by the objects that posted in the last window. A window that
        # folded Events is kept one more window, so its count can still be reported.
        for key in [k for k, w in self._windows.items()
                    if now - w.started >= self.window * (2 if w.folded else 1)]:
            del self._windows[key]


LIMITER = EventLimiter()


def reset() -> None:
    """Forget every window: an operator (re)start begins with none, as a new process would."""
    LIMITER._windows.clear()


def post(owner: Mapping[str, Any], *, type: str, reason: str, message: str,  # `type`: kopf.event's name
         now: float | None = None) -> bool:
    """Post an Event on `owner` unless the limiter folds it; True when posted."""
    uid = str((owner.get("metadata") or {}).get("uid", ""))
    text = LIMITER.admit((uid, type, reason), message, time.monotonic() if now is None else now)
    if text is None:
        return False
    kopf.event(owner, type=type, reason=reason, message=text)
    return True
