"""The capacity model's inputs, each with where it came from.

Three kinds, and the plan prints every one with its source:

- **measured**: read from `docs/benchmarks.json` (`make bench --record` writes its "bench" key,
  `make bench-worker --record` its "worker" key) or `docs/loadtest.json` (the Locust runs). Never
  a default: a measured figure that is not there is *missing*, and the tiers that need it are not
  sized, unless the user states a value with `--assume key=value`;
- **estimate**: a figure no benchmark here records yet (a process's own memory, Redis's
  throughput per core). It has a default with its reason, and is printed as an estimate;
- **assumed**: a value given with `--assume`, printed as such whatever it replaced.

Reading never fails on a missing file or field: it records why the figure is missing and how to
get it, so the plan can say so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "docs" / "benchmarks.json"
LOADTEST = REPO / "docs" / "loadtest.json"

MEASURED, ESTIMATE, ASSUMED = "measured", "estimate", "assumed"


@dataclass(frozen=True)
class Figure:
    key: str
    value: float
    kind: str  # MEASURED, ESTIMATE or ASSUMED
    source: str  # where it was read, or why it is what it is
    record: str = ""  # the recorded run it comes from (measured figures)


@dataclass(frozen=True)
class Reading:
    value: float
    kind: str  # MEASURED or ESTIMATE
    source: str
    record: str = ""


@dataclass(frozen=True)
class InputSpec:
    key: str
    meaning: str
    read: Callable[[Documents], Reading]  # raises Missing when a measured figure is not there


class Missing(Exception):
    """A measured figure is not where it should be; the message says why and how to get it."""


class MissingInputs(Exception):
    """Raised by `Inputs.get` for a missing figure: the tier needing it cannot be sized."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = keys


@dataclass
class Documents:
    """The two result files as read (None when absent), and what the plan is for."""

    bench: Mapping[str, Any] | None
    loadtest: Mapping[str, Any] | None
    bench_path: Path
    loadtest_path: Path
    server: str  # the protocol server whose fan-out figure applies (values: protocol.server)
    store_connections: int  # PARLEY_STORE_CONNECTIONS: which worker throughput run applies


