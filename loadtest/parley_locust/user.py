"""`ParleyUser`: one chat user speaking Parley's protocol, the way docs/protocol.md tells a client to.

It connects (token from the users file), joins its rooms, and lives by its plan (`mix.plan_for`):
idle users read; chatting users send at `--message-rate` per minute (Poisson arrivals). Now and
then it drops its socket, reconnects and `resume`s every room, or reads a page of history. Like
the documented client, it re-sends unacked messages with the same `client_msg_id` after an error
or a reconnect, obeys `reconnect` (a draining server) and backs off with jitter.

What users feel goes into Locust's statistics, as requests of type `WS`: `connect` (to `hello`),
`join`, `ack` (send to ack), `delivery 1/N` (send timestamp in the body to arrival, every Nth
delivery), `resume` (reconnect to the last `resumed`), `history`. Error frames are failures named
`error <code>`, and what breaks the promise (gaps, duplicates, lost messages) failures of their own.
"""

from __future__ import annotations

import random
import time
from typing import Any

import gevent
from gevent.event import AsyncResult
from locust import User, task

from parley_locust.coordinator import Coordinator, coordinator
from parley_locust.ledger import RoomTrack
from parley_locust.mix import Plan, pick_room, plan_for
from parley_locust.users_file import UserRecord
from parley_locust.wire import Closed, Connection, now_ms, ws_url

# Waits for the server's answers. A join or resume answered after 30 s is a failure a user would
# have noticed long before; past that, the user reconnects.
ANSWER_TIMEOUT_S = 30.0
# An unacked send is re-sent after this long (same client_msg_id): the worker acks in tens of ms,
# so 10 s means the message or its ack was lost on the way.
ACK_RETRY_S = 10.0
# Reconnect backoff: first wait, cap (seconds), with full jitter, as docs/protocol.md advises.
BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.5, 30.0
# Codes after which a send is worth re-sending (the rest are the client's own mistakes).
RETRYABLE = {"unavailable", "busy", "rate_limited", "internal"}
BODY_PREFIX = "lt:"


class Pending:
    __slots__ = ("body", "client_msg_id", "first_sent", "last_sent", "room")

    def __init__(self, room: int, body: str, client_msg_id: str) -> None:
        self.room, self.body, self.client_msg_id = room, body, client_msg_id
        self.first_sent = self.last_sent = time.monotonic()


