"""`migrate` that is safe to run from every pod at once (initContainers, Helm hooks).

On PostgreSQL it holds an advisory lock for the duration, so concurrent runs queue up instead of
racing on the same DDL; elsewhere (SQLite) it is plain `migrate`.
"""

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection

LOCK_ID = 0x5041524C  # "PARL"


class Command(BaseCommand):
    help = "Apply migrations under a PostgreSQL advisory lock."

    def handle(self, *args, **options):
        if connection.vendor != "postgresql":
            call_command("migrate", interactive=False, verbosity=options["verbosity"])
            return
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [LOCK_ID])
            try:
                call_command("migrate", interactive=False, verbosity=options["verbosity"])
            finally:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_ID])
