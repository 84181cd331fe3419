"""The run's shape: ramp to the target at a set rate, hold, check, ramp down.

Locust spawns at the rate a shape returns, so the ramp is Locust's own; the shape adds the phases
around it. The check (`coordinator.VERIFY`) runs with every user still connected, before the
ramp-down; the shape waits for every process's final counts (or `--settle-seconds` plus a margin).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from locust import LoadTestShape

from parley_locust.coordinator import VERIFY, coordinator

log = logging.getLogger("parley.loadtest")

# The check's bound beyond --settle-seconds: a process reports after its users' checks end.
VERIFY_MARGIN_S = 15.0


def targets(options: Any) -> tuple[int, float]:
    """(users, users per second), from --target-users/--ramp-rate or Locust's -u/-r."""
    users = int(options.target_users or options.num_users or 1)
    rate = float(options.ramp_rate or options.spawn_rate or 1)
    return users, rate


class RampHoldCheckShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.verify_sent_at = 0.0

    def tick(self) -> tuple[int, float] | None:
        environment = self.runner.environment
        options = environment.parsed_options
        users, rate = targets(options)
        run_time = self.get_run_time()
        if run_time < users / rate + options.hold_seconds:
            return users, rate
        co = coordinator(environment)
        if not self.verify_sent_at:
            log.info("holding done: every user checks its rooms now")
            self.verify_sent_at = time.monotonic()
            # To every worker; a local run's runner hands the message to its own listener.
            self.runner.send_message(VERIFY, {})
            return users, rate
        waited = time.monotonic() - self.verify_sent_at
        if len(co.final) < co.expected_nodes() and waited < options.settle_seconds + VERIFY_MARGIN_S:
            return users, rate
        if self.get_current_user_count() > 0:
            return 0, rate
        return None
