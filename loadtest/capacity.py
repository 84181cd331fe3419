"""`python -m loadtest.capacity --users 400000`: the pods, shards, rates and cost a target needs.

From the figures `make bench` and `make bench-worker` recorded in docs/benchmarks.json and the
Locust runs in docs/loadtest.json (never numbers copied by hand), for a number of concurrent users
and a workload (messages per user per minute, who receives them, peaks), it prints a table of
protocol pods, worker pods, Redis shards, the PostgreSQL write rate, Locust workers, cores and
memory, and says which figure limits each tier and what the others would need.

    python -m loadtest.capacity --users 400000                 # the plan (exit 3 if a tier cannot be sized)
    python -m loadtest.capacity --inputs                       # every input, its value and source
    python -m loadtest.capacity --assume locust.users_per_process=10000   # state a missing figure
    python -m loadtest.capacity --users 400000 --write-values values-400k.yaml
    python -m loadtest.capacity --users 400000 --check-values values-400k.yaml   # exit 1 + a diff if stale
    python -m loadtest.capacity --validate --plot var/capacity.png   # the model against the Locust runs

A measured figure that is missing is never replaced by a guess: the tiers needing it are listed
as not sized, with what to run, unless `--assume key=value` states it (printed as an assumption).
The equations and every input: loadtest/capacity_model.py and docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest import capacity_values as values
from loadtest.capacity_inputs import (
    ASSUMED,
    BENCHMARKS,
    ESTIMATE,
    KEYS,
    LOADTEST,
    REPO,
    Documents,
    Inputs,
    load_json,
    meaning,
    parse_assumptions,
    read_inputs,
    relative,
)
from loadtest.capacity_model import (
    Config,
    Plan,
    Planning,
    Tier,
    Workload,
    app_defaults,
    batching,
    plan,
    planning_defaults,
)
from loadtest.capacity_validate import (
    PER_SOCKET_TIERS,
    compare,
    per_socket_rest,
    plot,
    read_runs,
    table,
    unexplained,
    workload_table,
)
from parley_operator.spec import DEFAULTS as OPERATOR_DEFAULTS

VALUES = REPO / "values-400k.yaml"
EXIT_DISAGREES = 1
EXIT_MISSING = 3
# docs/operations.md's assumptions, "Sizing for 400,000 concurrent users".
DEFAULT_USERS = 400_000
DEFAULT_MESSAGES_PER_USER_PER_MINUTE = 1.0
DEFAULT_ROOM_SIZE = 20.0
DEFAULT_PEAK_FACTOR = 3.0


def parse_room_mix(text: str) -> tuple[tuple[float, float], ...]:
    """`2:30,5:30,20:30,100:10`: members online : share of messages (any positive numbers)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, sep, share = part.partition(":")
        try:
            pair = (float(size), float(share))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not MEMBERS:SHARE") from None
        if not sep or pair[0] < 1 or pair[1] <= 0:
            raise argparse.ArgumentTypeError(f"{part!r}: members >= 1 and a positive share")
        out.append(pair)
    if not out:
        raise argparse.ArgumentTypeError("an empty mix")
    return tuple(out)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in [0, 1)")
    return value


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    load = p.add_argument_group("workload")
    load.add_argument("--users", type=int, default=DEFAULT_USERS, help="concurrent users (default 400000)")
    load.add_argument("--messages-per-user-per-minute", type=positive,
                      help="messages each user sends per minute on average (default 1, or the profile's)")
    mix = load.add_mutually_exclusive_group()
    mix.add_argument("--mean-room-size", type=positive,
                     help="members online who receive each message (default 20: docs/operations.md)")
    mix.add_argument("--room-mix", type=parse_room_mix, metavar="MEMBERS:SHARE,...",
                     help="messages by room size, e.g. 2:30,5:30,20:30,100:10 (share of messages to rooms of "
                          "that many members online)")
    mix.add_argument("--loadtest-profile", type=Path, metavar="USERS_FILE",
                     help="the Locust profile's workload: expected rate and room mix of this minted users file "
                          "under --locust-mix and --locust-message-rate")
    load.add_argument("--locust-mix", help="with --loadtest-profile: Locust's --mix (default: the locustfile's)")
    load.add_argument("--locust-message-rate", type=positive,
                      help="with --loadtest-profile: Locust's --message-rate (default: the locustfile's)")
    load.add_argument("--peak-factor", type=positive, default=DEFAULT_PEAK_FACTOR,
                      help="peak message rate / average (default 3)")
    choices = p.add_argument_group("planning")
    choices.add_argument("--headroom", type=fraction, default=Planning.headroom,
                         help="share of every measured rate kept free (default 0.25)")
    choices.add_argument("--drain-reserve", type=fraction, default=Planning.drain_reserve,
                         help="share of the sockets one process held in make bench kept for draining pods' sockets "
                              "(default 0.2)")
    choices.add_argument("--surge", type=float, default=Planning.surge,
                         help="ceilings (maxReplicas, Redis shards) carry this much more than the planned users "
                              "(default 0.5)")
    choices.add_argument("--server", choices=("daphne", "uvicorn"),
                         help="protocol server whose fan-out figure applies (default: the values file's)")
    sources = p.add_argument_group("inputs")
    sources.add_argument("--benchmarks", type=Path, default=BENCHMARKS, help="make bench's record")
    sources.add_argument("--loadtest", type=Path, default=LOADTEST, help="the Locust runs' record")
    sources.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                         help="state an input (a missing one, or instead of the recorded one); see --inputs")
    sources.add_argument("--inputs", action="store_true", help="list every input with its value and source")
    out = p.add_argument_group("output")
    files = out.add_mutually_exclusive_group()
    files.add_argument("--write-values", type=Path, metavar="FILE", help="rewrite the plan's numbers in FILE")
    files.add_argument("--check-values", type=Path, metavar="FILE",
                       help="exit 1 with a diff when FILE's numbers differ from the plan's")
    out.add_argument("--validate", action="store_true", help="compare the model with the runs of --loadtest")
    out.add_argument("--plot", type=Path, metavar="PNG", help="with --validate: cost per 1,000 users, a PNG")
    args = p.parse_args(argv)
    if args.users < 1:
        p.error("--users must be at least 1")
    if (args.locust_mix or args.locust_message_rate) and not args.loadtest_profile:
        p.error("--locust-mix and --locust-message-rate go with --loadtest-profile")
    if args.loadtest_profile and args.messages_per_user_per_minute:
        p.error("--loadtest-profile gives the message rate: leave out --messages-per-user-per-minute")
    if args.plot and not args.validate:
        p.error("--plot goes with --validate")
    return args


