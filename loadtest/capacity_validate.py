"""`--validate`: the model's cost per user against the Locust runs of docs/loadtest.json.

Each run measured one local stack (its protocol and worker processes, Redis, PostgreSQL, the
Locust workers) at one size. For each run and tier the model predicts CPU cores and memory from
the run's own measured load (messages/s, deliveries/s) and process counts, with the figures
make bench recorded, so the comparison tests the cost model, not the workload's arithmetic (that
is compared on its own: the messages and deliveries the options predict for the run's users).
Both are shown per 1,000 users: how cost grows as the work grows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.capacity_inputs import Inputs, MissingInputs
from loadtest.capacity_model import Config, Workload, redis_cores, redis_load, worker_cores

TIERS = ("protocol", "worker", "redis", "postgres", "locust")
RUN_FIELDS = ("users", "messages_per_s", "deliveries_per_s", "protocol_processes", "worker_processes")


@dataclass(frozen=True)
class Cost:
    cores: float | None
    memory_mib: float | None
    why: str = ""  # why a prediction is None


@dataclass(frozen=True)
class Run:
    label: str
    users: int
    messages_per_s: float
    deliveries_per_s: float
    protocol_processes: int
    worker_processes: int
    cores: Mapping[str, float]
    rss_mb: Mapping[str, float]


def read_runs(loadtest: Mapping[str, Any] | None, where: str) -> tuple[list[Run], list[str]]:
    """The usable runs, smallest first, and a message for each run (or file) that is not usable."""
    if loadtest is None:
        return [], [f"{where} does not exist yet: the Locust runs at ~2k, 5k, 10k and 20k users write it "
                    "(docs/loadtest.md)"]
    raw = loadtest.get("runs")
    if not isinstance(raw, list) or not raw:
        return [], [f"{where} has no runs yet"]
    runs, problems = [], []
    for n, item in enumerate(raw, start=1):
        label = f"run {n}" + (f" ({item.get('when')})" if isinstance(item, Mapping) and item.get("when") else "")
        if not isinstance(item, Mapping):
            problems.append(f"{label}: not an object")
            continue
        absent = [f for f in RUN_FIELDS if not _positive(item.get(f))]
        if absent:
            problems.append(f"{label}: no usable {', '.join(absent)}: skipped")
            continue
        runs.append(Run(label, int(item["users"]), float(item["messages_per_s"]), float(item["deliveries_per_s"]),
                        int(item["protocol_processes"]), int(item["worker_processes"]),
                        _tier_map(item.get("cpu_cores")), _tier_map(item.get("rss_mb"))))
    return sorted(runs, key=lambda r: r.users), problems


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _tier_map(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {k: float(v) for k, v in value.items() if k in TIERS and isinstance(v, int | float) and math.isfinite(v)}


def predict(run: Run, inputs: Inputs, app: Config) -> dict[str, Cost]:
    """The model's cores and MiB for each tier of the run's stack."""
    out: dict[str, Cost] = {}

    def guarded(tier: str, compute: Any) -> None:
        try:
            out[tier] = compute()
        except MissingInputs as missing:
            out[tier] = Cost(None, None, f"missing {', '.join(missing.keys)}")

    guarded("protocol", lambda: Cost(
        run.deliveries_per_s * inputs.get("protocol.cpu_us_per_delivery") / 1e6,
        run.protocol_processes * inputs.get("protocol.process_rss_mb")
        + run.users * inputs.get("protocol.idle_kb_per_socket") / 1024))
    guarded("worker", lambda: Cost(
        run.worker_processes * worker_cores(run.messages_per_s / run.worker_processes, inputs),
        run.worker_processes * inputs.get("worker.process_rss_mb")))

    def redis() -> Cost:
        # The run's own fan-out: its deliveries per message, all in rooms of that size.
        load = redis_load(run.messages_per_s, ((run.deliveries_per_s / run.messages_per_s, 1.0),),
                          run.protocol_processes, run.worker_processes, app)
        commands, pushes, _ = redis_cores(load, inputs)
        return Cost(commands + pushes, None, "memory not modelled")

    guarded("redis", redis)
    out["postgres"] = Cost(None, None, "not modelled")
    guarded("locust", lambda: Cost(run.users / 1000 * inputs.get("locust.cpu_cores_per_1000_users"),
                                   run.users / 1000 * inputs.get("locust.rss_mb_per_1000_users")))
    return out


@dataclass(frozen=True)
class Row:
    run: Run
    tier: str
    measured_cores: float | None
    predicted_cores: float | None
    measured_mib: float | None
    predicted_mib: float | None
    why: str

    @staticmethod
    def per_1000(value: float | None, users: int) -> float | None:
        return None if value is None else value / users * 1000


def compare(runs: list[Run], inputs: Inputs, app: Config) -> list[Row]:
    rows = []
    for run in runs:
        predicted = predict(run, inputs, app)
        for tier in TIERS:
            cost = predicted[tier]
            rows.append(Row(run, tier, run.cores.get(tier), cost.cores, run.rss_mb.get(tier), cost.memory_mib,
                            cost.why))
    return rows


def error(predicted: float | None, measured: float | None) -> str:
    if predicted is None or measured is None or measured <= 0:
        return "—"
    return f"{(predicted - measured) / measured:+.0%}"


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    lines = ["| users | tier | cores/1k users: measured | model | error | MiB/1k users: measured | model | error "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u = r.run.users
        mc, pc = Row.per_1000(r.measured_cores, u), Row.per_1000(r.predicted_cores, u)
        mm, pm = Row.per_1000(r.measured_mib, u), Row.per_1000(r.predicted_mib, u)
        lines.append(f"| {u:,} | {r.tier} | {fmt(mc, '.3f')} | {fmt(pc, '.3f')} | {error(pc, mc)} | "
                     f"{fmt(mm, '.1f')} | {fmt(pm, '.1f')} | {error(pm, mm)} | {r.why} |")
    return "\n".join(lines)


def workload_table(runs: list[Run], workload: Workload) -> str:
    """The options' workload for each run's users against what the run measured."""
    lines = ["| users | messages/s: measured | model | error | deliveries per message: measured | model | error |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        model = workload.messages_per_user_per_minute * run.users / 60
        per_message = run.deliveries_per_s / run.messages_per_s
        lines.append(f"| {run.users:,} | {run.messages_per_s:,.1f} | {model:,.1f} | {error(model, run.messages_per_s)} "
                     f"| {per_message:.2f} | {workload.recipients_per_message:.2f} | "
                     f"{error(workload.recipients_per_message, per_message)} |")
    return "\n".join(lines)


# The tiers whose unexplained CPU is shown per socket (the model's costs are per message or
# delivery; what is left grows with connected users: pings, presence, joins, reconnects).
PER_SOCKET_TIERS = ("protocol", "redis")


def unexplained(rows: list[Row]) -> str:
    """The CPU the model does not explain, per connected socket per second for the protocol and
    Redis tiers, per process for the workers: what make bench does not measure."""
    lines = ["| users | tier | cores: measured | model | the rest |", "|---|---|---|---|---|"]
    for r in rows:
        if r.tier not in (*PER_SOCKET_TIERS, "worker") or r.measured_cores is None or r.predicted_cores is None:
            continue
        rest = r.measured_cores - r.predicted_cores
        if r.tier in PER_SOCKET_TIERS:
            what = f"{rest / r.run.users * 1e6:.1f} us per socket per second"
        else:
            what = f"{rest / r.run.worker_processes:.3f} cores per worker process"
        lines.append(f"| {r.run.users:,} | {r.tier} | {r.measured_cores:.3f} | {r.predicted_cores:.3f} | {what} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def per_socket_rest(rows: list[Row], tier: str) -> list[tuple[Run, float]]:
    """(run, its unexplained CPU-us per socket per second) for `tier`, smallest run first."""
    out = []
    for r in sorted(rows, key=lambda r: r.run.users):
        if r.tier == tier and r.measured_cores is not None and r.predicted_cores is not None:
            out.append((r.run, (r.measured_cores - r.predicted_cores) / r.run.users * 1e6))
    return out


COLOURS = {"protocol": "tab:blue", "worker": "tab:orange", "redis": "tab:red", "postgres": "tab:purple",
           "locust": "tab:green"}


def plot(rows: list[Row], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax_cpu, ax_mem) = plt.subplots(1, 2, figsize=(13, 6.5), constrained_layout=True)
    fig.suptitle(title, fontsize=12)
    for ax, measured_of, predicted_of, label in (
        (ax_cpu, lambda r: r.measured_cores, lambda r: r.predicted_cores, "CPU cores per 1,000 users"),
        (ax_mem, lambda r: r.measured_mib, lambda r: r.predicted_mib, "memory (MiB) per 1,000 users"),
    ):
        for tier in TIERS:
            mine = [r for r in rows if r.tier == tier]
            for pick, style, marker, what in ((measured_of, "-", "o", "measured"),
                                              (predicted_of, "--", "x", "model")):
                points = [(r.run.users, Row.per_1000(pick(r), r.run.users)) for r in mine if pick(r) is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, linestyle=style, marker=marker, color=COLOURS[tier], label=f"{tier}: {what}")
        ax.set_xscale("log")
        sizes = sorted({r.run.users for r in rows})
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{u / 1000:g}k" for u in sizes])
        ax.set_xlabel("concurrent users (log scale)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)

    handles, labels = ax_cpu.get_legend_handles_labels()
    more = [(h, lab) for h, lab in zip(*ax_mem.get_legend_handles_labels(), strict=True) if lab not in labels]
    fig.legend([*handles, *(h for h, _ in more)], [*labels, *(lab for _, lab in more)], loc="outside lower center",
               ncol=5, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
