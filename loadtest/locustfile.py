"""Parley's Locust load test: real WebSocket users, every delivery checked.

    bin/parley manage loadtest_users --count 1000 --out var/loadtest/users.jsonl
    .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --token-file var/loadtest/users.jsonl --headless -u 1000 -r 100 --hold-seconds 60

Distributed: the same with `--master --expect-workers N` on one process, and `--worker
--master-host HOST` on N others (or `--processes N`). docs/loadtest.md has the rest: the profile,
the statistics, the thresholds (a failed run exits 1), the limits of a load client, the cluster.
The code is in `parley_locust/`; this file wires it into Locust.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from locust import events
from locust.runners import MasterRunner, WorkerRunner
from parley_locust import options, verdict
from parley_locust.coordinator import REPORT_KEY, VERIFIED, VERIFY, coordinator
from parley_locust.shape import RampHoldCheckShape  # noqa: F401  (Locust finds the shape here)
from parley_locust.user import ParleyUser  # noqa: F401  (and the user)

log = logging.getLogger("parley.loadtest")


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_: Any) -> None:
    options.add_arguments(parser)


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    runner = environment.runner
    co = coordinator(environment)
    if not isinstance(runner, MasterRunner):
        _raise_open_files()
        runner.register_message(VERIFY, lambda environment, msg, **kw: co.start_verify())
    if not isinstance(runner, WorkerRunner):
        runner.register_message(VERIFIED, lambda environment, msg, **kw: co.on_verified(msg.node_id, msg.data))


def _raise_open_files() -> None:
    """Locust raises the soft limit to 10,000 only: a worker with more users needs the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("open files: up to %d (a socket per user)", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    # The event carries no environment; a worker process has one.
    for co in _coordinators():
        data[REPORT_KEY] = co.totals.as_dict()


@events.worker_report.add_listener
def _collect(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if REPORT_KEY in data:
        for co in _coordinators():
            co.periodic[client_id] = data[REPORT_KEY]


def _coordinators() -> list[Any]:
    from parley_locust import coordinator as module

    return list(module._COORDINATORS.values())


@events.quitting.add_listener
def _verdict(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    co = coordinator(environment)
    summary = co.summary()
    failed = verdict.failures(summary, environment.stats, environment.parsed_options)
    if not co.final:
        failed.append("the end-of-run check did not report (the run ended before it: use the shape's phases)")
    for reason in failed:
        log.error("threshold missed: %s", reason)
    print(verdict.one_line(summary, environment.stats, failed), flush=True)
    environment.process_exit_code = 1 if failed else 0
