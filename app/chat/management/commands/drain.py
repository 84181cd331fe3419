"""`parley drain`: the protocol pod's preStop hook.

Asks the local protocol process to stop accepting and to send every client a `reconnect` frame
(jittered delay) and close with 4012, then waits until its connections reach 0 or the drain
window (PARLEY_DRAIN_SECONDS) runs out. Kubernetes sends SIGTERM only after this returns, so
Daphne's abrupt shutdown (daphne#177) finds nobody left to cut off.
"""

import json
import time
import urllib.request

from django.core.management.base import BaseCommand

from parley.config import CONFIG


class Command(BaseCommand):
    help = "Drain the local protocol process before it stops (for a preStop hook)."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=CONFIG.port)
        parser.add_argument("--seconds", type=float, default=CONFIG.drain_seconds)

    def _call(self, url: str, method: str) -> dict:
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def handle(self, *args, **options):
        url = f"http://127.0.0.1:{options['port']}/internal/drain"
        deadline = time.monotonic() + options["seconds"]
        state = self._call(url, "POST")
        self.stdout.write(f"draining: {state['connections']} connections")
        while state["connections"] > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            state = self._call(url, "GET")
        self.stdout.write(f"drained: {state['connections']} connections left")
