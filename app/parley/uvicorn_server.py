"""`PARLEY_SERVER=uvicorn parley protocol`: uvicorn with the limits of `parley.config`.

The same limits as `parley.daphne_server` applies to Daphne: the largest client frame, the
client frames queued per socket, and no proxy headers taken by the server itself
(`parley.proxies` reads them, from trusted proxies only). Other options come from the command
line or uvicorn's own `UVICORN_*` variables.
"""

from __future__ import annotations

import logging
import re
import sys

import uvicorn.main

from parley.config import CONFIG

# A query parameter whose value is a credential (`/ws/?token=...`, docs/protocol.md).
TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"]*")


class RedactTokens(logging.Filter):
    """uvicorn logs every WebSocket handshake at INFO on `uvicorn.error`, with the path and its
    query string: a bearer token in each line (`--no-access-log` does not cover these). Blank
    it, as Daphne's access log never shows the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(TOKEN_IN_QUERY.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


def main(argv: list[str]) -> None:
    from chat import admin

    admin.enable()
    # Kept through uvicorn's own logging set-up (dictConfig leaves a logger's filters alone).
    logging.getLogger("uvicorn.error").addFilter(RedactTokens())
    args = [
        "parley.asgi:application",
        "--ws-max-size", str(CONFIG.ws_max_bytes),
        "--ws-max-queue", str(CONFIG.inbox_frames),
        "--no-proxy-headers",
        "--lifespan", "off",
        "--no-access-log",
        *argv,
    ]
    uvicorn.main.main(args=args, prog_name="uvicorn", auto_envvar_prefix="UVICORN")


if __name__ == "__main__":
    main(sys.argv[1:])
