"""`migrate` that is safe to run from every pod at once (initContainers, Helm hooks).

On PostgreSQL it holds an advisory lock for the duration, so concurrent runs queue up instead of
racing on the same DDL; elsewhere (SQLite) it is plain `migrate`.

`--if-pending` is the protocol and worker pods' initContainer (parley_operator.resources): it
first asks the database which migrations of this image are not applied, without the lock. None
(the chart's hook Job ran them before the rollout, the usual case): it returns at once, so the
replacements of a rollout are not queued one by one behind the lock. Some (a first install whose
post-install Job has not run yet, an operator used without the chart): it takes the lock, asks
again (another pod or the Job may have applied them meanwhile) and applies what is still
pending. Either way no pod starts on a schema older than its code.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connection
from django.db.migrations.executor import MigrationExecutor

LOCK_ID = 0x5041524C  # "PARL"
# On a first install the pods start with the database (the built-in PostgreSQL's StatefulSet):
# the check waits this long for it, every 2 s, before failing (the kubelet then restarts the
# initContainer with its back-off, which grows to minutes: waiting here is faster).
DATABASE_WAIT_SECONDS = 120
DATABASE_RETRY_SECONDS = 2


def pending() -> list[str]:
    """The migrations of this code that the database has not applied, in order."""
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]


@contextlib.contextmanager
def migration_lock() -> Iterator[None]:
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [LOCK_ID])
        try:
            yield
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_ID])


def wait_for_database(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            connection.ensure_connection()
            return
        except OperationalError as exc:
            if time.monotonic() >= deadline:
                raise CommandError(f"the database did not answer within {seconds:g}s: {exc}") from None
            time.sleep(DATABASE_RETRY_SECONDS)


class Command(BaseCommand):
    help = "Apply migrations under a PostgreSQL advisory lock."

    def add_arguments(self, parser):
        parser.add_argument("--if-pending", action="store_true",
                            help="only check, without the lock, unless migrations are pending (initContainers)")

    def handle(self, *args, **options):
        verbosity = options["verbosity"]
        if options["if_pending"]:
            wait_for_database(DATABASE_WAIT_SECONDS)
            todo = pending()
            if not todo:
                self.stdout.write("migrations: none pending")
                return
            self.stdout.write(f"migrations: {len(todo)} pending ({', '.join(todo[:3])}"
                              f"{', ...' if len(todo) > 3 else ''}): applying them under the lock")
        with migration_lock():
            if options["if_pending"] and not pending():
                self.stdout.write("migrations: applied meanwhile by another run")
                return
            call_command("migrate", interactive=False, verbosity=verbosity)
