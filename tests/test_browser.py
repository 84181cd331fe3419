"""The chat page in a real headless Chromium (Playwright, sync API) against real Daphne + worker processes.

Two browser contexts (alice and bob) log in through the real /login/ form. The page talks to the
server only through its HTTP API and its one WebSocket, exactly as a user's browser would.
Screenshots land in var/screenshots/ (gitignored).
"""

from __future__ import annotations

import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from chat import admin
from parley.config import default_admin_socket

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "var" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PASSWORD = "parley-demo"  # seed_demo's password for alice and bob
WAIT_MS = 15_000
# Protocol processes: short drain jitter, so a `reconnect {delay_ms}` does not stall the test.
PROTOCOL_ENV = {"PARLEY_RECONNECT_JITTER_MS": "300"}


@pytest.fixture
def demo(transactional_db: None) -> None:
    """seed_demo's alice, bob (password parley-demo), public `lobby` and the `helpbot` bot."""
    call_command("seed_demo", verbosity=0)


@pytest.fixture
def archive(demo: None) -> None:
    """A group `archive` of alice's with 60 messages: more than one history page (50)."""
    from django.contrib.auth import get_user_model

    from chat.services import create_group, store_batch

    alice = get_user_model().objects.get(username="alice")
    room = create_group(alice, "archive", False)
    store_batch([
        {"room": room.pk, "sender": alice.pk, "body": f"old {n}", "client_msg_id": f"old-{n}"} for n in range(1, 61)
    ])


