"""One Locust process's shared state, and the master's view of every process.

- Each process (a worker, or a local run) hands its users the records of its share of the users
  file (`UsersPool`: worker index `w` of `n` takes records `w, w + n, ...`, streamed so that a
  worker holds only its slice of 400,000 users), counts what its users see (`ledger.Totals`) and
  reports the counts to the master with Locust's `report_to_master` every few seconds.
- The end of a run is a check, run everywhere at once: the shape tells every process to verify
  (`parley_verify`); users stop sending, wait for their last acks, resume every room and settle
  what is missing; each process then sends its final counts (`parley_verified`). The shape ramps
  down only when every process has answered (or the settle time is over), so the verdict reads
  final figures, not the last periodic report.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import resource
import secrets
import time
from typing import Any

import gevent
from gevent.lock import Semaphore

from parley_locust.ledger import Totals
from parley_locust.login import log_in, parse_login
from parley_locust.mix import parse_mix
from parley_locust.users_file import UserRecord, iter_users, read_header

log = logging.getLogger("parley.loadtest")

VERIFY = "parley_verify"
VERIFIED = "parley_verified"
# The periodic report's key in Locust's worker -> master stats message.
REPORT_KEY = "parley"
# Files a process keeps beside its users' sockets (logs, zmq, the users file, Python's own).
FD_SLACK = 200
# Source addresses given as a range: more than a /16 of loopback is surely a typo.
MAX_SOURCE_ADDRESSES = 65536


def parse_addresses(text: str) -> list[str]:
    """`127.0.0.2-127.0.0.9`, `127.0.1.0/24` or `a,b,c` -> the addresses; [] for empty."""
    found: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part:
            first, last = (ipaddress.ip_address(p.strip()) for p in part.split("-", 1))
            if int(last) < int(first) or int(last) - int(first) >= MAX_SOURCE_ADDRESSES:
                raise ValueError(f"--source-addresses: {part!r} is not a range of at most {MAX_SOURCE_ADDRESSES}")
            found.extend(str(ipaddress.ip_address(n)) for n in range(int(first), int(last) + 1))
        elif "/" in part:
            network = ipaddress.ip_network(part, strict=False)
            if network.num_addresses > MAX_SOURCE_ADDRESSES:
                raise ValueError(f"--source-addresses: {part!r} holds more than {MAX_SOURCE_ADDRESSES} addresses")
            found.extend(str(a) for a in (network.hosts() if network.num_addresses > 2 else network))
        else:
            found.append(str(ipaddress.ip_address(part)))
    return found


class UsersPool:
    """This process's records, handed out one per started user and taken back when it stops."""

    def __init__(self, path: str, share: int, shares: int) -> None:
        self.path = path
        self.header = read_header(path)
        self.free: list[UserRecord] = list(iter_users(path, share=share, shares=shares))
        self.free.reverse()  # pop() hands out the lowest index first
        self.share, self.shares = share, shares
        if not self.free:
            raise ValueError(f"{path}: no users for share {share} of {shares} ({self.header.get('count')} in the file)")

    def take(self) -> UserRecord:
        if not self.free:
            raise RuntimeError(
                f"{self.path}: share {self.share} of {self.shares} has no free users left: mint more "
                f"(bin/parley manage loadtest_users --count N) or start fewer users")
        return self.free.pop()

    def give_back(self, record: UserRecord) -> None:
        self.free.append(record)


