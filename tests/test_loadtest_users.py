"""`manage.py loadtest_users` (issue 12: minting load-test users) and the users-file reader the
Locust users read it with (`loadtest/parley_locust/users_file.py`).

The mint runs on the test database (PostgreSQL under `make test`: the COPY path; SQLite otherwise:
the bulk_create path) and the file is read back with the real reader. The last test connects
minted users to real protocol and worker processes.
"""

from __future__ import annotations

import io
import json
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from chat import join_rules, services, tokens
from chat.models import ApiToken, Bot, Membership, Room
from loadtest.parley_locust.users_file import RoomRef, UserRecord, iter_users, read_header
from tests.helpers import WsClient

COUNT = 400
# Sizes a few hundred users can hold (the default's 1000-member rooms would be cut to 400).
SIZES = "5:50,20:30,100:20"
GROUPS_PER_USER = 3


def mint(out: Path, *args: str, count: int = COUNT, prefix: str = "lt", **options: Any) -> str:
    """Run the command; its stdout (the summary line)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command(
        "loadtest_users", f"--count={count}", f"--out={out}", f"--prefix={prefix}", f"--room-sizes={SIZES}",
        f"--groups-per-user={GROUPS_PER_USER}", *args, stdout=stdout, stderr=stderr, **options,
    )
    return stdout.getvalue()


@pytest.fixture(autouse=True)
def _no_cached_tokens() -> Iterator[None]:
    # A token found once is remembered per process: a test of revoked tokens must ask the database.
    tokens.CACHE.clear()
    yield
    tokens.CACHE.clear()


@pytest.fixture
def minted(db: None, tmp_path: Path) -> tuple[Path, list[UserRecord], str]:
    out = tmp_path / "users.jsonl"
    summary = mint(out, "--seed=11")
    return out, list(iter_users(out)), summary


# --- the mint, read back --------------------------------------------------------------------------


def test_every_minted_token_authenticates_as_its_user_and_the_file_is_private(minted):
    out, records, summary = minted
    assert re.fullmatch(
        rf"minted users={COUNT} rooms=\d+ group=\d+ dm=\d+ bot=\d+ memberships=\d+ seconds=[\d.]+ file={out}\n",
        summary,
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [r.i for r in records] == list(range(COUNT))
    assert [r.username for r in records[:2]] == ["lt0000000", "lt0000001"]
    for record in records:
        info = tokens.find_token(record.token)
        assert info is not None, record.username
        assert (info.user_id, info.username) == (record.id, record.username)
    # Stored as chat.tokens stores them: the hash only, expiring after PARLEY_TOKEN_TTL_DAYS.
    stored = ApiToken.objects.get(user_id=records[0].id)
    assert stored.key_hash == tokens.hash_token(records[0].token)
    assert abs(stored.expires_at - (timezone.now() + tokens.ttl())) < timedelta(minutes=1)
    assert not ApiToken.objects.filter(key_hash=records[0].token).exists()
    user = get_user_model().objects.get(pk=records[0].id)
    assert user.is_active and not user.has_usable_password()


def test_the_header_describes_the_mint(minted):
    out, _, summary = minted
    header = read_header(out)
    assert header["format"] == "parley-loadtest-users" and header["version"] == 1
    assert header["count"] == COUNT and header["prefix"] == "lt"
    assert header["params"]["seed"] == 11 and header["params"]["room_sizes"] == SIZES
    rooms = header["rooms"]
    assert rooms == {kind: Room.objects.filter(kind=kind).count() for kind in ("group", "dm", "bot")}
    assert f"group={rooms['group']} dm={rooms['dm']} bot={rooms['bot']}" in summary


def test_the_database_memberships_are_the_files(minted):
    _, records, _ = minted
    in_db: dict[int, set[int]] = defaultdict(set)
    for user_id, room_id in Membership.objects.filter(user_id__in=[r.id for r in records]).values_list(
        "user_id", "room_id"
    ):
        in_db[user_id].add(room_id)
    sizes = Counter(Membership.objects.values_list("room_id", flat=True))
    kinds = dict(Room.objects.values_list("pk", "kind"))
    for record in records:
        assert {room.id for room in record.rooms} == in_db[record.id], record.username
        for room in record.rooms:
            assert (room.kind, room.size) == (kinds[room.id], sizes[room.id])


def test_group_sizes_follow_the_profile_and_each_user_has_its_groups(minted):
    _, records, _ = minted
    groups = {room.id: room.size for r in records for room in r.rooms if room.kind == "group"}
    assert all(sum(room.kind == "group" for room in r.rooms) == GROUPS_PER_USER for r in records)
    off_profile = [size for size in groups.values() if size not in (5, 20, 100)]
    assert len(off_profile) <= 1, off_profile  # at most the rounding's remainder room
    memberships = Counter()
    for size in groups.values():
        memberships[size] += size
    total = COUNT * GROUPS_PER_USER
    for size, percent in ((5, 50), (20, 30), (100, 20)):
        # Whole rooms only: 100-member rooms come in steps of 100 of 1,200 memberships.
        assert abs(memberships[size] / total * 100 - percent) <= 100 * 100 / total, (size, memberships)


def test_dms_pair_two_minted_users_and_bot_chats_hold_the_bot(minted):
    _, records, _ = minted
    ids = {r.id for r in records}
    bot = Bot.objects.select_related("user").get(user__username="helpbot")
    dm_users = [r for r in records if any(room.kind == "dm" for room in r.rooms)]
    bot_users = [r for r in records if any(room.kind == "bot" for room in r.rooms)]
    assert len(dm_users) == COUNT // 2 and len(bot_users) == COUNT // 10
    for room in Room.objects.filter(kind="dm"):
        members = set(room.memberships.values_list("user_id", flat=True))
        assert len(members) == 2 and members <= ids
        assert room.pair_key == ":".join(map(str, sorted(members)))  # as chat.services.open_dm keys them
    for room in Room.objects.filter(kind="bot"):
        members = set(room.memberships.values_list("user_id", flat=True))
        assert bot.user_id in members and len(members - {bot.user_id}) == 1
        assert room.bot_id == bot.pk


def test_every_user_can_join_all_its_rooms_with_the_apps_own_rules(minted):
    _, records, _ = minted
    for record in records[:50]:
        answers = services.join_rooms(record.id, [room.id for room in record.rooms])
        assert all(isinstance(a, dict) for a in answers.values()), answers
        for room in record.rooms:
            answer = answers[room.id]
            # A room without messages yet: seq counters start at 0, like a room made by the app.
            assert (answer["last_seq"], answer["last_read_seq"]) == (0, 0)
            if room.kind in join_rules.PAIR_KINDS:
                assert answer["peer"]["id"] != record.id


def test_a_groups_members_are_spread_over_locust_workers(minted):
    _, records, _ = minted
    shares = 4
    members: dict[int, set[int]] = defaultdict(set)
    for record in records:
        for room in record.rooms:
            if room.kind == "group":
                members[room.id].add(record.i % shares)
    sizes = {room.id: room.size for record in records for room in record.rooms}
    # Consecutive users: a room of at least `shares` members has one on every worker.
    assert all(len(workers) == shares for room_id, workers in members.items() if sizes[room_id] >= shares)
    assert sum(sizes[room_id] >= shares for room_id in members) > 100


def test_the_slices_of_the_workers_partition_the_users(minted):
    out, records, _ = minted
    slices = [list(iter_users(out, share=s, shares=3)) for s in range(3)]
    assert all(r.i % 3 == s for s, part in enumerate(slices) for r in part)
    assert sorted((r for part in slices for r in part), key=lambda r: r.i) == records
    with pytest.raises(ValueError, match="share 3 of 3"):
        list(iter_users(out, share=3, shares=3))


def test_the_same_seed_gives_the_same_rooms(db, tmp_path):
    def structure(path: Path) -> tuple[list[list[tuple[str, int]]], set[frozenset[int]]]:
        records = list(iter_users(path))
        by_room: dict[int, set[int]] = defaultdict(set)
        for r in records:
            for room in r.rooms:
                by_room[room.id].add(r.i)
        return [[(room.kind, room.size) for room in r.rooms] for r in records], {frozenset(m) for m in by_room.values()}

    mint(tmp_path / "a.jsonl", "--seed=5", prefix="sa", count=120)
    mint(tmp_path / "b.jsonl", "--seed=5", prefix="sb", count=120)
    mint(tmp_path / "c.jsonl", "--seed=6", prefix="sc", count=120)
    assert structure(tmp_path / "a.jsonl") == structure(tmp_path / "b.jsonl")
    assert structure(tmp_path / "a.jsonl") != structure(tmp_path / "c.jsonl")


# --- refusing and replacing ----------------------------------------------------------------------


def test_a_second_mint_of_a_prefix_is_refused_and_writes_nothing(minted, tmp_path):
    out, _, _ = minted
    users, rooms, before = get_user_model().objects.count(), Room.objects.count(), out.read_bytes()
    again = tmp_path / "again.jsonl"
    with pytest.raises(CommandError, match=f"{COUNT} users with prefix 'lt' exist already: pass --replace"):
        mint(again, "--seed=12")
    with pytest.raises(CommandError, match="exist already"):
        mint(out, "--seed=12")
    assert not again.exists() and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.jsonl"]  # no temporary file left
    assert (get_user_model().objects.count(), Room.objects.count()) == (users, rooms)


def test_replace_deletes_the_prefixs_users_rooms_and_tokens_first(minted):
    out, old, _ = minted
    other_prefix = mint(out.with_name("other.jsonl"), "--seed=1", prefix="keep", count=20)
    assert "users=20" in other_prefix
    old_rooms = {room.id for r in old for room in r.rooms}
    mint(out, "--seed=12", "--replace", count=COUNT // 2)
    new = list(iter_users(out))
    assert len(new) == COUNT // 2 and read_header(out)["count"] == COUNT // 2
    assert all(tokens.find_token(r.token) is None for r in old[:50])
    assert all(tokens.find_token(r.token) is not None for r in new)
    assert not Room.objects.filter(pk__in=old_rooms).exists()
    assert get_user_model().objects.filter(username__startswith="lt").count() == COUNT // 2
    assert get_user_model().objects.filter(username__startswith="keep").count() == 20  # another mint's
    assert all(tokens.find_token(r.token) for r in iter_users(out.with_name("other.jsonl")))


def test_replace_never_deletes_a_user_it_did_not_mint(db, tmp_path):
    get_user_model().objects.create_user(username="lt0000007", password="a-real-password-1")
    with pytest.raises(CommandError, match="'lt0000007' was not minted by loadtest_users"):
        mint(tmp_path / "u.jsonl", "--replace")
    assert get_user_model().objects.filter(username="lt0000007").exists()
    assert not (tmp_path / "u.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--room-sizes=5:50,20:30"], "add up to 80, not 100"),
        (["--room-sizes=5-50,20:50"], "'5-50' is not SIZE:PERCENT"),
        (["--room-sizes=1:100"], "a group of 1 member"),
        (["--prefix=1x"], "--prefix '1x'"),
        (["--bot=alice"], "--bot alice: that user is not a bot"),
    ],
)
def test_bad_options_are_clear_errors(db, tmp_path, args, error):
    get_user_model().objects.create_user(username="alice", password="a-real-password-1")
    with pytest.raises(CommandError, match=re.escape(error)):
        call_command("loadtest_users", "--count=10", f"--out={tmp_path / 'u.jsonl'}", *args,
                     stdout=io.StringIO(), stderr=io.StringIO())
    assert not (tmp_path / "u.jsonl").exists()
    assert not get_user_model().objects.filter(username__startswith="lt").exists()


def test_an_out_file_in_a_missing_directory_is_refused_before_minting(db, tmp_path):
    with pytest.raises(CommandError, match="no such directory"):
        mint(tmp_path / "missing" / "u.jsonl")
    assert not get_user_model().objects.filter(username__startswith="lt").exists()


def test_the_default_profile_on_fewer_users_says_which_rooms_it_cannot_make(db, tmp_path):
    out, stderr = tmp_path / "u.jsonl", io.StringIO()
    call_command("loadtest_users", "--count=300", f"--out={out}", "--seed=2", stdout=io.StringIO(), stderr=stderr)
    records = list(iter_users(out))
    sizes = Counter(room.size for r in records for room in r.rooms if room.kind == "group")
    # 5% of 900 group memberships cannot fill a room of 1000 (nor of 300 users): none is made.
    assert "1000:5 gives no room" in stderr.getvalue()
    assert {5, 20, 100} <= set(sizes) and max(sizes) == 100
    assert all(sum(room.kind == "group" for room in r.rooms) == 3 for r in records)


def test_a_room_bigger_than_the_users_is_cut_to_all_of_them(db, tmp_path):
    out, stderr = tmp_path / "u.jsonl", io.StringIO()
    call_command("loadtest_users", "--count=300", f"--out={out}", "--room-sizes=5:50,1000:50", "--seed=2",
                 stdout=io.StringIO(), stderr=stderr)
    records = list(iter_users(out))
    everyone = {room.id for room in records[0].rooms if room.size == 300}
    assert len(everyone) == 1 and all(everyone <= {room.id for room in r.rooms} for r in records)
    assert "rooms of 1000 cut to 300" in stderr.getvalue()


# --- the reader's errors ----------------------------------------------------------------------------


def write_lines(path: Path, *lines: Any, compact: bool = True) -> Path:
    """The lines as JSON, compact as the mint writes them unless `compact` is False."""
    separators = (",", ":") if compact else None
    path.write_text("".join(
        (line if isinstance(line, str) else json.dumps(line, separators=separators)) + "\n" for line in lines
    ))
    return path


HEADER = {"format": "parley-loadtest-users", "version": 1, "count": 2, "prefix": "lt", "created_at": "x",
          "params": {}, "rooms": {"group": 1, "dm": 0, "bot": 0}}


def user_line(i: int, **changes: Any) -> dict[str, Any]:
    return {"i": i, "id": 100 + i, "username": f"lt{i:07d}", "token": "t" * 43,
            "rooms": [{"id": 7, "kind": "group", "size": 2}], **changes}


@pytest.mark.parametrize("compact", [True, False])
def test_the_reader_reads_a_wellformed_file(tmp_path, compact):
    # Not compact: another writer's spacing is read too (in full, without the fast skim).
    path = write_lines(tmp_path / "u.jsonl", HEADER, user_line(0), user_line(1), compact=compact)
    assert list(iter_users(path, share=1, shares=2)) == [
        UserRecord(1, 101, "lt0000001", "t" * 43, (RoomRef(7, "group", 2),))
    ]


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([], r"u\.jsonl:1: empty file"),
        (["not json"], r"u\.jsonl:1: the header is not JSON"),
        ([{**HEADER, "format": "csv"}], r"u\.jsonl:1: not a parley-loadtest-users file \(format 'csv'\)"),
        ([{**HEADER, "version": 2}], r"u\.jsonl:1: users file version 2"),
        ([HEADER, user_line(0), "{oops"], r"u\.jsonl:3: not JSON"),
        ([HEADER, user_line(0), user_line(1, token=None)], r"u\.jsonl:3: 'token' should be str"),
        ([HEADER, user_line(0, rooms=[{"id": 1, "kind": "lobby", "size": 2}]), user_line(1)],
         r"u\.jsonl:2: room .* is not"),
        ([HEADER, user_line(1), user_line(0)], r"u\.jsonl:2: user index 1 where 0 should be"),
        ([HEADER, user_line(0)], r"the header says 2 users but the file holds 1 \(truncated\?\)"),
        ([HEADER, user_line(0), ""], r"u\.jsonl:3: empty line"),
    ],
)
def test_the_reader_names_the_line_of_a_bad_file(tmp_path, lines, error):
    path = write_lines(tmp_path / "u.jsonl", *lines) if lines else tmp_path / "u.jsonl"
    if not lines:
        path.write_text("")
    with pytest.raises(ValueError, match=error):
        read_header(path)
        list(iter_users(path))


def test_a_malformed_line_is_reported_by_the_worker_that_owns_it(tmp_path):
    # Workers skim other slices' lines; the line's owner parses it and reports it.
    path = write_lines(tmp_path / "u.jsonl", HEADER, user_line(0), user_line(1, rooms="none"))
    assert [r.i for r in iter_users(path, share=0, shares=2)] == [0]
    with pytest.raises(ValueError, match=r"u\.jsonl:3: 'rooms' should be list"):
        list(iter_users(path, share=1, shares=2))


# --- minted users on real processes -------------------------------------------------------------------


@pytest.mark.slow
async def test_minted_users_chat_in_their_rooms_on_real_processes(live_stack, tmp_path):
    out = tmp_path / "users.jsonl"
    await database_sync_to_async(mint)(out, "--seed=3", "--bot-fraction=0.5", count=40, prefix="live")
    records = list(iter_users(out))
    port = live_stack.start_protocol()
    live_stack.start_worker()

    def first_room(kind: str) -> tuple[RoomRef, list[UserRecord]]:
        room = next(room for r in records for room in r.rooms if room.kind == kind)
        return room, [r for r in records if room in r.rooms]

    group, group_members = first_room("group")
    dm, dm_members = first_room("dm")
    for room, members in ((group, group_members), (dm, dm_members)):
        sender, receiver = [await WsClient.connect(port, m.token) for m in members[:2]]
        assert (await sender.join(room.id))["type"] == "joined"
        assert (await receiver.join(room.id))["type"] == "joined"
        await sender.send({"type": "send", "room": room.id, "body": "hi", "client_msg_id": f"m-{room.id}"})
        ack = await sender.expect(lambda f: f["type"] == "ack")
        got = await receiver.expect(lambda f: f["type"] == "message")
        assert ack["seq"] == got["seq"] == 1  # the room's first message: last_seq started at 0
        await sender.close()
        await receiver.close()

    bot_room, (bot_user, *_) = first_room("bot")
    client = await WsClient.connect(port, bot_user.token)
    assert (await client.join(bot_room.id))["type"] == "joined"
    await client.send({"type": "send", "room": bot_room.id, "body": "hello", "client_msg_id": "b-1"})
    reply = await client.expect(lambda f: f["type"] == "message" and f["sender"]["username"] == "helpbot")
    assert reply["seq"] == 2 and bot_user.username in reply["body"]
    await client.close()
