"""chat.process.ProcessState: the per-user socket books behind the cap (4009) and revocation."""

from __future__ import annotations

import pytest

from chat import process
from chat.process import ProcessState


class Conn:
    pass


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> ProcessState:
    import dataclasses

    monkeypatch.setattr(process, "CONFIG", dataclasses.replace(process.CONFIG, max_sockets_per_user=3))
    return ProcessState()


def test_a_user_is_capped_and_every_socket_is_found_until_it_leaves(state):
    a, b, c, d = Conn(), Conn(), Conn(), Conn()
    assert [state.add(conn, 7) for conn in (a, b, c, d)] == [True, True, True, False]
    assert set(state.of_user(7)) == {a, b, c} and d not in state.connections
    state.remove(b, 7)
    assert set(state.of_user(7)) == {a, c}
    assert state.add(d, 7)
    for conn in (a, c, d):
        state.remove(conn, 7)
    assert state.of_user(7) == [] and 7 not in state.by_user and not state.connections


def test_one_socket_is_booked_without_a_set_and_back_again(state):
    a, b = Conn(), Conn()
    state.add(a, 1)
    assert state.by_user[1] is a  # most users: no set per user
    state.add(b, 1)
    state.remove(a, 1)
    assert state.by_user[1] is b and state.of_user(1) == [b]
    state.remove(a, 1)  # twice: nothing changes
    assert state.of_user(1) == [b]
    state.remove(b, 1)
    assert state.of_user(1) == []
