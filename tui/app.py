"""The full-screen chat: `quill chat`.

One `ChatSession` (gpt_runtime) does the work; this app shows it. Replies and
commands run on worker threads, so the screen never waits on torch: streamed
text is collected by the worker and drawn by a 10 Hz timer, in batches, not
once per token. Everything a user can type is a slash command of the shared
registry; the side panel, the jobs panel and the command palette send those
same commands.
"""

from __future__ import annotations

import gc
import os
import threading
import traceback
import warnings
from typing import Any

from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from gpt_runtime import commands
from gpt_runtime.errors import QuillError, debug_enabled, explain
from gpt_runtime.profiles import default_profile, find_profiles
from gpt_runtime.session import ChatSession, Notice

from .conversation import Conversation
from .panels import JobsPanel, RunCommand, SidePanel
from .screens import (CompareScreen, ConfirmScreen, EditScreen, FindScreen, HelpScreen, ProbabilityScreen,
                      ProvenanceScreen, TokensScreen)
from .widgets import ChatInput, MessageView

MIN_WIDTH, MIN_HEIGHT = 60, 16
PROBS = 5  # alternatives kept per token for the probability view
# Each draw re-lays the screen out (about 10 ms here), and the reply's thread waits for
# Python's lock meanwhile: at 20 draws a second the shipped model streamed 365-388 tokens/s
# in the app, at 10, 437-477 (2-core AVX2 EPYC). Ten batches a second still read as a stream.
DRAW_INTERVAL = 0.1
NO_MODEL = "no model loaded: pick a profile with /profile NAME (/profiles lists them)"


class NoModel:
    """The session commands see while no model is loaded (the first one failed to load):
    `/profile NAME` loads one, which becomes the app's session; from then on this stands
    for it. Anything else that needs a model says how to get one."""

    def __init__(self, app: QuillApp) -> None:
        self._app = app
        self.loaded = False  # whether this one loaded the app's first model

    @property
    def profile(self) -> Any:
        """None until a model is loaded (`/profiles` then marks no profile as current)."""
        return self._app.session.profile if self._app.session is not None else None

    def use_profile(self, name: str) -> None:
        """Load profile `name` as the app's session (on a command's worker thread)."""
        app = self._app
        with app.first_load:  # two quick /profile commands: the second switches the first's session
            if app.session is not None:
                app.session.use_profile(name)
                return
            app.call_from_thread(setattr, app, "loading_model", True)  # input waits, as at start-up
            try:
                session = app.new_session(name)
            finally:
                app.call_from_thread(setattr, app, "loading_model", False)
            app.session, self.loaded = session, True

    def __getattr__(self, name: str) -> Any:
        if self._app.session is not None:
            return getattr(self._app.session, name)
        raise QuillError("no model is loaded", hint="pick one with /profile NAME (/profiles lists them)")


