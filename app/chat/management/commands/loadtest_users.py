"""`manage.py loadtest_users --count N --out FILE`: mint N load-test users, their API tokens, rooms
and memberships in bulk, and write the tokens to a users file for Locust.

The users file is JSON Lines, mode 0600 (it holds live tokens): a header line, then one line per
user in index order with the user's token and rooms. Its reader is
`loadtest/parley_locust/users_file.py` (no Django there: the Locust pods do not have it).

Speed: 400,000 users are ~2.5 million rows (users, tokens, ~280,000 rooms, ~1.5 million
memberships). Row-by-row ORM saves would take hours; on PostgreSQL this command reserves the ids
from the tables' sequences and streams the rows with `COPY`, one transaction per batch of users;
on SQLite (`make run`) it falls back to `bulk_create`.

Minted users are marked by their password, `PASSWORD_MARK` (unusable: Django treats a leading "!"
as "no password"), so `--replace` deletes only what a mint made, never a person who happens to be
called `lt0000001`.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, models, transaction
from django.utils import timezone

from chat.management.commands.seed_demo import TEMPLATES as DEMO_BOT_TEMPLATES
from chat.models import ApiToken, Bot, BotTemplate, Membership, Message, Room
from chat.tokens import TOKEN_BYTES, hash_token, ttl

FILE_FORMAT = "parley-loadtest-users"
FILE_VERSION = 1
DEFAULT_PREFIX = "lt"
# Seven digits: 10 million users per prefix, 25x the 400k target, and every name the same length
# (so that "lt" + 7 digits can never be "lt1" + 7 digits: prefixes cannot collide).
INDEX_DIGITS = 7
MAX_COUNT = 10**INDEX_DIGITS - 1
# A prefix is part of a username (Django allows letters, digits and @.+-_) and of a regex.
PREFIX_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
# The default profile, modelled on a chat service: half of all group memberships are in small
# rooms (family, a team), fewer in department-sized rooms, a few in big community rooms.
DEFAULT_ROOM_SIZES = "5:50,20:30,100:15,1000:5"
DEFAULT_GROUPS_PER_USER = 3
# Half the users have a 1:1 conversation open, one in ten talks to the bot.
DEFAULT_DM_FRACTION = 0.5
DEFAULT_BOT_FRACTION = 0.1
# `seed_demo`'s bot: the one `make run` shows and the app's tests know.
DEFAULT_BOT = "helpbot"
# Marks a minted user (see the module docstring). The benchmark's users use "!bench" likewise.
PASSWORD_MARK = "!loadtest"
TOKEN_NAME = "loadtest"
# Users per transaction and per progress line. Django declares PostgreSQL foreign keys DEFERRABLE
# INITIALLY DEFERRED, so every row's check waits in the transaction's trigger queue until commit:
# 50,000 users (with their ~200,000 memberships) keep that queue to tens of MB, where one
# transaction for 400,000 would hold ~4 million entries.
BATCH_USERS = 50_000
# Rooms per transaction: rooms have two foreign keys (creator, bot), so the same reasoning.
BATCH_ROOMS = 100_000
# bulk_create's batch on SQLite: under its 32,766 bound variables for the widest row (users,
# 11 columns), few enough statements to stay fast.
SQLITE_BATCH = 2_000


# --- the plan: who is in which room (pure: no database) ------------------------------------------


@dataclass(frozen=True)
class SizeShare:
    """One class of group rooms: rooms of `size` members hold `percent` of all group memberships."""

    size: int
    percent: float


def parse_room_sizes(text: str) -> list[SizeShare]:
    shares = []
    for part in text.split(","):
        try:
            size_text, percent_text = part.split(":")
            share = SizeShare(int(size_text), float(percent_text))
        except ValueError:
            raise CommandError(f"--room-sizes: {part!r} is not SIZE:PERCENT (e.g. {DEFAULT_ROOM_SIZES})") from None
        if share.size < 2:
            raise CommandError(f"--room-sizes: a group of {share.size} member tests no delivery: use 2 or more")
        if share.percent <= 0:
            raise CommandError(f"--room-sizes: {part!r}: the percent must be positive")
        shares.append(share)
    total = sum(s.percent for s in shares)
    if abs(total - 100) > 1e-6:
        raise CommandError(f"--room-sizes: the percents add up to {total:g}, not 100")
    return shares


@dataclass
class MintPlan:
    """Who is in which room, by user index (0 to count-1), and each user's rooms. Room index j:
    the group rooms first, then the DMs, then the bot chats (their order in the users file too)."""

    count: int
    # Group room j holds users (start + k) % count for k < size: see `plan_groups`.
    groups: list[tuple[int, int]]
    dm_pairs: list[tuple[int, int]]
    bot_users: list[int]
    # Where the plan departs from the profile (a user count too small for some room sizes).
    warnings: list[str]
    user_rooms: list[list[int]] = field(default_factory=list)

    @property
    def room_count(self) -> int:
        return len(self.groups) + len(self.dm_pairs) + len(self.bot_users)

    def kind(self, j: int) -> str:
        if j < len(self.groups):
            return Room.Kind.GROUP.value
        return Room.Kind.DM.value if j < len(self.groups) + len(self.dm_pairs) else Room.Kind.BOT.value

    def size(self, j: int) -> int:
        # A DM has its two users; a bot chat its user and the bot.
        return self.groups[j][1] if j < len(self.groups) else 2


def group_sizes(memberships: int, shares: Sequence[SizeShare], cap: int) -> tuple[list[int], list[str]]:
    """Room sizes whose sum is exactly `memberships`, in the profile's proportions, and warnings.
    A size above `cap` (the user count) is cut to it: a room cannot hold a user twice. Rooms are
    whole: a class too small for one room gives none (its memberships go to the smallest rooms,
    and a warning says so), and rounding leaves at most one room off the profile, the remainder."""
    sizes: list[int] = []
    warnings = []
    for share in shares:
        size = min(share.size, cap)
        if size < share.size:
            warnings.append(f"rooms of {share.size} cut to {size}: there are only {cap} users")
        rooms = int(memberships * share.percent / 100 // size)
        if not rooms:
            warnings.append(f"{share.size}:{share.percent:g} gives no room: {share.percent:g}% of "
                            f"{memberships} group memberships do not fill one")
        sizes += [size] * rooms
    smallest = min(min(s.size for s in shares), cap)
    missing = memberships - sum(sizes)
    sizes += [smallest] * (missing // smallest)
    rest = missing % smallest
    if rest == 1 and any(s < cap for s in sizes):
        # One member is no group: the first room below the cap takes the last user instead.
        i = next(i for i, s in enumerate(sizes) if s < cap)
        sizes[i] += 1
    elif rest:
        sizes.append(rest)
    return sizes, warnings


def plan_groups(
    count: int, groups_per_user: int, shares: Sequence[SizeShare], rng: random.Random
) -> tuple[list[tuple[int, int]], list[str]]:
    """Group rooms cut one after another from the stream 0, 1, ..., count-1, 0, 1, ... (each user
    `groups_per_user` times), the sizes shuffled so that each user gets a mix of them.

    A room's members are consecutive users, and that is what spreads them over Locust workers
    realistically: a worker keeps the users with `i % shares == share`, so consecutive users land
    on different workers (as a real room's members are on different devices) and every delivery
    crosses from the sender's worker to other workers. Consecutive users also come online
    together during a ramp, so rooms fill up as the ramp passes them rather than all rooms staying
    nearly empty until its end. A chunk of at most `count` positions never holds a user twice,
    and a user's appearances, `count` positions apart, always fall in different rooms."""
    sizes, warnings = group_sizes(count * groups_per_user, shares, cap=count)
    rng.shuffle(sizes)
    groups = []
    start = 0
    for size in sizes:
        groups.append((start % count, size))
        start += size
    return groups, warnings


def plan_mint(
    count: int, shares: Sequence[SizeShare], groups_per_user: int, dm_fraction: float, bot_fraction: float,
    seed: int,
) -> MintPlan:
    """Who is in which room; the same arguments give the same plan."""
    rng = random.Random(seed)
    groups, warnings = plan_groups(count, groups_per_user, shares, rng) if groups_per_user else ([], [])
    # DM partners are random users: unlike a group's, a DM's two members have nothing in common.
    dm_users = rng.sample(range(count), int(count * dm_fraction) // 2 * 2)
    dm_pairs = list(zip(dm_users[0::2], dm_users[1::2], strict=True))
    bot_users = sorted(rng.sample(range(count), round(count * bot_fraction)))
    plan = MintPlan(count, groups, dm_pairs, bot_users, warnings)
    plan.user_rooms = [[] for _ in range(count)]
    for j, (start, size) in enumerate(groups):
        for k in range(size):
            plan.user_rooms[(start + k) % count].append(j)
    first = len(groups)
    for j, (a, b) in enumerate(dm_pairs, first):
        plan.user_rooms[a].append(j)
        plan.user_rooms[b].append(j)
    first += len(dm_pairs)
    for j, user in enumerate(bot_users, first):
        plan.user_rooms[user].append(j)
    return plan


# --- writing rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomRow:
    name: str
    kind: str
    created_by_id: int
    pair_key: str | None
    bot_id: int | None


class RowWriter:
    """Inserts the mint's rows; `PostgresRows` and `SqliteRows` say how. Call inside a transaction."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def users(self, usernames: Sequence[str]) -> list[int]:
        raise NotImplementedError

    def tokens(self, user_ids: Sequence[int], key_hashes: Sequence[str], expires_at: datetime) -> None:
        raise NotImplementedError

    def rooms(self, rows: Sequence[RoomRow]) -> list[int]:
        raise NotImplementedError

    def memberships(self, pairs: Iterable[tuple[int, int]]) -> None:
        """(room id, user id) pairs."""
        raise NotImplementedError


def user_defaults(now: datetime) -> dict[str, Any]:
    """Column -> value of a minted user (any user model): its defaults, an unusable password that
    marks it as minted, active, joined now."""
    user_model = get_user_model()
    values = {f.column: f.get_default() for f in user_model._meta.concrete_fields if not f.primary_key}
    values[user_model._meta.get_field("password").column] = PASSWORD_MARK
    for name, value in (("is_active", True), ("date_joined", now)):
        try:
            values[user_model._meta.get_field(name).column] = value
        except models.FieldDoesNotExist:
            pass
    return values


class PostgresRows(RowWriter):
    """COPY, with ids taken from the tables' own sequences beforehand (COPY returns none): the ids
    are the database's, so the app's later inserts never collide with them."""

    def reserve_ids(self, model: type[models.Model], n: int) -> list[int]:
        meta = model._meta
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                [meta.db_table, meta.pk.column, n],
            )
            return [row[0] for row in cursor.fetchall()]

    def copy(self, model: type[models.Model], columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        quote = connection.ops.quote_name
        sql = f"COPY {quote(model._meta.db_table)} ({', '.join(quote(c) for c in columns)}) FROM STDIN"
        with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    def users(self, usernames: Sequence[str]) -> list[int]:
        user_model = get_user_model()
        ids = self.reserve_ids(user_model, len(usernames))
        values = user_defaults(self.now)
        name_column = user_model._meta.get_field(user_model.USERNAME_FIELD).column
        columns = [user_model._meta.pk.column, *values]

        def rows() -> Iterator[list[Any]]:
            for user_id, username in zip(ids, usernames, strict=True):
                values[name_column] = username
                yield [user_id, *values.values()]
        self.copy(user_model, columns, rows())
        return ids

    def tokens(self, user_ids: Sequence[int], key_hashes: Sequence[str], expires_at: datetime) -> None:
        self.copy(
            ApiToken, ["key_hash", "user_id", "name", "created_at", "expires_at"],
            ((h, u, TOKEN_NAME, self.now, expires_at) for u, h in zip(user_ids, key_hashes, strict=True)),
        )

    def rooms(self, rows: Sequence[RoomRow]) -> list[int]:
        ids = self.reserve_ids(Room, len(rows))
        self.copy(
            Room, ["id", "name", "kind", "private", "created_by_id", "created_at", "last_seq", "pair_key", "bot_id"],
            ((i, r.name, r.kind, True, r.created_by_id, self.now, 0, r.pair_key, r.bot_id)
             for i, r in zip(ids, rows, strict=True)),
        )
        return ids

    def memberships(self, pairs: Iterable[tuple[int, int]]) -> None:
        self.copy(
            Membership, ["room_id", "user_id", "joined_at", "last_read_seq"],
            ((room_id, user_id, self.now, 0) for room_id, user_id in pairs),
        )


class SqliteRows(RowWriter):
    """bulk_create, for SQLite (`make run`): it returns the ids of a multi-row insert (3.35+)."""

    def users(self, usernames: Sequence[str]) -> list[int]:
        user_model = get_user_model()
        extra = {"is_active": True, "date_joined": self.now}
        extra = {k: v for k, v in extra.items() if any(f.name == k for f in user_model._meta.fields)}
        made = user_model.objects.bulk_create(
            [user_model(username=name, password=PASSWORD_MARK, **extra) for name in usernames], batch_size=SQLITE_BATCH
        )
        return [u.pk for u in made]

    def tokens(self, user_ids: Sequence[int], key_hashes: Sequence[str], expires_at: datetime) -> None:
        ApiToken.objects.bulk_create(
            [ApiToken(key_hash=h, user_id=u, name=TOKEN_NAME, expires_at=expires_at)
             for u, h in zip(user_ids, key_hashes, strict=True)],
            batch_size=SQLITE_BATCH,
        )

    def rooms(self, rows: Sequence[RoomRow]) -> list[int]:
        made = Room.objects.bulk_create(
            [Room(name=r.name, kind=r.kind, private=True, created_by_id=r.created_by_id, pair_key=r.pair_key,
                  bot_id=r.bot_id) for r in rows],
            batch_size=SQLITE_BATCH,
        )
        return [r.pk for r in made]

    def memberships(self, pairs: Iterable[tuple[int, int]]) -> None:
        Membership.objects.bulk_create(
            [Membership(room_id=room_id, user_id=user_id) for room_id, user_id in pairs], batch_size=SQLITE_BATCH
        )


# --- the users file ---------------------------------------------------------------------------------


class AtomicFile:
    """A file that appears complete or not at all: written to a temporary file beside it (mode
    0600 from `mkstemp`: it holds live tokens), renamed over `path` on `commit()`. Opened before
    the database is touched, so an unwritable directory fails before anything is minted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.temp = Path(temp)
        self.file: TextIO = os.fdopen(fd, "w", encoding="utf-8")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def json_line(value: dict[str, Any]) -> str:
    # Compact separators: at 400,000 users the file is ~25% smaller.
    return json.dumps(value, separators=(",", ":")) + "\n"


# --- the prefix's users: finding and deleting them ---------------------------------------------------


def prefix_pattern(prefix: str) -> str:
    return f"^{re.escape(prefix)}[0-9]{{{INDEX_DIGITS}}}$"


def minted_users_sql(prefix: str) -> tuple[str, list[str]]:
    """SELECT of the ids of the prefix's minted users (a subquery for the deletes), and its parameters."""
    user_model = get_user_model()
    quote = connection.ops.quote_name
    name = quote(user_model._meta.get_field(user_model.USERNAME_FIELD).column)
    password = quote(user_model._meta.get_field("password").column)
    # PostgreSQL's regex operator; Django gives its SQLite connections a REGEXP function.
    match = f"{name} ~ %s" if connection.vendor == "postgresql" else f"{name} REGEXP %s"
    sql = (f"SELECT {quote(user_model._meta.pk.column)} FROM {quote(user_model._meta.db_table)} "
           f"WHERE {match} AND {password} = %s")
    return sql, [prefix_pattern(prefix), PASSWORD_MARK]


def delete_prefix(prefix: str) -> dict[str, int]:
    """Delete the prefix's minted users, the rooms they created (with those rooms' messages and
    memberships), their tokens and memberships; their messages elsewhere lose their sender, as a
    deleted user's do. Raw SQL with a subquery: the ORM's cascade would load 400,000 users and
    their rows into memory first."""
    quote = connection.ops.quote_name
    users, params = minted_users_sql(prefix)
    room, message, membership = (quote(m._meta.db_table) for m in (Room, Message, Membership))
    rooms = f"SELECT id FROM {room} WHERE created_by_id IN ({users})"
    deleted: dict[str, int] = {}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {message} WHERE room_id IN ({rooms})", params)
        cursor.execute(f"DELETE FROM {membership} WHERE room_id IN ({rooms})", params)
        cursor.execute(f"DELETE FROM {room} WHERE created_by_id IN ({users})", params)
        deleted["rooms"] = cursor.rowcount
        # Whatever else points at a user (tokens, memberships, auth's groups, messages' senders),
        # found from the model, so a relation added later is not forgotten.
        user_model = get_user_model()
        for rel in user_model._meta.get_fields(include_hidden=True):
            if not (rel.auto_created and not rel.concrete and (rel.one_to_many or rel.one_to_one)):
                continue
            table, column = quote(rel.related_model._meta.db_table), quote(rel.field.column)
            if rel.on_delete is models.CASCADE:
                cursor.execute(f"DELETE FROM {table} WHERE {column} IN ({users})", params)
            elif rel.on_delete is models.SET_NULL:
                cursor.execute(f"UPDATE {table} SET {column} = NULL WHERE {column} IN ({users})", params)
            else:
                raise CommandError(f"cannot delete minted users: {rel.related_model.__name__} refers to them")
            if rel.related_model is ApiToken:
                deleted["tokens"] = cursor.rowcount
        table, pk = quote(user_model._meta.db_table), quote(user_model._meta.pk.column)
        cursor.execute(f"DELETE FROM {table} WHERE {pk} IN ({users})", params)
        deleted["users"] = cursor.rowcount
    return deleted


def ensure_bot(username: str) -> Bot:
    """The bot of the bot chats; made as `seed_demo` makes its bot when missing (the bot alone: the
    demo's users have a known password, no place in a load-test database)."""
    user_model = get_user_model()
    user = user_model.objects.filter(username=username).first()
    if user is None:
        user = user_model(username=username)
        user.set_unusable_password()
        user.save()
        bot = Bot.objects.create(user=user, description="Answers from templates")
        for match, pattern, reply, priority in DEMO_BOT_TEMPLATES:
            BotTemplate.objects.create(bot=bot, match=match, pattern=pattern, reply=reply, priority=priority)
        return bot
    bot = Bot.objects.filter(user=user).first()
    if bot is None:
        raise CommandError(f"--bot {username}: that user is not a bot")
    return bot


# --- the command ---------------------------------------------------------------------------------------


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(text)
    return value


class Command(BaseCommand):
    help = (
        "Mint N load-test users with tokens, group rooms, DMs and bot chats in bulk, and write their tokens "
        "to a users file (JSON Lines, mode 0600) for the Locust load test."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, required=True, help=f"users to mint (1 to {MAX_COUNT:,})")
        parser.add_argument("--out", type=Path, required=True, help="the users file to write")
        parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                            help=f"usernames are PREFIX + a {INDEX_DIGITS}-digit index (default %(default)s)")
        parser.add_argument("--room-sizes", default=DEFAULT_ROOM_SIZES,
                            help="group rooms: SIZE:PERCENT of group memberships, comma-separated "
                                 "(default %(default)s)")
        parser.add_argument("--groups-per-user", type=int, default=DEFAULT_GROUPS_PER_USER,
                            help="group rooms per user (default %(default)s)")
        parser.add_argument("--dm-fraction", type=fraction, default=DEFAULT_DM_FRACTION,
                            help="share of users paired two by two in a DM (default %(default)s)")
        parser.add_argument("--bot-fraction", type=fraction, default=DEFAULT_BOT_FRACTION,
                            help="share of users with a bot chat (default %(default)s)")
        parser.add_argument("--bot", default=DEFAULT_BOT,
                            help="the bot's username; created as seed_demo does if missing (default %(default)s)")
        parser.add_argument("--seed", type=int, default=None,
                            help="makes the room assignment reproducible (default: random, written to the header)")
        parser.add_argument("--replace", action="store_true",
                            help="delete the prefix's minted users, their rooms and tokens first")

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        count, prefix, out = options["count"], options["prefix"], options["out"].resolve()
        if not 1 <= count <= MAX_COUNT:
            raise CommandError(f"--count must be 1 to {MAX_COUNT:,}")
        if not PREFIX_SHAPE.fullmatch(prefix):
            raise CommandError(f"--prefix {prefix!r}: a letter, then up to 31 letters, digits, '_' or '-'")
        if options["groups_per_user"] < 0:
            raise CommandError("--groups-per-user must be 0 or more")
        shares = parse_room_sizes(options["room_sizes"])
        seed = options["seed"] if options["seed"] is not None else secrets.randbits(32)
        if not out.parent.is_dir():
            raise CommandError(f"--out {out}: no such directory {out.parent}")

        try:
            file = AtomicFile(out)
        except OSError as exc:
            raise CommandError(f"--out {out}: cannot write there ({exc})") from None
        try:
            self.check_prefix(prefix, options["replace"])
            plan = plan_mint(count, shares, options["groups_per_user"], options["dm_fraction"],
                             options["bot_fraction"], seed)
            for warning in plan.warnings:
                self.progress(f"--room-sizes: {warning}")
            bot = ensure_bot(options["bot"]) if plan.bot_users else None
            params = {
                "count": count, "prefix": prefix, "room_sizes": options["room_sizes"],
                "groups_per_user": options["groups_per_user"], "dm_fraction": options["dm_fraction"],
                "bot_fraction": options["bot_fraction"], "bot": options["bot"], "seed": seed,
            }
            try:
                rooms, memberships = self.mint(plan, prefix, bot, params, file.file, started)
                file.commit()
            except Exception as exc:
                # Each batch is its own transaction: what was committed stays, without a file.
                raise CommandError(
                    f"minting stopped ({exc.__class__.__name__}: {exc}); the batches already committed stay in "
                    f"the database: run again with --replace to start over"
                ) from exc
        except BaseException:
            file.discard()
            raise
        self.stdout.write(
            f"minted users={count} rooms={plan.room_count} group={rooms['group']} dm={rooms['dm']} "
            f"bot={rooms['bot']} memberships={memberships} seconds={time.monotonic() - started:.1f} file={out}"
        )

    def check_prefix(self, prefix: str, replace: bool) -> None:
        """Refuse a prefix in use unless --replace, and never delete users this command did not mint."""
        user_model = get_user_model()
        taken = user_model.objects.filter(username__regex=prefix_pattern(prefix))
        if not taken.exists():
            return
        if not replace:
            raise CommandError(
                f"{taken.count():,} users with prefix {prefix!r} exist already: pass --replace to delete them "
                "(with their rooms and tokens) first, or choose another --prefix"
            )
        stranger = taken.exclude(password=PASSWORD_MARK).values_list("username", flat=True).first()
        if stranger is not None:
            raise CommandError(f"user {stranger!r} was not minted by loadtest_users: choose another --prefix")
        deleted = delete_prefix(prefix)
        self.progress(f"--replace: deleted {deleted.get('users', 0):,} users, {deleted.get('rooms', 0):,} rooms, "
                      f"{deleted.get('tokens', 0):,} tokens of prefix {prefix!r}")

    def progress(self, text: str) -> None:
        self.stderr.write(f"loadtest_users: {text}")

    def mint(
        self, plan: MintPlan, prefix: str, bot: Bot | None, params: dict[str, Any], out: TextIO, started: float
    ) -> tuple[dict[str, int], int]:
        """Insert everything, then write the users file; (rooms by kind, memberships)."""
        now = timezone.now()
        expires_at = now + ttl()
        rows: RowWriter = PostgresRows(now) if connection.vendor == "postgresql" else SqliteRows(now)
        count = plan.count
        usernames = [f"{prefix}{i:0{INDEX_DIGITS}d}" for i in range(count)]
        # As chat.tokens.create_token makes them; only the hash is stored, the plaintext goes to the file.
        tokens = [secrets.token_urlsafe(TOKEN_BYTES) for _ in range(count)]

        def elapsed() -> str:
            return f"({time.monotonic() - started:.1f} s)"

        user_ids: list[int] = []
        for first in range(0, count, BATCH_USERS):
            batch = slice(first, min(first + BATCH_USERS, count))
            with transaction.atomic():
                ids = rows.users(usernames[batch])
                rows.tokens(ids, [hash_token(t) for t in tokens[batch]], expires_at)
            user_ids += ids
            self.progress(f"users and tokens {batch.stop:,}/{count:,} {elapsed()}")

        room_rows = self.room_rows(plan, prefix, user_ids, usernames, bot)
        room_ids: list[int] = []
        for first in range(0, len(room_rows), BATCH_ROOMS):
            with transaction.atomic():
                room_ids += rows.rooms(room_rows[first:first + BATCH_ROOMS])
            self.progress(f"rooms {len(room_ids):,}/{len(room_rows):,} {elapsed()}")

        memberships = 0
        for first in range(0, count, BATCH_USERS):
            stop = min(first + BATCH_USERS, count)
            pairs = [(room_ids[j], user_ids[u]) for u in range(first, stop) for j in plan.user_rooms[u]]
            if bot is not None and first == 0:
                # The bot is a member of each of its chats, as chat.services.open_dm makes them.
                bot_rooms = room_ids[len(plan.groups) + len(plan.dm_pairs):]
                pairs += [(room_id, bot.user_id) for room_id in bot_rooms]
            with transaction.atomic():
                rows.memberships(pairs)
            memberships += len(pairs)
            self.progress(f"memberships of users {stop:,}/{count:,} {elapsed()}")

        if connection.vendor == "postgresql":
            # Fresh statistics: the planner would otherwise plan the load test's first queries for
            # the tables' old, maybe near-empty, sizes until autovacuum's next ANALYZE.
            with connection.cursor() as cursor:
                for model in (get_user_model(), ApiToken, Room, Membership):
                    cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")

        by_kind = {
            "group": len(plan.groups), "dm": len(plan.dm_pairs), "bot": len(plan.bot_users),
        }
        header = {
            "format": FILE_FORMAT, "version": FILE_VERSION, "count": count, "prefix": prefix,
            "created_at": now.isoformat(), "expires_at": expires_at.isoformat(), "params": params, "rooms": by_kind,
        }
        out.write(json_line(header))
        for i in range(count):
            out.write(json_line({
                "i": i, "id": user_ids[i], "username": usernames[i], "token": tokens[i],
                "rooms": [{"id": room_ids[j], "kind": plan.kind(j), "size": plan.size(j)} for j in plan.user_rooms[i]],
            }))
        return by_kind, memberships

    def room_rows(
        self, plan: MintPlan, prefix: str, user_ids: list[int], usernames: list[str], bot: Bot | None
    ) -> list[RoomRow]:
        """Every room's row, in plan order. The creator is a minted user (a group's first member),
        which is how --replace finds the rooms again."""
        rows = [
            RoomRow(f"{prefix} group {j} ({size})", Room.Kind.GROUP.value, user_ids[start], None, None)
            for j, (start, size) in enumerate(plan.groups)
        ]
        # Names and pair keys as chat.services.open_dm makes them, so the app finds these rooms.
        for a, b in plan.dm_pairs:
            low, high = sorted((user_ids[a], user_ids[b]))
            rows.append(RoomRow(f"{usernames[a]} & {usernames[b]}", Room.Kind.DM.value, user_ids[a],
                                f"{low}:{high}", None))
        if plan.bot_users:
            assert bot is not None
            bot_name = bot.user.get_username()
            for u in plan.bot_users:
                low, high = sorted((user_ids[u], bot.user_id))
                rows.append(RoomRow(f"{usernames[u]} & {bot_name}", Room.Kind.BOT.value, user_ids[u],
                                    f"{low}:{high}", bot.pk))
        return rows
