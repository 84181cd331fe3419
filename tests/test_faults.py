"""Every fault case (faults/cases.py, docs/reliability.md) against real processes: the promise holds.

Each case starts its own cluster (two protocol processes, two workers, two Redis shards of its own
and the test database), runs numbered senders and documented clients through one fault, and checks
that every acked message was stored once and reached every member with no gap, no duplicate and no
reordering. The line each case prints is the one `python -m faults` prints.
"""

from __future__ import annotations

import json

import pytest

from faults.cases import CASES
from faults.cluster import Cluster
from faults.run import run_case
from tests import conftest

# PostgreSQL is the truth in every deployment; the faults are those of a deployment. (On SQLite the
# harness runs too, `python -m faults`, but two workers then take turns on one file.)
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("name", list(CASES))
def test_the_promise_holds_through(name: str) -> None:
    case = CASES[name]
    cluster = Cluster(conftest.test_database_url(), conftest.LOG_DIR / f"faults-{name}", shards=case.shards,
                      proxy_redis=case.proxy_redis, proxy_postgres=case.proxy_postgres, env=case.env)
    result = run_case(name, case.fault, cluster, case.traffic, setup=case.setup, verify=case.verify)
    print(result.line())
    assert result.ok, json.dumps(result.as_dict(), indent=1, default=str)
    assert result.acked > 0 and result.unacked == 0, result.line()
    # Every sender was served again soon after the fault ended: at worst (black-holed connections)
    # the time to notice a silent shard (PARLEY_REDIS_TIMEOUT 6 s and a ping interval), plus a
    # client's ack timeout (3 s) and a reconnect.
    assert result.recovery_s is not None and result.recovery_s < 15, result.line()
