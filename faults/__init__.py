"""Fault injection: real Parley processes, documented clients, faults, and a checker of the promise.

Parley promises (README, docs/reliability.md) that every message acked to its sender is stored
once and reaches every member of its room, live or through `resume`, with no gap in the room's
seq, whatever happens to a process, a pod, Redis or PostgreSQL. `faults.cases` runs one fault per
case against a `faults.cluster.Cluster`, with `faults.client.DocumentedClient`s sending numbered
messages, and `faults.checker` checks the promise after each case. `python -m faults` runs cases
or a soak; `tests/test_faults.py` runs every case in `make test`.
"""
