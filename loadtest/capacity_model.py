"""The capacity model: from a workload and the measured figures to pods, shards, rates and cost.

Pure arithmetic, no I/O. Parley's own settings (batching, connections, the drain's reconnect
jitter, the worker channel's capacity), the operator's scaling rule and its simulator's pod start-up
time are imported from the code that uses them, so the plan follows the code when it changes.

The equations, tier by tier (docs/loadtest.md has them with every input's source):

* load: messages/s M = users x rate / 60; deliveries/s D = M x mean members online per room;
  peaks are `peak_factor` x both.
* protocol pods: sockets per pod T = the least of (a) the sockets make bench held on one process
  less the drain reserve, (b) the users whose peak deliveries fill one pod's planned deliveries/s,
  (c) the sockets a pod may hold so that a rollout's reconnect storm (maxSurge of the pods draining
  at once, their clients back within the reconnect jitter) stays within each pod's planned resume
  rate. Pods = ceil(users / T) by the operator's own rule. The operator scales this tier on
  connections only, so the floor must carry the peak's deliveries: (b) is why.
* workers: planned rate = measured x (1 - headroom); floor = max(2, ceil(M / planned)); the
  operator adds workers on chat.persist's depth up to ceil(peak M x (1 + surge) / planned).
* Redis: commands = 2 per message + a receive per worker batch pass + an ack PUBLISH per protocol
  pod with senders in a batch; pub/sub pushes = per room message, the distinct pods its members are
  on (members spread uniformly over the pods), + the acks. Cores = commands / per-core + pushes /
  per-core; chat.persist lives on one shard, which also carries every send and receive:
  shards = ceil((cores - persist's) / (usable - persist's)), usable = 1 - headroom, sized for the
  ceilings (shards do not autoscale).
* PostgreSQL: rows/s = M; statements/s = 2 per batch, batches from the worker's pacing
  (PARLEY_BATCH_WAIT_MS) and the batcher's split over PARLEY_STORE_CONNECTIONS.
* Locust: processes = ceil(users / users per process); cores and memory per 1,000 users.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
for _sub in ("app", "operator"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

from chat.batcher import Batcher  # noqa: E402
from loadtest.capacity_inputs import Inputs, MissingInputs  # noqa: E402
from parley.config import Config  # noqa: E402
from parley_operator import scaling  # noqa: E402
from parley_operator.simulate import Model as QueueModel  # noqa: E402

# --- constants, each with its reason -----------------------------------------------------------

# A protocol pod is one Python process whose Python work runs on one thread: one core is what it
# can use, and make bench's deliveries figure is one process's. Likewise a worker (one event loop)
# and a Redis shard (Redis executes commands on one thread).
CORES_PER_PROTOCOL_POD = 1
CORES_PER_WORKER_POD = 1
CORES_PER_REDIS_SHARD = 1
# The fewest workers: one restarting or rolling out never leaves chat.persist unconsumed.
WORKER_AVAILABILITY_FLOOR = 2
# The queue depth per worker the autoscaler aims for, in seconds of one worker's planned work: a
# message behind that much work is still acked well within a second, and a backlog that size
# held for a poll is worth a worker.
QUEUE_TARGET_SECONDS = 0.25
# Memory request = working set x 2: under load a socket also holds frames queued for writing
# (bounded per slow client by PARLEY_SEND_BUFFER), and a burst of deliveries queues on many
# sockets at once. Limit = request x 2: a reconnect storm's handshakes or a run of history pages
# should not get a pod of thousands of sockets OOM-killed.
MEMORY_REQUEST_FACTOR = 2.0
MEMORY_LIMIT_FACTOR = 2.0
# Memory requests are rounded up to a multiple of this many MiB.
MEMORY_STEP_MI = 64
# Per message Redis runs the channel-layer send to chat.persist (one EVAL) and the room PUBLISH.
COMMANDS_PER_MESSAGE = 2
# chat.store_pg stores a batch with one read and one write statement, whatever its size
# (tests/test_capacity.py counts them on a real PostgreSQL).
STATEMENTS_PER_BATCH = 2
# The protocol Deployment's rollingUpdate maxSurge (parley_operator.resources.deployment, with
# maxUnavailable 0): in a rollout up to this share of the pods drain at once as their replacements
# become ready (tests/test_capacity.py compares it with the operator's Deployment).
ROLLOUT_MAX_SURGE = 0.25
# Each process keeps one database connection for Django's own queries beyond its async pool
# (docs/operations.md, "Production choices").
DJANGO_CONNECTIONS = 1
# The operator should take a tier from its floor to its ceiling within this many polls.
SCALE_UP_POLLS = 3
# Linux's default ip_local_port_range (32768-60999): connections one source address opens to one
# destination address and port, i.e. the most users one Locust pod can hold against one Service.
EPHEMERAL_PORTS = 28_232


def app_defaults() -> Config:
    """Parley's settings as a pod without overrides runs them. This shell's PARLEY_* variables (a
    test run, a tuned laptop) must not change a plan that is written to a file and checked."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        return Config()


