"""Who the client is, behind proxies we trust and only those (`PARLEY_TRUSTED_PROXIES`).

`X-Forwarded-For` is a list each proxy appends to; only its right end was written by our own
ingress. Daphne's `--proxy-headers` takes the *first* entry from any peer, so any client could
name itself 127.0.0.1. Here the header is read only when the TCP peer is a trusted proxy, and the
client is the right-most address that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from functools import cache
from typing import Any

from parley.config import CONFIG

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def trusted_networks() -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in CONFIG.trusted_proxies)
    except ValueError as exc:
        raise SystemExit(f"PARLEY_TRUSTED_PROXIES: {exc}") from None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[v6]:port"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "v4:port"
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_trusted(host: str | None) -> bool:
    if not host:
        return False
    address = _address(host)
    return address is not None and any(address in net for net in trusted_networks())


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    values = [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]
    return ",".join(values) if values else None


def apply(scope: dict[str, Any]) -> None:
    """Rewrite `scope["client"]` (and the scheme) in place from trusted proxy headers."""
    networks = trusted_networks()
    client = scope.get("client")
    if not networks or not client or not is_trusted(client[0]):
        return
    forwarded = _header(scope, b"x-forwarded-for")
    if forwarded:
        hops = [h for h in (part.strip() for part in forwarded.split(",")) if h]
        chosen = None
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break  # garbage from before our proxies: stop at the last hop we could read
            chosen = address
            if not any(address in net for net in networks):
                break
        if chosen is not None:
            scope["client"] = (str(chosen), 0)
    proto = _header(scope, b"x-forwarded-proto")
    if proto:
        last = proto.split(",")[-1].strip().lower()
        if last in ("http", "https"):
            secure = last == "https"
            if scope["type"] == "websocket":
                scope["scheme"] = "wss" if secure else "ws"
            else:
                scope["scheme"] = last
