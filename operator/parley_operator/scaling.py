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

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"bad replica bounds: min={self.min_replicas} max={self.max_replicas}")
        if self.target <= 0:
            raise ValueError("target per replica must be positive")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("step limits must be at least 1")

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class Recommendation:
    at: float
    replicas: int


class Reason(enum.StrEnum):
    SCALE_UP = "ScaledUp"
    SCALE_DOWN = "ScaledDown"
    STEADY = "WithinTolerance"
    UP_STABILIZING = "ScaleUpStabilizing"
    DOWN_STABILIZING = "ScaleDownStabilizing"
    AT_MAX = "AtMaxReplicas"
    AT_MIN = "AtMinReplicas"
    NO_METRICS = "MetricsUnavailable"
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


def raw_recommendation(policy: Policy, current: int, load: float) -> int:
    """Replicas needed for `load`, or `current` when inside the tolerance band."""
    if load <= 0:
        return 0
    # Rounding first keeps float noise (e.g. 300/100*1.0000001) from adding a replica.
    needed = math.ceil(round(load / policy.target, 6))
    if current == 0:
        return needed  # waking from zero: there is no ratio to be tolerant about
    ratio = load / (current * policy.target)
    if abs(ratio - 1.0) <= policy.tolerance + 1e-9:  # 440/400 is 1.1000000000000001
        return current
    return needed


def decide(
    policy: Policy,
    current: int,
    load: float | None,
    now: float,
    history: Iterable[Recommendation] = (),
) -> Decision:
    """Decide the replica count for one sample. Feed `Decision.history` into the next call."""
    keep_for = max(policy.up_window, policy.down_window)
    past = tuple(r for r in history if now - r.at <= keep_for)

    if load is None:
        # Unknown load is not zero load: hold, only honouring the spec's bounds. The hold is
        # remembered as a recommendation, so after an outage the scale-down window has to
        # fill with real low samples again before anything is removed.
        held = policy.clamp(current)
        return Decision(
            current, held, current, Reason.NO_METRICS,
            f"{policy.metric} unknown: holding {held} replicas", (*past, Recommendation(now, held)),
        )

    raw = raw_recommendation(policy, current, load)
    history_now = (*past, Recommendation(now, raw))
    up_floor = min(r.replicas for r in history_now if now - r.at <= policy.up_window)
    down_ceiling = max(r.replicas for r in history_now if now - r.at <= policy.down_window)

    if current < up_floor:
        stabilized = up_floor
    elif current > down_ceiling:
        stabilized = down_ceiling
    else:
        stabilized = current

    stepped = max(current - policy.max_step_down, min(current + policy.max_step_up, stabilized))
    final = policy.clamp(stepped)
    reason, message = _explain(policy, current, load, raw, stabilized, stepped, final)
    return Decision(current, final, raw, reason, message, history_now)


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
        if final == policy.max_replicas and stepped > final:
            why += " (lowered to maxReplicas)"
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
