"""Snapshots of the chat's main screens at 80x24 and 120x40 (pytest-textual-snapshot).

Only screens that are the same on every run: no speeds, no random replies. The
conversation comes from a saved transcript. After a deliberate change to the
look, review the new SVGs by eye and accept them with `pytest --snapshot-update`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import tui.app
from tui.app import QuillApp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRANSCRIPT = {"format": "quill-transcript", "turns": [
    {"user": "Speak, speak.", "reply": "You are all resolved rather to die than to famish?"},
    {"user": "Resolved. resolved.", "reply": "First, you know Caius is chief enemy to the people."},
]}


def loaded(*then: str, ready=lambda app: True):
    """A run_before that waits for the model, presses keys, then waits for `ready(app)`."""
    async def run_before(pilot) -> None:
        deadline = time.monotonic() + 60
        while pilot.app.profile_name is None and time.monotonic() < deadline:
            await pilot.pause(0.05)
        if then:
            await pilot.press(*then)
        while not ready(pilot.app) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        steady_cursors(pilot.app)
        await pilot.pause(0.3)
    return run_before


def steady_cursors(app) -> None:
    """A blinking cursor is drawn or not depending on when the picture is taken."""
    for screen in app.screen_stack:
        for box in screen.query("TextArea, Input"):
            box.cursor_blink = False
            box.refresh()  # its lines are cached with the cursor as it was


class SteadyApp(QuillApp):
    """The app with a message box whose cursor never blinks, from the first frame."""

    CSS_PATH = Path(tui.app.__file__).with_name(QuillApp.CSS_PATH)

    def on_mount(self) -> None:  # runs after QuillApp.on_mount
        steady_cursors(self)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_the_chat_on_start(snap_compare, chat_profiles, size):
    assert snap_compare(SteadyApp("alpha"), terminal_size=size, run_before=loaded())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_a_conversation(snap_compare, chat_profiles, tmp_path, size):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(TRANSCRIPT))

    async def run_before(pilot) -> None:
        await loaded()(pilot)
        pilot.app.query_one("#input").text = f"/load {path}"
        await pilot.press("enter")
        deadline = time.monotonic() + 30
        while len(pilot.app.session.turns) < 2 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        pilot.app.query_one("#conversation").scroll_home(animate=False)
        pilot.app.query("MessageView.output").remove()  # "loaded ... from /tmp/...": a path that changes
        await pilot.pause(0.2)

    assert snap_compare(SteadyApp("alpha"), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_the_side_panel(snap_compare, chat_profiles, size):
    has_options = lambda app: bool(app.query("#set-model_name"))  # noqa: E731 - the panel is built
    assert snap_compare(SteadyApp("alpha"), terminal_size=size, run_before=loaded("f2", ready=has_options))


def test_the_jobs_panel_empty(snap_compare, chat_profiles):
    assert snap_compare(SteadyApp("alpha"), terminal_size=(120, 40), run_before=loaded("f3"))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_the_help_screen(snap_compare, chat_profiles, size):
    assert snap_compare(SteadyApp("alpha"), terminal_size=size, run_before=loaded("f1"))


def test_the_tokenizer_inspector(snap_compare, chat_profiles):
    async def run_before(pilot) -> None:
        await loaded()(pilot)
        pilot.app.query_one("#input").text = "/tokens You are all resolved"
        await pilot.press("enter")
        await pilot.pause(0.3)

    assert snap_compare(SteadyApp("alpha"), terminal_size=(80, 24), run_before=run_before)


def test_too_small(snap_compare, chat_profiles):
    assert snap_compare(SteadyApp("alpha"), terminal_size=(50, 12), run_before=loaded())
