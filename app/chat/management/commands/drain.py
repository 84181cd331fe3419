"""`parley drain`: the protocol pod's preStop hook.

Asks the local protocol process, over its admin Unix socket (`PARLEY_ADMIN_SOCKET`; nothing on
the network can reach it), to stop accepting and to send every client a `reconnect` frame
(jittered delay) and close with 4012, then waits until its connections reach 0 or the drain
window (PARLEY_DRAIN_SECONDS) runs out. Kubernetes sends SIGTERM only after this returns, so
Daphne's abrupt shutdown (daphne#177) finds nobody left to cut off.

A request that fails (no socket yet, a process too busy to answer, a reply that is not JSON) does
not end the hook: it retries until the window is over, because returning early is what lets
SIGTERM cut every socket at once. The hook then exits non-zero when the process never confirmed
the drain (the kubelet records a FailedPreStopHook event) and zero otherwise.

Time: the window counts from the start of this command, each request is bounded by what is left
of it, so the hook returns at most REQUEST_FLOOR_SECONDS after the window (after its own start-up:
`parley_operator.resources` adds both to terminationGracePeriodSeconds).
"""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from chat import admin
from parley.config import CONFIG

# Between status requests: the hook returns within this of the last connection leaving.
POLL_SECONDS = 0.5
# One request may take this long: a process busy with a reconnect storm answers late, and a
# later request may still get through.
REQUEST_TIMEOUT_SECONDS = 2.0
# A request made just before the deadline still gets this long to be answered: the most the
# hook can overrun its window.
REQUEST_FLOOR_SECONDS = 0.2
# Errors a request can end in: the socket (missing, refused, timed out) or the reply (empty or
# not JSON: ValueError; a JSON object without the counts: KeyError, TypeError).
REQUEST_ERRORS = (OSError, ValueError, KeyError, TypeError)


def connections_of(reply: dict[str, object]) -> int:
    count = reply["connections"]
    if not isinstance(count, int):
        raise TypeError(f"connections is {type(count).__name__}, not int")
    return count


class Command(BaseCommand):
    help = "Drain the local protocol process before it stops (for a preStop hook)."

    def add_arguments(self, parser):
        parser.add_argument("--socket", default=CONFIG.admin_socket, help="the process's admin socket")
        parser.add_argument("--seconds", type=float, default=CONFIG.drain_seconds)
        parser.add_argument("--status", action="store_true", help="only print the drain state")

    def handle(self, *args, **options):
        path = options["socket"]
        if options["status"]:
            try:
                state = admin.call("status", path)
                self.stdout.write(f"draining: {state['draining']}, connections: {connections_of(state)}")
            except REQUEST_ERRORS as exc:
                raise CommandError(f"no protocol process answers on {path}: {exc}") from None
            return
        seconds = options["seconds"]
        deadline = time.monotonic() + seconds
        left: int | None = None  # connections at the last answer; None until the drain is confirmed
        failed: str | None = None
        while True:
            remaining = deadline - time.monotonic()
            timeout = max(REQUEST_FLOOR_SECONDS, min(REQUEST_TIMEOUT_SECONDS, remaining))
            try:
                count = connections_of(admin.call("drain" if left is None else "status", path, timeout=timeout))
            except REQUEST_ERRORS as exc:
                if failed is None:
                    self.stderr.write(f"drain request to {path} failed ({exc!r}); retrying until the "
                                      f"{seconds:g}s window is over")
                failed = repr(exc)
            else:
                if left is None:
                    self.stdout.write(f"draining: {count} connections")
                left = count
                if count == 0:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(POLL_SECONDS, remaining))
        if left is None:
            raise CommandError(f"no protocol process confirmed the drain on {path} within {seconds:g}s "
                               f"(last error: {failed})")
        self.stdout.write(f"drained: {left} connections left")
