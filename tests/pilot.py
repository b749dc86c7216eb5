"""Driving the full-screen chat through Textual's Pilot, as a user would (test_tui, test_devices, test_interop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tui.app import QuillApp
    from tui.widgets import MessageView


def run(app: QuillApp, steps: Callable, size: tuple[int, int] = (100, 32)) -> None:
    """Drive `app` with the coroutine function `steps(pilot)`, once the model has loaded."""
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.session is not None and app.profile_name is not None)
            await steps(pilot)
    asyncio.run(main())


async def until(pilot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            app = pilot.app
            jobs = [(j.status, j.error, j.last) for j in app.session.jobs.all()] if app.session else None
            raise AssertionError(f"timed out waiting in the app; messages: {[v.text for v in views(app)][-3:]}; "
                                 f"jobs: {jobs}")
        await pilot.pause(0.05)
    await pilot.pause(0.1)  # let the last updates draw


def views(app: QuillApp, role: str | None = None) -> list[MessageView]:
    from tui.widgets import MessageView

    return [v for v in app.query(MessageView) if role is None or v.role == role]


async def say(pilot, text: str) -> None:
    app = pilot.app
    before, errors = len(views(app, "model")), len(views(app, "error"))
    await pilot.press(*text, "enter")
    await until(pilot, lambda: not app.streaming and (len(views(app, "model")) > before
                                                      or len(views(app, "error")) > errors))
    assert len(views(app, "error")) == errors, views(app, "error")[-1].text


async def type_command(pilot, line: str) -> None:
    box = pilot.app.query_one("#input")
    box.text = line
    await pilot.press("enter")
    await pilot.pause(0.2)
