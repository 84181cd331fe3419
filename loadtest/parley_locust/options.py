"""The load test's command-line options (Locust forwards them from the master to its workers, and
shows them in the web UI). Every option also reads an environment variable, for the chart."""

from __future__ import annotations

from typing import Any

# The default profile, modelled on a chat service (docs/loadtest.md): most users idle in their
# rooms and read; some chat in groups, some in DMs, a few with the bot.
DEFAULT_MIX = "idle=80,group=12,dm=5,bot=3"
# Messages per minute of a chatting user: with a fifth of the users chatting, one message per
# user per minute on average, the rate docs/operations.md sizes 400,000 users for.
DEFAULT_MESSAGE_RATE = 5.0


def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("Parley", "Parley's WebSocket load test (loadtest/locustfile.py)")
    group.add_argument("--token-file", env_var="PARLEY_LT_TOKEN_FILE", default="var/loadtest/users.jsonl",
                       help="users file written by `bin/parley manage loadtest_users` (JSON Lines, one user per line)")
    group.add_argument("--login", env_var="PARLEY_LT_LOGIN", default="",
                       help="without a users file: <username prefix>:<password> of existing accounts "
                            "(<prefix>0000000, <prefix>0000001, ...), logged in over the HTTP API")
    group.add_argument("--mix", env_var="PARLEY_LT_MIX", default=DEFAULT_MIX,
                       help="share of users per behaviour: idle, group, dm, bot (percent, comma-separated)")
    group.add_argument("--message-rate", env_var="PARLEY_LT_MESSAGE_RATE", type=float, default=DEFAULT_MESSAGE_RATE,
                       help="messages per minute of each chatting user (group, dm, bot)")
    group.add_argument("--reconnects-per-hour", env_var="PARLEY_LT_RECONNECTS_PER_HOUR", type=float, default=2.0,
                       help="how often each user drops its socket, reconnects and resumes its rooms")
    group.add_argument("--history-per-hour", env_var="PARLEY_LT_HISTORY_PER_HOUR", type=float, default=1.0,
                       help="how often each user reads a page of a room's history")
    group.add_argument("--delivery-sample", env_var="PARLEY_LT_DELIVERY_SAMPLE", type=int, default=10,
                       help="every Nth delivery goes into Locust's statistics (`delivery 1/N`); all are checked")
    group.add_argument("--source-addresses", env_var="PARLEY_LT_SOURCE_ADDRESSES", default="",
                       help="local addresses to connect from, e.g. 127.0.0.2-127.0.0.9: each has ~28,000 ports "
                            "per server address (empty: the system picks)")
    group.add_argument("--target-users", env_var="PARLEY_LT_TARGET_USERS", type=int, default=0,
                       help="users to ramp to (default: -u/--users)")
    group.add_argument("--ramp-rate", env_var="PARLEY_LT_RAMP_RATE", type=float, default=0.0,
                       help="users started per second, all workers together (default: -r/--spawn-rate)")
    group.add_argument("--hold-seconds", env_var="PARLEY_LT_HOLD_SECONDS", type=float, default=60.0,
                       help="seconds at the target before the check and the ramp-down")
    group.add_argument("--settle-seconds", env_var="PARLEY_LT_SETTLE_SECONDS", type=float, default=30.0,
                       help="at the end, how long users may take to get their last acks and resume every room")
    group.add_argument("--min-connect-success", env_var="PARLEY_LT_MIN_CONNECT_SUCCESS", type=float, default=0.999,
                       help="threshold: share of connects that must succeed")
    group.add_argument("--max-delivery-p99-ms", env_var="PARLEY_LT_MAX_DELIVERY_P99_MS", type=float, default=1000.0,
                       help="threshold: p99 of the end-to-end delivery latency")
    group.add_argument("--max-error-frames", env_var="PARLEY_LT_MAX_ERROR_FRAMES", type=int, default=0,
                       help="threshold: error frames allowed (all codes)")
