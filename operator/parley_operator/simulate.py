"""Replay a load profile through the scaling rule against a model of the worker queue.

    python -m parley_operator.simulate --out docs/autoscaling.png

The model, one tick per second:
* messages arrive at the profile's rate (Poisson noise, seeded) into one FIFO channel;
* each ready worker handles `--rate` messages a second; new workers are ready only after
  `--startup` seconds (scheduling, image, the migrate init container), removed ones stop at once;
* like channels-redis, a message still queued after `--expiry` seconds is dropped (lost);
* every `--poll` seconds the operator reads the queue depth and applies `scaling.decide`
  with the same policy the operator would build from a ChatPlatform spec.

It prints a summary and writes a PNG with queue depth, replicas and latency over time.

`--profile edges` replays the operator at the edges (issue 14): an operator restart in the middle
of a dip, then one of two Redis shards down for four minutes while the load rises. The operator
keeps its recommendation history in the ChatPlatform's status and reads a partial sum as a lower
bound; the orange lines replay the operator before that (a restart forgets the history, one
shard down blinds the whole reading).

    python -m parley_operator.simulate --profile edges --out docs/autoscaling-edges.png
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from parley_operator import scaling


@dataclasses.dataclass(frozen=True)
class Phase:
    until: float  # seconds from the start
    rate: float  # messages per second at the end of the phase (linear from the previous)


# Quiet, ramp to a peak, hold, a 3x spike, back to peak, then quiet (workers go to zero).
DEFAULT_PROFILE = (
    Phase(300, 5), Phase(1200, 400), Phase(1800, 400), Phase(1801, 1200), Phase(1980, 1200),
    Phase(1981, 400), Phase(2400, 400), Phase(2520, 0), Phase(3600, 0),
)


# Ramp, hold, a rise to twice the load while one of two shards is down, back, a dip, quiet; the
# operator restarts while the scale-down window holds the replicas the rise called for.
EDGES_PROFILE = (
    Phase(1, 5), Phase(300, 400), Phase(360, 400), Phase(420, 900), Phase(600, 900), Phase(660, 400),
    Phase(1500, 400), Phase(1560, 150), Phase(1800, 150), Phase(1860, 400), Phase(2100, 400),
    Phase(2160, 0), Phase(2700, 0),
)


@dataclasses.dataclass(frozen=True)
class Disruptions:
    """What happens to the operator, not to the load."""

    restarts: tuple[float, ...] = ()  # seconds at which the operator restarts
    outages: tuple[tuple[float, float], ...] = ()  # (from, to): one shard unreadable
    visible: float = 0.5  # the share of the queue on the shards still readable
    # How the operator handles them: True as now (history in the status, a partial sum is a
    # lower bound); False as before issue 14 (a restart forgets the history, one shard down
    # makes the whole reading unavailable).
    survives: bool = True


NO_DISRUPTIONS = Disruptions()
EDGES = Disruptions(restarts=(780.0,), outages=((360.0, 600.0),))


def profile_rate(profile: Sequence[Phase]) -> Callable[[float], float]:
    def rate(t: float) -> float:
        start, start_rate = 0.0, profile[0].rate
        for phase in profile:
            if t <= phase.until:
                span = phase.until - start
                frac = 1.0 if span <= 0 else (t - start) / span
                return start_rate + (phase.rate - start_rate) * frac
            start, start_rate = phase.until, phase.rate
        return profile[-1].rate
    return rate


@dataclasses.dataclass
class Trace:
    t: list[float] = dataclasses.field(default_factory=list)
    arrival_rate: list[float] = dataclasses.field(default_factory=list)
    depth: list[float] = dataclasses.field(default_factory=list)
    ready: list[int] = dataclasses.field(default_factory=list)
    desired: list[int] = dataclasses.field(default_factory=list)
    latency: list[float] = dataclasses.field(default_factory=list)  # mean wait of messages started
    expired: int = 0
    handled: int = 0
    scale_events: int = 0


@dataclasses.dataclass(frozen=True)
class Model:
    rate_per_worker: float = 25.0
    startup_seconds: float = 20.0
    expiry_seconds: float = 60.0
    poll_seconds: float = 15.0
    duration: float = 3600.0
    seed: int = 7


def simulate(policy: scaling.Policy, model: Model, rate: Callable[[float], float],
             start_replicas: int | None = None, disruptions: Disruptions = NO_DISRUPTIONS) -> Trace:
    rng = random.Random(model.seed)
    queue: collections.deque[list[float]] = collections.deque()  # [enqueued_at, count] FIFO buckets
    depth = 0.0
    desired = policy.clamp(policy.min_replicas if start_replicas is None else start_replicas)
    ready = desired
    starting: list[float] = []  # times at which pending pods become ready
    history: tuple[scaling.Recommendation, ...] = ()
    restarted = False
    trace = Trace()

    for tick in range(int(model.duration)):
        t = float(tick)
        arrivals = _poisson(rng, rate(t))
        if arrivals:
            queue.append([t, float(arrivals)])
            depth += arrivals
        # channels-redis drops expired messages when the next message is sent.
        while queue and queue[0][0] <= t - model.expiry_seconds:
            trace.expired += int(queue[0][1])
            depth -= queue.popleft()[1]

        ready += sum(1 for at in starting if at <= t)
        starting = [at for at in starting if at > t]

        capacity = ready * model.rate_per_worker
        served, waited = 0.0, 0.0
        while queue and served < capacity:
            take = min(queue[0][1], capacity - served)
            served += take
            waited += take * (t - queue[0][0])
            queue[0][1] -= take
            if queue[0][1] <= 1e-9:
                queue.popleft()
        depth = max(0.0, depth - served)
        trace.handled += int(served)

        if any(t == at for at in disruptions.restarts) and not disruptions.survives:
            restarted = True  # before issue 14: the history was in memory only
            history = ()
        if tick % int(model.poll_seconds) == 0:
            # What the operator sees: the live queue. (`$inflight` only holds messages between
            # pop and acknowledgement, milliseconds; it is not a measure of busy workers.)
            out = any(start <= t < end for start, end in disruptions.outages)
            seen: float | None = depth
            if out:
                seen = depth * disruptions.visible if disruptions.survives else None
            rule = policy
            if restarted:
                # The first decision after a restart, as before issue 14: no seed, so the
                # scale-down "window" is this one sample.
                rule, restarted = dataclasses.replace(policy, down_window=0), False
            decision = scaling.decide(rule, desired, seen, t, history, lower_bound=out,
                                      failures=1 if seen is None else 0)
            history = decision.history
            if decision.replicas != desired:
                trace.scale_events += 1
                if decision.replicas > desired:
                    starting += [t + model.startup_seconds] * (decision.replicas - desired)
                else:
                    drop = desired - decision.replicas
                    not_started = min(drop, len(starting))
                    starting = sorted(starting)[: len(starting) - not_started]
                    ready -= drop - not_started
                desired = decision.replicas

        trace.t.append(t)
        trace.arrival_rate.append(rate(t))
        trace.depth.append(depth)
        trace.ready.append(ready)
        trace.desired.append(desired)
        trace.latency.append(waited / served if served else (trace.latency[-1] if depth and trace.latency else 0.0))
    return trace


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:  # normal approximation: exact Poisson sampling is slow for large means
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    threshold, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= threshold:
            return k
        k += 1


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(trace: Trace, model: Model) -> dict[str, float]:
    busy = [lat for lat, rate in zip(trace.latency, trace.arrival_rate, strict=True) if rate > 0]
    return {
        "messages_handled": trace.handled,
        "messages_expired": trace.expired,
        "max_queue_depth": round(max(trace.depth)),
        "p50_latency_s": round(percentile(busy, 0.50), 1),
        "p95_latency_s": round(percentile(busy, 0.95), 1),
        "max_latency_s": round(max(trace.latency), 1),
        "max_replicas": max(trace.desired),
        "scale_events": trace.scale_events,
        "minutes_at_zero": round(sum(1 for r in trace.desired if r == 0) / 60, 1),
        "worker_minutes": round(sum(trace.ready) / 60),
    }


def plot(trace: Trace, policy: scaling.Policy, model: Model, out: Path, title: str,
         baseline: Trace | None = None, baseline_label: str = "without windows or step limits",
         disruptions: Disruptions = NO_DISRUPTIONS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [t / 60 for t in trace.t]
    fig, (ax_q, ax_r, ax_l) = plt.subplots(3, 1, figsize=(12, 9), sharex=True, constrained_layout=True)
    fig.suptitle(title, fontsize=13)

    ax_q.plot(minutes, trace.depth, color="tab:red", label="queue depth (messages)")
    ax_q.set_ylabel("queued messages")
    ax_in = ax_q.twinx()
    ax_in.plot(minutes, trace.arrival_rate, color="tab:gray", linestyle="--", label="arrival rate (msg/s)")
    ax_in.set_ylabel("arrivals / s")
    lines = ax_q.get_lines() + ax_in.get_lines()
    ax_q.legend(lines, [str(line.get_label()) for line in lines], loc="upper left")
    ax_q.grid(alpha=0.3)

    needed = [math.ceil(r / model.rate_per_worker) for r in trace.arrival_rate]
    if baseline is not None:
        ax_r.step(minutes, baseline.desired, where="post", color="tab:orange", alpha=0.6, linewidth=0.9,
                  label=f"same rule {baseline_label}")
    ax_r.step(minutes, trace.desired, where="post", color="tab:blue", label="desired replicas (operator)")
    ax_r.step(minutes, trace.ready, where="post", color="tab:green", label="ready replicas")
    ax_r.plot(minutes, needed, color="tab:gray", linestyle=":", label="arrival rate / worker rate")
    ax_r.axhline(policy.max_replicas, color="black", linewidth=0.8, linestyle="--", label="maxReplicas")
    ax_r.set_ylabel("worker replicas")
    ax_r.legend(loc="upper left")
    ax_r.grid(alpha=0.3)

    if baseline is not None:
        ax_l.plot(minutes, baseline.latency, color="tab:orange", alpha=0.6, linewidth=0.9,
                  label=f"{baseline_label} ({baseline.expired} messages expired)")
    ax_l.plot(minutes, trace.latency, color="tab:purple", label=f"queueing latency ({trace.expired} expired)")
    ax_l.axhline(model.expiry_seconds, color="tab:red", linewidth=0.8, linestyle="--",
                 label=f"channel expiry ({model.expiry_seconds:g} s): older messages are dropped")
    ax_l.set_ylabel("seconds waiting")
    ax_l.set_xlabel("minutes")
    ax_l.legend(loc="upper left")
    ax_l.grid(alpha=0.3)

    for ax in (ax_q, ax_r, ax_l):
        for n, at in enumerate(disruptions.restarts):
            ax.axvline(at / 60, color="black", linewidth=1.2, linestyle="-.",
                       label="operator restart" if ax is ax_r and n == 0 else None)
        for n, (start, end) in enumerate(disruptions.outages):
            ax.axvspan(start / 60, end / 60, color="tab:red", alpha=0.08,
                       label="one of two Redis shards down" if ax is ax_r and n == 0 else None)
    if disruptions.restarts or disruptions.outages:
        for ax in (ax_r, ax_l):
            ax.legend(loc="upper left", fontsize="small", framealpha=0.6)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m parley_operator.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default docs/autoscaling.png; docs/autoscaling-edges.png for edges)")
    p.add_argument("--profile", choices=("default", "edges"), default="default",
                   help="edges: an operator restart in a dip, then a shard outage while the load rises")
    p.add_argument("--peak", type=float, default=400.0, help="peak arrivals per second")
    p.add_argument("--spike", type=float, default=3.0, help="spike height as a multiple of the peak")
    p.add_argument("--rate", type=float, default=25.0, help="messages per second one worker handles")
    p.add_argument("--startup", type=float, default=20.0, help="seconds until a new worker is ready")
    p.add_argument("--min", type=int, default=0)
    p.add_argument("--max", type=int, default=40)
    p.add_argument("--target", type=float, default=100.0, help="targetQueueDepthPerReplica")
    p.add_argument("--tolerance", type=float, default=10.0, help="tolerancePercent")
    p.add_argument("--poll", type=float, default=15.0)
    p.add_argument("--up-window", type=float, default=0.0)
    p.add_argument("--down-window", type=float, default=300.0)
    p.add_argument("--step-up", type=int, default=10, help="maxScaleUpStep")
    p.add_argument("--step-down", type=int, default=2, help="maxScaleDownStep")
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    edges = args.profile == "edges"
    out = args.out or Path("docs/autoscaling-edges.png" if edges else "docs/autoscaling.png")
    peak = args.peak
    base = EDGES_PROFILE if edges else DEFAULT_PROFILE
    profile = tuple(
        dataclasses.replace(ph, rate=ph.rate / 400.0 * peak * (args.spike / 3.0 if ph.rate == 1200 else 1.0))
        for ph in base
    )
    policy = scaling.Policy(
        min_replicas=args.min, max_replicas=args.max, target=args.target, tolerance=args.tolerance / 100,
        up_window=args.up_window, down_window=args.down_window, max_step_up=args.step_up,
        max_step_down=args.step_down, metric="queue depth",
    )
    model = Model(rate_per_worker=args.rate, startup_seconds=args.startup, poll_seconds=args.poll,
                  duration=profile[-1].until, seed=args.seed)
    disruptions = EDGES if edges else Disruptions()
    trace = simulate(policy, model, profile_rate(profile), disruptions=disruptions)
    result = summary(trace, model)
    if edges:
        # The same rule and load, the operator as it was before issue 14.
        label, column = "as before issue 14 (restart forgets, a shard down blinds)", "before"
        baseline = simulate(policy, model, profile_rate(profile),
                            disruptions=dataclasses.replace(disruptions, survives=False))
        title = (f"Worker autoscaling at the edges: operator restart at minute {disruptions.restarts[0] / 60:g}, "
                 f"a shard down minutes {disruptions.outages[0][0] / 60:g}-{disruptions.outages[0][1] / 60:g}")
    else:
        # The same ratio rule with no memory: what stabilization windows and step limits buy.
        label, column = "without windows or step limits", "no windows"
        bare = dataclasses.replace(policy, up_window=0, down_window=0, max_step_up=1000, max_step_down=1000)
        baseline = simulate(bare, model, profile_rate(profile))
        title = (f"Worker autoscaling: target {args.target:g} msgs/replica, poll {args.poll:g}s, windows up "
                 f"{args.up_window:g}s / down {args.down_window:g}s, steps +{args.step_up}/-{args.step_down}")
    plot(trace, policy, model, out, title, baseline, label, disruptions)
    print(f"{'':22}{'operator':>12}{column:>12}")
    for key, value in result.items():
        print(f"{key:22}{value:>12}{summary(baseline, model)[key]:>12}")
    print(f"plot: {out}")
    return result


if __name__ == "__main__":
    main()