def canonical_command(args: argparse.Namespace, values_file: Path | None) -> str:
    """The command that gives this plan, options in a fixed order and only those not at their default,
    so that --check-values reproduces exactly the header --write-values wrote."""
    parts = ["python -m loadtest.capacity", f"--users {args.users}"]
    if args.messages_per_user_per_minute:
        parts.append(f"--messages-per-user-per-minute {args.messages_per_user_per_minute:g}")
    if args.mean_room_size:
        parts.append(f"--mean-room-size {args.mean_room_size:g}")
    if args.room_mix:
        parts.append("--room-mix " + ",".join(f"{s:g}:{f:g}" for s, f in args.room_mix))
    if args.loadtest_profile:
        parts.append(f"--loadtest-profile {shlex.quote(display(args.loadtest_profile))}")
    for flag, value, default in (("--peak-factor", args.peak_factor, DEFAULT_PEAK_FACTOR),
                                 ("--headroom", args.headroom, Planning.headroom),
                                 ("--drain-reserve", args.drain_reserve, Planning.drain_reserve),
                                 ("--surge", args.surge, Planning.surge)):
        if value != default:
            parts.append(f"{flag} {value:g}")
    if args.server:
        parts.append(f"--server {args.server}")
    parts += [f"--assume {a}" for a in args.assume]
    if values_file is not None:
        parts.append(f"--write-values {shlex.quote(display(values_file))}")
    return " ".join(parts)


def display(path: Path) -> str:
    """A path as the header and messages show it: from the repository's root when inside it, so
    that `./values-400k.yaml` and `values-400k.yaml` give the same header."""
    return relative(path.resolve())


def build_workload(args: argparse.Namespace) -> tuple[Workload, str | None]:
    if args.loadtest_profile:
        from loadtest.capacity_profile import DEFAULT_MESSAGE_RATE, DEFAULT_MIX, profile_workload

        profile = profile_workload(args.loadtest_profile, args.locust_mix or DEFAULT_MIX,
                                   args.locust_message_rate or DEFAULT_MESSAGE_RATE)
        return Workload(args.users, profile.messages_per_user_per_minute, profile.room_mix,
                        args.peak_factor), profile.source
    mix = args.room_mix or ((args.mean_room_size or DEFAULT_ROOM_SIZE, 1.0),)
    return Workload(args.users, args.messages_per_user_per_minute or DEFAULT_MESSAGES_PER_USER_PER_MINUTE, mix,
                    args.peak_factor), None


