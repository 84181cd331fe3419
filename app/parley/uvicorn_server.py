"""`PARLEY_SERVER=uvicorn parley protocol`: uvicorn with the limits of `parley.config`.

The same limits as `parley.daphne_server` applies to Daphne: the largest client frame, the
client frames queued per socket, and no proxy headers taken by the server itself
(`parley.proxies` reads them, from trusted proxies only). Other options come from the command
line or uvicorn's own `UVICORN_*` variables.
"""

from __future__ import annotations

import sys

import uvicorn.main

from parley.config import CONFIG


def main(argv: list[str]) -> None:
    from chat import admin

    admin.enable()
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
