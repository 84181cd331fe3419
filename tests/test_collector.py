"""chat.collector: survivors are frozen out of the collector's passes, and frozen garbage is
still reclaimed by the periodic full pass."""

from __future__ import annotations

import gc
import weakref

import pytest

from chat import collector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()


def test_survivors_leave_the_passes_and_frozen_cycles_are_reclaimed_by_the_full_pass():
    gc.unfreeze()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle, as a closed socket's protocol and transport make
    gone = weakref.ref(a)
    collector.freeze_survivors()
    assert gc.get_freeze_count() > 0
    tracked_before = len(gc.get_objects(generation=2))
    del a, b
    gc.collect()  # what the interpreter's own passes do: frozen objects are not scanned
    assert gone() is not None
    assert len(gc.get_objects(generation=2)) <= tracked_before
    collector.full_pass()
    assert gone() is None
    assert gc.get_freeze_count() > 0  # frozen again after the pass
