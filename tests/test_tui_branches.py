"""Branching conversations in the full-screen chat: e edits a message in a window (the
conversation forks there, the old branch stays), messages with other versions show
"k/n" and ← → switch between them, /regen's reply is another version, /find's hits
resume a saved chat at their message, and the side panel sets the system text.

Driven through Textual's Pilot (tests/pilot.py) on the chat's small models (alpha).
"""

from __future__ import annotations

import pytest

from pilot import run, say, type_command, until, views
from tui.app import QuillApp
from tui.panels import SidePanel
from tui.screens import EditScreen, FindScreen

pytestmark = pytest.mark.usefixtures("one_torch_thread", "data_home")  # saved chats of each test its own


def noted(app: QuillApp) -> list[str]:
    """Record the app's notices from now on; returns the list they go to."""
    notes: list[str] = []
    app.notify = lambda message, **kwargs: notes.append(message)
    return notes


def shown(app: QuillApp) -> list[tuple[str, str]]:
    """The conversation on screen: (role, text) of each message, first to last."""
    return [(v.role, v.text) for v in views(app) if v.role in ("user", "model") and not v._pruning]


def conversation(app: QuillApp) -> list[tuple[str, str]]:
    """The session's current path, as `shown` gives it."""
    return [pair for t in app.session.turns for pair in (("user", t.user), ("model", t.reply))]


def message(app: QuillApp, turn: int, role: str = "user"):
    return next(v for v in views(app, role) if v.turn == turn and not v._pruning)


def version(app: QuillApp, turn: int, role: str = "user") -> str:
    return message(app, turn, role).version


async def short_chat(pilot, *messages: str) -> None:
    await type_command(pilot, "/set max_new_tokens 4")
    for text in messages:
        await say(pilot, text)


def test_e_edits_a_message_and_arrows_switch_between_the_branches(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await short_chat(pilot, "Speak", "hear me")
        session, old = app.session, list(app.session.turns)
        message(app, 1).focus()
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditScreen))
        box = app.screen.query_one("#edit")
        assert box.text == "hear me"  # the old text, to change
        box.text = "Citizen"
        await pilot.press("enter")
        await until(pilot, lambda: session.turns[-1].user == "Citizen" and session.turns[-1].provenance is not None
                    and not app.streaming)
        assert [t.user for t in session.turns] == ["Speak", "Citizen"] and session.turns[0] is old[0]
        assert [t.user for t in session.versions(1, "user")[0]] == ["hear me", "Citizen"]  # the old branch stays
        assert shown(app) == conversation(app)
        assert version(app, 1) == "2/2" and str(message(app, 1).border_title) == f"{session.template.user_name} · 2/2"
        assert version(app, 0) == "" and version(app, 1, "model") == ""
        assert message(app, 1, "model").border_subtitle  # the new reply streamed: its tokens and speed

        message(app, 1).focus()
        await pilot.press("left")
        await until(pilot, lambda: session.turns[-1] is old[1] and version(app, 1) == "1/2")
        assert shown(app) == conversation(app) == [("user", "Speak"), ("model", old[0].reply),
                                                   ("user", "hear me"), ("model", old[1].reply)]
        assert app.focused is message(app, 1)  # still on the message, to go on switching
        notes = noted(app)
        await pilot.press("left")  # the first version already: nothing changes
        await pilot.pause(0.1)
        assert session.turns[-1] is old[1] and notes == ["This is the first version (1/2)."]
        await pilot.press("right")
        await until(pilot, lambda: session.turns[-1].user == "Citizen" and version(app, 1) == "2/2")
        assert shown(app) == conversation(app)

    run(app, steps)


