"""`python -m parley_operator`: run the operator against the current cluster.

Credentials: PARLEY_KUBE_API_URL (e.g. `kubectl proxy`), else the in-cluster service account,
else KUBECONFIG / ~/.kube/config.

With `--leader-election NAME` any number of replicas may run: the one holding the Lease NAME
(coordination.k8s.io) works, the others wait for it (leader.py). Without it, run exactly one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp.web
import kopf

from parley_operator import (
    handlers,  # noqa: F401  (registers the handlers)
    leader,
)
from parley_operator.kube import Kube

# How long a leader that lost its Lease waits for kopf to stop before exiting anyway. Its writes
# are already refused (the fence), so this only bounds a clean shutdown of the handlers.
STEP_DOWN_SECONDS = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parley_operator", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--leader-election", metavar="LEASE",
                        default=os.environ.get("PARLEY_OPERATOR_LEADER_ELECTION") or None,
                        help="elect one working replica through this Lease; default: off (run one replica)")
    parser.add_argument("--leader-election-namespace", default=os.environ.get("POD_NAMESPACE"),
                        help="namespace of the Lease (default: $POD_NAMESPACE, the operator's own)")
    parser.add_argument("--lease-duration", type=float,
                        default=float(os.environ.get("PARLEY_OPERATOR_LEASE_SECONDS", "15")),
                        help="seconds a standby waits for a silent leader (client-go's default 15; "
                             "the renew deadline and retry period keep client-go's proportions)")
    parser.add_argument("--liveness", default=os.environ.get("PARLEY_OPERATOR_LIVENESS",
                                                             "http://0.0.0.0:8080/healthz"),
                        help="liveness endpoint for the operator's own pod ('' to disable)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("PARLEY_OPERATOR_METRICS_PORT", "0")),
                        help="serve the operator's Prometheus metrics on this port (0: off)")
    parser.add_argument("--log-format", choices=["json", "full", "plain"],
                        default=os.environ.get("PARLEY_OPERATOR_LOG_FORMAT", "json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.leader_election and not args.leader_election_namespace:
        parser.error("--leader-election needs --leader-election-namespace or $POD_NAMESPACE")
    return args


@contextlib.asynccontextmanager
async def standby_liveness(url: str) -> AsyncIterator[None]:
    """Answer the liveness probe while waiting for the Lease (kopf serves it once leading)."""
    if not url:
        yield
        return
    parts = urlsplit(url)

    async def alive(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"standby": True})

    app = aiohttp.web.Application()
    app.router.add_get(parts.path or "/", alive)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, parts.hostname, parts.port or 80).start()
    try:
        yield
    finally:
        await runner.cleanup()  # before kopf binds the same port


async def run(args: argparse.Namespace) -> int:
    operator = functools.partial(
        kopf.operator,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        # Never kopf's peering: equal priorities freeze every peer, and it elects nobody.
        standalone=True,
        liveness_endpoint=args.liveness or None,
    )
    if not args.leader_election:
        await operator()
        return 0
    lease_kube = Kube()  # the Lease's own client: not fenced, it is what the fence is made of
    elector = leader.LeaderElector(lease_kube, args.leader_election_namespace, args.leader_election,
                                   timing=leader.Timing.for_lease(args.lease_duration))
    try:
        async with standby_liveness(args.liveness):
            await elector.acquire()
        leader.install(elector)
        stop = asyncio.Event()
        working = asyncio.create_task(operator(stop_flag=stop))
        holding = asyncio.create_task(elector.hold())
        await asyncio.wait({working, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding.done() and not working.done():
            # Lost the Lease: writes are refused already; stop, and exit non-zero so that the
            # kubelet restarts this pod as a candidate (as client-go's controllers do).
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(working, STEP_DOWN_SECONDS)
            return 1
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        await elector.release()
        working.result()  # re-raise what stopped kopf, if anything did
        return 0
    finally:
        await lease_kube.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["PARLEY_OPERATOR_METRICS_PORT"] = str(args.metrics_port)  # read by the startup handler
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()], log_refkey="object")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
