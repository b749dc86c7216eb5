"""A long conversation in the full-screen chat shows a window of its turns (tui.conversation.SHOWN_TURNS):
the rest come as you turn the wheel on past its top or bottom, or click "earlier"/"later"; the
window slides, a new message goes back to the end, and a search hit deep in a saved chat opens
at its message.

Laying out every message of a 1,000-message chat on each streamed line stalled the screen
(benchmarks/sessions_bench.py); here the window is 3 turns, so 10 saved exchanges show it.
"""

from __future__ import annotations

import pytest
from textual import events

import tui.conversation
from gpt_runtime.store import Store, default_path
from pilot import run, type_command, until, views
from tui.app import QuillApp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def small_window(data_home, monkeypatch) -> None:
    monkeypatch.setattr(tui.conversation, "SHOWN_TURNS", 3)


def saved_chat(exchanges: int) -> dict[int, int]:
    """A saved session of `exchanges` exchanges ("question N", "answer N"); the ids of the questions."""
    questions = {}
    with Store(default_path()) as store:
        session, (asked, answer) = store.start_session("alpha", None, "question 0", "answer 0")
        questions[0] = asked
        for n in range(1, exchanges):
            questions[n], answer = store.add_exchange(session, answer, f"question {n}", f"answer {n}")
    return questions


def turns_shown(app: QuillApp) -> list[int]:
    return [v.turn for v in views(app, "user") if not v._pruning]


def more(app: QuillApp, which: str) -> str:
    widget = app.query_one(f"#{which}")
    return str(widget.render()) if widget.display else ""


async def wheel(pilot, app: QuillApp, to: str) -> None:
    """Scroll the conversation to its top or bottom, then turn the mouse wheel on past it, as
    a user would (scrolling there shows no more turns; the wheel past the edge does)."""
    c = app.conversation
    shown = c.shown
    c.scroll_home(animate=False) if to == "top" else c.scroll_end(animate=False)
    await pilot.pause(0.2)
    assert c.shown == shown
    kind = events.MouseScrollUp if to == "top" else events.MouseScrollDown
    c.post_message(kind(c, 1, 1, 0, -1 if to == "top" else 1, 0, False, False, False))


def test_a_long_chat_shows_its_last_turns_and_more_as_asked_and_a_new_message_goes_to_the_end(chat_profiles):
    saved_chat(10)
    app = QuillApp("alpha", resume="last")

    async def steps(pilot):
        await until(pilot, lambda: turns_shown(app) == [7, 8, 9])
        assert more(app, "earlier").startswith("↑ 7 earlier turns") and more(app, "later") == ""
        await wheel(pilot, app, "top")  # on past the top: the turns before come
        await until(pilot, lambda: turns_shown(app) == [4, 5, 6, 7, 8, 9])
        assert more(app, "earlier").startswith("↑ 4 earlier turns")
        await wheel(pilot, app, "top")  # the window slides up: the last turns go, "later" says so
        await until(pilot, lambda: turns_shown(app) == [1, 2, 3, 4, 5, 6])
        assert more(app, "later").startswith("↓ 3 later turns") and app.conversation.shown == (1, 7)
        await type_command(pilot, "/set max_new_tokens 4")
        await pilot.press(*"Speak", "enter")  # a new message: back to the end, after the last turns
        await until(pilot, lambda: not app.streaming and app.session.turns[-1].provenance is not None)
        assert turns_shown(app) == [7, 8, 9, 10] and more(app, "later") == ""
        assert [v.text for v in views(app, "user") if not v._pruning][-2:] == ["question 9", "Speak"]

    run(app, steps)


def test_a_search_hit_deep_in_a_long_chat_opens_at_its_message(chat_profiles):
    questions = saved_chat(10)
    app = QuillApp("alpha")

    async def steps(pilot):
        await type_command(pilot, f"/resume 1:{questions[2]}")
        await until(pilot, lambda: turns_shown(app) == [2, 3, 4])
        assert more(app, "earlier").startswith("↑ 2 earlier") and more(app, "later").startswith("↓ 5 later")
        await pilot.click("#later")  # at the bottom already: a click on it
        await until(pilot, lambda: turns_shown(app) == [2, 3, 4, 5, 6, 7])
        await wheel(pilot, app, "bottom")  # on past the bottom: the turns after come
        await until(pilot, lambda: turns_shown(app) == [4, 5, 6, 7, 8, 9])  # the window slides down too
        assert more(app, "later") == "" and more(app, "earlier").startswith("↑ 4 earlier")
        app.query_one("#input").focus()  # back to the message box from the click
        await type_command(pilot, "/set max_new_tokens 4")
        await type_command(pilot, "/undo")
        await until(pilot, lambda: turns_shown(app) == [4, 5, 6, 7, 8])
        await wheel(pilot, app, "top")
        await until(pilot, lambda: turns_shown(app) == [1, 2, 3, 4, 5, 6])
        assert more(app, "later").startswith("↓ 2 later")
        await type_command(pilot, "/edit 9 changed")  # below the window, not next to it: the window from there
        await until(pilot, lambda: not app.streaming and app.session.turns[-1].provenance is not None
                    and app.session.turns[-1].user == "changed")
        assert turns_shown(app) == [6, 7, 8] and more(app, "later") == ""
        assert [v.text for v in views(app, "user") if not v._pruning][-1] == "changed"

    run(app, steps)
