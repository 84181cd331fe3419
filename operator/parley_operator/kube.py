"""A small asyncio Kubernetes client for the children, built on kopf's ConnectionInfo.

kopf authenticates its own watches; the handlers need to create and patch Deployments,
Services, PDBs and pods. Rather than a second client library with its own idea of the
credentials, this one reuses the very ConnectionInfo the login handler gave kopf (TLS context,
token, client certificate), so kopf and the handlers always talk to the same API server as the
same identity.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
import kopf

log = logging.getLogger(__name__)

# `kubectl proxy` (or a test API server) on loopback: plain HTTP, no credentials needed.
API_URL_ENV = "PARLEY_KUBE_API_URL"


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class NotLeader(Exception):
    """A write refused because this process no longer holds the leader Lease (`leader.py`).
    Not a KubeError: nothing may catch it as "this child failed" and carry on writing."""


# Names this process in the API server's audit log: with a standby, which replica wrote.
USER_AGENT = f"parley-operator ({os.environ.get('POD_NAME') or socket.gethostname()})"


def login(settings: kopf.OperatorSettings | None = None) -> kopf.ConnectionInfo:
    """Credentials in order: PARLEY_KUBE_API_URL, in-cluster service account, kubeconfig."""
    settings = settings or kopf.OperatorSettings()
    url = os.environ.get(API_URL_ENV)
    if url:
        return kopf.ConnectionInfo(server=url.rstrip("/"), default_namespace="default")
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError(f"no credentials: set KUBECONFIG, run in a pod, or set {API_URL_ENV}")
    return info


def path(api_version: str, plural: str, namespace: str | None = None,
         name: str | None = None, subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class Kube:
    def __init__(self, login_fn: Callable[[], kopf.ConnectionInfo] = login,
                 may_write: Callable[[], bool] | None = None) -> None:
        self._login = login_fn
        self._may_write = may_write  # None: always (the Lease's own client, standalone mode)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self.closed = False

    def _connect(self) -> aiohttp.ClientSession:
        if self.closed:
            raise KubeError(0, "the client is closed: the operator is shutting down")
        if self._session is None:
            info = self._login()
            self._server = info.server.rstrip("/")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=20),
                headers={**info.as_http_headers(), "User-Agent": USER_AGENT},
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def _disconnect(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def close(self) -> None:
        self.closed = True
        await self._disconnect()

    async def request(self, method: str, url: str, *, body: Any = None,
                      content_type: str = "application/json", params: Mapping[str, str] | None = None) -> Any:
        if method != "GET" and self._may_write is not None and not self._may_write():
            raise NotLeader(f"{method} {url}: this operator does not hold the leader Lease")
        for attempt in (1, 2):
            session = self._connect()
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            async with session.request(method, self._server + url, data=data, headers=headers,
                                       params=params) as rsp:
                text = await rsp.text()
                if rsp.status == 401 and attempt == 1:
                    # Service-account tokens rotate: log in again once with fresh credentials.
                    await self._disconnect()
                    continue
                if rsp.status >= 400:
                    message = text
                    try:
                        message = json.loads(text).get("message", text)
                    except ValueError:
                        pass
                    cls = NotFound if rsp.status == 404 else Conflict if rsp.status == 409 else KubeError
                    raise cls(rsp.status, f"{method} {url}: {message}")
                return json.loads(text) if text else None
        raise AssertionError("unreachable")

    async def get(self, url: str) -> dict[str, Any]:
        return await self.request("GET", url)

    async def list(self, url: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", url, params=params)
        return list(result.get("items") or [])

    async def create(self, url: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", url, body=obj)

    async def merge_patch(self, url: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", url, body=patch, content_type="application/merge-patch+json")

    async def json_patch(self, url: str, ops: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return await self.request("PATCH", url, body=list(ops), content_type="application/json-patch+json")