def load_json(path: Path) -> Mapping[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SystemExit(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, Mapping):
        raise SystemExit(f"{path}: expected a JSON object at the top")
    return data


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# --- readers ---------------------------------------------------------------------------------

def _number(value: Any, where: str) -> float:
    if value is None:
        raise Missing(f"{where} is null (that part of the run was skipped or failed)")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Missing(f"{where} is {value!r}, not a number")
    if value <= 0:
        raise Missing(f"{where} is {value}: a measured rate or size must be positive")
    return float(value)


def _dig(doc: Mapping[str, Any], path: list[str], where: str) -> Any:
    node: Any = doc
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise Missing(f"{where} has no {'.'.join(path)}")
        node = node[part]
    return node


def _section(doc: Documents, key: str, make: str, script: str) -> Mapping[str, Any]:
    """docs/benchmarks.json's `key` section ("bench" or "worker"), or Missing with what to run."""
    where = relative(doc.bench_path)
    if doc.bench is None:
        raise Missing(f"{where} does not exist: run `{make}` with --record (loadtest/{script})")
    section = doc.bench.get(key)
    if not isinstance(section, Mapping):
        raise Missing(f"{where} has no \"{key}\" key: run `.venv/bin/python loadtest/{script} --record`")
    return section


def _bench(doc: Documents, *path: str) -> Reading:
    where = relative(doc.bench_path)
    section = _section(doc, "bench", "make bench", "bench.py")
    value = _number(_dig(section, list(path), f"{where} bench"), f"{where} bench.{'.'.join(path)}")
    record = f"{where} bench: make bench, {section.get('when', '?')}, {section.get('git', '?')}"
    return Reading(value, MEASURED, f"{where} bench.{'.'.join(path)}", record)


def _worker_section(doc: Documents) -> Mapping[str, Any]:
    return _section(doc, "worker", "make bench-worker", "worker_bench.py")


def _worker_reading(doc: Documents, section: Mapping[str, Any], value: float, what: str) -> Reading:
    where = relative(doc.bench_path)
    record = f"{where} worker: make bench-worker, {section.get('when', '?')}, {section.get('git', '?')}"
    return Reading(value, MEASURED, f"{where} worker.{what}", record)


def _worker_throughput(doc: Documents, key: str) -> Reading:
    """From the throughput run of the async store path with PARLEY_STORE_CONNECTIONS connections:
    the path and setting a deployed worker runs."""
    section = _worker_section(doc)
    runs = section.get("throughput") or []
    run = next((r for r in runs if isinstance(r, Mapping) and r.get("path") == "async"
                and r.get("connections") == doc.store_connections), None)
    what = f"throughput[path=async, connections={doc.store_connections}].{key}"
    if run is None:
        raise Missing(f"{relative(doc.bench_path)} worker.throughput has no run of the async path with "
                      f"{doc.store_connections} connections (PARLEY_STORE_CONNECTIONS)")
    if run.get("lost"):
        raise Missing(f"{relative(doc.bench_path)} worker.{what}: that run lost {run['lost']} messages")
    return _worker_reading(doc, section, _number(run.get(key), what), what)


def _worker_latency(doc: Documents, key: str) -> Reading:
    section = _worker_section(doc)
    run = section.get("latency")
    if not isinstance(run, Mapping):
        raise Missing(f"{relative(doc.bench_path)} worker has no latency run")
    return _worker_reading(doc, section, _number(run.get(key), f"latency.{key}"), f"latency.{key}")


def _fanout(doc: Documents) -> Reading:
    return _bench(doc, "fanout_per_process", doc.server, "parley")


def _locust(doc: Documents, key: str) -> Reading:
    where = relative(doc.loadtest_path)
    if doc.loadtest is None:
        raise Missing(f"{where} does not exist yet (written after the Locust runs: docs/loadtest.md)")
    section = doc.loadtest.get("locust")
    if not isinstance(section, Mapping):
        raise Missing(f"{where} has no \"locust\" section yet")
    value = _number(section.get(key), f"{where} locust.{key}")
    record = f"{where} locust: {section.get('when', '?')}, {section.get('git', '?')}"
    return Reading(value, MEASURED, f"{where} locust.{key}", record)


def _optional_bench(key: str, scale: float, fallback: Callable[[Documents], Reading]) -> Callable[[Documents], Reading]:
    """A figure make bench may record (`bench.<key>` times `scale`); until it does, `fallback`."""
    def read(doc: Documents) -> Reading:
        section = (doc.bench or {}).get("bench")
        if isinstance(section, Mapping) and section.get(key) is not None:
            measured = _bench(doc, key)
            return Reading(measured.value * scale, MEASURED, measured.source, measured.record)
        return fallback(doc)
    return read


def _estimate(value: float, why: str) -> Callable[[Documents], Reading]:
    return lambda _doc: Reading(value, ESTIMATE, why)


def _cpu_per_delivery_bound(doc: Documents) -> Reading:
    fanout = _fanout(doc)
    # make bench's summary records the fan-out's capacity, not the CPU it took: a process at its
    # measured capacity is taken to use one whole core, so this is an upper bound per delivery.
    return Reading(1e6 / fanout.value, ESTIMATE,
                   f"bound: one core / {fanout.value:,.0f} deliveries/s ({fanout.source}); "
                   "make bench's summary records no CPU per delivery for the fan-out")


# Each input: its key (for --assume), what it means, and how it is read.
SPECS: tuple[InputSpec, ...] = (
    InputSpec("protocol.deliveries_per_s",
              "deliveries/s one protocol process carried at p99 <= 100 ms, delivery ratio >= 0.999 "
              "(make bench fan-out: rooms of 20, the protocol server of the plan)", _fanout),
    InputSpec("protocol.cpu_us_per_delivery", "protocol CPU-us per delivery in that fan-out",
              _optional_bench("fanout_cpu_us_per_delivery", 1.0, _cpu_per_delivery_bound)),
    InputSpec("protocol.idle_kb_per_socket", "RSS per idle joined socket (make bench socket phase)",
              lambda d: _bench(d, "idle_kb_per_conn")),
    InputSpec("protocol.sockets_held", "sockets one process held open after connect, join, close, "
              "reconnect and resume (make bench socket phase)", lambda d: _bench(d, "max_sockets")),
    InputSpec("protocol.resume_per_s", "reconnects + resumes/s one process served (make bench socket phase)",
              lambda d: _bench(d, "resume_per_s")),
    InputSpec("protocol.process_rss_mb", "RSS of a protocol process before any socket",
              _optional_bench("sockets_rss_base_kb", 1 / 1024, _estimate(
                  120.0, "estimate: an idle `parley protocol` here is ~95 MB (Django, Channels, Daphne, "
                         "psycopg loaded; tests/test_capacity.py checks a real one stays below this); "
                         "make bench records only the per-socket slope"))),
    InputSpec("worker.msgs_per_s", "messages one worker stored per second from a backlog "
              "(make bench-worker, async store path, PARLEY_STORE_CONNECTIONS connections)",
              lambda d: _worker_throughput(d, "msgs_per_s")),
    InputSpec("worker.cpu_share_at_max", "share of a core the worker used at that rate",
              lambda d: _worker_throughput(d, "worker_cpu_share")),
    InputSpec("worker.trickle_rate", "offered messages/s of make bench-worker's latency run",
              lambda d: _worker_latency(d, "rate")),
    InputSpec("worker.trickle_cpu_us_per_msg", "worker CPU-us per message at that rate",
              lambda d: _worker_latency(d, "cpu_us_per_msg")),
    InputSpec("worker.trickle_mean_batch", "mean messages per batch at that rate",
              lambda d: _worker_latency(d, "mean_batch")),
    InputSpec("worker.process_rss_mb", "RSS of a worker process",
              _estimate(120.0, "estimate: an idle `parley worker` here is ~95 MB; its batches in flight "
                               "hold at most PARLEY_BATCH_MAX x PARLEY_STORE_CONNECTIONS messages (a few MB); "
                               "tests/test_capacity.py checks a real one stays below this")),
    # make bench records no Redis figure. loadtest/capacity_redis_probe.py measures both on a
    # throwaway server; on the 2-core development machine (2026-12-07, valkey 9.1) it gave 73,000-78,000
    # unpipelined commands/s and 1.2 million pushes/s per core. The defaults round those down.
    InputSpec("redis.commands_per_s_per_core", "small unpipelined commands (a send's EVAL, PUBLISH, ZPOPMIN) "
              "one Redis core serves",
              _estimate(70_000.0, "estimate: loadtest/capacity_redis_probe.py measured 73,000-78,000/s on the "
                                  "2-core dev machine; make bench records no Redis figure")),
    InputSpec("redis.pushes_per_s_per_core", "pub/sub messages one Redis core pushes to subscribers "
              "(the PUBLISH's own cost included)",
              _estimate(1_000_000.0, "estimate: loadtest/capacity_redis_probe.py measured 1.2 million/s (PUBLISH to "
                                     "~17 of 50 connections) on the 2-core dev machine")),
    InputSpec("locust.users_per_process", "Locust users one worker process held at the default profile, "
              "every delivery counted", lambda d: _locust(d, "users_per_process")),
    InputSpec("locust.cpu_cores_per_1000_users", "Locust worker CPU per 1,000 users",
              lambda d: _locust(d, "cpu_cores_per_1000_users")),
    InputSpec("locust.rss_mb_per_1000_users", "Locust worker RSS per 1,000 users",
              lambda d: _locust(d, "rss_mb_per_1000_users")),
)
KEYS = tuple(spec.key for spec in SPECS)


@dataclass
class Inputs:
    figures: dict[str, Figure] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # key -> why, and how to get it
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str) -> float:
        if key not in self.figures:
            raise MissingInputs([key])
        return self.figures[key].value

    def require(self, *keys: str) -> None:
        """All of `keys`, or MissingInputs naming every one that is missing."""
        absent = [k for k in keys if k not in self.figures]
        if absent:
            raise MissingInputs(absent)


