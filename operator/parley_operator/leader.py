"""Leader election on a coordination.k8s.io Lease: one operator writes, the others wait.

kopf's peering is not a leader election: peers with equal priorities all pause, and a peer
that appears with a higher priority starts before the others have paused. This is client-go's
`leaderelection` instead, with its default timings:

* a candidate takes the Lease when it has no holder, or when the record it saw has not changed
  for `lease_duration` by the candidate's own clock (clocks of two nodes never get compared);
* the leader renews every `retry_period`; every write of the Lease is guarded by the
  resourceVersion it read, so of two candidates only one wins;
* the leader stops writing `renew_deadline` after its last successful renewal began, which is
  `lease_duration - renew_deadline` before anyone else may take over. `may_write()` is that
  fence: the operator's API client refuses to write once it is False, and the process exits
  (the kubelet restarts it as a candidate) rather than run on without the Lease;
* a leader that shuts down cleanly releases the Lease, so a standby takes over within one
  `retry_period` instead of a whole `lease_duration`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from parley_operator.kube import Conflict, Kube, KubeError, NotFound, path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    # client-go's defaults (LeaseDuration 15 s, RenewDeadline 10 s, RetryPeriod 2 s): a dead
    # leader is replaced within ~15 s; the 5 s between the deadline and the expiry cover a
    # write that was already under way when the leader lost the Lease.
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")

    @classmethod
    def for_lease(cls, lease_duration: float) -> Timing:
        """client-go's proportions (15 : 10 : 2) for another lease duration."""
        return cls(lease_duration, lease_duration * 2 / 3, lease_duration * 2 / 15)


DEFAULT_TIMING = Timing()
# A failed Lease request to retry rather than crash on: the API server is away for a moment.
_TRANSIENT = (KubeError, aiohttp.ClientError, OSError, TimeoutError)


def default_identity() -> str:
    """The pod's name (unique among live pods) and a random part (unique across restarts)."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(moment: float) -> str:
    # metav1.MicroTime, the type of a Lease's acquireTime and renewTime.
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str | None = None,
                 timing: Timing = DEFAULT_TIMING, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.url = path("coordination.k8s.io/v1", "leases", namespace)
        self.name = name
        self.identity = identity or default_identity()
        self.timing = timing
        self._clock = clock
        self._observed: tuple[Any, ...] | None = None  # the Lease's spec as last seen
        self._observed_at = 0.0  # our clock when it last changed
        self._renewed_at: float | None = None  # our clock when our last successful write began

    def leading(self) -> bool:
        """Whether this process may write now: within renew_deadline of its last renewal."""
        return self._renewed_at is not None and self._clock() < self._renewed_at + self.timing.renew_deadline

    async def try_acquire_or_renew(self) -> bool:
        started = self._clock()
        try:
            lease = await self.kube.get(f"{self.url}/{self.name}")
        except NotFound:
            return await self._write(None, self._spec(None, started), started)
        spec = lease.get("spec") or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseDurationSeconds"),
                  spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, started
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
        if holder and holder != self.identity and started < self._observed_at + duration:
            self._renewed_at = None  # someone else holds a live Lease
            return False
        return await self._write(lease, self._spec(spec, started), started)

    def _spec(self, current: dict[str, Any] | None, started: float) -> dict[str, Any]:
        now = _micro_time(time.time())
        current = current or {}
        ours = current.get("holderIdentity") == self.identity
        transitions = int(current.get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.timing.lease_duration),
            "acquireTime": current.get("acquireTime") if ours and current.get("acquireTime") else now,
            "renewTime": now,
            "leaseTransitions": transitions if ours or not current else transitions + 1,
        }

    async def _write(self, lease: dict[str, Any] | None, spec: dict[str, Any], started: float) -> bool:
        try:
            if lease is None:
                await self.kube.create(self.url, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name}, "spec": spec})
            else:
                # Guarded by the version we read: of two candidates writing at once, one fails.
                await self.kube.json_patch(f"{self.url}/{self.name}", [
                    {"op": "test", "path": "/metadata/resourceVersion",
                     "value": lease["metadata"]["resourceVersion"]},
                    {"op": "replace", "path": "/spec", "value": spec},
                ])
        except Conflict:
            return False  # another candidate wrote first
        except KubeError as exc:
            if exc.status == 422:  # the resourceVersion test failed: the same race
                return False
            raise
        self._renewed_at = started
        self._observed = (spec["holderIdentity"], spec["renewTime"], spec["leaseDurationSeconds"],
                          spec["leaseTransitions"])
        self._observed_at = started
        return True

    async def acquire(self) -> None:
        """Wait until this process holds the Lease."""
        announced = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("acquired Lease %s as %s", self.name, self.identity)
                    return
            except _TRANSIENT as exc:
                log.warning("cannot read or write Lease %s: %s", self.name, exc)
            if not announced:
                log.info("standing by: Lease %s is held by another operator", self.name)
                announced = True
            await asyncio.sleep(self.timing.retry_period)

    async def hold(self) -> None:
        """Renew until the Lease is lost (taken, or not renewed for renew_deadline); then return."""
        while True:
            await asyncio.sleep(self.timing.retry_period)
            try:
                if not await self.try_acquire_or_renew():
                    log.error("Lease %s was taken by another operator", self.name)
                    return
            except _TRANSIENT as exc:
                log.warning("cannot renew Lease %s: %s", self.name, exc)
            if not self.leading():
                log.error("Lease %s not renewed for %gs: stepping down", self.name, self.timing.renew_deadline)
                return

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby need not wait for it to expire."""
        if not self.leading():
            return
        self._renewed_at = None  # no more writes from here, even if the release fails
        try:
            lease = await self.kube.get(f"{self.url}/{self.name}")
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            await self.kube.json_patch(f"{self.url}/{self.name}", [
                {"op": "test", "path": "/metadata/resourceVersion", "value": lease["metadata"]["resourceVersion"]},
                {"op": "replace", "path": "/spec/holderIdentity", "value": ""},
                {"op": "replace", "path": "/spec/leaseDurationSeconds", "value": 1},
            ])
            log.info("released Lease %s", self.name)
        except _TRANSIENT as exc:
            log.warning("cannot release Lease %s (a standby takes over when it expires): %s", self.name, exc)


# The elector of this process, if it runs with leader election; None: standalone, always writes.
_ELECTOR: LeaderElector | None = None


def install(elector: LeaderElector | None) -> None:
    global _ELECTOR
    _ELECTOR = elector


def may_write() -> bool:
    """The fence the operator's API client checks before every write."""
    return _ELECTOR is None or _ELECTOR.leading()
