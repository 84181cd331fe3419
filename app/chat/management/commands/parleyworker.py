"""`manage.py parleyworker chat.persist chat.bot`: runworker with Parley's metrics and heartbeat."""

from channels.management.commands.runworker import Command as RunWorkerCommand

from chat.worker_server import ParleyWorker


class Command(RunWorkerCommand):
    worker_class = ParleyWorker