def parse_assumptions(pairs: list[str]) -> dict[str, float]:
    """`--assume key=value` pairs; unknown keys and non-numbers are errors naming the known keys."""
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(f"--assume {pair!r}: expected KEY=VALUE with KEY one of: {', '.join(KEYS)}")
        try:
            value = float(raw.replace(",", "").replace("_", ""))
        except ValueError:
            raise ValueError(f"--assume {pair!r}: {raw!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--assume {pair!r}: must be a positive number")
        out[key] = value
    return out


def read_inputs(doc: Documents, assumptions: Mapping[str, float]) -> Inputs:
    inputs = Inputs()
    if doc.loadtest is not None and doc.loadtest.get("synthetic"):
        inputs.warnings.append(f"{relative(doc.loadtest_path)} is SYNTHETIC (a test fixture, not a measurement): "
                               f"{doc.loadtest.get('synthetic')}")
    for spec in SPECS:
        figure: Figure | None
        try:
            reading = spec.read(doc)
            figure = Figure(spec.key, reading.value, reading.kind, reading.source, reading.record)
            was = f"{reading.kind} {reading.value:g}"
        except Missing as why:
            figure, was = None, "missing"
            inputs.missing[spec.key] = str(why)
        if spec.key in assumptions:
            figure = Figure(spec.key, assumptions[spec.key], ASSUMED, f"--assume {spec.key} (instead of: {was})")
            inputs.missing.pop(spec.key, None)
        if figure is not None:
            inputs.figures[spec.key] = figure
    return inputs


def meaning(key: str) -> str:
    return next(spec.meaning for spec in SPECS if spec.key == key)