class Coordinator:
    def __init__(self, environment: Any) -> None:
        self.environment = environment
        options = environment.parsed_options
        self.options = options
        self.mix = parse_mix(options.mix)
        self.addresses = parse_addresses(options.source_addresses)
        self.totals = Totals()
        self.rng = random.Random()
        # In every client_msg_id: a user's ids must be new across runs and Locust processes too
        # (Parley answers a reused id with another body `conflict`).
        self.run_tag = secrets.token_hex(4)
        self.sampled = 0  # deliveries seen, for the 1-in-N sample
        self.verifying = False
        # The users of this process that are up (started, not stopped), and whether each has done
        # its end-of-run check: the process reports when every one of them has.
        self.users: dict[int, bool] = {}
        self._pool: UsersPool | None = None
        self.logged_in = 0  # users logged in so far (--login)
        self._pool_lock = Semaphore()
        # Master (or local run): the final counts of each process, by node id.
        self.final: dict[str, dict[str, object]] = {}
        self.periodic: dict[str, dict[str, object]] = {}

    # --- users ----------------------------------------------------------------------------------

    def share(self) -> tuple[int, int]:
        """(this process's share, shares): worker `w` of `--expect-workers` takes users w, w + n, ...
        A worker that restarts mid-run gets a new index from the master, so it takes the same
        share as a live one: the same users, twice (Parley allows a user several sockets)."""
        runner = self.environment.runner
        shares = max(1, int(getattr(self.options, "expect_workers", 1) or 1)) if _is_worker(runner) else 1
        return max(0, getattr(runner, "worker_index", 0)) % shares, shares

    def take_user(self) -> UserRecord:
        """A record for a starting user: from the users file, or logged in (`--login`)."""
        if self.options.login:
            prefix, password = parse_login(self.options.login)
            share, shares = self.share()
            index = share + shares * self.logged_in
            self.logged_in += 1
            host = (self.environment.host or "").split(",")[0].strip()
            return log_in(host, prefix, password, index)
        return self.pool().take()

    def give_back(self, record: UserRecord) -> None:
        if self._pool is not None:
            self._pool.give_back(record)

    def pool(self) -> UsersPool:
        with self._pool_lock:  # the first users start together: read the file once
            if self._pool is None:
                share, shares = self.share()
                self._pool = UsersPool(self.options.token_file, share, shares)
                log.info("users file %s: %d users for share %d of %d", self.options.token_file,
                         len(self._pool.free), share, shares)
                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                if len(self._pool.free) + FD_SLACK > soft:
                    # A socket per user: past the limit, connects fail with EMFILE.
                    log.warning("this process may start %d users but may open %d files: raise the hard "
                                "limit (ulimit -Hn) or add workers", len(self._pool.free), soft)
            return self._pool

    def source_address(self, index: int) -> str | None:
        return self.addresses[index % len(self.addresses)] if self.addresses else None

    # --- the end-of-run check -------------------------------------------------------------------

    def start_verify(self) -> None:
        """(Every process.) Users stop sending and check their rooms; report when all are done."""
        if self.verifying:
            return
        self.verifying = True
        gevent.spawn(self._report_when_verified)

    def unverified(self) -> int:
        return sum(1 for done in self.users.values() if not done)

    def _report_when_verified(self) -> None:
        deadline = time.monotonic() + self.options.settle_seconds + 10
        while self.unverified() and time.monotonic() < deadline:
            gevent.sleep(0.2)
        if self.unverified():
            log.warning("%d users did not finish their check in time", self.unverified())
            self.totals.add_error("unverified", self.unverified())
        self.environment.runner.send_message(VERIFIED, self.totals.as_dict())

    def on_verified(self, node: str, totals: dict[str, object]) -> None:
        """(Master or local.) A process's final counts."""
        self.final[node] = totals

    def expected_nodes(self) -> int:
        runner = self.environment.runner
        if hasattr(runner, "clients"):  # master: the workers that are up
            return max(1, len(runner.clients.ready) + len(runner.clients.spawning) + len(runner.clients.running))
        return 1

    def summary(self) -> dict[str, object]:
        """The run's counts: final ones where every process answered, else the latest reports."""
        if self.final:
            return Totals.summed(list(self.final.values()))
        if self.periodic:
            return Totals.summed(list(self.periodic.values()))
        return self.totals.as_dict()


def _is_worker(runner: Any) -> bool:
    return type(runner).__name__ == "WorkerRunner"


_COORDINATORS: dict[int, Coordinator] = {}


def coordinator(environment: Any) -> Coordinator:
    """This process's coordinator (one per Locust environment)."""
    found = _COORDINATORS.get(id(environment))
    if found is None:
        found = _COORDINATORS[id(environment)] = Coordinator(environment)
    return found