def test_regen_shows_the_reply_as_version_2_of_2_and_left_goes_back(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await short_chat(pilot, "Speak")
        session, first = app.session, app.session.turns[0]
        await type_command(pilot, "/regen")
        await until(pilot, lambda: len(session.versions(0, "model")[0]) == 2 and not app.streaming)
        reply = message(app, 0, "model")
        assert reply.version == "2/2" and str(reply.border_title) == f"{session.template.model_name} · 2/2"
        assert reply.border_subtitle.startswith(f"{session.turns[0].provenance.new_tokens} tokens · ")  # kept too
        assert version(app, 0) == ""  # the message itself has one version
        assert shown(app) == conversation(app)
        reply.focus()
        await pilot.press("left")
        await until(pilot, lambda: session.turns[0] is first and version(app, 0, "model") == "1/2")
        assert shown(app) == conversation(app) and message(app, 0, "model").text == first.reply

    run(app, steps)


def test_e_on_a_reply_is_refused_in_one_line_and_escape_cancels_an_edit(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await short_chat(pilot, "Speak", "hear me")
        notes = noted(app)
        message(app, 0, "model").focus()
        await pilot.press("e")
        await pilot.pause(0.1)
        assert notes == ["Only your messages can be edited: messages 1 to 2."]
        assert not isinstance(app.screen, EditScreen) and len(app.session.tree) == 2
        message(app, 0).focus()
        await pilot.press("right")  # a message with one version: said, nothing changes
        await pilot.pause(0.1)
        assert notes[-1] == "This message has no other versions: e edits it." and len(notes) == 2
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditScreen))
        app.screen.query_one("#edit").text = "Citizen"
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, EditScreen)
        assert [t.user for t in app.session.turns] == ["Speak", "hear me"] and len(app.session.tree) == 2

    run(app, steps)


def test_find_lists_hits_and_the_one_chosen_resumes_the_saved_chat_at_its_message(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await short_chat(pilot, "Speak", "hear me")
        session = app.session
        await type_command(pilot, "/edit 2 Citizen")  # the saved chat goes on from "Citizen" now
        await until(pilot, lambda: session.turns[-1].provenance is not None and not app.streaming)
        await type_command(pilot, "/clear")
        await until(pilot, lambda: not session.turns and not views(app, "user"))
        await type_command(pilot, "/find nowhere")  # no hits: said as text, no window
        await until(pilot, lambda: "no saved message holds 'nowhere'" in views(app)[-1].text)
        assert not isinstance(app.screen, FindScreen)
        await type_command(pilot, "/find hear")
        await until(pilot, lambda: isinstance(app.screen, FindScreen))
        await pilot.press("escape")  # closes, nothing resumed
        await until(pilot, lambda: not isinstance(app.screen, FindScreen))
        assert not session.turns
        await type_command(pilot, "/find hear")
        await until(pilot, lambda: isinstance(app.screen, FindScreen))
        hits = app.screen.hits
        assert [(h.role, h.snippet.replace("[", "").replace("]", "")) for h in hits] == [("user", "hear me")]
        await pilot.press("enter")
        await until(pilot, lambda: len(session.turns) == 2 and not isinstance(app.screen, FindScreen))
        await until(pilot, lambda: shown(app) == conversation(app))
        assert [t.user for t in session.turns] == ["Speak", "hear me"]  # at the hit, not where the chat was left
        assert session.saved_id == hits[0].session and version(app, 1) == "1/2"
        assert f"resumed session {hits[0].session}" in views(app, "output")[-1].text

    run(app, steps)


def test_the_side_panel_sets_and_resets_the_system_text(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await pilot.press("f2")
        await until(pilot, lambda: bool(app.query("#system")))
        field = app.query_one("#system")
        assert field.value == "" and app.session.system is None
        field.focus()
        await pilot.press(*"Be brief", "enter")
        await until(pilot, lambda: app.session.system == "Be brief\n")
        assert app.session.template.system == "Be brief\n"
        await until(pilot, lambda: "this chat's" in str(app.query_one(SidePanel).query("Label")[-1].render()))
        field = app.query_one("#system")
        assert field.value == "Be brief"
        field.value = ""
        field.focus()
        await pilot.press("enter")
        await until(pilot, lambda: app.session.system is None)
        assert app.session.template.system == app.session.profile.template.system

    run(app, steps)
