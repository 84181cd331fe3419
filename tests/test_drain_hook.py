"""The preStop hook `parley drain`, run as the kubelet runs it, against a fake protocol process.

A failed drain request must not end the hook early (the kubelet would send SIGTERM, and Daphne
cuts every socket at once): the hook waits out the drain window whatever its requests meet. And
the hook, start-up included, must end within the terminationGracePeriodSeconds the operator
gives the pod, less the process's own exit after SIGTERM.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from parley_operator import resources
from parley_operator.spec import parse_body
from stack import PARLEY

WINDOW = 3.0  # the drain window these runs use (PARLEY_DRAIN_SECONDS / --seconds)

# What the fake process answers to a command: a reply line, or None to hold the request without
# an answer (a process too busy to answer).
Answer = Callable[[str], bytes | None]


@contextmanager
def fake_process(answer: Answer | None) -> Iterator[str]:
    """An admin socket answering like a protocol process would (or not); None: no socket."""
    directory = tempfile.mkdtemp(prefix="parley-drain-")
    path = os.path.join(directory, "admin.sock")
    if answer is None:
        yield path
        return
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            command = conn.makefile("rb").readline().decode().strip()
            reply = answer(command)
            if reply is None:
                held.append(conn)
                continue
            conn.sendall(reply)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


def run_hook(path: str, seconds: float = WINDOW) -> tuple[float, subprocess.CompletedProcess[str]]:
    """`parley drain` as the preStop hook: wall-clock time from its start, its own start-up included."""
    env = {**os.environ, "PARLEY_DEV": "1", "PYTHON": sys.executable}
    started = time.monotonic()
    result = subprocess.run([PARLEY, "drain", "--socket", path, "--seconds", str(seconds)], env=env,
                            capture_output=True, text=True, timeout=seconds + 60)
    return time.monotonic() - started, result


def counts(connections: Callable[[], int]) -> Answer:
    return lambda command: f'{{"draining": true, "connections": {connections()}}}\n'.encode()


def never_answers(command: str) -> bytes | None:
    return None


def not_json(command: str) -> bytes | None:
    return b"<html>502</html>\n"


@pytest.mark.parametrize("answer", [None, never_answers, not_json], ids=["no-socket", "no-answer", "not-json"])
def test_a_failed_drain_request_still_waits_out_the_window(answer: Answer | None) -> None:
    with fake_process(answer) as path:
        took, result = run_hook(path)
    assert took >= WINDOW, f"the hook gave up after {took:.1f}s: {result.stderr[-500:]}"
    # It says so (a FailedPreStopHook event with the reason), after the window.
    assert result.returncode != 0
    assert "no protocol process confirmed the drain" in result.stderr, result.stderr[-500:]


def test_a_process_that_stops_answering_mid_drain_still_gets_the_whole_window() -> None:
    state = {"requests": 0}

    def answer(command: str) -> bytes | None:
        state["requests"] += 1
        if state["requests"] == 1:
            return b'{"draining": true, "connections": 3}\n'
        return None if state["requests"] % 2 else b""  # a hung request, then a dropped one

    with fake_process(answer) as path:
        took, result = run_hook(path)
    assert took >= WINDOW, result.stdout + result.stderr
    assert result.returncode == 0 and "drained: 3 connections left" in result.stdout, result.stderr[-500:]


def test_a_drain_request_that_succeeds_later_drains() -> None:
    # The first requests fail (the listener is busy), a later one gets through: the hook keeps
    # asking instead of giving up, and returns as soon as the process is empty.
    state = {"requests": 0}

    def answer(command: str) -> bytes | None:
        state["requests"] += 1
        if state["requests"] <= 2:
            return b"\n"
        return b'{"draining": true, "connections": 0}\n'

    with fake_process(answer) as path:
        took, result = run_hook(path)
    assert result.returncode == 0 and "drained: 0 connections left" in result.stdout, result.stderr
    assert took < WINDOW + resources.DRAIN_HOOK_STARTUP_SECONDS


@pytest.mark.parametrize("answer", [counts(lambda: 7), never_answers],
                         ids=["clients-never-leave", "requests-hang"])
def test_the_hook_ends_within_the_grace_period_the_operator_gives(answer: Answer) -> None:
    body = {"apiVersion": "parley.dev/v1alpha1", "kind": "ChatPlatform",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat"},
            "spec": {"image": "parley:1", "allowedHosts": ["chat.example.com"],
                     "redis": {"urls": ["redis://127.0.0.1:6379/0"]}, "database": {"secretRef": {"name": "db"}},
                     "drain": {"gracePeriodSeconds": int(WINDOW)}}}
    grace = resources.deployment(body, parse_body(body), "protocol", 1)["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    with fake_process(answer) as path:
        took, result = run_hook(path)
    assert took >= WINDOW, result.stderr[-500:]
    # The whole hook, its start-up included, leaves the process its time to exit after SIGTERM.
    assert took <= grace - resources.SHUTDOWN_SECONDS, f"hook took {took:.1f}s of a {grace}s grace"
    # ... and overran the window by less than the operator allows for it.
    assert took - WINDOW <= resources.DRAIN_HOOK_STARTUP_SECONDS + resources.DRAIN_HOOK_OVERRUN_SECONDS
