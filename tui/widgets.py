"""The chat screen's widgets: the input, the messages, the loss plot.

Nothing here talks to the model: `tui.app` owns the session and feeds these.
"""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.binding import Binding
from textual.content import Content
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static, TextArea


class ChatInput(TextArea):
    """The message box: Enter sends, Alt+Enter or Ctrl+J adds a line, Tab completes a command."""

    BINDINGS = [
        Binding("enter", "submit", "Send", priority=True, show=False),
        Binding("alt+enter,ctrl+j", "newline", "New line", priority=True, show=False),
        Binding("tab", "complete", "Complete", priority=True, show=False),
    ]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Complete(Message):
        pass

    # Priority bindings run on the app's task as soon as the key arrives, while the keys
    # typed just before it may still wait in this box's queue (a paste, tmux send-keys, a
    # fast typist). So each action queues itself behind them, and reads the box only then.

    def action_submit(self) -> None:
        self.call_later(self.submit)

    def action_newline(self) -> None:
        self.call_later(self.insert, "\n")

    def submit(self) -> None:
        """Send the text and empty the box now, so keys typed after Enter start the next message."""
        if self.text.strip():
            self.post_message(self.Submitted(self.text))
            self.clear()

    def action_complete(self) -> None:
        self.post_message(self.Complete())


VERSIONS = Binding.Group("Versions", compact=True)  # ←→ in the footer, once


class More(Static):
    """Above or below the messages shown, how many turns are not (a long conversation shows
    a window of it); a click, or scrolling to it, shows them."""

    def show(self, count: int) -> None:
        self.display = count > 0
        if count:
            up = self.id == "earlier"
            self.update(f"{'↑' if up else '↓'} {count} {'earlier' if up else 'later'} turn{'s' if count != 1 else ''}: "
                        f"scroll {'up' if up else 'down'} or click here to show them")

    def on_click(self) -> None:
        self.parent.show_more(self.id)  # the conversation's


class MessageView(Static, can_focus=True):
    """One message of the conversation.

    `role` is "user", "model", "notice", "error" or "output" (a command's text).
    A user or model message knows the index of its turn (which message it is, for
    editing, versions and provenance); a model message keeps its `Token` events, for
    the probability view. A message with other versions shows which it is ("2/3").
    """

    BINDINGS = [
        Binding("c", "app.copy_message", "Copy"),
        Binding("p", "app.probabilities", "Probabilities"),
        Binding("i", "app.provenance", "Provenance"),
        Binding("t", "app.inspect_tokens", "Tokens"),
        Binding("e", "app.edit_message", "Edit"),
        Binding("left", "app.version(-1)", "Previous version", key_display="←", group=VERSIONS),
        Binding("right", "app.version(1)", "Next version", key_display="→", group=VERSIONS),
    ]

    def __init__(self, role: str, text: str = "", turn: int | None = None, title: str = "") -> None:
        super().__init__(classes=role, markup=False)
        self.role, self.text, self.turn, self.tokens = role, text, turn, []
        self.pending: deque[str] = deque()  # text streamed in (by a worker thread) but not drawn yet
        self.name_title, self.version = title, ""
        self.show_title()
        self.update(text or ("…" if role == "model" else ""))

    def set_version(self, version: str) -> None:
        """Show which version of the message this is ("2/3"), or none ("")."""
        if version != self.version:
            self.version = version
            self.show_title()

    def show_title(self) -> None:
        title = " · ".join(part for part in (self.name_title, self.version) if part)
        self.border_title = Content(title) if title else None  # a name like "[/]" is text, not markup

    def flush(self) -> None:
        """Draw what streamed in since the last call."""
        if not self.pending:
            return
        parts = []
        while self.pending:
            parts.append(self.pending.popleft())
        self.text += "".join(parts)
        self.update(self.text)

    def finish(self, text: str, subtitle: str = "") -> None:
        self.pending.clear()
        self.text = text
        self.update(text or "(no reply)")
        self.border_subtitle = subtitle or None


# Probability colours, from unlikely to likely; readable on light and dark backgrounds.
SCALE = ["#d7263d", "#f46036", "#e6b800", "#8fbf3f", "#2e9e44"]


def probability_style(p: float) -> str:
    index = min(int(p * len(SCALE)), len(SCALE) - 1)
    return f"bold {SCALE[index]}"


def token_text(pieces: list[tuple[str, str]]) -> Text:
    """Coloured runs of text: [(text, style)]; spaces and newlines made visible."""
    out = Text()
    for piece, style in pieces:
        out.append(piece.replace(" ", "·").replace("\n", "↵\n"), style=style)
    return out


class LossPlot(Widget):
    """Train loss (•) and val loss (o) against step, drawn in text, sized to fit."""

    DEFAULT_CSS = "LossPlot { height: 8; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.points: list[tuple[int, float, float | None]] = []  # (step, loss, val loss)

    def set_points(self, points: list[tuple[int, float, float | None]]) -> None:
        self.points = points
        self.refresh()

    def render(self) -> Text:
        width, height = max(self.size.width - 8, 8), max(self.size.height - 1, 2)
        if not self.points:
            return Text("waiting for the first steps…", style="dim")
        values = [p[1] for p in self.points] + [p[2] for p in self.points if p[2] is not None]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        last_step = max(p[0] for p in self.points) or 1
        grid = [[" "] * width for _ in range(height)]

        def put(step: int, value: float, mark: str) -> None:
            x = min(int(step / last_step * (width - 1)), width - 1)
            y = min(int((high - value) / span * (height - 1)), height - 1)
            if grid[y][x] != "o":  # val marks win: there are fewer of them
                grid[y][x] = mark

        for step, loss, val in self.points:
            put(step, loss, "•")
            if val is not None:
                put(step, val, "o")
        out = Text()
        for row, cells in enumerate(grid):
            label = f"{high:6.2f} " if row == 0 else f"{low:6.2f} " if row == height - 1 else " " * 7
            out.append(label, style="dim")
            for cell in cells:
                out.append(cell, style="bold cyan" if cell == "•" else "bold magenta" if cell == "o" else "")
            out.append("\n")
        out.append(f"{'':7}step 0 … {last_step}   • train  o val", style="dim")
        return out