# --- printing --------------------------------------------------------------------------------------

def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def mib_text(mib: float | None) -> str:
    if mib is None:
        return "not modelled"
    return f"{mib / 1024:,.1f} GiB" if mib >= 1024 else f"{mib:,.0f} MiB"


def tier_row(tier: Tier) -> str:
    limit = tier.bounds[0]
    others = "; ".join(f"{b.name} → {b.needs}" for b in tier.bounds[1:])
    count = f"{tier.count}" if tier.count == tier.ceiling else f"{tier.count} to {tier.ceiling}"
    return (f"| {tier.name} | {count} | {tier.cores:,.1f} | {mib_text(tier.memory_mib)} | "
            f"{limit.name} → {limit.needs} | {others or '—'} |")


def print_plan(result: Plan, profile_source: str | None) -> None:
    w, p = result.workload, result.planning
    print(f"# Capacity plan: {w.users:,} concurrent users\n")
    print(f"Load: {w.messages_per_user_per_minute:g} message per user per minute = {w.messages_per_s:,.0f} "
          f"messages/s; {w.mix_text()} = {w.deliveries_per_s:,.0f} deliveries/s. Peaks x{w.peak_factor:g}: "
          f"{w.peak_messages_per_s:,.0f} messages/s, {w.peak_deliveries_per_s:,.0f} deliveries/s.")
    if profile_source:
        print(f"Workload from the load test profile: {profile_source}.")
    print(f"Planning: {p.headroom:.0%} of every measured rate kept free; {p.drain_reserve:.0%} of the sockets a "
          f"process held kept for draining pods; ceilings for {1 + p.surge:g}x the users.\n")
    print("| tier | floor to ceiling | cores (requests, floor) | memory (requests, floor) | limited by (→ needs) "
          "| other figures (→ needs) |")
    print("|---|---|---|---|---|---|")
    tiers = [t for t in (result.protocol and result.protocol.tier, result.workers and result.workers.tier,
                         result.redis and result.redis.tier) if t]
    for tier in tiers:
        print(tier_row(tier))
    if result.postgres:
        pg = result.postgres
        print(f"| PostgreSQL | external | not modelled | not modelled | writes: {pg.rows_avg:,.0f} rows/s in "
              f"{pg.statements_avg:,.0f} statements/s (peak {pg.rows_peak:,.0f} in {pg.statements_peak:,.0f}) | "
              f"max_connections ≥ {pg.connections:,} |")
    if result.locust:
        tiers.append(result.locust.tier)
        print(tier_row(result.locust.tier))
    for name, reasons in result.unsized.items():
        what = "missing" if all(r in KEYS for r in reasons) else "cannot size"
        print(f"| {name} | not sized | | | {what}: {', '.join(reasons)} | |")
    cores = sum(t.cores for t in tiers)
    memory = sum(t.memory_mib or 0 for t in tiers)
    print(f"| **total** | | {cores:,.1f} | {mib_text(memory)} (+ Redis, PostgreSQL) | | |")
    print()
    for tier in tiers:
        print(f"## {tier.name}: {tier.count}" + (f" (ceiling {tier.ceiling})" if tier.ceiling != tier.count else "")
              + f", limited by {tier.bounds[0].name}")
        for bound in tier.bounds:
            print(f"- {bound.name} → {bound.needs}: {bound.detail}")
        for note in tier.notes:
            print(f"- note: {note}")
        print()
    details(result)