class QuillApp(App):
    """Chat with a profile's model; switch profiles and samplers; run jobs; look inside."""

    TITLE = "Quill"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("escape", "stop_reply", "Stop reply"),
        Binding("f1", "help", "Help"),
        Binding("f2", "toggle_side", "Sampler"),
        Binding("f3", "toggle_jobs", "Jobs"),
        Binding("f4", "inspect_input", "Tokens"),
        Binding("ctrl+y", "copy_last", "Copy reply", priority=True, show=False),  # over the message box's redo
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, profile: str | None = None, resume: str | None = None, save: bool | None = None) -> None:
        """`resume`: a saved session to carry on with (an id or "last"); `save`: whether to
        save the chat (None: as the profile says)."""
        super().__init__()
        self.profile_arg = profile
        self.resume_arg = resume
        self.save = save
        self.session: Any = None
        self.profile_name: str | None = None
        self.streaming: list[MessageView] = []  # the reply being streamed, if any
        self.loading_model = True  # the first model is loading (False once loaded, or failed)
        self.first_load = threading.Lock()  # held while /profile loads the first model after a failed one
        self.suggestions: list[str] = []
        self.last_speed = ""

    # --- layout ---------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield Conversation(id="conversation")
                yield Static("", id="suggestions", markup=False)
                yield ChatInput(id="input", soft_wrap=True, show_line_numbers=False)
                yield Static("", id="status", markup=False)
            yield SidePanel(id="side")
            yield JobsPanel(id="jobs")
        yield Static(f"The terminal is too small: Quill needs at least {MIN_WIDTH}x{MIN_HEIGHT}.", id="too-small")
        yield Footer()

    def on_mount(self) -> None:
        # Warnings (characters the tokenizer lacks, a prompt cut to fit) become notices:
        # stderr is not visible under the app.
        self._showwarning, warnings.showwarning = warnings.showwarning, self.show_warning
        self.query_one("#side").display = False
        self.query_one("#jobs").display = False
        self.query_one("#input").border_title = "Message (Enter sends, Alt+Enter new line, Tab completes)"
        self.loading = self.add_message("notice", "Loading the model… you can type meanwhile.")
        self.status("loading…")
        self.set_interval(DRAW_INTERVAL, self.tick)
        self.query_one(ChatInput).focus()
        self.load(self.profile_arg)

    def on_resize(self, event: events.Resize) -> None:
        small = event.size.width < MIN_WIDTH or event.size.height < MIN_HEIGHT
        self.query_one("#too-small").display = small
        self.query_one("#main").display = not small

    # --- the model ------------------------------------------------------------------

    def new_session(self, name: str) -> ChatSession:
        """A chat session on profile `name` that keeps token probabilities for the views."""
        session = ChatSession(name, save=self.save)
        session.probs = PROBS
        return session

    @work(thread=True, exclusive=True, group="load")
    def load(self, name: str | None) -> None:
        """Import torch and load the first model off the event loop."""
        from gpt_runtime.session import saved_profile

        resumed = None
        try:
            if self.resume_arg and not name:
                name = saved_profile(self.resume_arg)
            name = name or default_profile()
            self.call_from_thread(self.status, f"loading {name}…")
            session = self.new_session(name)
            if self.resume_arg:
                resumed = commands.Resumed.saying(session, *session.resume(self.resume_arg, switch_profile=False))
            self.session = session
        except Exception as exc:  # noqa: BLE001 - shown in the app, which goes on
            self.call_from_thread(self.load_failed, exc)
            return
        self.call_from_thread(self.loaded, resumed)

    def load_failed(self, exc: BaseException) -> None:
        self.loading_model = False
        if self.session is None:
            self.loading.finish("No model is loaded.")
        self.show_error(exc)

    def loaded(self, resumed: str | None = None) -> None:
        # torch and the app leave many long-lived objects; a full garbage collection
        # walking them all stalled the screen for 100-200 ms mid-reply. Freeze them out of it.
        gc.freeze()
        self.loading_model = False
        p = self.session.profile
        self.profile_name = p.name
        self.loading.finish(f"Profile {p.name}: {p.description or p.checkpoint}. /help lists the commands; F1 the keys; "
                            "F2 the sampler panel.")
        if resumed:
            self.conversation.show_resumed(resumed, clear=False)  # below the greeting
            self.add_message("output", resumed)
        self.refresh_panels()

    def profiles(self) -> list[str]:
        return [e.name for e in find_profiles() if e.profile is not None]

    def refresh_panels(self, redraw: bool = False) -> None:
        if self.session is None:
            return
        if self.query_one("#side").display:
            self.query_one(SidePanel).show(self.session, self.profiles(), redraw)
        self.update_status()

    # --- the conversation -----------------------------------------------------------

    @property
    def conversation(self) -> Conversation:
        return self.query_one(Conversation)

    def add_message(self, role: str, text: str, turn: int | None = None, title: str = "",
                    before: MessageView | None = None) -> MessageView:
        return self.conversation.add(MessageView(role, text, turn, title), before)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        """The wheel turned up at the top of the conversation (it could not scroll, so the
        event came up to the app): show earlier turns."""
        if self.in_conversation(event):
            self.conversation.show_more("earlier")

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        if self.in_conversation(event):
            self.conversation.show_more("later")

    def in_conversation(self, event: events.MouseEvent) -> bool:
        return self.session is not None and event.widget is not None and self.conversation in event.widget.ancestors_with_self

    def status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def update_status(self) -> None:
        s = self.session
        used, block = s.context_used()
        d = s.describe()
        busy = " │ streaming (Esc stops)" if self.streaming else ""
        self.status(f"{d['profile']} │ {d['chain']} │ {d['device']} {d['path']} │ "
                    f"{self.last_speed or '– tok/s'} │ context {used}/{block}{busy}")

    def tick(self) -> None:
        """Ten times a second: draw streamed text, and what the jobs reported."""
        found = self.query("#conversation")  # none while the app is closing and its widgets go
        if self.streaming and found:
            conversation = found.first()
            at_end = conversation.scroll_y >= conversation.max_scroll_y - 1
            self.streaming[0].flush()
            if at_end:  # follow the reply, unless the user scrolled up to read
                conversation.follow_end()
        if self.session is not None:
            try:
                notices = self.session.job_notices()
            except Exception as exc:  # noqa: BLE001 - e.g. the profile directory is not writable
                self.show_error(exc)
                notices = []
            for notice in notices:
                self.add_message("notice", notice.text)
            if notices:
                self.refresh_panels()
            jobs = self.session.jobs.all()
            panel = self.query(JobsPanel)  # empty while the app is closing and its widgets go
            if jobs and panel and panel.first().display:
                panel.first().show(jobs)

    def show_error(self, exc: BaseException) -> None:
        kind, message, hint = explain(exc)
        if debug_enabled():
            text = "".join(traceback.format_exception(exc))
        else:  # the message box says it is an error; a bug says so itself
            text = (message if kind == "error" else f"{kind}: {message}") + (f"\nhint: {hint}" if hint else "")
        self.add_message("error", text)
        if self.session is None and not self.loading_model:
            self.status(NO_MODEL)

    # --- input ----------------------------------------------------------------------

    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        if not self.run_line(event.text.strip()):  # refused: give the text back, ahead of anything typed since
            self.query_one(ChatInput).insert(event.text, (0, 0), maintain_selection_offset=False)

    def on_run_command(self, event: RunCommand) -> None:
        self.run_line(event.line)
        if event.then_type:  # "Chat with it", or a profile picked: go on typing
            self.query_one(ChatInput).focus()

    def on_text_area_changed(self, event) -> None:
        text = self.query_one(ChatInput).text
        if not text.startswith("/") or "\n" in text:
            self.suggestions = []
            self.query_one("#suggestions", Static).update("")
            return

        try:
            self.suggestions = commands.complete(self.session or NoModel(self), text)[:12]
        except Exception:  # noqa: BLE001 - a plugin's completer failing must not break typing
            self.suggestions = []
        self.query_one("#suggestions", Static).update("Tab: " + "  ".join(self.suggestions) if self.suggestions else "")

    def on_chat_input_complete(self, event: ChatInput.Complete) -> None:
        if not self.suggestions:
            return
        box = self.query_one(ChatInput)
        text = box.text
        typed = text.rpartition(" ")[2] if " " in text else text
        choice = self.suggestions[0] if len(self.suggestions) == 1 else os.path.commonprefix(self.suggestions)
        if len(choice) <= len(typed):
            return
        box.text = text[: len(text) - len(typed)] + choice + (" " if len(self.suggestions) == 1 and " " not in text else "")
        box.move_cursor(box.document.end)

    def run_line(self, line: str) -> bool:
        """A message to the model, or a slash command; False if it was refused (keep the text)."""
        if self.loading_model:
            self.notify("The model is still loading: send it in a moment (your text is kept).")
            return False
        if line.startswith("/"):
            self.command(line)
            return True
        if self.session is None:
            self.notify("No model is loaded: pick one with /profile NAME (/profiles lists them).")
            return False
        if self.streaming or self.session.busy:
            self.notify("A reply is still streaming (or a model loading): wait, or press Escape to stop it.")
            return False
        self.conversation.to_end()
        try:
            events = self.session.send(line)
        except Exception as exc:  # noqa: BLE001
            self.show_error(exc)
            return True
        names, turn = self.session.template, len(self.session.turns) - 1
        self.add_message("user", line, turn=turn, title=names.user_name)
        self.start_stream(events, self.add_message("model", "", turn=turn, title=names.model_name))
        return True

    @work(thread=True, group="command")
    def command(self, line: str) -> None:
        """Run a slash command off the event loop (switching profile loads a model, /compare
        generates twice); the status line says what runs meanwhile."""
        self.call_from_thread(self.status, f"{line.strip()}…")
        no_model = NoModel(self) if self.session is None else None
        try:
            result = commands.run(no_model or self.session, line)
        except Exception as exc:  # noqa: BLE001 - shown in the app, which goes on
            self.call_from_thread(self.show_error, exc)
            self.call_from_thread(self.refresh_panels, True)  # undo what the panel asked for
            return
        self.call_from_thread(self.command_done, result, no_model is not None and no_model.loaded)

    def command_done(self, result: commands.Result, first_model: bool = False) -> None:
        """Show a command's result by its type (see `gpt_runtime.commands`)."""
        if isinstance(result, commands.Quit):
            self.action_quit()
            return
        if first_model:
            self.loaded()
        # The conversation is redrawn first, so what the command says stays below it.
        if isinstance(result, commands.Resumed):
            self.conversation.show_resumed(result)
        elif isinstance(result, commands.TurnsChanged):
            self.conversation.redraw_turns(result.kept)
        if isinstance(result, commands.JobsChanged):
            self.show_panel("jobs", toggle=False)
        if isinstance(result, commands.CommandHelp):
            self.push_screen(HelpScreen())
        elif isinstance(result, commands.TokenView):
            self.push_screen(TokensScreen(result))
        elif isinstance(result, commands.Comparison):
            self.push_screen(CompareScreen(result.sides))
        elif isinstance(result, commands.Found) and result.hits:
            self.push_screen(FindScreen(result.hits), self.resume_hit)
        elif isinstance(result, commands.Reply) and result.kept is not None:  # /edit: the turns from `kept` changed
            self.start_stream(result, self.conversation.redraw_turns(result.kept)[-1])  # the last turn's reply is the new one
        elif isinstance(result, commands.Reply):  # replaces the last reply (/regen)
            self.conversation.to_end()
            models = [v for v in self.query(MessageView) if v.role == "model"]
            if models:
                models[-1].remove()
            self.start_stream(result, self.add_message("model", "", turn=len(self.session.turns) - 1,
                                                       title=self.session.template.model_name))
        elif isinstance(result, str):
            if self.session is not None and not isinstance(result, commands.TurnsChanged):
                self.conversation.to_end()  # what a command says goes after the last turn, where the next one will be
            self.add_message("output", result)
        if self.session is not None:
            self.profile_name = self.session.profile.name
            self.refresh_panels()  # and the status line
        else:
            self.status(NO_MODEL)

    def start_stream(self, events: Any, view: MessageView) -> None:
        self.streaming[:] = [view]  # now, so Escape and a second Enter see it at once
        self.update_status()
        self.stream(events, view)

    @work(thread=True, group="reply")
    def stream(self, events: Any, view: MessageView) -> None:
        from gpt_runtime.generate import Done, Token  # imports torch: loaded when first used

        done = error = None
        try:
            for event in events:
                if isinstance(event, Token):
                    view.tokens.append(event)
                    view.pending.append(event.text)
                elif isinstance(event, Notice):
                    self.call_from_thread(self.add_message, "notice", event.text, None, "", view)
                elif isinstance(event, Done):
                    done = event
        except Exception as exc:  # noqa: BLE001 - shown in the app, which goes on
            error = exc
        finally:
            self.call_from_thread(self.reply_done, view, done, error)

    def reply_done(self, view: MessageView, done: Any, error: BaseException | None = None) -> None:
        if self.streaming and self.streaming[0] is view:
            self.streaming.clear()
        view.flush()
        if done is None:  # it failed: show what the session kept, then why
            self.conversation.show_last()
            if error is not None:
                self.show_error(error)
        else:
            turn = self.session.turns[view.turn] if view.turn is not None and view.turn < len(self.session.turns) else None
            speed = round(done.tokens_per_second, 1)  # as the reply's provenance records it
            self.last_speed = f"{speed:.0f} tok/s"
            stopped = " · stopped" if done.reason == "cancelled" else ""
            view.finish(turn.reply if turn else view.text.strip(), f"{done.new_tokens} tokens · {speed:.0f} tok/s{stopped}")
            self.conversation.label_versions()  # a new reply (/regen) is another version; an edit made its message one
            self.conversation.trim()
        self.update_status()

    # --- actions --------------------------------------------------------------------

    def action_stop_reply(self) -> None:
        if self.session is not None and (self.streaming or self.session.busy):  # a reply, /replay, /compare
            self.session.cancel()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_side(self) -> None:
        self.show_panel("side")

    def action_toggle_jobs(self) -> None:
        self.show_panel("jobs")

    def show_panel(self, name: str, toggle: bool = True) -> None:
        """Show one panel on the right (or hide it, if it shows and `toggle`)."""
        panel, other = self.query_one(f"#{name}"), self.query_one("#jobs" if name == "side" else "#side")
        panel.display = not (panel.display and toggle)
        other.display = False
        self.refresh_panels()
        if name == "jobs" and self.session is not None:
            self.query_one(JobsPanel).show(self.session.jobs.all())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme != "textual-light" else "textual-dark"

    def action_inspect_input(self) -> None:
        text = self.query_one(ChatInput).text or self.last_reply_text()
        if self.session is None or not text:
            self.notify("Type some text first: F4 shows how the tokenizer splits the message box.")
            return
        self.push_screen(TokensScreen(commands.TokenView(self.session.loaded.tokenizer, text)))

    def _selected_message(self, role: str | None = None) -> MessageView | None:
        """The focused message (for a reply: the focused one, or the one answering the
        focused message), else the last one."""
        every = list(self.query(MessageView))
        focused = self.focused
        if isinstance(focused, MessageView) and focused in every:
            for view in every[every.index(focused):]:
                if role is None or view.role == role:
                    return view
        views = [v for v in every if role is None or v.role == role]
        return views[-1] if views else None

    def last_reply_text(self) -> str:
        view = self._selected_message("model")
        return view.text if view else ""

    def action_copy_message(self) -> None:
        view = self._selected_message()
        if view is not None:
            self.copy_to_clipboard(view.text)
            self.notify("Copied the message.")

    def action_copy_last(self) -> None:
        views = [v for v in self.query(MessageView) if v.role == "model"]
        if not views:
            self.notify("There is no reply to copy yet.")
            return
        self.copy_to_clipboard(views[-1].text)
        self.notify("Copied the last reply.")

    def action_probabilities(self) -> None:
        view = self._selected_message("model")
        if view is None or not view.tokens:
            self.notify("No token probabilities for this reply: they are kept for replies made in this window.")
            return
        self.push_screen(ProbabilityScreen(view.tokens, self.session.loaded.tokenizer))

    def action_provenance(self) -> None:
        view = self._selected_message("model")
        turn = view.turn if view is not None else None
        if turn is None or turn >= len(self.session.turns) or self.session.turns[turn].provenance is None:
            self.notify("This reply has no provenance yet.")
            return
        self.push_screen(ProvenanceScreen(turn + 1, self.session.turns[turn].provenance))

    def action_inspect_tokens(self) -> None:
        view = self._selected_message()
        if self.session is not None and view is not None and view.text:
            self.push_screen(TokensScreen(self.session.loaded.tokenizer, view.text))

    def _message_at(self, turn: int, role: str, views: list[MessageView]) -> MessageView | None:
        return next((v for v in views if v.turn == turn and v.role == role), None)

    def _refuse_while_busy(self) -> bool:
        """Whether a reply or command is running, said as a notice: versions and edits wait for it."""
        if self.session is None or self.streaming or self.session.busy:
            self.notify("A reply is still streaming (or a model loading): wait, or press Escape to stop it.")
            return True
        return False

    def action_version(self, step: int) -> None:
        """← →: show the previous or next version of the focused message, and the
        conversation that follows it."""
        view = self.focused
        if not isinstance(view, MessageView) or view.role not in ("user", "model") or view.turn is None:
            return
        if self._refuse_while_busy():
            return
        index, role = view.turn, view.role
        try:
            versions, current = self.session.versions(index, role)
        except IndexError:  # a message of a conversation that is being redrawn
            return
        if len(versions) < 2:
            what = "message has no other versions: e edits it" if role == "user" else "reply has no other versions"
            self.notify(f"This {what}" + ("" if role == "user" else ": /regen makes one") + ".")
            return
        if not 0 <= current + step < len(versions):  # at either end: say where, quietly
            self.notify(f"This is the {'first' if step < 0 else 'last'} version ({current + 1}/{len(versions)}).")
            return
        try:
            self.session.switch(index, role, current + step)
        except QuillError as exc:
            self.notify(exc.message, severity="warning")
            return
        moved = self._message_at(index, role, self.conversation.redraw_turns(index, show_kept=True))
        if moved is not None:  # keep going through the versions from the same place
            self.call_after_refresh(moved.focus)
        self.update_status()

    def action_edit_message(self) -> None:
        """e: edit the focused message of yours in a window; sending it runs /edit N TEXT."""
        view = self.focused
        if not isinstance(view, MessageView):
            return
        if view.role != "user" or view.turn is None:
            count = len(self.session.turns) if self.session is not None else 0
            yours = f"messages 1 to {count}" if count > 1 else "message 1" if count else "none yet"
            self.notify(f"Only your messages can be edited: {yours}.")
            return
        if self._refuse_while_busy():
            return
        n = view.turn + 1

        def send(text: str | None) -> None:
            if text and text.strip():
                self.run_line(f"/edit {n} {text.strip()}")

        self.push_screen(EditScreen(n, view.text), send)

    def resume_hit(self, line: str | None) -> None:
        """A search hit chosen in the /find window: resume there, as /resume SESSION:MESSAGE."""
        if line:
            self.run_line(line)

    def action_quit(self) -> None:
        if self.session is not None and any(j.status == "running" for j in self.session.jobs.all()):
            def answer(yes: bool | None) -> None:
                if yes:
                    self.session.cancel()
                    self.add_message("notice", "Stopping the jobs (training saves its last checkpoint)…")
                    self.stop_jobs_and_exit()

            self.push_screen(ConfirmScreen("A job is still running. Quit, and stop it (training saves its last "
                                           "checkpoint)?"), answer)
            return
        if self.session is not None:
            self.session.cancel()
        self.exit()

    @work(thread=True, group="quit")
    def stop_jobs_and_exit(self) -> None:
        self.session.jobs.stop_all()
        self.call_from_thread(self.exit)

    def get_system_commands(self, screen: Screen):
        """The command palette (Ctrl+P): every action, each profile, common commands."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "keys and commands (F1)", self.action_help)
        yield SystemCommand("Side panel", "profile, sampler chain and options (F2)", self.action_toggle_side)
        yield SystemCommand("Jobs panel", "training and evaluation jobs (F3)", self.action_toggle_jobs)
        yield SystemCommand("Tokenizer inspector", "how the message box's text splits into tokens (F4)",
                            self.action_inspect_input)
        yield SystemCommand("Probabilities of the last reply", "each token coloured by probability",
                            self.action_probabilities)
        yield SystemCommand("Provenance of the last reply", "checkpoint, sampler, seed", self.action_provenance)
        yield SystemCommand("Copy the last reply", "to the clipboard (Ctrl+Y)", self.action_copy_last)
        for line, what in (("/regen", "a new reply to the last message (the old one stays: ← → on it)"),
                           ("/branch", "the messages with other versions (e on a message edits it)"),
                           ("/undo", "forget the last exchange"),
                           ("/clear", "forget the conversation"), ("/save", "write the transcript"),
                           ("/sessions", "the saved sessions"),
                           ("/jobs", "list the jobs"), ("/show", "profile, sampler, device")):
            yield SystemCommand(line, what, lambda line=line: self.run_line(line))
        for line, what in (("/finetune ", "fine-tune this model on your files or conversations: name them"),
                           ("/train --data  --out ", "start training in the background: fill in the paths"),
                           ("/eval  --data ", "evaluate a checkpoint in the background"),
                           ("/compare greedy | ", "the last message through two sampler chains"),
                           ("/find ", "search every saved chat: pick a hit to carry on there"),
                           ("/system ", "the system text for this chat (also in the side panel, F2)")):
            yield SystemCommand(line.strip(), what, lambda line=line: self.prefill(line))
        for name in self.profiles():
            yield SystemCommand(f"Profile {name}", "switch the model, keeping the conversation",
                                lambda name=name: self.run_line(f"/profile {name}"))

    def prefill(self, text: str) -> None:
        box = self.query_one(ChatInput)
        box.text = text
        box.focus()
        box.move_cursor(box.document.end)

    def show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = f"warning: {message}"
        if threading.get_ident() == self._thread_id:
            self.add_message("notice", text)
        else:
            self.call_from_thread(self.add_message, "notice", text)

    def on_unmount(self) -> None:
        warnings.showwarning = self._showwarning
        if self.session is not None:
            self.session.jobs.stop_all()


def run_app(profile: str | None = None, resume: str | None = None, save: bool | None = None) -> None:
    """Run the full-screen chat."""
    QuillApp(profile, resume=resume, save=save).run()
