"""A TCP proxy on loopback that can add latency, stall or reset its connections, or refuse new ones.

Put in front of a Redis shard or PostgreSQL, it is the network between Parley's processes and
that backend: what a flaky switch, a full conntrack table or a failover does to a connection,
without root or `tc`. It runs its own event loop in a thread, so a busy harness loop never skews
the faults it injects, and every control method is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from concurrent.futures import Future
from typing import Any

# Bytes read per chunk: what one recv on loopback typically returns; a larger frame is forwarded
# in several chunks (each delayed by the same latency, so order holds).
CHUNK = 65536


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listen_port = listen_port
        self.latency_s = 0.0
        self.stalled = False  # bytes are held, connections stay open (a half-open path)
        self.refusing = False  # new connections are closed at once (the backend is "down")
        self.accepted = 0
        self.resets = 0
        self._links: set[_Link] = set()
        self._resume = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def port(self) -> int:
        return self.listen_port

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen()).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # Faults (any thread).

    def set_latency(self, seconds: float) -> None:
        """Each chunk, each way, is forwarded `seconds` after it arrived (order is kept)."""
        self._loop.call_soon_threadsafe(setattr, self, "latency_s", seconds)

    def stall(self) -> None:
        """Stop forwarding, both ways, on every connection (new ones too): sockets stay open and
        silent, as behind a dead switch. Only a timeout on the client side notices."""
        self._loop.call_soon_threadsafe(self._set_stalled, True)

    def unstall(self) -> None:
        self._loop.call_soon_threadsafe(self._set_stalled, False)

    def reset_all(self) -> int:
        """Abort every open connection with a TCP RST (mid-stream, whatever was in flight)."""
        return self._call(self._reset_all()).result(10)

    def blackhole_existing(self) -> int:
        """Every open connection goes silent for good (bytes dropped, sockets left open), while new
        connections work: a half-open path, as after a NAT or load-balancer state flush. Only the
        client's own timeouts or pings can tell."""
        return self._call(self._blackhole()).result(10)

    def upstream_ports(self) -> list[int]:
        """The local ports of the proxy's open connections to its target: how the target (say,
        PostgreSQL's pg_stat_activity.client_port) tells the proxied clients from everyone else."""
        return self._call(self._upstream_ports()).result(10)

    def refuse(self, on: bool = True) -> None:
        """While on, a new connection is reset as soon as it is accepted."""
        self._loop.call_soon_threadsafe(setattr, self, "refusing", on)

    def heal(self) -> None:
        """Back to a plain proxy (latency 0, forwarding, accepting)."""
        self._loop.call_soon_threadsafe(self._heal)

    # Internals (the proxy's loop).

    def _call(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _set_stalled(self, on: bool) -> None:
        self.stalled = on
        if on:
            self._resume.clear()
        else:
            self._resume.set()

    def _heal(self) -> None:
        self.latency_s = 0.0
        self.refusing = False
        self._set_stalled(False)

    async def _listen(self) -> None:
        self._resume.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _reset_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self.resets += len(links)
        return len(links)

    async def _upstream_ports(self) -> list[int]:
        ports = []
        for link in self._links:
            name = link.writers[1].get_extra_info("sockname")
            if name:
                ports.append(name[1])
        return ports

    async def _blackhole(self) -> int:
        for link in self._links:
            link.dead = True
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            _abort(writer)
            return
        link = _Link(self, writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(link.pump(reader, up_writer), link.pump(up_reader, writer))
        finally:
            self._links.discard(link)
            link.close()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers = (client, upstream)
        self.dead = False  # black-holed: reads go on, nothing is forwarded ever again

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                arrived = loop.time()
                if self.dead:
                    continue
                while self.proxy.stalled:
                    await self.proxy._resume.wait()
                delay = self.proxy.latency_s - (loop.time() - arrived)
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close()

    def reset(self) -> None:
        for writer in self.writers:
            _abort(writer)

    def close(self) -> None:
        for writer in self.writers:
            if not writer.is_closing():
                writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: the peer sees ECONNRESET mid-stream, as after a middlebox drop."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
