"""The conversation in the full-screen chat: its messages, and a window of a long one.

A long conversation shows a window of its turns, the last `SHOWN_TURNS` at first,
and more as the user scrolls on past the top or bottom of those shown (the app sees
the wheel turn the conversation could not follow) or clicks the line saying how many
are left out. With every message of a 1,000-message chat mounted,
each streamed line re-laid them all out, 60-360 ms a frame (benchmarks/sessions_bench.py).
The window slides, so at most twice SHOWN_TURNS turns stay mounted; a new message, a
command's output and the end of a reply bring it back to the last turns.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import VerticalScroll

from gpt_runtime import commands

from .widgets import MessageView, More

SHOWN_TURNS = 40


class Conversation(VerticalScroll):
    """The messages of the chat; `shown` is the window of turns on screen."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shown = (0, 0)  # the turns on screen: the first, and one past the last

    def compose(self) -> ComposeResult:
        yield More(id="earlier")  # the lines saying how many turns are above and below those shown
        yield More(id="later")

    @property
    def session(self) -> Any:
        return self.app.session

    def add(self, view: MessageView, before: MessageView | None = None) -> MessageView:
        """Mount a message after the turns shown (or `before` one); follow the end, unless the
        user scrolled up to read."""
        at_end = self.scroll_y >= self.max_scroll_y - 1
        self.mount(view, before=before or self.query_one("#later"))
        if at_end or view.role == "user":
            self.follow_end()
        if view.turn is not None:
            self.shown = (self.shown[0], max(self.shown[1], view.turn + 1))
        return view

    def follow_end(self) -> None:
        """Scroll to the end of the conversation once new text is laid out, unless the
        user scrolls away meanwhile."""
        y = self.scroll_y

        def scroll() -> None:
            if self.scroll_y == y:
                self.scroll_end(animate=False, immediate=True)

        self.app.call_after_refresh(scroll)

    def turn_views(self, start: int, stop: int) -> list[MessageView]:
        names, views = self.session.template, []
        for n, turn in enumerate(self.session.turns[start:stop], start=start):
            views += [MessageView("user", turn.user, n, names.user_name), MessageView("model", turn.reply, n, names.model_name)]
        self.label_versions(views)
        return views

    def add_turns(self, start: int, stop: int | None = None) -> list[MessageView]:
        """Show the session's turns `start` to `stop` (by default, at most SHOWN_TURNS of them)
        after those shown; returns their views."""
        stop = min(len(self.session.turns), start + SHOWN_TURNS) if stop is None else stop
        views = self.turn_views(start, stop)
        y = self.scroll_y
        if views:
            mounted = self.mount_all(views, before=self.query_one("#later"))  # one layout for them all
        self.shown = (self.shown[0], stop)
        self.update_more()
        if stop == len(self.session.turns):  # not when later turns are left out: the window is not at the end
            self.follow_end()
            if views:
                self.call_later(self.follow_when_mounted, mounted, y)
        return views

    async def follow_when_mounted(self, mounted: Any, y: float) -> None:
        """Follow the end again once `mounted` (many messages at once) is: on a busy machine
        their layout can come after the refresh `follow_end` waited for. Not if the user
        scrolled away from `y` meanwhile (or from the end)."""
        await mounted
        if self.scroll_y == y or self.scroll_y >= self.max_scroll_y - 1:
            self.follow_end()

    def show_window(self, start: int, clear: bool = True) -> list[MessageView]:
        """Show afresh the window of turns from `start` (after what is on screen, unless `clear`); returns their views."""
        if clear:
            self.query(MessageView).remove()
        self.shown = (start, start)
        return self.add_turns(start)

    def show_last(self, clear: bool = True) -> list[MessageView]:
        """Show the session's last turns afresh (after /clear, /load, a failed reply)."""
        return self.show_window(max(0, len(self.session.turns) - SHOWN_TURNS), clear)

    def show_resumed(self, result: commands.Resumed, clear: bool = True) -> None:
        """A resumed conversation: its last turns, or those from the message it was resumed at
        (after what is on screen, unless `clear`)."""
        if result.at is None:
            self.show_last(clear)
            return
        views = self.show_window(max(0, min(result.at, len(self.session.turns) - SHOWN_TURNS)), clear)
        found = next((v for v in views if v.turn == result.at and v.role == "user"), None)
        if found is not None:  # the search hit, at the top of the screen
            self.scroll_to_top(found)

    def redraw_turns(self, kept: int, show_kept: bool = False) -> list[MessageView]:
        """After a command changed the turns from `kept` on (/undo, /clear, /load, /edit, a
        version switched): show them afresh; returns their views. The replies before `kept`
        keep their token probabilities. From turn 0 (/load, /clear), the conversation's end
        is shown, unless `show_kept`."""
        if kept == 0 and not show_kept:
            return self.show_last()
        first, last = self.shown
        if kept == 0 or not first <= kept <= last or last - first > 2 * SHOWN_TURNS:
            # not next to the window (or it grew wide, which slows a reply): the window from there
            return self.show_window(max(0, min(kept, len(self.session.turns) - SHOWN_TURNS)))
        views = list(self.query(MessageView))
        # the first message of turn `kept`: what the command said about earlier turns stays above it
        first = next((i for i, v in enumerate(views) if v.role in ("user", "model") and v.turn is not None
                      and v.turn >= kept), None)
        for view in views[first:] if first is not None else []:
            view.remove()
        self.shown = (self.shown[0], min(kept, self.shown[1]))
        return self.add_turns(kept)

    def update_more(self) -> None:
        """Say how many turns are above and below those shown."""
        total = len(self.session.turns) if self.session is not None else 0
        self.query_one("#earlier", More).show(self.shown[0])
        self.query_one("#later", More).show(max(0, total - self.shown[1]))

    def show_more(self, which: str) -> None:
        """Show SHOWN_TURNS more turns above ("earlier") or below ("later") those shown, if there are."""
        if self.session is None:
            return
        if which == "earlier" and self.shown[0] > 0:
            self.show_earlier()
        elif which == "later" and self.shown[1] < len(self.session.turns):
            self.show_later()

    def show_earlier(self) -> None:
        """SHOWN_TURNS more turns above; the window slides up: what is far below goes."""
        first, last = self.shown
        start = max(0, first - SHOWN_TURNS)
        top = next(iter(self.query(MessageView)), None)
        self.mount_all(self.turn_views(start, first), after=self.query_one("#earlier"))
        if last - start > 2 * SHOWN_TURNS and not self.app.streaming:
            last, cut = start + 2 * SHOWN_TURNS, False
            for view in list(self.query(MessageView)):
                cut = cut or (view.turn is not None and view.turn >= last)  # and the notices among them
                if cut:
                    view.remove()
        self.shown = (start, last)
        self.update_more()
        if top is not None:  # what was at the top stays where it was on screen
            self.scroll_to_top(top)

    def show_later(self) -> None:
        """SHOWN_TURNS more turns below; the window slides down: what is far above goes."""
        bottom = [v for v in self.query(MessageView) if v.turn is not None][-1:]
        self.add_turns(self.shown[1])
        first, last = self.shown
        if last - first > 2 * SHOWN_TURNS and not self.app.streaming:
            self.drop_before(last - 2 * SHOWN_TURNS)
            if bottom:  # the message that was last stays on screen, at its top
                self.scroll_to_top(bottom[0])

    def drop_before(self, turn: int) -> None:
        """Unmount every message above turn `turn`'s: the window starts there."""
        for view in list(self.query(MessageView)):
            if view.role == "user" and view.turn is not None and view.turn >= turn:
                break
            view.remove()
        self.shown = (turn, self.shown[1])
        self.update_more()

    def scroll_to_top(self, view: MessageView) -> None:
        """Scroll `view` to the top of the screen once laid out."""
        self.app.call_after_refresh(lambda: view.scroll_visible(top=True, animate=False))

    def to_end(self) -> None:
        """Show the last turns, if they are not, or only they if many more are (a new message
        or reply goes after them, and a reply streams fastest with few messages mounted)."""
        first, last = self.shown
        if last < len(self.session.turns) or last - first > 2 * SHOWN_TURNS:
            self.show_last()

    def trim(self) -> None:
        """After a reply, at the end of a conversation grown long in this sitting: keep only its last turns."""
        first, last = self.shown
        if last - first > 2 * SHOWN_TURNS and self.scroll_y >= self.max_scroll_y - 1:
            self.drop_before(last - SHOWN_TURNS)

    def label_versions(self, views: list[MessageView] | None = None) -> None:
        """Mark each message that has other versions with which one it is ("2/3"). The
        forks are found once for all the messages: a long conversation redraws quickly."""
        if self.session is None:
            return
        try:
            shown = {(f.index, f.role): f"{f.current + 1}/{len(f.versions)}" for f in self.session.forks()}
        except IndexError:  # the conversation changed under us (a reply ending): the next redraw labels
            return
        streaming = self.app.streaming[0] if self.app.streaming else None
        for view in self.query(MessageView) if views is None else views:
            if view.role in ("user", "model") and view.turn is not None and view is not streaming:
                view.set_version(shown.get((view.turn, view.role), ""))
