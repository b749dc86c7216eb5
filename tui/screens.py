"""Modal screens: help, the tokenizer inspector, the probability view, /compare,
a reply's provenance, editing a message, /find's hits, and a yes/no question.
Escape closes each."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from gpt_runtime import commands

from .widgets import ChatInput, probability_style, token_text

KEYS = [
    ("Enter", "send the message (or run the /command)"),
    ("Alt+Enter, Ctrl+J", "new line in the message"),
    ("Tab", "complete a /command, profile, sampler or option"),
    ("Escape", "stop the reply in flight; close a window"),
    ("Ctrl+P", "command palette: every action"),
    ("F1", "this help"),
    ("F2", "side panel: profile, sampler chain, options"),
    ("F3", "jobs panel: training and evaluation"),
    ("F4", "tokenizer inspector for the message box's text"),
    ("Ctrl+Y", "copy the last reply"),
    ("Ctrl+T", "light or dark theme"),
    ("Shift+Tab", "from the message box up to the messages (Tab goes down); on a message: c copy, p token "
                  "probabilities, i provenance, t tokens, e edit it (your messages: the conversation forks there)"),
    ("← →", "on a message marked 2/3: its previous or next version (an edit, or a reply from /regen), and the "
            "conversation that followed it"),
    ("Ctrl+Q", "quit (asks first while a job runs)"),
]


class Closable(ModalScreen):
    BINDINGS = [Binding("escape,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    Closable { align: center middle; }
    Closable > .box { width: 90%; max-width: 120; height: auto; max-height: 90%; border: round $accent;
                      background: $surface; padding: 0 1; }
    """


class HelpScreen(Closable):
    """F1: the keys and every slash command, plugins' included."""

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        for key, what in KEYS:
            keys.add_row(Text(key, style="bold"), what)
        cmds = Table.grid(padding=(0, 2))
        for entry in commands.commands():
            cmds.add_row(Text(entry.meta.get("usage", entry.name), style="bold"), entry.meta.get("help", ""))
        self.tables = (keys, cmds)
        with VerticalScroll(classes="box") as box:
            box.border_title = "Quill help (Escape closes)"
            yield Static(Text("Keys", style="bold underline"))
            yield Static(keys)
            yield Static(Text("\nCommands", style="bold underline"))
            yield Static(cmds)
            yield Static(Text("\nAnything else you type is sent to the model.", style="dim"))


class TokensScreen(Closable):
    """How the active tokenizer splits a text: coloured pieces, then their ids."""

    def __init__(self, view: commands.TokenView) -> None:
        super().__init__()
        self.view = view

    def compose(self) -> ComposeResult:
        view = self.view
        colours = ["on #3b4d7a", "on #6b3b7a", "on #3b7a5a", "on #7a5a3b"]
        coloured = token_text([(p, f"white {colours[n % len(colours)]}") for n, p in enumerate(view.pieces)])
        table = Table("#", "id", "piece", box=None, padding=(0, 1))
        for n, (i, p) in enumerate(zip(view.ids, view.pieces)):
            table.add_row(str(n), str(i), repr(p))
        self.table = table  # for tests and the curious
        with VerticalScroll(classes="box") as box:
            box.border_title = f"{len(view.ids)} tokens for {len(view.source)} characters ({view.kind} tokenizer)"
            yield Static(coloured, id="pieces")
            yield Static(table, id="ids")


class ProbabilityView(Widget, can_focus=True):
    """A reply's tokens coloured by the probability the model gave each; ← → select one."""

    BINDINGS = [Binding("left", "move(-1)", "Previous", show=False), Binding("right", "move(1)", "Next", show=False),
                Binding("home", "move(-100000)", show=False), Binding("end", "move(100000)", show=False)]
    DEFAULT_CSS = "ProbabilityView { height: auto; }"

    def __init__(self, tokens: list, pieces: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.tokens, self.pieces, self.index = tokens, pieces, 0

    def action_move(self, delta: int) -> None:
        self.index = max(0, min(len(self.tokens) - 1, self.index + delta))
        self.refresh(layout=True)
        self.screen.show_token(self.index)

    def render(self) -> Text:
        pieces = []
        for n, (token, piece) in enumerate(zip(self.tokens, self.pieces)):
            style = probability_style(token.prob or 0.0) + (" reverse" if n == self.index else "")
            pieces.append((piece, style))
        return token_text(pieces)


class ProbabilityScreen(Closable):
    """Each token of a reply by probability; the selected one's top alternatives."""

    def __init__(self, tokens: list, tokenizer: Any) -> None:
        super().__init__()
        self.tokens = tokens
        # each token's own piece: its released text can be empty (held back, in case a
        # stop string was starting) or carry earlier tokens' text
        self.pieces = [tokenizer.decode([t.id]) for t in tokens]

    def show_token(self, index: int) -> None:
        token = self.tokens[index]
        self.query_one("#token", Static).update(Text(
            f"token {index + 1} of {len(self.tokens)}: {self.pieces[index]!r}, probability {token.prob or 0:.1%}; "
            "the model's likeliest choices here:", style="bold"))
        self.query_one("#alternatives", Static).update(self.alternatives(index))

    def alternatives(self, index: int) -> Table:
        token = self.tokens[index]
        table = Table("", "token", "probability", box=None, padding=(0, 1))
        for tid, text, p in token.top or []:
            mark = "→" if tid == token.id else ""
            table.add_row(mark, Text(repr(text), style=probability_style(p)), f"{p:.1%}")
        if token.id not in [t[0] for t in token.top or []]:
            table.add_row("→", Text(repr(self.pieces[index]), style=probability_style(token.prob or 0)),
                          f"{token.prob or 0:.1%}")
        self.shown = table
        return table

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="box") as box:
            box.border_title = "Probabilities: red unlikely … green likely; ← → select a token"
            yield ProbabilityView(self.tokens, self.pieces, id="probabilities")
            yield Static("", id="token")
            yield Static("", id="alternatives")

    def on_mount(self) -> None:
        self.show_token(0)
        self.query_one(ProbabilityView).focus()


