"""`parley drain`: the protocol pod's preStop hook.

Asks the local protocol process, over its admin Unix socket (`PARLEY_ADMIN_SOCKET`; nothing on
the network can reach it), to stop accepting and to send every client a `reconnect` frame
(jittered delay) and close with 4012, then waits until its connections reach 0 or the drain
window (PARLEY_DRAIN_SECONDS) runs out. Kubernetes sends SIGTERM only after this returns, so
Daphne's abrupt shutdown (daphne#177) finds nobody left to cut off.
"""

import time

from django.core.management.base import BaseCommand, CommandError

from chat import admin
from parley.config import CONFIG


class Command(BaseCommand):
    help = "Drain the local protocol process before it stops (for a preStop hook)."

    def add_arguments(self, parser):
        parser.add_argument("--socket", default=CONFIG.admin_socket, help="the process's admin socket")
        parser.add_argument("--seconds", type=float, default=CONFIG.drain_seconds)
        parser.add_argument("--status", action="store_true", help="only print the drain state")

    def handle(self, *args, **options):
        path = options["socket"]
        try:
            state = admin.call("status" if options["status"] else "drain", path)
        except OSError as exc:
            raise CommandError(f"no protocol process answers on {path}: {exc}") from None
        if options["status"]:
            self.stdout.write(f"draining: {state['draining']}, connections: {state['connections']}")
            return
        self.stdout.write(f"draining: {state['connections']} connections")
        deadline = time.monotonic() + options["seconds"]
        while state["connections"] > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                state = admin.call("status", path)
            except OSError:
                break  # the process is gone: nothing left to drain
        self.stdout.write(f"drained: {state['connections']} connections left")