class ParleyUser(User):
    # The task paces itself (Poisson sends, reconnects, history reads): no wait between runs.
    wait_time = staticmethod(lambda: 0)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.co: Coordinator = coordinator(environment)
        self.rng = random.Random()
        self.record: UserRecord | None = None
        self.plan: Plan | None = None
        self.conn: Connection | None = None
        self.tracks: dict[int, RoomTrack] = {}
        self.waiters: dict[str, AsyncResult] = {}
        self.pending: dict[str, Pending] = {}
        self.acked_seqs: dict[int, list[int]] = {}
        self.counter = 0
        self.host_shift = 0
        self.reconnect_at = 0.0  # a `reconnect` frame's deadline (monotonic), 0 when none
        self.next_send = self.next_reconnect = self.next_history = float("inf")
        self.verified = False

    # --- life -----------------------------------------------------------------------------------

    def on_start(self) -> None:
        self.co.users[id(self)] = False
        self.record = self.co.take_user()
        self.plan = plan_for(self.record, self.co.mix, self.rng)
        now = time.monotonic()
        options = self.co.options
        if self.plan.talks_in and options.message_rate > 0:
            self.next_send = now + self._exp(60.0 / options.message_rate)
        if options.reconnects_per_hour > 0:
            self.next_reconnect = now + self._exp(3600.0 / options.reconnects_per_hour)
        if options.history_per_hour > 0:
            self.next_history = now + self._exp(3600.0 / options.history_per_hour)
        try:
            self._connect_with_backoff(first=True)
        except BaseException:
            self.co.users.pop(id(self), None)  # never up: nothing of it to check at the end
            raise

    def on_stop(self) -> None:
        # A user stopped before its check is not waited for: its rooms are not counted at all.
        self.co.users.pop(id(self), None)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.record is not None:
            self.co.give_back(self.record)
            self.record = None

    @task
    def live(self) -> None:
        """One step: verify at the end; reconnect when told or dropped; else the next due action."""
        if self.co.verifying:
            if not self.verified:
                self._verify()
            gevent.sleep(1.0)
            return
        now = time.monotonic()
        if self.conn is None or self.conn.closed is not None or (self.reconnect_at and now >= self.reconnect_at):
            self._reconnect()
            return
        self._retry_stale_sends(now)
        due = min(self.next_send, self.next_reconnect, self.next_history)
        if due > now:
            gevent.sleep(min(due - now, 1.0))  # wake at least once a second: flags, retries
            return
        if due == self.next_send:
            self.next_send = now + self._exp(60.0 / self.co.options.message_rate)
            self._send_one()
        elif due == self.next_reconnect:
            self.next_reconnect = now + self._exp(3600.0 / self.co.options.reconnects_per_hour)
            self._reconnect(voluntary=True)
        else:
            self.next_history = now + self._exp(3600.0 / self.co.options.history_per_hour)
            self._read_history()

    def _exp(self, mean: float) -> float:
        return self.rng.expovariate(1.0 / mean)

    # --- connecting -----------------------------------------------------------------------------

    def _connect(self) -> Connection:
        assert self.record is not None
        # --host may list several servers (local runs: one URL per protocol process); each user
        # starts on one and moves to the next when a connect fails, as a client behind DNS would.
        hosts = [h for h in (self.environment.host or "").split(",") if h.strip()]
        if not hosts:
            raise Closed("no --host given")
        host = hosts[(self.record.i + self.host_shift) % len(hosts)].strip()
        started = time.perf_counter()
        try:
            conn = Connection.open(ws_url(host), self.record.token, self._on_frame,
                                   self._on_close, self.co.source_address(self.record.i))
        except Closed as exc:
            self.co.totals.connect_errors += 1
            self.host_shift += 1
            self._fire("connect", started, exception=exc)
            raise
        self.co.totals.connects += 1
        self._fire("connect", started)
        return conn

    def _connect_with_backoff(self, first: bool = False) -> None:
        """Connect (and join, or resume), retrying with full-jitter exponential backoff."""
        wait = BACKOFF_FIRST_S
        while True:
            try:
                self.conn = self._connect()
                if first:
                    self._join_all()
                else:
                    self._resume_all()
                self._resend_pending()
                return
            except Closed as exc:
                if exc.code == 4001:
                    # The token was refused: retrying cannot help (the users file is stale?).
                    raise
            except TimeoutError:
                pass
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            gevent.sleep(self.rng.uniform(0, wait))
            wait = min(wait * 2, BACKOFF_CAP_S)

    def _reconnect(self, voluntary: bool = False) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.reconnect_at:
            gevent.sleep(max(0.0, self.reconnect_at - time.monotonic()))
            self.reconnect_at = 0.0
        self.co.totals.reconnects += 1
        self._connect_with_backoff()

    def _join_all(self) -> None:
        assert self.plan is not None and self.conn is not None
        for room in self.plan.rooms:
            if room.id in self.tracks:
                continue
            started = time.perf_counter()
            waiter = self._expect(f"joined:{room.id}")
            self.conn.send({"type": "join", "room": room.id, "ref": f"j{room.id}"})
            try:
                waiter.get(timeout=ANSWER_TIMEOUT_S)
            except gevent.Timeout:
                self._fire("join", started, exception=TimeoutError(f"no joined for room {room.id}"))
                raise TimeoutError from None
            except Closed:
                raise
            except Exception as exc:  # an error frame for this join
                self._fire("join", started, exception=exc)
                continue
            self._fire("join", started)

    def _resume_all(self, final: bool = False) -> dict[int, int]:
        """`resume` every tracked room from what this member has; {room: last_seq} answered."""
        assert self.conn is not None
        if not self.tracks:
            self._join_all()
            return {}
        started = time.perf_counter()
        waiters = {room: self._expect(f"resumed:{room}") for room in self.tracks}
        for track in self.tracks.values():
            track.final = final
        self.conn.send({"type": "resume", "rooms": {str(room): track.high for room, track in self.tracks.items()}})
        answered: dict[int, int] = {}
        try:
            for room, waiter in waiters.items():
                answered[room] = waiter.get(timeout=max(0.1, ANSWER_TIMEOUT_S - (time.perf_counter() - started)))
        except gevent.Timeout:
            self._fire("resume", started, exception=TimeoutError(f"{len(waiters) - len(answered)} rooms unanswered"))
            raise TimeoutError from None
        self.co.totals.resumes += 1
        self._fire("resume", started)
        return answered

    def _expect(self, key: str) -> AsyncResult:
        waiter = self.waiters[key] = AsyncResult()
        return waiter

    # --- sending --------------------------------------------------------------------------------

    def _send_one(self) -> None:
        assert self.plan is not None and self.record is not None
        room = pick_room(self.plan, self.rng)
        if room.id not in self.tracks:
            return  # its join failed: nothing to send there
        self.counter += 1
        client_msg_id = f"{self.record.i}.{self.co.run_tag}.{self.counter}"
        body = f"{BODY_PREFIX}{self.record.i}:{self.counter}:{now_ms():.1f}"
        self.pending[client_msg_id] = Pending(room.id, body, client_msg_id)
        self.co.totals.sent += 1
        self._transmit(self.pending[client_msg_id])

    def _transmit(self, pending: Pending) -> None:
        pending.last_sent = time.monotonic()
        if self.conn is None:
            return
        try:
            self.conn.send({"type": "send", "room": pending.room, "body": pending.body,
                            "client_msg_id": pending.client_msg_id})
        except Closed:
            pass  # re-sent after the reconnect

    def _resend_pending(self) -> None:
        for pending in list(self.pending.values()):
            self._transmit(pending)

    def _retry_stale_sends(self, now: float) -> None:
        for pending in list(self.pending.values()):
            if now - pending.last_sent > ACK_RETRY_S:
                self._transmit(pending)

    def _read_history(self) -> None:
        assert self.conn is not None
        if not self.tracks:
            return
        room = self.rng.choice(list(self.tracks))
        started = time.perf_counter()
        self.counter += 1
        ref = f"h{self.counter}"
        waiter = self._expect(f"history:{ref}")
        try:
            self.conn.send({"type": "history", "room": room, "limit": 50, "ref": ref})
            waiter.get(timeout=ANSWER_TIMEOUT_S)
        except gevent.Timeout:
            self._fire("history", started, exception=TimeoutError("no history page"))
            return
        except Exception as exc:
            self._fire("history", started, exception=exc)
            return
        self._fire("history", started)

    # --- the end-of-run check -------------------------------------------------------------------

    def _verify(self) -> None:
        """Stop sending; wait for the last acks; resume every room; count what is still missing."""
        try:
            deadline = time.monotonic() + self.co.options.settle_seconds
            while self.pending and time.monotonic() < deadline:
                if self.conn is None or self.conn.closed is not None:
                    self._connect_with_backoff()
                self._retry_stale_sends(time.monotonic())
                gevent.sleep(0.2)
            if self.conn is None or self.conn.closed is not None:
                self._connect_with_backoff()
            answered = self._resume_all(final=True)
            for room, last_seq in answered.items():
                self.tracks[room].settle(last_seq, self.acked_seqs.get(room, []), self.co.totals)
            self.co.totals.unacked += len(self.pending)
        except (Closed, TimeoutError) as exc:
            self.co.totals.add_error("unverified")
            self._fire("verify", time.perf_counter(), exception=exc)
        finally:
            self.verified = True
            if id(self) in self.co.users:
                self.co.users[id(self)] = True

    # --- frames from the server (the reader greenlet) -------------------------------------------

    def _on_close(self, closed: Closed) -> None:
        if closed.code not in (None, 1000):
            self.co.totals.add_close(closed.code)
        for waiter in self.waiters.values():
            if not waiter.ready():
                waiter.set_exception(closed)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            self._on_message(frame)
        elif kind == "ack":
            self._on_ack(frame)
        elif kind == "joined":
            info = frame.get("info") or {}
            room = frame.get("room")
            if isinstance(room, int) and room not in self.tracks:
                # Here, not in the joining greenlet: the room's next messages may be read before
                # that greenlet runs again, and they must find the track.
                self.tracks[room] = RoomTrack(int(info.get("last_seq", 0)))
            self._answer(f"joined:{room}", info)
        elif kind == "resumed":
            self._answer(f"resumed:{frame.get('room')}", frame.get("last_seq", 0))
        elif kind == "reload":
            track = self.tracks.get(frame.get("room", 0))
            if track is not None:
                track.skip_to(frame.get("last_seq", 0), self.co.totals)
            self._answer(f"resumed:{frame.get('room')}", frame.get("last_seq", 0))
        elif kind == "history":
            self._answer(f"history:{frame.get('ref')}", frame)
        elif kind == "error":
            self._on_error(frame)
        elif kind == "reconnect":
            # A draining server: go within its jittered delay, resume elsewhere.
            self.reconnect_at = time.monotonic() + frame.get("delay_ms", 0) / 1000

    def _answer(self, key: str, value: Any) -> None:
        waiter = self.waiters.pop(key, None)
        if waiter is not None and not waiter.ready():
            waiter.set(value)

    def _on_message(self, frame: dict[str, Any]) -> None:
        room, seq = frame.get("room"), frame.get("seq")
        track = self.tracks.get(room) if isinstance(room, int) else None
        if track is None or not isinstance(seq, int):
            return
        before = (self.co.totals.gaps, self.co.totals.reordered, self.co.totals.duplicates)
        new = track.receive(seq, self.co.totals)
        after = (self.co.totals.gaps, self.co.totals.reordered, self.co.totals.duplicates)
        for name, was, now in zip(("gap", "reordered", "duplicate"), before, after, strict=True):
            if now > was:
                self._fire(name, time.perf_counter(), exception=AssertionError(f"room {room} seq {seq}"))
        sender = frame.get("sender") or {}
        if self.record is not None and sender.get("id") == self.record.id and frame.get("client_msg_id"):
            track.own_message(frame["client_msg_id"], seq, self.co.totals)
        if not new or track.final:
            return
        body = frame.get("body", "")
        if not body.startswith(BODY_PREFIX):
            return  # a bot's answer: no timestamp
        self.co.sampled += 1
        every = max(1, self.co.options.delivery_sample)
        if self.co.sampled % every == 0:
            try:
                sent_ms = float(body.rsplit(":", 1)[1])
            except (IndexError, ValueError):
                return
            self._fire_ms(f"delivery 1/{every}", max(0.0, now_ms() - sent_ms))

    def _on_ack(self, frame: dict[str, Any]) -> None:
        pending = self.pending.pop(frame.get("client_msg_id", ""), None)
        if pending is None:
            return  # a duplicate ack of a re-sent message
        self.co.totals.acked += 1
        room, seq = frame.get("room"), frame.get("seq")
        if isinstance(room, int) and isinstance(seq, int):
            self.acked_seqs.setdefault(room, []).append(seq)
            track = self.tracks.get(room)
            if track is not None:
                track.acked(pending.client_msg_id, seq, self.co.totals)
        self._fire_ms("ack", (time.monotonic() - pending.first_sent) * 1000)

    def _on_error(self, frame: dict[str, Any]) -> None:
        code = str(frame.get("code", "unknown"))
        self.co.totals.add_error(code)
        self._fire_ms(f"error {code}", 0.0, exception=RuntimeError(frame.get("message", code)))
        ref = frame.get("ref") or ""
        pending = self.pending.get(ref)
        if pending is not None:
            if code in RETRYABLE:
                pending.last_sent = time.monotonic() - ACK_RETRY_S + self.rng.uniform(0.5, 2.0)
            else:
                del self.pending[ref]
                self.co.totals.ack_errors += 1
            return
        room = frame.get("room")
        for key in (f"joined:{room}", f"resumed:{room}", f"history:{ref}"):
            waiter = self.waiters.pop(key, None)
            if waiter is not None and not waiter.ready():
                waiter.set_exception(RuntimeError(f"{code}: {frame.get('message', '')}"))

    # --- statistics -----------------------------------------------------------------------------

    def _fire(self, name: str, started: float, exception: BaseException | None = None) -> None:
        self._fire_ms(name, (time.perf_counter() - started) * 1000, exception)

    def _fire_ms(self, name: str, ms: float, exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(request_type="WS", name=name, response_time=ms, response_length=0,
                                             exception=exception, context={})