@pytest.fixture
def browser(demo: None, live_stack: Any) -> Iterator[Any]:
    """Debian's Chromium. Sync Playwright runs an event loop in this thread while it is open, and
    Django refuses ORM calls there: do database work in fixtures set up before this one."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: `make browser-deps` (or apt-get install chromium) installs it")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # assertions wait like actions do (the default is 5 s)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _static_served(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/chat/app.js", timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


class Chat:
    """One user's browser context on the chat page, with shortcuts for the page's test ids."""

    def __init__(self, browser: Any, port: int, username: str, viewport: dict[str, int] | None = None) -> None:
        from playwright.sync_api import expect

        self.username = username
        self.errors: list[str] = []
        self.context = browser.new_context(
            base_url=f"http://127.0.0.1:{port}", viewport=viewport or {"width": 1280, "height": 800}
        )
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto("/login/")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(PASSWORD)
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_url("**/")
        expect(self.state).to_have_attribute("data-state", "online")

    @property
    def state(self) -> Any:
        return self.page.get_by_test_id("conn-state")

    def room(self, name: str) -> Any:
        return self.page.locator(f'[data-testid="room-item"][data-room-name="{name}"]')

    def open_room(self, name: str) -> None:
        from playwright.sync_api import expect

        self.room(name).get_by_role("button").click()
        expect(self.page.get_by_test_id("room-title")).to_have_text(f"# {name}")
        expect(self.page.get_by_test_id("messages")).to_have_attribute("data-loaded", "true")

    def say(self, text: str) -> None:
        composer = self.page.get_by_test_id("composer-input")
        composer.fill(text)
        composer.press("Enter")

    def bodies(self) -> Any:
        return self.page.get_by_test_id("message-body")

    def seqs(self) -> list[int]:
        return [int(s) for s in self.page.locator('[data-testid="message"][data-seq]').evaluate_all(
            "items => items.map(item => item.dataset.seq)")]

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / name))

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], f"uncaught errors on {self.username}'s page: {self.errors}"


def test_two_users_chat_live_with_typing_presence_acks_and_unread(live_stack, browser):
    from playwright.sync_api import expect

    port = live_stack.start_protocol(**PROTOCOL_ENV)
    live_stack.start_worker()
    alice = Chat(browser, port, "alice")
    bob = Chat(browser, port, "bob")

    # Alice creates a public group in the page; bob finds it among the public rooms and joins it.
    alice.page.get_by_label("Room name").fill("design-review")
    alice.page.get_by_test_id("create-room-submit").click()
    expect(alice.page.get_by_test_id("room-title")).to_have_text("# design-review")
    expect(alice.page.get_by_test_id("empty-room")).to_have_text("No messages yet: say hello!")
    bob.page.get_by_test_id("refresh-rooms").click()
    public = bob.page.locator('[data-testid="public-room"][data-room-name="design-review"]')
    public.get_by_test_id("join-room").click()
    expect(bob.page.get_by_test_id("room-title")).to_have_text("# design-review")
    expect(bob.room("design-review")).to_have_count(1)
    expect(alice.page.get_by_test_id("presence")).to_have_text("Online: bob")
    # `joined.online` has ids only: bob's page counts alice until a frame tells it her name.
    expect(bob.page.get_by_test_id("presence")).to_have_text(re.compile(r"^Online: (alice|1 other)$"))

    # Typing shows at bob's while alice types; the message arrives live, as text (never as HTML).
    text = "Hi bob <b>not bold</b> & <script>alert(1)</script>"
    composer = alice.page.get_by_test_id("composer-input")
    composer.fill("Hi bob")
    expect(bob.page.get_by_test_id("typing")).to_have_text("alice is typing…")
    expect(bob.page.get_by_test_id("presence")).to_have_text("Online: alice")
    composer.fill(text)
    composer.press("Enter")
    expect(bob.bodies()).to_have_text([text])
    expect(bob.page.get_by_test_id("message-sender")).to_have_text(["alice"])
    assert bob.page.locator('[data-testid="message-list"] b, [data-testid="message-list"] script').count() == 0
    expect(bob.page.get_by_test_id("typing")).to_have_text("")  # her message ends her typing
    # Alice's own copy leaves the pending state once the server acked it.
    mine = alice.page.get_by_test_id("message").filter(has_text="Hi bob")
    expect(mine).to_have_attribute("data-seq", "1")
    expect(mine).not_to_have_attribute("data-pending", "true")
    expect(alice.page.get_by_test_id("pending-marker")).to_have_count(0)

    # Bob answers; alice sees it and bob's read marker ("Seen by bob") follows.
    bob.say("Hello alice")
    expect(alice.bodies()).to_have_text([text, "Hello alice"])
    expect(alice.page.get_by_test_id("read-receipt")).to_have_text("Seen by bob")

    # A message in another room shows as unread at bob's until he opens that room.
    alice.open_room("lobby")
    alice.say("lobby ping")
    expect(bob.room("lobby").get_by_test_id("unread-badge")).to_have_text("1")
    alice.shot("chat-alice-1280.png")
    bob.open_room("lobby")
    expect(bob.bodies()).to_have_text(["lobby ping"])
    expect(bob.room("lobby").get_by_test_id("unread-badge")).to_have_count(0)

    # Narrow screen: the room list is a drawer behind the "Rooms" button.
    bob.page.set_viewport_size({"width": 390, "height": 800})
    expect(bob.page.get_by_test_id("room-list")).not_to_be_visible()
    bob.page.get_by_test_id("menu-toggle").click()
    expect(bob.room("design-review")).to_be_visible()
    expect(bob.page.get_by_test_id("sidebar")).to_have_css("transform", "none")  # slid in
    bob.page.wait_for_timeout(300)  # let the transition settle for the screenshot
    bob.shot("chat-bob-narrow-drawer.png")
    bob.room("design-review").get_by_role("button").click()
    expect(bob.page.get_by_test_id("room-list")).not_to_be_visible()
    expect(bob.bodies()).to_have_text([text, "Hello alice"])
    bob.shot("chat-bob-narrow.png")
    alice.close()
    bob.close()


def test_bot_chat_answers_with_the_users_name_and_history_pages_load_on_demand(archive, live_stack, browser):
    from playwright.sync_api import expect

    port = live_stack.start_protocol(**PROTOCOL_ENV)
    live_stack.start_worker()
    alice = Chat(browser, port, "alice")

    alice.page.get_by_label("Chat with a user or bot").fill("helpbot")
    alice.page.get_by_test_id("dm-submit").click()
    expect(alice.page.get_by_test_id("room-title")).to_have_text("helpbot (bot)")
    expect(alice.page.get_by_test_id("invite-form")).to_be_hidden()  # only groups take invitations
    expect(alice.page.get_by_test_id("dm-list").get_by_test_id("room-item")).to_have_attribute(
        "data-room-name", "helpbot")
    alice.say("hello")
    expect(alice.bodies()).to_have_count(2)
    expect(alice.bodies().nth(0)).to_have_text("hello")
    expect(alice.bodies().nth(1)).to_contain_text("Hello alice!")
    expect(alice.page.get_by_test_id("message-sender")).to_have_text(["alice", "helpbot"])

    # An unknown user is reported in the status line, without blocking the page.
    alice.page.get_by_label("Chat with a user or bot").fill("nobody-here")
    alice.page.get_by_test_id("dm-submit").click()
    expect(alice.page.get_by_test_id("status")).to_contain_text("no user named 'nobody-here'")
    expect(alice.page.get_by_test_id("room-title")).to_have_text("helpbot (bot)")
    alice.shot("chat-helpbot.png")

    # History: the newest page first, older pages on demand, in seq order without duplicates.
    expect(alice.room("archive").get_by_test_id("unread-badge")).to_have_text("60")
    alice.open_room("archive")
    expect(alice.bodies()).to_have_count(50)
    assert alice.seqs() == list(range(11, 61))
    alice.page.get_by_test_id("load-older").click()
    expect(alice.bodies()).to_have_count(60)
    assert alice.seqs() == list(range(1, 61))
    expect(alice.bodies().first).to_have_text("old 1")
    expect(alice.page.get_by_test_id("load-older")).to_be_hidden()
    expect(alice.room("archive").get_by_test_id("unread-badge")).to_have_count(0)
    alice.close()


def test_page_reconnects_by_itself_and_resumes_missed_messages_in_order(live_stack, browser):
    from playwright.sync_api import expect

    port_a = live_stack.start_protocol(**PROTOCOL_ENV)
    port_b = live_stack.start_protocol(**PROTOCOL_ENV)
    bobs_process = live_stack.processes[-1]
    live_stack.start_worker()
    alice = Chat(browser, port_a, "alice")
    bob = Chat(browser, port_b, "bob")
    alice.open_room("lobby")
    bob.open_room("lobby")
    alice.say("before the restart")
    expect(bob.bodies()).to_have_text(["before the restart"])

    # Bob's protocol process drains (`reconnect {delay_ms}`, close 4012), as before a pod stops,
    # then exits: his page keeps trying, with backoff, and tells him so.
    assert admin.call("drain", default_admin_socket(port_b))["draining"] is True
    expect(bob.state).to_have_attribute("data-state", "reconnecting")
    os.killpg(bobs_process.pid, signal.SIGTERM)
    bobs_process.wait(timeout=15)

    # Bob writes while offline: the send waits, marked pending, for the connection to return.
    bob.say("written offline")
    offline_note = bob.page.get_by_test_id("message").filter(has_text="written offline")
    expect(offline_note).to_have_attribute("data-pending", "true")
    missed = [f"missed {n}" for n in range(1, 4)]
    for body in missed:
        alice.say(body)
    expect(alice.bodies()).to_have_text(["before the restart", *missed])
    expect(alice.page.get_by_test_id("pending-marker")).to_have_count(0)
    bob.shot("reconnect-bob-offline.png")

    # A protocol process comes back on the same port: bob's page reconnects on its own, resumes
    # the lobby from its last seq and re-sends the pending message (same client_msg_id).
    live_stack.start_protocol(port=port_b, **PROTOCOL_ENV)
    expect(bob.state).to_have_attribute("data-state", "online", timeout=30_000)
    expected = ["before the restart", *missed, "written offline"]
    expect(bob.bodies()).to_have_text(expected)
    expect(bob.page.get_by_test_id("pending-marker")).to_have_count(0)
    assert bob.seqs() == [1, 2, 3, 4, 5]  # in order, no duplicates, nothing pending
    expect(alice.bodies()).to_have_text(expected)
    assert alice.seqs() == [1, 2, 3, 4, 5]
    expect(bob.page.get_by_test_id("presence")).to_have_text("Online: alice")
    bob.shot("reconnect-bob-online.png")
    alice.close()
    bob.close()


def test_protocol_process_serves_the_page_assets(live_stack):
    port = live_stack.start_protocol()
    assert _static_served(port)