# --- the workload and the planning choices ------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    users: int
    messages_per_user_per_minute: float = 1.0
    # (members online, share of messages) per room size; shares need not add up to 1.
    room_mix: tuple[tuple[float, float], ...] = ((20.0, 1.0),)
    peak_factor: float = 3.0

    @property
    def messages_per_s(self) -> float:
        return self.users * self.messages_per_user_per_minute / 60

    @property
    def peak_messages_per_s(self) -> float:
        return self.messages_per_s * self.peak_factor

    @property
    def recipients_per_message(self) -> float:
        total = sum(share for _, share in self.room_mix)
        return sum(size * share for size, share in self.room_mix) / total

    @property
    def deliveries_per_s(self) -> float:
        return self.messages_per_s * self.recipients_per_message

    @property
    def peak_deliveries_per_s(self) -> float:
        return self.peak_messages_per_s * self.recipients_per_message

    def mix_text(self) -> str:
        if len(self.room_mix) == 1:
            return f"rooms of {self.room_mix[0][0]:g}"
        total = sum(share for _, share in self.room_mix)
        parts = ", ".join(f"{share / total:.0%} to rooms of {size:g}" for size, share in self.room_mix)
        return f"messages {parts} (mean {self.recipients_per_message:.1f} members)"


@dataclass(frozen=True)
class Planning:
    headroom: float = 0.25  # share of every measured rate kept free
    drain_reserve: float = 0.2  # share of the sockets a pod held in make bench kept for draining pods
    surge: float = 0.5  # users beyond the plan the ceilings (maxReplicas, Redis) still carry
    poll_seconds: float = 10.0  # the operator's scaling.pollIntervalSeconds
    jitter_seconds: float = 5.0  # PARLEY_RECONNECT_JITTER_MS: a drained pod's clients come back within it


def planning_defaults(app: Config, poll_seconds: float) -> Planning:
    return Planning(poll_seconds=poll_seconds, jitter_seconds=app.reconnect_jitter_ms / 1000)


# --- helpers -------------------------------------------------------------------------------------

