"""The plain chat: a prompt_toolkit REPL, or a script read from stdin.

`quill chat --plain` (and `quill chat` whenever stdin or stdout is not a
terminal) runs here. Interactively: persistent history, Tab completes commands
and their arguments, Esc then Enter (or Alt+Enter) inserts a new line, Ctrl-C
stops a reply (at an empty prompt, a second Ctrl-C leaves), Ctrl-D leaves.
Not interactively: every line of stdin is a message or a slash command, and the
transcript goes to stdout, so chats can be scripted and tested.

Replies are generated on a worker thread and printed as they stream, so Ctrl-C
reaches the session (`cancel`) instead of tearing the generation down.
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from gpt_runtime import commands
from gpt_runtime.errors import QuillError, debug_enabled, explain
from gpt_runtime.session import ChatSession, Notice

_END = object()


def _stream(session: ChatSession, events: Iterator[Any], out: TextIO) -> None:
    """Print a reply's events as they come; Ctrl-C cancels it and waits for its end."""
    from gpt_runtime.generate import Done, Token  # imports torch: loaded when first used

    inbox: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for event in events:
                inbox.put(event)
        except BaseException as exc:  # shown by the main thread
            inbox.put(exc)
        inbox.put(_END)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while True:
        # Ctrl-C may come while waiting or while printing (a terminal is slow): either way the
        # reply is cancelled and shown to its end. Should it eat _END, the worker's end is seen.
        try:
            try:
                event = inbox.get(timeout=0.2)
            except queue.Empty:
                if worker.is_alive():
                    continue
                break
            if event is _END:
                break
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Notice):
                out.write(f"[{event.text}]\n")
            elif isinstance(event, Token):
                out.write(event.text)
            elif isinstance(event, Done):
                out.write(event.text + ("\n[stopped]" if event.reason == "cancelled" else "") + "\n")
            out.flush()
        except KeyboardInterrupt:
            session.cancel()


def show_job_notices(session: ChatSession, out: TextIO) -> None:
    for notice in session.job_notices():
        out.write(f"[{notice.text}]\n")
    out.flush()


def show_turns(session: ChatSession, out: TextIO, start: int = 0) -> None:
    """The conversation from turn `start` on, as the transcript shows it (after resuming a
    saved session, or switching to another branch)."""
    for turn in session.turns[start:]:
        out.write(f"> {turn.user}\n{turn.reply}\n")
    out.flush()


def resume(session: ChatSession, ref: str, out: TextIO, switch_profile: bool = True) -> None:
    """`quill chat --resume`: carry on with a saved session, its turns shown."""
    out.write(commands.Resumed.saying(session, *session.resume(ref, switch_profile)) + "\n")
    show_turns(session, out)


def handle(session: ChatSession, line: str, out: TextIO, err: TextIO) -> str:
    """Act on one input line (a message or a command): "ok", "failed" (the error
    was shown) or "quit"."""
    show_job_notices(session, out)
    outcome = "ok"
    try:
        if line.startswith("/"):
            result = commands.run(session, line)
            if result is commands.QUIT:
                return "quit"
            if isinstance(result, str):
                out.write(result + "\n")
                if isinstance(result, commands.TurnsChanged):
                    show_turns(session, out, result.kept)
            elif result is not None:
                _stream(session, result, out)
        elif line.strip():
            _stream(session, session.send(line), out)
    except Exception as exc:  # shown in one line and a hint; the chat goes on
        if debug_enabled() and not isinstance(exc, QuillError):
            raise
        outcome = "failed"
        kind, message, hint = explain(exc)
        err.write(f"{kind}: {message}\n" + (f"  hint: {hint}\n" if hint else ""))
    show_job_notices(session, out)
    return outcome


def run_script(session: ChatSession, lines: Iterable[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run messages and commands from `lines`, writing the transcript to `out` (default: stdout).

    Every line runs, even after one fails (as a chat would go on); returns how many failed.
    """
    out, err = out or sys.stdout, err or sys.stderr  # looked up now: sys.stdout may have been replaced
    failed = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        out.write(f"> {line}\n")
        outcome = handle(session, line, out, err)
        if outcome == "quit":
            break
        failed += outcome == "failed"
    session.jobs.wait()  # a script's jobs finish before the transcript ends
    show_job_notices(session, out)
    return failed


def run_interactive(session: ChatSession, history_file: str | None = None) -> None:
    """The interactive REPL on the terminal."""
    # Ctrl-C must reach us even when started by a shell that ignores it for
    # background work (an inherited SIG_IGN would otherwise stay in force).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    class SlashCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/"):
                return
            typed = text.rpartition(" ")[2] if " " in text else text
            for option in commands.complete(session, text):
                yield Completion(option, start_position=-len(typed))

    keys = KeyBindings()

    @keys.add("escape", "enter")  # Esc then Enter, or Alt+Enter: a new line instead of sending
    def _(event) -> None:
        event.current_buffer.insert_text("\n")

    prompt = PromptSession(history=FileHistory(history_file) if history_file else InMemoryHistory(),
                           completer=SlashCompleter(), complete_while_typing=False, key_bindings=keys)
    print(f"Chatting with {session.profile.name}. /help lists the commands; Esc Enter adds a line; Ctrl-D leaves.")
    try:
        _loop(session, prompt)
    finally:
        if any(job.status == "running" for job in session.jobs.all()):
            print("stopping the running jobs (training saves its last checkpoint) ...")
            session.jobs.stop_all()
            show_job_notices(session, sys.stdout)


def _loop(session: ChatSession, prompt) -> None:
    interrupted = False
    while True:
        try:
            line = prompt.prompt("> ")
        except KeyboardInterrupt:
            if interrupted:
                return
            interrupted = True
            print("(Ctrl-C again to leave)")
            continue
        except EOFError:
            return
        interrupted = False
        try:
            outcome = handle(session, line, sys.stdout, sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C in a command that takes long (/compare, /replay): stop it, not the chat
            print("(interrupted)")
            continue
        if outcome == "quit":
            return