def details(result: Plan) -> None:
    w = result.workload
    if result.protocol:
        pr = result.protocol
        print(f"Protocol pod: {pr.target_per_pod:,} sockets (targetConnectionsPerPod), {pr.per_pod_deliveries:,.0f} "
              f"deliveries/s planned, memory request {values.memory(pr.memory_request_mi)} / limit "
              f"{values.memory(pr.memory_limit_mi)} (working set {pr.working_set_mib:.0f} MiB); the tier uses "
              f"~{pr.cores_used_avg:.1f} cores on average, ~{pr.cores_used_peak:.1f} at the peak.")
    if result.workers:
        wk = result.workers
        print(f"Worker pod: {wk.planned_rate:,.0f} messages/s planned, targetQueueDepthPerReplica "
              f"{wk.target_queue_depth:,}, memory request {values.memory(wk.memory_request_mi)} / limit "
              f"{values.memory(wk.memory_limit_mi)}; the tier uses ~{wk.cores_used_avg:.2f} cores on average, "
              f"~{wk.cores_used_peak:.2f} at the peak ({wk.peak_workers} workers).")
        trickle = result.inputs.figures.get("worker.trickle_rate")
        counted = result.inputs.figures.get("worker.trickle_mean_batch")
        if trickle and counted:
            modelled = batching(trickle.value, app_defaults()).mean_batch
            print(f"  Batching model at make bench-worker's {trickle.value:,.0f} messages/s: {modelled:.1f} messages "
                  f"per batch; the worker counted {counted.value:.1f}.")
    if result.redis:
        rows = (("average", result.redis.average), ("peak", result.redis.peak), ("ceilings", result.redis.ceiling))
        print("Redis: " + "; ".join(f"{name} {load.commands_per_s:,.0f} commands/s, {load.pushes_per_s:,.0f} "
                                    f"pub/sub pushes/s" for name, load in rows) + ".")
        print("  " + "; ".join(result.redis.tier.notes) + ".")
    if result.postgres:
        print("PostgreSQL: " + "; ".join(result.postgres.notes) + ".")
    if result.locust:
        lo = result.locust
        print(f"Locust worker pod: {lo.users_per_process:,.0f} users, requests ~{lo.cores_per_process:.2f} cores and "
              f"{lo.memory_per_process_mib:,.0f} MiB (as measured; add headroom), plus the master.")
    print(f"Deliveries per message: {w.recipients_per_message:.1f} on average.")
    print()


def print_run_residuals(result: Plan, doc: Documents, app: Config) -> None:
    """What the Locust runs measured beyond the model, scaled to the plan's users: not in the
    sizing above (the runs are one small machine), but the first thing to check at scale."""
    runs, _ = read_runs(doc.loadtest, relative(doc.loadtest_path))
    if not runs:
        return
    rows = compare(runs, result.inputs, app)
    w = result.workload
    for tier in PER_SOCKET_TIERS:
        found = per_socket_rest(rows, tier)
        if not found or found[-1][1] <= 0:
            continue
        (small, first), (large, rest) = found[0], found[-1]
        extra = rest * w.users / 1e6
        where = (f", {rest * result.protocol.target_per_pod / 1e6:.2f} of a core per pod at "
                 f"{result.protocol.target_per_pod:,} sockets" if tier == "protocol" and result.protocol else "")
        trend = (f" (it fell from {first:.1f} us at {small.users:,} users: partly per process, not per socket, "
                 "so this is an upper bound)" if len(found) > 1 and first > rest * 1.2 else "")
        print(f"Locust runs: {tier} CPU beyond the model's messages and deliveries was {rest:.1f} us per socket per "
              f"second at {large.users:,} users{trend}; at {w.users:,} sockets up to ~{extra:.1f} cores{where}. "
              "Not in the sizing above; see --validate.")
    print()


def print_inputs(inputs: Inputs) -> None:
    print("## Inputs\n")
    print("| key | value | kind | source |")
    print("|---|---|---|---|")
    for key, figure in inputs.figures.items():
        record = f" ({figure.record})" if figure.record else ""
        print(f"| {key} | {number(figure.value)} | {figure.kind} | {figure.source}{record} |")
    for key, why in inputs.missing.items():
        print(f"| {key} | — | MISSING | {why} |")
    print()


def print_missing(inputs: Inputs, result: Plan) -> None:
    needed = sorted({k for keys in result.unsized.values() for k in keys if k in inputs.missing})
    if not needed:
        return
    print("Not sized, for want of measured figures (nothing is guessed):", file=sys.stderr)
    for key in needed:
        print(f"  {key} ({meaning(key)}): {inputs.missing[key]}; or state it: --assume {key}=VALUE",
              file=sys.stderr)


def print_assumptions(inputs: Inputs) -> None:
    assumed = [f for f in inputs.figures.values() if f.kind == ASSUMED]
    estimated = [f for f in inputs.figures.values() if f.kind == ESTIMATE]
    for figure in assumed:
        print(f"ASSUMED (not measured): {figure.key} = {figure.value:g} ({figure.source})")
    for figure in estimated:
        print(f"estimate: {figure.key} = {number(figure.value)} ({figure.source})")
    for warning in inputs.warnings:
        print(f"WARNING: {warning}")
    if assumed or estimated or inputs.warnings:
        print()