class CompareScreen(Closable):
    """Two replies to the same message and seed, side by side."""

    DEFAULT_CSS = """
    CompareScreen Horizontal { height: auto; }
    CompareScreen .side { width: 1fr; height: auto; border: round $primary; padding: 0 1; margin: 0 1 0 0; }
    """

    def __init__(self, sides: list) -> None:
        super().__init__()
        self.sides = sides

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="box") as box:
            box.border_title = f"/compare: one message, one seed ({self.sides[0].seed})"
            with Horizontal():
                for side in self.sides:
                    view = Static(side.text or "(no reply)", classes="side", markup=False)
                    view.border_title = Content(side.side)
                    view.border_subtitle = f"{side.tokens_per_second:.0f} tokens/s"
                    yield view


class ProvenanceScreen(Closable):
    """What produced one reply."""

    def __init__(self, number: int, provenance: Any) -> None:
        super().__init__()
        self.number, self.provenance = number, provenance

    def compose(self) -> ComposeResult:
        p = self.provenance
        table = Table.grid(padding=(0, 2))
        options = "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for n, o in p.options.items() if o)
        for key, value in [("profile", p.profile), ("checkpoint", p.checkpoint), ("sha-256", p.checkpoint_sha256),
                           ("step", p.step), ("tokenizer", p.tokenizer_fingerprint), ("sampler chain", p.chain),
                           ("options", options or "none"), ("seed", p.seed), ("max_new_tokens", p.max_new_tokens),
                           ("path", p.path or f"{p.dtype}, {p.quantize} quantization"), ("ended", p.reason),
                           ("tokens", p.new_tokens), ("speed", f"{p.tokens_per_second} tokens/s")]:
            table.add_row(Text(key, style="bold"), str(value))
        with Vertical(classes="box") as box:
            box.border_title = f"Reply {self.number}: where it came from (/replay {self.number} redoes it)"
            yield Static(table)


class EditBox(ChatInput):
    """The edit window's text: Enter sends, Alt+Enter or Ctrl+J adds a line, as in the message box."""


class EditScreen(ModalScreen[str | None]):
    """e on a message of yours: change it; Enter (or Ctrl+S) sends it as /edit N TEXT, Escape cancels.
    Dismisses with the new text, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "send", "Send", priority=True)]
    DEFAULT_CSS = """
    EditScreen { align: center middle; }
    EditScreen > Vertical { width: 90%; max-width: 100; height: auto; border: round $accent; background: $surface;
                            padding: 0 1; }
    EditScreen EditBox { height: auto; min-height: 3; max-height: 16; }
    EditScreen Label { color: $text-muted; width: 1fr; }
    """

    def __init__(self, number: int, text: str) -> None:
        super().__init__()
        self.number, self.text = number, text

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = f"Edit message {self.number}"
            yield EditBox(self.text, id="edit", soft_wrap=True, show_line_numbers=False)
            yield Label("Enter sends it for a new reply (the old version stays: ← → on the message switch), "
                        "Alt+Enter adds a line, Escape cancels", markup=False)

    def on_mount(self) -> None:
        box = self.query_one(EditBox)
        box.focus()
        box.move_cursor(box.document.end)

    def action_send(self) -> None:
        self.query_one(EditBox).action_submit()

    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        event.stop()
        self.dismiss(event.text)

    # The app completes /commands and suggests them for its own message box: not here.
    def on_chat_input_complete(self, event: ChatInput.Complete) -> None:
        event.stop()

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        event.stop()


class FindScreen(ModalScreen[str | None]):
    """/find's hits, one a line: Enter resumes the chat at that message (dismisses with
    the /resume SESSION:MESSAGE line), Escape closes."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]
    DEFAULT_CSS = """
    FindScreen { align: center middle; }
    FindScreen > OptionList { width: 90%; max-width: 120; height: auto; max-height: 90%; border: round $accent;
                              background: $surface; }
    """

    def __init__(self, hits: list[Any]) -> None:
        super().__init__()
        self.hits = hits

    def compose(self) -> ComposeResult:
        options = []
        for hit in self.hits:
            line = Text.assemble((f"{hit.session}:{hit.message}", "bold"), f"  {hit.title or '(untitled)'}  ",
                                 ("you" if hit.role == "user" else "model", "italic"), "  ",
                                 " ".join(hit.snippet.split()))
            options.append(Option(line, id=f"{hit.session}:{hit.message}"))
        found = OptionList(*options, id="hits")
        found.border_title = f"{len(self.hits)} saved message{'s' if len(self.hits) != 1 else ''} found: " \
                             "Enter resumes that chat there, Escape closes"
        yield found

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(f"/resume {event.option.id}")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question."""

    BINDINGS = [Binding("escape,n", "answer(False)", "No"), Binding("y", "answer(True)", "Yes")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; align: center middle; margin-top: 1; }
    ConfirmScreen Button { margin: 0 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
