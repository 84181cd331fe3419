"""The scaling rule: from an observed load to a replica count.

Pure on purpose: no I/O and no clock (the caller passes `now`), so the rule is tested with
tables and replayed offline by `parley_operator.simulate`.

It follows the HorizontalPodAutoscaler's algorithm (autoscaling/v2 `behavior`):

1. raw recommendation = ceil(load / target per replica), unless the ratio to the current
   replicas is inside the tolerance band, in which case it is the current count;
2. stabilization: every raw recommendation is remembered; scale up only to the *lowest*
   recommendation of the scale-up window and down only to the *highest* of the scale-down
   window, so one noisy sample cannot move the Deployment;
3. bounded steps per decision, then the spec's min/max (the spec wins over the step limits:
   raising minReplicas is an explicit order, not a metric).

Unlike the HPA it can hold workers at zero and wake them when work arrives, and it treats a
missing metric as "hold", never as "zero load".

At the edges it does what the HPA and KEDA do:

* an empty history (a restart, a new leader) is seeded with the current replicas, as the HPA's
  `recordInitialRecommendation`, so a restart during a dip cannot skip the scale-down window;
* a partial reading (some Redis shards unreadable) is a lower bound: it may scale up, never down;
* replicas with no fresh metric are assumed at target on a scale-down and at zero on a scale-up
  (the HPA's missing pods), so a late heartbeat never makes a busy pod look idle;
* after `fallback_after` failed readings in a row, a role goes up to `fallback_replicas` (KEDA's
  `fallback`, as a floor: a blind operator never removes pods);
* waking from zero: any load above `activation` wakes one replica at once (KEDA's activation
  threshold), and a role goes back to zero only after `cooldown` seconds without load (KEDA's
  `cooldownPeriod`);
* a per-pod ceiling (`ceiling`): enough replicas that the survivors of one drain stay under it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target: float  # the load one replica should carry (queued messages, open WebSockets)
    tolerance: float = 0.1  # |load / capacity - 1| <= tolerance means "leave it alone"
    up_window: float = 0.0  # seconds of recommendations considered before scaling up
    down_window: float = 300.0  # seconds of recommendations considered before scaling down
    max_step_up: int = 10  # replicas added by one decision at most
    max_step_down: int = 2  # replicas removed by one decision at most
    metric: str = "load"  # what `load` is, for human-readable messages
    # Waking from zero needs load above this (KEDA's activationThreshold); 0: any load wakes.
    activation: float = 0.0
    # ...or work that has waited this long (seconds): below the threshold a trickle would
    # otherwise wait for ever, and expire.
    activation_max_wait: float = math.inf
    # Seconds without load before going back to zero (KEDA's cooldownPeriod); 0: the scale-down
    # window alone decides.
    cooldown: float = 0.0
    # The most one replica can hold (sockets per protocol pod); None: no ceiling. Replicas are
    # kept at ceil(load / ceiling) + 1 at least, so the others can take a drained pod's load.
    ceiling: float | None = None
    # Replicas to go up to after `fallback_after` failed readings in a row (KEDA's fallback);
    # None: hold the current count however long the outage.
    fallback_replicas: int | None = None
    fallback_after: int = 3

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"bad replica bounds: min={self.min_replicas} max={self.max_replicas}")
        if self.target <= 0:
            raise ValueError("target per replica must be positive")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("step limits must be at least 1")
        if self.ceiling is not None and self.ceiling < self.target:
            raise ValueError(f"the per-replica ceiling {self.ceiling:g} is below the target {self.target:g}")
        if self.activation < 0 or self.cooldown < 0:
            raise ValueError("activation and cooldown cannot be negative")
        if self.fallback_after < 1 or (self.fallback_replicas is not None and self.fallback_replicas < 0):
            raise ValueError("fallback needs a threshold of at least 1 and replicas >= 0")

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    def bound(self, current: int, replicas: int) -> int:
        """`replicas` inside min/max, except that a count above maxReplicas comes down at most
        `max_step_down` per decision: a lowered maxReplicas (a spec edit) drains at the pace of
        any other scale-down, with fresh deletion costs, not 25 of 30 pods in one patch.
        Raising minReplicas adds pods at once: adding drains nothing."""
        return max(self.min_replicas, min(max(self.max_replicas, current - self.max_step_down), replicas))


@dataclass(frozen=True)
class Recommendation:
    at: float
    replicas: int
    # An assumed recommendation (the seed of an empty history): it guards the scale-down window
    # only; it must not delay a scale-up.
    seeded: bool = False


class Reason(enum.StrEnum):
    SCALE_UP = "ScaledUp"
    SCALE_DOWN = "ScaledDown"
    STEADY = "WithinTolerance"
    UP_STABILIZING = "ScaleUpStabilizing"
    DOWN_STABILIZING = "ScaleDownStabilizing"
    AT_MAX = "AtMaxReplicas"
    AT_MIN = "AtMinReplicas"
    NO_METRICS = "MetricsUnavailable"
    PARTIAL_METRICS = "PartialMetrics"  # a lower bound: up only, never down
    FALLBACK = "FallbackReplicas"
    DELETION_COST_UNAVAILABLE = "PodDeletionCostUnavailable"  # set by the operator, not by decide()


@dataclass(frozen=True)
class Decision:
    current: int
    replicas: int  # what the Deployment should be set to now
    recommended: int  # the raw recommendation of this sample (before windows, steps, bounds)
    reason: Reason
    message: str
    history: tuple[Recommendation, ...] = field(default=(), repr=False)

    @property
    def changed(self) -> bool:
        return self.replicas != self.current


def raw_recommendation(policy: Policy, current: int, load: float, waited: float = 0.0) -> int:
    """Replicas needed for `load`, or `current` when inside the tolerance band. `waited`: how
    long the oldest waiting work has waited (for the activation threshold's bound)."""
    if load <= 0 or (current == 0 and load <= policy.activation and waited < policy.activation_max_wait):
        return 0
    # Rounding first keeps float noise (e.g. 300/100*1.0000001) from adding a replica.
    needed = math.ceil(round(load / policy.target, 6))
    # Enough replicas that the others can absorb one drained replica's load under the ceiling.
    survivors = math.ceil(round(load / policy.ceiling, 6)) + 1 if policy.ceiling else 0
    if current == 0:
        return max(needed, survivors)  # waking from zero: there is no ratio to be tolerant about
    ratio = load / (current * policy.target)
    if abs(ratio - 1.0) <= policy.tolerance + 1e-9:  # 440/400 is 1.1000000000000001
        return max(current, survivors)
    return max(needed, survivors)


def estimate(
    policy: Policy, current: int, load: float, *, unmeasured: int = 0, lower_bound: bool = False,
    waited: float = 0.0,
) -> int:
    """The raw recommendation of an incomplete reading, the HPA's way with missing pods.

    `load` is what was measured; `unmeasured` replicas had no fresh metric. Counted at zero they
    give the scale-up estimate; a scale-down must hold with them counted at target (a busy pod
    whose heartbeat is late is not idle), and a direction that reverses is no change. A
    `lower_bound` reading (a shard unreadable) can only ever add replicas.
    """
    up = raw_recommendation(policy, current, load, waited)
    if up >= current:
        return up
    if lower_bound:
        return current
    down = raw_recommendation(policy, current, load + unmeasured * policy.target)
    return min(current, down)


def compact(history: Iterable[Recommendation], policy: Policy, now: float) -> tuple[Recommendation, ...]:
    """The recommendations that can still decide something, oldest first.

    A recommendation matters while it is inside a window and no later one dominates it: for the
    highest-of-window rules (scale-down, cooldown) a later one at least as high, for the
    lowest-of-window rule (scale-up) a later one at least as low. What is left is small (a few
    entries), which is what lets the history live in the ChatPlatform's status.
    """
    keep_for = max(policy.up_window, policy.down_window, policy.cooldown)
    live = [r for r in history if now - r.at <= keep_for]
    kept: list[Recommendation] = []
    highest = lowest = None
    for r in reversed(live):
        in_up_window = now - r.at <= policy.up_window and not r.seeded
        needed = highest is None or r.replicas > highest or (
            in_up_window and (lowest is None or r.replicas < lowest))
        if needed:
            kept.append(r)
        highest = r.replicas if highest is None else max(highest, r.replicas)
        if in_up_window:
            lowest = r.replicas if lowest is None else min(lowest, r.replicas)
    return tuple(reversed(kept))


def decide(
    policy: Policy,
    current: int,
    load: float | None,
    now: float,
    history: Iterable[Recommendation] = (),
    *,
    unmeasured: int = 0,
    lower_bound: bool = False,
    failures: int = 0,
    waited: float = 0.0,
) -> Decision:
    """Decide the replica count for one sample. Feed `Decision.history` into the next call.

    `load` None: no reading (`failures` counts the failed readings in a row, this one included).
    `unmeasured`: replicas with no fresh metric. `lower_bound`: `load` misses some shards.
    `waited`: seconds the oldest waiting work has waited.
    """
    keep_for = max(policy.up_window, policy.down_window, policy.cooldown)
    past = tuple(r for r in history if now - r.at <= keep_for)
    if not past and policy.down_window > 0:
        # A restart, a new leader, a first sight: we do not know what the last window saw, so
        # assume it recommended the current count (the HPA's recordInitialRecommendation). A
        # scale-down then waits out a whole window of real samples.
        past = (Recommendation(now, current, seeded=True),)

    if load is None:
        # Unknown load is not zero load: hold, only honouring the spec's bounds. The hold is
        # remembered as a recommendation, so after an outage the scale-down window has to
        # fill with real low samples again before anything is removed.
        held = policy.bound(current, current)
        if policy.fallback_replicas is not None and failures >= policy.fallback_after:
            wanted = policy.bound(current, max(current, policy.fallback_replicas))
            if wanted != held or policy.fallback_replicas > current:
                return Decision(
                    current, wanted, wanted, Reason.FALLBACK,
                    f"{policy.metric} unknown for {failures} polls: fallback to {wanted} replicas",
                    compact((*past, Recommendation(now, wanted)), policy, now),
                )
        return Decision(
            current, held, current, Reason.NO_METRICS,
            f"{policy.metric} unknown: holding {held} replicas" if held == current else
            f"{policy.metric} unknown: {current} -> {held} to fit min/max {policy.min_replicas}/{policy.max_replicas}",
            compact((*past, Recommendation(now, held)), policy, now),
        )

    raw = estimate(policy, current, load, unmeasured=unmeasured, lower_bound=lower_bound, waited=waited)
    history_now = (*past, Recommendation(now, raw))
    up_floor = min(r.replicas for r in history_now if now - r.at <= policy.up_window and not r.seeded)
    down_ceiling = max(r.replicas for r in history_now if now - r.at <= policy.down_window)

    if current < up_floor:
        stabilized = up_floor
    elif current > down_ceiling:
        stabilized = down_ceiling
    else:
        stabilized = current
    if current == 0 and raw > 0:
        # Waking from zero is never stabilized: the first message must not wait out a window.
        stabilized = max(stabilized, 1)
    if stabilized == 0 < current and policy.cooldown > 0 and any(
        r.replicas > 0 for r in history_now if now - r.at <= policy.cooldown
    ):
        stabilized = 1  # going to zero waits for a whole cooldown without load

    stepped = max(current - policy.max_step_down, min(current + policy.max_step_up, stabilized))
    final = policy.bound(current, stepped)
    reason, message = _explain(policy, current, load, raw, stabilized, stepped, final)
    if lower_bound and final == current:
        reason = Reason.PARTIAL_METRICS
        message = (f"{policy.metric} at least {load:g} (some Redis shards unreadable): "
                   f"holding {final}, scaling up only")
    return Decision(current, final, raw, reason, message, compact(history_now, policy, now))


def _explain(
    policy: Policy, current: int, load: float, raw: int, stabilized: int, stepped: int, final: int,
) -> tuple[Reason, str]:
    observed = f"{policy.metric} {load:g} for target {policy.target:g}/replica"
    if final > current:
        why = f"{observed}: {current} -> {final}"
        if stepped < stabilized and final == stepped:
            why += f" (step limited to +{policy.max_step_up}, wants {stabilized})"
        if final == policy.min_replicas and stepped < final:
            why += " (raised to minReplicas)"
        return Reason.SCALE_UP, why
    if final < current:
        why = f"{observed}: {current} -> {final}"
        if stepped > stabilized and final == stepped:
            why += f" (step limited to -{policy.max_step_down}, wants {stabilized})"
        if stepped > final:
            why += f" (lowering to maxReplicas {policy.max_replicas}, -{policy.max_step_down} at most per decision)"
        return Reason.SCALE_DOWN, why
    if raw > current:
        if current >= policy.max_replicas:
            return Reason.AT_MAX, f"{observed}: wants {raw}, capped at maxReplicas {policy.max_replicas}"
        return Reason.UP_STABILIZING, (
            f"{observed}: wants {raw}, waiting out the {policy.up_window:g}s scale-up window"
        )
    if raw < current:
        if current <= policy.min_replicas:
            return Reason.AT_MIN, f"{observed}: wants {raw}, floored at minReplicas {policy.min_replicas}"
        return Reason.DOWN_STABILIZING, (
            f"{observed}: wants {raw}, waiting out the {policy.down_window:g}s scale-down window"
        )
    return Reason.STEADY, f"{observed}: {current} replicas within tolerance"
