"""`python -m parley_operator`: run the operator against the current cluster.

Credentials: PARLEY_KUBE_API_URL (e.g. `kubectl proxy`), else the in-cluster service account,
else KUBECONFIG / ~/.kube/config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

from parley_operator import handlers  # noqa: F401  (registers the handlers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parley_operator", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--peering", default=os.environ.get("PARLEY_OPERATOR_PEERING"),
                        help="kopf peering name for an active/standby pair (needs kopf's peering CRDs); "
                             "default: standalone single-replica mode")
    parser.add_argument("--priority", type=int, default=int(os.environ.get("PARLEY_OPERATOR_PRIORITY", "0")),
                        help="peering priority: the highest-priority live peer works, the others pause")
    parser.add_argument("--liveness", default=os.environ.get("PARLEY_OPERATOR_LIVENESS",
                                                             "http://0.0.0.0:8080/healthz"),
                        help="liveness endpoint for the operator's own pod ('' to disable)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("PARLEY_OPERATOR_METRICS_PORT", "0")),
                        help="serve the operator's Prometheus metrics on this port (0: off)")
    parser.add_argument("--log-format", choices=["json", "full", "plain"],
                        default=os.environ.get("PARLEY_OPERATOR_LOG_FORMAT", "json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["PARLEY_OPERATOR_METRICS_PORT"] = str(args.metrics_port)  # read by the startup handler
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()], log_refkey="object")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(kopf.operator(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
    ))


if __name__ == "__main__":
    main()