def header_sources(inputs: Inputs) -> list[str]:
    """The records the platform's numbers come from, and every estimate or assumption among them."""
    platform = [f for k, f in inputs.figures.items() if not k.startswith("locust.")]
    records = list(dict.fromkeys(f.record for f in platform if f.record))
    stated = [f"{f.key} = {number(f.value)} ({'assumed' if f.kind == ASSUMED else 'estimate'})"
              for f in platform if f.kind in (ASSUMED, ESTIMATE)]
    return [*records, *(f"{line}" for line in stated)]


# --- main ------------------------------------------------------------------------------------------

def values_outcome(args: argparse.Namespace, result: Plan, inputs: Inputs) -> int:
    path: Path = args.write_values or args.check_values
    if not path.exists():
        print(f"{path}: no such file (the tool rewrites an existing values file)", file=sys.stderr)
        return 2
    if not result.platform_complete:
        print(f"{path}: not written or checked: the platform's tiers are not all sized", file=sys.stderr)
        print_missing(inputs, result)
        return EXIT_MISSING
    current = path.read_text()
    try:
        expected = values.apply(current, values.header(result, canonical_command(args, path), header_sources(inputs)),
                                values.edits(result))
    except values.ValuesError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if args.write_values:
        if expected != current:
            path.write_text(expected)
            print(f"{path}: rewritten from the plan")
        else:
            print(f"{path}: already agrees with the plan")
        return 0
    if expected == current:
        print(f"{path}: agrees with the plan")
        return 0
    print(values.diff(current, expected, display(path)), end="")
    print(f"{path}: differs from the plan (above: - the file, + the model). If the measurements or the model "
          f"changed, regenerate it: {canonical_command(args, path)}", file=sys.stderr)
    return EXIT_DISAGREES


def validate(args: argparse.Namespace, doc: Documents, inputs: Inputs, workload: Workload, app: Config) -> int:
    runs, problems = read_runs(doc.loadtest, relative(doc.loadtest_path))
    for problem in problems:
        print(f"validate: {problem}", file=sys.stderr)
    if not runs:
        return EXIT_MISSING
    rows = compare(runs, inputs, app)
    synthetic = bool(doc.loadtest and doc.loadtest.get("synthetic"))
    print("## The model against the Locust runs" + (" (SYNTHETIC fixture, not measurements)" if synthetic else ""))
    print()
    print(table(rows))
    print()
    rest = unexplained(rows)
    if rest:
        print("CPU the model does not explain (it counts messages and deliveries, not connected sockets)")
        print()
        print(rest)
        print()
    print("Workload: what the options predict for each run's users, against the run")
    print()
    print(workload_table(runs, workload))
    print()
    if args.plot:
        title = ("Cost per 1,000 users: measured (" + relative(doc.loadtest_path) + ") vs the capacity model"
                 + ("\nSYNTHETIC FIXTURE, not measurements" if synthetic else ""))
        plot(rows, args.plot, title)
        print(f"plot: {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        assumptions = parse_assumptions(args.assume)
    except ValueError as exc:
        print(f"python -m loadtest.capacity: {exc}", file=sys.stderr)
        return 2
    app = app_defaults()
    settings_file = args.write_values or args.check_values or VALUES
    settings = settings_file.read_text() if settings_file.exists() else ""
    server = args.server or values.read_setting(settings, "protocol.server") or OPERATOR_DEFAULTS["protocol.server"]
    poll = values.read_setting(settings, "scaling.pollIntervalSeconds")
    doc = Documents(load_json(args.benchmarks), load_json(args.loadtest), args.benchmarks, args.loadtest,
                    server.strip("\"'"), app.store_connections)
    inputs = read_inputs(doc, assumptions)
    try:
        workload, profile_source = build_workload(args)
    except ValueError as exc:
        print(f"python -m loadtest.capacity: {exc}", file=sys.stderr)
        return 2
    planning = planning_defaults(app, float(poll) if poll else OPERATOR_DEFAULTS["scaling.pollIntervalSeconds"])
    planning = Planning(args.headroom, args.drain_reserve, args.surge, planning.poll_seconds, planning.jitter_seconds)
    result = plan(workload, planning, inputs, app)
    print_plan(result, profile_source)
    print_run_residuals(result, doc, app)
    print_assumptions(inputs)
    if args.inputs:
        print_inputs(inputs)
    if args.write_values or args.check_values:
        return values_outcome(args, result, inputs)
    if args.validate:
        return validate(args, doc, inputs, workload, app)
    print_missing(inputs, result)
    return EXIT_MISSING if result.unsized else 0


if __name__ == "__main__":
    sys.exit(main())
