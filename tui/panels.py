"""The side panel (profile, sampler chain, options, editable in place) and the
jobs panel (progress, ETA, loss plot, cancel, chat with the result).

Both only show the session and post commands back to the app as text, the
same slash commands a user could type, so every interface behaves alike.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, ProgressBar, Select, Sparkline, Static

from gpt_runtime.plugins import get_registry
from gpt_runtime.progress import describe_compile, describe_step

from .widgets import LossPlot


class RunCommand(Message):
    """Ask the app to run a slash command, as if typed; `then_type`: focus the message box after."""

    def __init__(self, line: str, then_type: bool = False) -> None:
        super().__init__()
        self.line, self.then_type = line, then_type


class SidePanel(VerticalScroll):
    """The active profile and sampler chain, every option an input, and the chat's system
text: Enter applies each."""

    def show(self, session: Any, profiles: list[str], redraw: bool = False) -> None:
        """Rebuild for the session's current profile, chain and options, if they changed
        (or with `redraw`: after a failed change, the widgets show what was asked, not what is)."""
        state = (session.profile.name, tuple(profiles), session.chain, repr(session.options), session.max_new_tokens,
                 session.seed, session.template.user_name, session.template.model_name, session.template.system,
                 session.system is None)
        if state == getattr(self, "_state", None) and not redraw:
            return
        self._state = state
        registry = get_registry()
        if session.profile.name not in profiles:  # e.g. a profile given as a path
            profiles = [session.profile.name, *profiles]
        widgets: list = [Label("Profile", classes="heading"),
                         Select([(name, name) for name in profiles], value=session.profile.name, allow_blank=False,
                                id="profile-select", compact=True),
                         Label("Sampler chain", classes="heading"),
                         Input(session.chain, id="chain", placeholder="e.g. top_k,top_p,temperature", compact=True),
                         Label("samplers: " + ", ".join(registry.names("samplers")), classes="option-help",
                               id="sampler-names")]
        for sampler, values in session.options.items():
            if not values:
                continue
            entry = registry.get("samplers", sampler)
            widgets.append(Label(f"{sampler}  [{entry.plugin}]", classes="sampler", markup=False))
            for option, value in values.items():
                spec = entry.obj.options[option]
                widgets.append(Label(f"{option}: {spec.help}", classes="option-help", markup=False))
                widgets.append(Input(str(value), id=f"set-{sampler}-{option}", classes="option",
                                     name=f"{sampler}.{option}", compact=True))
        widgets.append(Label("Generation", classes="heading"))
        for name, value in (("max_new_tokens", session.max_new_tokens),
                            ("seed", "random" if session.seed is None else session.seed),
                            ("user_name", session.template.user_name), ("model_name", session.template.model_name)):
            widgets.append(Label(name, classes="option-help"))
            widgets.append(Input(str(value), id=f"set-{name}", classes="option", name=name, compact=True))
        widgets.append(Label("System text", classes="heading"))
        whose = "this chat's" if session.system is not None else "the profile's"
        widgets.append(Label(f"before the conversation ({whose}); Enter applies, empty: the profile's",
                             classes="option-help"))
        # one line: a system text of several is shown with its line ends as spaces
        widgets.append(Input(" ".join(session.template.system.split()), id="system", placeholder="none",
                             compact=True))
        self.app.call_later(self._replace, widgets)

    async def _replace(self, widgets: list) -> None:
        focused = self.app.focused.id if self.app.focused in self.query("Input") else None
        await self.remove_children()
        await self.mount_all(widgets)
        if focused and self.query(f"#{focused}"):
            self.query_one(f"#{focused}").focus()  # keep editing where you were

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "chain":
            self.post_message(RunCommand(f"/sampler {event.value}"))
        elif event.input.id == "system":
            self.post_message(RunCommand(f"/system {event.value.strip() or '--reset'}"))
        else:
            self.post_message(RunCommand(f"/set {event.input.name} {event.value}"))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if event.value != Select.BLANK and event.value != getattr(self.app, "profile_name", None):
            self.post_message(RunCommand(f"/profile {event.value}", then_type=True))


class JobCard(Vertical):
    """One job: what it is, its progress and ETA, its losses and speed, and actions."""

    DEFAULT_CSS = """
    JobCard { height: auto; border: round $primary; padding: 0 1; margin-bottom: 1; }
    JobCard Horizontal { height: auto; }
    JobCard Sparkline { height: 2; margin: 0 0 1 0; }
    JobCard Button { margin-right: 1; min-width: 10; }
    """

    def __init__(self, job: Any) -> None:
        super().__init__(id=f"job-{job.id}")
        self.job = job
        self.border_title = f"job {job.id}: {job.kind}"

    def compose(self) -> ComposeResult:
        yield Static(" ".join(self.job.argv), classes="argv", markup=False)
        yield ProgressBar(total=None, show_eta=False, id="progress")
        yield Static("", id="stats", markup=False)
        yield LossPlot(id="plot")
        yield Label("tokens/s", classes="option-help")
        yield Sparkline([], id="speed")
        with Horizontal():
            yield Button("Cancel", id="cancel", variant="error")
            yield Button("Chat with it", id="open", variant="success")

    def update_from_job(self) -> None:
        if not self.query("#open"):
            return  # not all composed yet (the buttons' row comes last): drawn on the next tick
        job = self.job
        state = (job.status, len(job.history), repr(job.last), job.profile, job.error, job.result is not None)
        if state == getattr(self, "_state", None):
            return  # nothing new: no redraw
        self._state = state
        self.border_subtitle = job.status
        last = job.last
        bar = self.query_one("#progress", ProgressBar)
        if last.get("event") == "step":
            bar.update(total=last["max_steps"], progress=last["step"])
        elif last.get("event") == "progress":
            bar.update(total=last["total"], progress=last["done"])
        if job.status == "finished" and bar.total:
            bar.update(progress=bar.total)
        if job.error:
            stats = f"error: {job.error}"
        elif job.result is not None:
            stats = job.describe().split("] ", 1)[-1]
        elif last.get("event") == "step":
            stats = describe_step(last)
        elif last.get("event") in ("compiling", "compiled"):
            stats = describe_compile(last)
        else:
            stats = "starting…"
        self.query_one("#stats", Static).update(stats)
        self.query_one("#plot", LossPlot).set_points(
            [(e["step"], e["loss"], e.get("val_loss")) for e in job.history])
        self.query_one("#speed", Sparkline).data = [e["tokens_per_s"] for e in job.history if e.get("tokens_per_s")]
        self.query_one("#cancel", Button).display = job.status == "running"
        self.query_one("#open", Button).display = job.profile is not None

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "cancel":
            self.post_message(RunCommand(f"/cancel {self.job.id}"))
        elif event.button.id == "open" and self.job.profile:
            self.post_message(RunCommand(f"/profile {self.job.profile}", then_type=True))


class JobsPanel(VerticalScroll):
    """Every job of the session, newest first."""

    def on_mount(self) -> None:
        self.mount(Static("No jobs yet. Start one with /finetune FILES, /train --data DIR --out RUN or /eval DATA.",
                          id="no-jobs", classes="option-help"))

    def show(self, jobs: list) -> None:
        if jobs:
            for empty in self.query("#no-jobs"):
                empty.remove()
        for job in jobs:
            cards = self.query(f"#job-{job.id}")
            if cards:
                card = cards.first(JobCard)
            else:
                card = JobCard(job)
                self.mount(card, before=0)
                continue  # drawn from the next tick, once mounted
            card.update_from_job()