def floor_2sf(value: float) -> int:
    """Down to two significant figures (8,016 -> 8,000; 2,098 -> 2,000): a target must not promise
    more than the figures allow, and round numbers read as the estimates they are."""
    if value < 1:
        return 1
    step = 10 ** max(0, math.floor(math.log10(value)) - 1)
    return max(1, int(value // step * step))


def mib_request(mib: float) -> int:
    return MEMORY_STEP_MI * math.ceil(mib / MEMORY_STEP_MI)


def pods_for(load: float, target: float) -> int:
    """Replicas the operator asks for at `load` (parley_operator.scaling, from zero: no tolerance band)."""
    policy = scaling.Policy(min_replicas=0, max_replicas=10**9, target=target)
    return scaling.raw_recommendation(policy, current=0, load=load)


def distinct_pods(pods: int, members: float) -> float:
    """Expected number of pods holding at least one of `members` sockets spread uniformly over `pods`."""
    if pods <= 1:
        return 1.0 if members > 0 else 0.0
    return pods * (1 - (1 - 1 / pods) ** members)


@dataclass(frozen=True)
class Batching:
    receives_per_s: float  # the worker's passes over chat.persist
    batches_per_s: float  # batches stored (a pass may be split over the stores)
    mean_batch: float


def batching(rate: float, app: Config) -> Batching:
    """How one worker taking `rate` messages/s batches them (chat.worker_server.persist_listener's
    pacing, chat.batcher's split):
    - a quiet worker takes each message at once; a busy one waits PARLEY_BATCH_WAIT_MS between
      passes and takes what gathered, up to PARLEY_BATCH_MAX (a full pass goes at once);
    - a pass of at least the batcher's `split_at` messages is split over the idle stores
      (PARLEY_STORE_CONNECTIONS), one batch each."""
    if rate <= 0:
        return Batching(0.0, 0.0, 0.0)
    receives = max(min(rate, 1000 / app.batch_wait_ms), rate / app.batch_max)
    per_receive = rate / receives
    split_at = Batcher([None] * app.store_connections, _no_store, app.batch_max).split_at
    parts = min(app.store_connections, math.ceil(per_receive / split_at))
    return Batching(receives, receives * parts, per_receive / parts)


async def _no_store(_items: list, _store: None) -> None:  # the batcher is built only for its split rule
    return None


def worker_cores(rate: float, inputs: Inputs) -> float:
    """One worker's CPU (cores) at `rate` messages/s, between make bench-worker's two operating
    points: the latency run (a trickle in small batches) and the throughput run (full batches).
    Below the trickle rate, the trickle's cost per message (small batches cost more per message:
    an underestimate there); above the throughput run, its cost per message."""
    inputs.require("worker.trickle_rate", "worker.trickle_cpu_us_per_msg", "worker.msgs_per_s",
                   "worker.cpu_share_at_max")
    r1, us1 = inputs.get("worker.trickle_rate"), inputs.get("worker.trickle_cpu_us_per_msg")
    r2, c2 = inputs.get("worker.msgs_per_s"), inputs.get("worker.cpu_share_at_max")
    c1 = r1 * us1 / 1e6
    if rate <= r1 or r2 <= r1:
        return rate * us1 / 1e6
    if rate <= r2:
        return c1 + (c2 - c1) * (rate - r1) / (r2 - r1)
    return c2 * rate / r2


# --- tiers ---------------------------------------------------------------------------------------

class CannotSize(Exception):
    """A tier that no number of pods or shards carries (the message says why)."""


@dataclass(frozen=True)
class Bound:
    """One figure that bounds a tier: what it alone would require, and the arithmetic."""

    name: str
    needs: int
    detail: str


@dataclass
class Tier:
    name: str
    count: int  # pods, shards or processes at the floor
    ceiling: int  # ... and at the ceiling (the same for fixed tiers)
    cores: float  # requested at the floor
    memory_mib: float | None  # requested at the floor; None: not modelled
    bounds: list[Bound]  # the limiting figure first
    notes: list[str] = field(default_factory=list)


def ordered(bounds: list[Bound]) -> list[Bound]:
    """The bound that requires the most first (the limiting figure); ties keep their order."""
    return sorted(bounds, key=lambda b: -b.needs)


@dataclass
class ProtocolPlan:
    tier: Tier
    target_per_pod: int
    memory_request_mi: int
    memory_limit_mi: int
    per_pod_deliveries: float  # planned
    sockets_ceiling: int  # what a pod holds while absorbing draining pods' sockets
    working_set_mib: float
    cores_used_avg: float
    cores_used_peak: float


def rollout_bound(users: int, jitter: float, resume_rate: float) -> tuple[int, float, int]:
    """The fewest pods whose rollout storm fits: (pods, sockets per pod it allows, pods draining).

    With maxSurge s, ceil(s x P) pods drain at once as their replacements become ready; their
    users / P sockets each come back within the jitter, spread over the P pods then serving:
    ceil(s P) x users / P <= P x jitter x resume_rate per pod."""
    pods = max(1, math.floor(ROLLOUT_MAX_SURGE * users / (jitter * resume_rate)))
    while True:
        draining = math.ceil(ROLLOUT_MAX_SURGE * pods)
        if draining * users <= pods * pods * jitter * resume_rate:
            return pods, pods * jitter * resume_rate / draining, draining
        pods += 1


def plan_protocol(w: Workload, p: Planning, inputs: Inputs) -> ProtocolPlan:
    inputs.require("protocol.deliveries_per_s", "protocol.sockets_held", "protocol.resume_per_s",
                   "protocol.idle_kb_per_socket", "protocol.process_rss_mb", "protocol.cpu_us_per_delivery")
    measured = inputs.get("protocol.deliveries_per_s")
    held = inputs.get("protocol.sockets_held")
    resume = inputs.get("protocol.resume_per_s")
    planned = measured * (1 - p.headroom)
    resume_planned = resume * (1 - p.headroom)
    by_sockets = held * (1 - p.drain_reserve)
    by_deliveries = planned * w.users / w.peak_deliveries_per_s
    rollout_pods, by_rollout, draining = rollout_bound(w.users, p.jitter_seconds, resume_planned)
    target = floor_2sf(min(by_sockets, by_deliveries, by_rollout))
    pods = pods_for(w.users, target)
    # Rounding the target down adds pods, and a rollout of more pods drains more at once: recheck.
    while target > 1 and math.ceil(ROLLOUT_MAX_SURGE * pods) * target > pods * p.jitter_seconds * resume_planned:
        target -= 1
        pods = pods_for(w.users, target)
    ceiling = max(pods, pods_for(w.users * (1 + p.surge), target))
    bounds = ordered([
        Bound("connections per pod", pods_for(w.users, by_sockets),
              f"{held:,.0f} sockets held by one process in make bench, less {p.drain_reserve:.0%} for the "
              f"sockets of draining pods = {by_sockets:,.0f} per pod"),
        Bound("deliveries per pod", pods_for(w.peak_deliveries_per_s, planned),
              f"the peak's {w.peak_deliveries_per_s:,.0f} deliveries/s / {planned:,.0f} per pod "
              f"({measured:,.0f} measured, less {p.headroom:.0%} headroom) = {by_deliveries:,.0f} users per pod"),
        Bound("reconnect storm of a rollout", rollout_pods,
              f"with {rollout_pods} pods, {draining} drain at once (maxSurge {ROLLOUT_MAX_SURGE:.0%}); their clients "
              f"come back within {p.jitter_seconds:g} s at <= {resume_planned:,.0f} resumes/s per pod "
              f"({resume:,.0f} measured, less headroom) = {by_rollout:,.0f} sockets per pod"),
    ])
    sockets_ceiling = math.floor(target / (1 - p.drain_reserve))
    working = inputs.get("protocol.process_rss_mb") + sockets_ceiling * inputs.get("protocol.idle_kb_per_socket") / 1024
    request = mib_request(working * MEMORY_REQUEST_FACTOR)
    cpu_us = inputs.get("protocol.cpu_us_per_delivery")
    notes = [f"if every client reconnects at once (an ingress or network outage), each pod resumes its "
             f"{target:,} sockets in {target / resume:.0f} s at make bench's {resume:,.0f}/s"]
    if bounds[0].name == "deliveries per pod":
        notes.append("the operator scales protocol pods on connections only: the floor carries the peak's deliveries")
    tier = Tier("protocol pods", pods, ceiling, pods * CORES_PER_PROTOCOL_POD, pods * request, bounds, notes)
    return ProtocolPlan(tier, target, request, int(request * MEMORY_LIMIT_FACTOR), planned, sockets_ceiling,
                        working, w.deliveries_per_s * cpu_us / 1e6, w.peak_deliveries_per_s * cpu_us / 1e6)


@dataclass
class WorkerPlan:
    tier: Tier
    planned_rate: float
    peak_workers: int
    target_queue_depth: int
    memory_request_mi: int
    memory_limit_mi: int
    buffer_seconds: float | None  # how long chat.persist absorbs a step to the peak; None: no backlog
    reaction_seconds: float
    cores_used_avg: float
    cores_used_peak: float


def plan_workers(w: Workload, p: Planning, inputs: Inputs, app: Config) -> WorkerPlan:
    inputs.require("worker.msgs_per_s", "worker.process_rss_mb")
    measured = inputs.get("worker.msgs_per_s")
    planned = measured * (1 - p.headroom)
    by_rate = pods_for(w.messages_per_s, planned)
    at_peak = pods_for(w.peak_messages_per_s, planned)
    floor = max(WORKER_AVAILABILITY_FLOOR, by_rate)
    ceiling = max(floor, at_peak, pods_for(w.peak_messages_per_s * (1 + p.surge), planned))
    bounds = ordered([
        Bound("availability floor", WORKER_AVAILABILITY_FLOOR,
              "a worker restarting or rolling out never leaves chat.persist unconsumed"),
        Bound("stored messages/s per worker", by_rate,
              f"{w.messages_per_s:,.0f} messages/s / {planned:,.0f} per worker ({measured:,.0f} measured, less "
              f"{p.headroom:.0%}); the peak's {w.peak_messages_per_s:,.0f}/s needs {at_peak}, added by the "
              "operator on chat.persist's depth"),
    ])
    excess = w.peak_messages_per_s - floor * planned
    reaction = p.poll_seconds + QueueModel().startup_seconds
    buffer = app.worker_channel_capacity / excess if excess > 0 else None
    notes = []
    if buffer is not None:
        late = buffer < reaction
        notes.append(f"if the peak comes as a step, the floor's {floor} workers carry {floor * planned:,.0f}/s planned "
                     f"and the rest fills chat.persist (PARLEY_WORKER_CAPACITY {app.worker_channel_capacity:,}) in "
                     f"{buffer:.0f} s; a new worker takes ~{reaction:.0f} s (a poll + start-up)"
                     + (f": senders would get `busy` meanwhile (raise minReplicas to {at_peak} if peaks come as "
                        "steps)" if late else ""))
    rss = inputs.get("worker.process_rss_mb")
    request = mib_request(rss * MEMORY_REQUEST_FACTOR)
    workers_at_peak = max(floor, at_peak)
    try:
        used_avg = floor * worker_cores(w.messages_per_s / floor, inputs)
        used_peak = workers_at_peak * worker_cores(w.peak_messages_per_s / workers_at_peak, inputs)
    except MissingInputs:
        used_avg = used_peak = math.nan
    tier = Tier("worker pods", floor, ceiling, floor * CORES_PER_WORKER_POD, floor * request, bounds, notes)
    return WorkerPlan(tier, planned, workers_at_peak, floor_2sf(planned * QUEUE_TARGET_SECONDS), request,
                      int(request * MEMORY_LIMIT_FACTOR), buffer, reaction, used_avg, used_peak)


@dataclass(frozen=True)
class RedisLoad:
    commands_per_s: float
    pushes_per_s: float
    persist_commands_per_s: float  # chat.persist's sends and receives: all on one shard
    acks_per_s: float


def redis_load(messages: float, mix: tuple[tuple[float, float], ...], protocol_pods: int, workers: int,
               app: Config) -> RedisLoad:
    per_worker = batching(messages / workers, app) if workers else Batching(0, 0, 0)
    receives = per_worker.receives_per_s * workers
    batches = per_worker.batches_per_s * workers
    # After a batch, one ack PUBLISH per protocol process with senders in it.
    acks = batches * distinct_pods(protocol_pods, per_worker.mean_batch)
    total = sum(share for _, share in mix)
    room_pushes = messages * sum(share * distinct_pods(protocol_pods, size) for size, share in mix) / total
    return RedisLoad(messages * COMMANDS_PER_MESSAGE + receives + acks, room_pushes + acks, messages + receives, acks)


def redis_cores(load: RedisLoad, inputs: Inputs) -> tuple[float, float, float]:
    """(commands' cores, pushes' cores, chat.persist's cores)."""
    per_command = 1 / inputs.get("redis.commands_per_s_per_core")
    return (load.commands_per_s * per_command, load.pushes_per_s / inputs.get("redis.pushes_per_s_per_core"),
            load.persist_commands_per_s * per_command)


def shards_for(load: RedisLoad, p: Planning, inputs: Inputs) -> tuple[int, str, str]:
    """(shards, what limits them, the arithmetic). Each shard may use `1 - headroom` of its core;
    chat.persist's shard also carries every send and receive, so the rooms' share it has left is
    smaller: n = ceil((all - persist) / (usable - persist))."""
    commands, pushes, persist = redis_cores(load, inputs)
    usable = 1 - p.headroom
    if persist >= usable:
        return 0, "chat.persist's shard", (
            f"chat.persist's {load.persist_commands_per_s:,.0f} sends and receives/s alone need {persist:.2f} of a "
            f"core on its shard (> {usable:.2f}): more shards do not help")
    shards = max(1, math.ceil(round((commands + pushes - persist) / (usable - persist), 6)))
    if persist >= usable / 2:
        what = "chat.persist's shard"
    else:
        what = "pub/sub pushes" if pushes >= commands - persist else "commands"
    return shards, what, (
        f"{load.commands_per_s:,.0f} commands/s ({commands:.2f} cores) + {load.pushes_per_s:,.0f} pub/sub "
        f"pushes/s ({pushes:.2f} cores), each shard at <= {usable:.0%} of its core; chat.persist's shard also "
        f"carries its {load.persist_commands_per_s:,.0f} sends and receives/s ({persist:.2f} cores)")


@dataclass
class RedisPlan:
    tier: Tier
    peak: RedisLoad
    ceiling: RedisLoad
    average: RedisLoad


def plan_redis(w: Workload, p: Planning, inputs: Inputs, app: Config, protocol: ProtocolPlan,
               workers: WorkerPlan) -> RedisPlan:
    inputs.require("redis.commands_per_s_per_core", "redis.pushes_per_s_per_core")
    average = redis_load(w.messages_per_s, w.room_mix, protocol.tier.count, workers.tier.count, app)
    peak = redis_load(w.peak_messages_per_s, w.room_mix, protocol.tier.count, workers.peak_workers, app)
    top = redis_load(w.peak_messages_per_s * (1 + p.surge), w.room_mix, protocol.tier.ceiling,
                     workers.tier.ceiling, app)
    at_peak, what_peak, why_peak = shards_for(peak, p, inputs)
    at_top, what_top, why_top = shards_for(top, p, inputs)
    if not at_top:
        raise CannotSize(f"at the ceilings {why_top}")
    bounds = [
        Bound(f"{what_top} at the ceilings", at_top,
              f"{1 + p.surge:g}x the peak, {protocol.tier.ceiling} protocol pods, {workers.tier.ceiling} workers: "
              f"{why_top}"),
        Bound(f"{what_peak} at the plan's peak", at_peak,
              f"{protocol.tier.count} protocol pods, {workers.peak_workers} workers: {why_peak}"),
    ]
    notes = ["shards are fixed (adding one is a rolling restart): sized for what the scaled tiers' ceilings send",
             "not modelled: presence, typing and read frames, joins' subscriptions"]
    tier = Tier("Redis shards", at_top, at_top, at_top * CORES_PER_REDIS_SHARD, None, bounds, notes)
    return RedisPlan(tier, peak, top, average)


@dataclass
class PostgresPlan:
    rows_avg: float
    rows_peak: float
    statements_avg: float
    statements_peak: float
    connections: int
    notes: list[str]


def plan_postgres(w: Workload, app: Config, protocol: ProtocolPlan, workers: WorkerPlan) -> PostgresPlan:
    def statements(messages: float, count: int) -> float:
        return batching(messages / count, app).batches_per_s * count * STATEMENTS_PER_BATCH

    connections = (protocol.tier.ceiling * (app.protocol_db_connections + DJANGO_CONNECTIONS)
                   + workers.tier.ceiling * (app.store_connections + DJANGO_CONNECTIONS))
    avg = batching(w.messages_per_s / workers.tier.count, app)
    notes = [f"a batch of ~{avg.mean_batch:.0f} messages on average: {STATEMENTS_PER_BATCH} statements "
             "(chat.store_pg), each room's last_seq updated once per batch",
             f"max_connections >= {connections:,} at the ceilings: protocol pods x "
             f"(PARLEY_PROTOCOL_DB_CONNECTIONS {app.protocol_db_connections} + 1) + workers x "
             f"(PARLEY_STORE_CONNECTIONS {app.store_connections} + 1), plus the HTTP API's",
             "not modelled: reads (token lookups, joins, catch-ups, history), which come with connects, not messages"]
    return PostgresPlan(w.messages_per_s, w.peak_messages_per_s, statements(w.messages_per_s, workers.tier.count),
                        statements(w.peak_messages_per_s, workers.peak_workers), connections, notes)


@dataclass
class LocustPlan:
    tier: Tier
    users_per_process: float
    cores_per_process: float
    memory_per_process_mib: float


def plan_locust(w: Workload, inputs: Inputs) -> LocustPlan:
    inputs.require("locust.users_per_process", "locust.cpu_cores_per_1000_users", "locust.rss_mb_per_1000_users")
    per_process = inputs.get("locust.users_per_process")
    cpu, rss = inputs.get("locust.cpu_cores_per_1000_users"), inputs.get("locust.rss_mb_per_1000_users")
    processes = pods_for(w.users, per_process)
    ports = pods_for(w.users, EPHEMERAL_PORTS)
    bounds = ordered([
        Bound("users per Locust process", processes, f"{w.users:,} users / {per_process:,.0f} per process (measured)"),
        Bound("ephemeral ports", ports, f"one source address reaches one Service address:port through "
                                        f"{EPHEMERAL_PORTS:,} ports: <= that many users per Locust pod"),
    ])
    count = bounds[0].needs
    per = w.users / count
    tier = Tier("Locust workers", count, count, w.users / 1000 * cpu, w.users / 1000 * rss, bounds,
                ["one process per pod; plus the master (one process, no users)"])
    return LocustPlan(tier, per, per / 1000 * cpu, per / 1000 * rss)


@dataclass
class Plan:
    workload: Workload
    planning: Planning
    inputs: Inputs
    protocol: ProtocolPlan | None = None
    workers: WorkerPlan | None = None
    redis: RedisPlan | None = None
    postgres: PostgresPlan | None = None
    locust: LocustPlan | None = None
    unsized: dict[str, list[str]] = field(default_factory=dict)  # tier -> missing input keys, or why

    @property
    def platform_complete(self) -> bool:
        """Everything values-400k.yaml needs was sized."""
        return None not in (self.protocol, self.workers, self.redis, self.postgres)


def plan(w: Workload, p: Planning, inputs: Inputs, app: Config) -> Plan:
    out = Plan(w, p, inputs)
    try:
        out.protocol = plan_protocol(w, p, inputs)
    except MissingInputs as missing:
        out.unsized["protocol pods"] = missing.keys
    try:
        out.workers = plan_workers(w, p, inputs, app)
    except MissingInputs as missing:
        out.unsized["worker pods"] = missing.keys
    if out.protocol and out.workers:
        try:
            out.redis = plan_redis(w, p, inputs, app, out.protocol, out.workers)
        except MissingInputs as missing:
            out.unsized["Redis shards"] = missing.keys
        except CannotSize as why:
            out.unsized["Redis shards"] = [str(why)]
        out.postgres = plan_postgres(w, app, out.protocol, out.workers)
    else:
        out.unsized.setdefault("Redis shards", ["(needs the protocol and worker tiers)"])
        out.unsized.setdefault("PostgreSQL", ["(needs the protocol and worker tiers)"])
    try:
        out.locust = plan_locust(w, inputs)
    except MissingInputs as missing:
        out.unsized["Locust workers"] = missing.keys
    return out


def scale_steps(protocol: ProtocolPlan, workers: WorkerPlan, p: Planning, inputs: Inputs) -> tuple[int, int, str, str]:
    """scaling.maxScaleUpStep and maxScaleDownStep (shared by both tiers), with their reasons."""
    widest = max(protocol.tier.ceiling - protocol.tier.count, workers.tier.ceiling - workers.tier.count)
    up = max(1, math.ceil(widest / SCALE_UP_POLLS))
    # Pods removed at once drain: their sockets come back to the remaining pods within the jitter,
    # at no more than each pod's planned resume rate (k x T <= (P - k) x jitter x rate).
    rate = inputs.get("protocol.resume_per_s") * (1 - p.headroom)
    pods, target = protocol.tier.count, protocol.target_per_pod
    down = max(1, math.floor(pods * p.jitter_seconds * rate / (target + p.jitter_seconds * rate)))
    why_up = f"from the floor to the ceiling ({widest} pods at most) in {SCALE_UP_POLLS} polls"
    why_down = (f"removing {down} pods sends {down * target:,} sockets to the other {pods - down} within "
                f"{p.jitter_seconds:g} s: <= {rate:,.0f} resumes/s each ({inputs.get('protocol.resume_per_s'):,.0f} "
                "measured, less headroom)")
    return up, down, why_up, why_down
