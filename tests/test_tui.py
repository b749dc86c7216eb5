"""The full-screen chat, driven through Textual's Pilot as a user would drive it.

The models are the chat's small ones (conftest's chat_profiles: alpha and beta); the
third-party plugin is the installed example, quill-xtc. tests/pilot.py drives the app.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from helpers import SAMPLE_TEXT, add_builtin_plugin
from pilot import run, say, type_command, until, views

from gpt_runtime.data import prepare
from gpt_runtime.tokenizer import train_tokenizer
from tui.app import QuillApp
from tui.panels import JobCard, SidePanel
from tui.screens import (
    CompareScreen,
    ConfirmScreen,
    HelpScreen,
    ProbabilityScreen,
    ProvenanceScreen,
    TokensScreen,
)
from tui.widgets import MessageView

pytestmark = pytest.mark.usefixtures("one_torch_thread")


async def start_a_long_reply(pilot, tokens: int = 1) -> None:
    """Send "Speak" with no practical length limit; return once `tokens` have streamed."""
    app = pilot.app
    await type_command(pilot, "/set max_new_tokens 100000")
    await pilot.press(*"Speak", "enter")
    await until(pilot, lambda: bool(app.streaming) and len(app.streaming[0].tokens) >= tokens)


def burst(app: QuillApp, keys: str) -> None:
    """`keys` as a terminal delivers them in one read (tmux send-keys, a paste without
    brackets): every key queued before the app handles the first, with no pause between."""
    from textual._xterm_parser import XTermParser  # the parser the terminal driver uses

    for event in XTermParser().feed(keys):
        app.post_message(event)


def test_a_message_streams_its_reply_and_the_status_line_tells(chat_profiles):
    app = QuillApp("beta")  # beta always says 20 tokens

    async def steps(pilot):
        empty = len(app.session.loaded.tokenizer.encode("You: \nBot: "))  # the template alone
        assert f"beta │ logit_bias,top_k,temperature │ cpu float32 │ – tok/s │ context {empty}/64" in str(
            app.query_one("#status").render())
        await say(pilot, "Speak")
        user, reply = views(app, "user")[-1], views(app, "model")[-1]
        session = app.session
        assert user.text == "Speak" and user.border_title == "User" and reply.border_title == "Quill"
        assert reply.text == session.turns[0].reply and reply.text
        assert len(reply.tokens) == session.turns[0].provenance.new_tokens  # streamed token by token
        assert all(t.prob is not None and len(t.top) == 5 for t in reply.tokens)
        status = str(app.query_one("#status").render())
        assert f"{session.turns[0].provenance.tokens_per_second:.0f} tok/s" in status
        used, block = session.context_used()
        assert f"context {used}/{block}" in status and used > 0
        assert reply.border_subtitle.startswith(f"{session.turns[0].provenance.new_tokens} tokens · ")

    run(app, steps)


def test_escape_stops_a_reply_and_the_chat_goes_on(chat_profiles):
    app = QuillApp("beta")

    async def steps(pilot):
        await start_a_long_reply(pilot, tokens=4)
        await pilot.press("escape")
        await until(pilot, lambda: not app.streaming)
        reply = views(app, "model")[-1]
        assert reply.border_subtitle.endswith("· stopped")
        assert app.session.turns[0].provenance.reason == "cancelled" and not app.session.busy
        await type_command(pilot, "/set max_new_tokens 3")
        await say(pilot, "hear me")
        assert app.session.turns[1].provenance.new_tokens == 3

    run(app, steps)


def test_scrolling_up_to_read_is_not_undone_by_a_streaming_reply(chat_profiles):
    app = QuillApp("beta")

    async def steps(pilot):
        conversation = app.query_one("#conversation")
        await start_a_long_reply(pilot)
        await until(pilot, lambda: conversation.max_scroll_y > 5)
        conversation.scroll_home(animate=False)
        await pilot.pause(0.5)  # ten draws of the streaming reply
        assert conversation.scroll_y == 0
        await pilot.press("escape")
        await until(pilot, lambda: not app.streaming)
        await type_command(pilot, "/set max_new_tokens 5")
        await say(pilot, "hear me")  # a new message goes back to the end
        assert conversation.scroll_y == conversation.max_scroll_y

    run(app, steps)


def test_a_message_sent_while_a_reply_streams_is_refused_not_interleaved(chat_profiles):
    app = QuillApp("beta")

    async def steps(pilot):
        await start_a_long_reply(pilot)
        await pilot.press(*"again", "enter")
        await pilot.pause(0.2)
        assert app.query_one("#input").text == "again"  # refused, and kept for later
        assert [v.text for v in views(app, "user")] == ["Speak"]
        await pilot.press("escape")
        await until(pilot, lambda: not app.streaming)
        assert [t.user for t in app.session.turns] == ["Speak"]

    run(app, steps)


def test_switching_profile_and_sampler_mid_chat_keeps_the_conversation(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await say(pilot, "Speak")
        await type_command(pilot, "/profile beta")
        await until(pilot, lambda: app.profile_name == "beta")
        assert app.session.profile.name == "beta" and len(app.session.turns) == 1
        assert "switched to profile beta" in views(app, "output")[-1].text
        await type_command(pilot, "/sampler greedy")
        await until(pilot, lambda: app.session.chain == "greedy")
        await say(pilot, "hear me")
        assert app.session.turns[1].provenance.chain == "greedy" and app.session.turns[1].provenance.profile == "beta"
        assert "beta │ greedy │" in str(app.query_one("#status").render())
        assert [v.text for v in views(app, "user")] == ["Speak", "hear me"]

    run(app, steps)


def test_the_side_panel_edits_options_in_place_and_switches_profile(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await pilot.press("f2")
        await pilot.pause(0.2)
        panel = app.query_one(SidePanel)
        assert panel.display
        temperature = panel.query_one("#set-temperature-t")
        assert temperature.value == "0.9"
        temperature.focus()
        temperature.value = "0.5"
        await pilot.press("enter")
        await until(pilot, lambda: app.session.options["temperature"] == {"t": 0.5})
        bad = panel.query_one("#set-top_k-k")
        bad.focus()
        bad.value = "-3"
        await pilot.press("enter")
        await until(pilot, lambda: bool(views(app, "error")))
        assert "top_k.k" in views(app, "error")[-1].text and app.session.options["top_k"] == {"k": 20}
        # refused, so the panel shows the value in force again, not the one typed
        await until(pilot, lambda: app.query_one("#set-top_k-k").value == "20")
        chain = panel.query_one("#chain")
        chain.focus()
        chain.value = "top_k,xtc,temperature"  # a third-party sampler, with no UI code of its own
        await pilot.press("enter")
        await until(pilot, lambda: app.session.chain == "top_k,xtc,temperature")
        await pilot.pause(0.2)
        panel = app.query_one(SidePanel)
        labels = [str(label.render()) for label in panel.query("Label")]
        assert "xtc  [xtc]" in labels and any(text.startswith("threshold: ") for text in labels)
        assert "xtc" in str(panel.query_one("#sampler-names").render())
        assert panel.query_one("#set-xtc-threshold").value == "0.1"
        panel.query_one("#profile-select").value = "beta"
        await until(pilot, lambda: app.profile_name == "beta")
        assert app.session.profile.name == "beta"

    run(app, steps)


def test_completion_as_you_type_and_tab(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await pilot.press("/", "p", "r", "o")
        await pilot.pause(0.1)
        assert str(app.query_one("#suggestions").render()) == "Tab: /profile  /profiles"
        await pilot.press("f", "i", "l", "e", "space", "b")
        await pilot.pause(0.1)
        await pilot.press("tab")
        assert app.query_one("#input").text == "/profile beta"
        app.query_one("#input").text = "/x"
        await pilot.pause(0.1)
        await pilot.press("tab")
        assert app.query_one("#input").text == "/xtc "  # a plugin's command completes too

    run(app, steps)


def test_enter_right_behind_the_text_sends_it(chat_profiles):
    # The issue: tmux `send-keys "/show" Enter` left /show in the box, and "/clear" Enter
    # then a message sent "/clearSpeak, good sir.".
    app = QuillApp("beta")

    async def steps(pilot):
        box = app.query_one("#input")
        burst(app, "/show\r")
        await until(pilot, lambda: bool(views(app, "output")), timeout=10)
        assert "profile" in views(app, "output")[-1].text and box.text == ""
        await say(pilot, "Speak")
        burst(app, "/clear\rhear\nme")  # what follows Enter is the next message, in order, Ctrl+J included
        await until(pilot, lambda: not app.session.turns and box.text, timeout=10)
        assert box.text == "hear\nme" and not views(app, "user")
        await pilot.press("enter")
        await until(pilot, lambda: not app.streaming and len(views(app, "model")) == 1)
        assert [t.user for t in app.session.turns] == ["hear\nme"] and box.text == ""

    run(app, steps)


def test_the_tokenizer_inspector_and_the_probability_view(chat_profiles):
    app = QuillApp("beta")  # replies of 20 tokens: there is a second token to move to

    async def steps(pilot):
        await type_command(pilot, "/tokens Speak")
        screen = app.screen
        assert isinstance(screen, TokensScreen)
        tok = app.session.loaded.tokenizer
        ids = tok.encode("Speak")
        table = screen.table
        assert [str(c) for c in table.columns[1].cells] == [str(i) for i in ids]
        assert str(screen.query_one("#pieces").render()).replace("·", " ") == "Speak"
        await pilot.press("escape")
        await say(pilot, "Speak")
        reply = views(app, "model")[-1]
        reply.focus()
        await pilot.press("p")
        screen = app.screen
        assert isinstance(screen, ProbabilityScreen)
        first = reply.tokens[0]
        alternatives = screen.shown
        assert str(screen.query_one("#token").render()).startswith(f"token 1 of {len(reply.tokens)}: ")
        chosen = [] if first.id in [i for i, _, _ in first.top] else [first.prob]  # sampled from outside the top 5
        assert [c for c in alternatives.columns[2].cells] == [f"{p:.1%}" for p in [p for _, _, p in first.top] + chosen]
        await pilot.press("right")
        assert str(screen.query_one("#token").render()).startswith(f"token 2 of {len(reply.tokens)}: ")
        tok = app.session.loaded.tokenizer
        assert screen.pieces == [tok.pieces[t.id].decode() for t in reply.tokens]  # each token's own text
        await pilot.press("escape")
        reply.focus()
        await pilot.press("i")
        assert isinstance(app.screen, ProvenanceScreen)
        await pilot.press("escape")

    run(app, steps)


def test_compare_shows_two_replies_side_by_side(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await say(pilot, "Speak")
        await type_command(pilot, "/compare greedy | top_k,greedy")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen))
        sides = app.screen.sides
        assert [s.side for s in sides] == ["greedy", "top_k,greedy"] and sides[0].text == sides[1].text
        shown = [v for v in app.screen.query(".side")]
        assert [v.border_title for v in shown] == ["greedy", "top_k,greedy"]
        assert all(v.border_subtitle.endswith("tokens/s") for v in shown)

    run(app, steps)


def test_errors_are_notices_and_the_app_goes_on(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        for line, said in (("/bogus", "unknown command /bogus\nhint: /help lists the commands"),
                           ("/profile gamma", "no profile named 'gamma'"),
                           ("/set nope 1", "there is no setting 'nope'"),
                           ("/cancel 9", "there is no job 9"),
                           ("/train --data /nowhere --out /tmp/x", "no data at '/nowhere'")):
            await type_command(pilot, line)
            await until(pilot, lambda: bool(views(app, "error")) and said in views(app, "error")[-1].text)
        await say(pilot, "Speak")  # and the chat goes on
        assert app.session.turns[-1].reply == views(app, "model")[-1].text

    run(app, steps)


def test_help_lists_keys_and_every_command_plugins_included(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        from rich.console import Console

        from gpt_runtime import commands

        console = Console(width=200, record=True, file=io.StringIO())
        for table in app.screen.tables:
            console.print(table)
        text = console.export_text()

        for entry in commands.commands():
            assert entry.meta["usage"] in text and entry.meta["help"] in text
        assert "/xtc on|off" in text  # the installed plugin's command
        for key in ("F1", "F2", "F3", "F4", "Escape", "Ctrl+P", "Alt+Enter, Ctrl+J", "Ctrl+Y"):
            assert key in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    run(app, steps)


def test_a_terminal_too_small_says_so(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        assert app.query_one("#too-small").display and not app.query_one("#main").display
        await pilot.resize_terminal(100, 30)
        await pilot.pause(0.1)
        assert not app.query_one("#too-small").display and app.query_one("#main").display

    run(app, steps, size=(50, 12))


def tiny_data(root: Path) -> Path:
    tok = train_tokenizer("char", SAMPLE_TEXT)
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 4)
    prepare(corpus, tok, root / "data", val_fraction=0.2)
    return root / "data"


def test_a_training_job_runs_in_the_jobs_panel_and_its_model_opens_in_the_chat(chat_profiles, tmp_path):
    data = tiny_data(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    app = QuillApp("alpha")

    async def steps(pilot):
        await type_command(pilot, f"/train --data {data} --out {run_dir} --n-layer 1 --n-head 2 --n-embd 16 "
                                  "--block-size 16 --batch-size 4 --max-steps 20 --eval-interval 10 --log-interval 5")
        await until(pilot, lambda: app.query_one("#jobs").display and bool(app.query(JobCard)))
        card = app.query_one(JobCard)
        await until(pilot, lambda: card.job.profile is not None, timeout=120)
        await pilot.pause(0.4)
        assert card.job.status == "finished" and len(card.job.history) == 4
        plot = card.query_one("#plot")
        assert [p[0] for p in plot.points] == [5, 10, 15, 20] and plot.points[1][2] is not None
        assert "•" in str(plot.render()) and "o" in str(plot.render())
        assert card.query_one("#progress").percentage == 1.0
        assert card.query_one("#open").display and not card.query_one("#cancel").display
        assert any(f"profile {card.job.profile!r} is ready" in v.text for v in views(app, "notice"))
        await pilot.click("#open")
        await until(pilot, lambda: app.profile_name == card.job.profile)
        assert app.session.profile.checkpoint == (run_dir / "best.safetensors").resolve()
        await say(pilot, "Speak")
        assert app.session.turns[-1].provenance.profile == card.job.profile

    run(app, steps)


def test_a_finetune_job_opens_as_a_profile_from_its_card(chat_profiles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    app = QuillApp("alpha")

    async def steps(pilot):
        await type_command(pilot, "/finetune notes.txt --max-steps 4 --eval-interval 2 --eval-steps 1 --batch-size 2")
        await until(pilot, lambda: bool(app.query(JobCard)))
        card = app.query_one(JobCard)
        await until(pilot, lambda: card.job.profile is not None, timeout=120)
        await pilot.pause(0.4)
        assert card.job.kind == "finetune" and card.job.status == "finished" and card.job.profile == "alpha-finetune"
        assert card.query_one("#open").display
        await pilot.click("#open")
        await until(pilot, lambda: app.profile_name == "alpha-finetune")
        assert app.session.profile.checkpoint == (tmp_path / "runs" / "alpha-finetune" / "best.safetensors").resolve()
        await say(pilot, "Speak")
        assert app.session.turns[-1].provenance.profile == "alpha-finetune"

    run(app, steps)


def test_quitting_while_a_job_runs_asks_first(chat_profiles, tmp_path):
    data = tiny_data(tmp_path)
    app = QuillApp("alpha")

    async def steps(pilot):
        await type_command(pilot, f"/train --data {data} --out {tmp_path / 'long'} --n-layer 1 --n-head 2 "
                                  "--n-embd 16 --block-size 16 --batch-size 4 --max-steps 100000")
        await until(pilot, lambda: bool(app.session.jobs.all()))
        job = app.session.jobs.all()[0]
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause(0.1)
        assert job.status == "running" and not isinstance(app.screen, ConfirmScreen)
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)
        await pilot.press("y")
        # Stopping waits for the trainer to save; on a busy machine that takes a moment.
        await until(pilot, lambda: job.status in ("cancelled", "finished") and job.process.poll() is not None)

    run(app, steps)


def test_copy_theme_palette_and_moving_to_a_message(chat_profiles, monkeypatch):
    app = QuillApp("beta")
    copied = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)

    async def steps(pilot):
        await pilot.press("ctrl+y")
        await say(pilot, "Speak")
        await say(pilot, "hear me")
        await pilot.press("ctrl+y")
        assert copied == [app.session.turns[1].reply]
        await pilot.press("shift+tab")  # from the message box up to the last message
        assert isinstance(app.focused, MessageView) and app.focused.text == app.session.turns[1].reply
        for _ in range(4):  # up past "hear me" (and a notice, if the context filled up)
            await pilot.press("shift+tab")
            if app.focused.text == app.session.turns[0].reply:
                break
        assert app.focused.text == app.session.turns[0].reply
        await pilot.press("c")
        assert copied[-1] == app.session.turns[0].reply
        theme = app.theme
        await pilot.press("ctrl+t")
        assert {theme, app.theme} == {"textual-dark", "textual-light"}
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"Side panel")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.query_one("#side").display

    run(app, steps)


def test_a_plugin_that_raises_in_the_ui_is_named_and_the_app_goes_on(chat_profiles, monkeypatch):
    from gpt_runtime.hookspecs import hookimpl

    def boom(session, args):
        return 1 / 0

    class Boomer:
        @hookimpl
        def quill_register_commands(self, register):
            register("/boom", boom, help="always fails", usage="/boom")

    add_builtin_plugin(monkeypatch, "boomer", Boomer())
    app = QuillApp("alpha")

    async def steps(pilot):
        await type_command(pilot, "/boom")
        await until(pilot, lambda: bool(views(app, "error")))
        assert views(app, "error")[-1].text == ("command /boom (plugin 'boomer') failed: ZeroDivisionError: division by "
                                                "zero")
        await say(pilot, "Speak")

    run(app, steps)


def test_a_plugins_command_results_are_shown_by_type_as_a_built_ins_are(chat_profiles, monkeypatch):
    from gpt_runtime import commands
    from gpt_runtime.hookspecs import hookimpl

    def forget(session, args):  # a plugin's own /undo
        session.undo()
        return commands.TurnsChanged("forgotten", kept=len(session.turns))

    class Mine:
        @hookimpl
        def quill_register_commands(self, register):
            register("/peek", lambda session, args: commands.TokenView(session.loaded.tokenizer, args))
            register("/forget", forget)
            register("/busy", lambda session, args: commands.JobsChanged("nothing runs"))
            register("/again", lambda session, args: session.regenerate())  # an iterator, as before the types

    add_builtin_plugin(monkeypatch, "mine", Mine())
    app = QuillApp("alpha")

    async def steps(pilot):
        await type_command(pilot, "/peek Speak")
        await until(pilot, lambda: isinstance(app.screen, TokensScreen))
        assert app.screen.view.pieces == list("Speak")
        await pilot.press("escape")
        await say(pilot, "Speak")
        await say(pilot, "hear me")
        await type_command(pilot, "/forget")
        await until(pilot, lambda: [v.text for v in views(app, "user")] == ["Speak"])
        assert views(app, "model")[0].tokens and views(app, "output")[-1].text == "forgotten"
        await type_command(pilot, "/busy")
        await until(pilot, lambda: app.query_one("#jobs").display)
        before = views(app, "model")[-1]
        await type_command(pilot, "/again")
        await until(pilot, lambda: not app.streaming and views(app, "model")[-1] is not before)
        assert len(views(app, "model")) == 1

    run(app, steps)


def test_a_reply_that_fails_midway_keeps_its_error_in_view(chat_profiles, monkeypatch):
    from gpt_runtime.hookspecs import hookimpl
    from gpt_runtime.sampling import Sampler

    class Breaks(Sampler):
        name = "breaks"

        def apply(self, logits, state):
            if state.step == 2:
                raise RuntimeError("the sampler broke")
            return logits

    class Plugin:
        @hookimpl
        def quill_register_samplers(self, register):
            register("breaks", Breaks)

    add_builtin_plugin(monkeypatch, "breaks", Plugin())
    app = QuillApp("beta")

    async def steps(pilot):
        await type_command(pilot, "/sampler breaks")
        await until(pilot, lambda: app.session.chain == "breaks")
        await pilot.press(*"Speak", "enter")
        await until(pilot, lambda: not app.streaming and bool(views(app, "error")))
        await pilot.pause(0.3)  # the conversation is redrawn: the error must stay
        assert "the sampler broke" in views(app, "error")[-1].text

    run(app, steps)


def test_undo_keeps_what_it_says_and_the_other_replies_probabilities(chat_profiles):
    app = QuillApp("beta")

    async def steps(pilot):
        await say(pilot, "Speak")
        await say(pilot, "hear me")
        await type_command(pilot, "/undo")
        await until(pilot, lambda: bool(views(app, "output")) and "forgot: 'hear me'" in views(app, "output")[-1].text)
        await pilot.pause(0.2)
        assert [v.text for v in views(app, "user")] == ["Speak"]
        assert len(views(app, "model")) == 1 and views(app, "model")[0].tokens
        assert "forgot: 'hear me'" in views(app, "output")[-1].text

    run(app, steps)


def test_a_profile_that_fails_to_load_leaves_a_way_out(chat_profiles):
    app = QuillApp("gamma")  # there is no such profile

    async def steps(pilot):
        await until(pilot, lambda: bool(views(app, "error")))
        assert views(app, "error")[-1].text.startswith("no profile named 'gamma'")
        assert app.session is None and "/profile NAME" in str(app.query_one("#status").render())
        await pilot.press(*"Speak", "enter")  # refused, the text kept
        assert app.query_one("#input").text == "Speak"
        await type_command(pilot, "/profiles")  # the command itself, with no profile marked current
        await until(pilot, lambda: bool(views(app, "output")))
        assert views(app, "output")[-1].text == "  alpha  [user]  alpha: short replies\n  beta  [user]  beta: never stops by itself"
        assert "/profile NAME" in str(app.query_one("#status").render())
        await type_command(pilot, "/show")
        await until(pilot, lambda: views(app, "error")[-1].text.startswith("no model is loaded\nhint: pick one"))
        await type_command(pilot, "/profile alpha")
        await until(pilot, lambda: app.profile_name == "alpha")
        await type_command(pilot, "/set user_name [/]")  # markup characters are just text
        await say(pilot, "Speak")
        assert views(app, "user")[-1].text == "Speak" and "[/]" in views(app, "user")[-1].border_title

    async def main() -> None:
        async with app.run_test(size=(100, 32)) as pilot:
            await steps(pilot)
    asyncio.run(main())


def test_warnings_are_shown_as_notices(chat_profiles):
    app = QuillApp("alpha")

    async def steps(pilot):
        await say(pilot, "Speak Q")  # Q is not in the model's vocabulary
        assert any(v.text == "warning: 1 character(s) not in the char vocabulary became <unk>: 'Q'"
                   for v in views(app, "notice"))

    run(app, steps)
