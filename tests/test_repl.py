"""Slash commands through the registry, the plain REPL on a script, `quill chat`
in a subprocess, and the interactive REPL on a pseudo-terminal.

The checkpoints and profiles are the chat's small ones from helpers (`alpha`: short
replies; `beta`: replies that never stop by themselves). What a script or a
terminal must show is worked out in-process with a `ChatSession` of its own.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpt_runtime import commands
from gpt_runtime import plugins as host_mod
from gpt_runtime.errors import QuillError, UsageError
from gpt_runtime.generate import Done
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.session import ChatSession
from helpers import ALPHA_TOML, add_builtin_plugin, quill_env, run_quill, write_chat_models
from tui import repl

REPO = Path(__file__).resolve().parent.parent
BUILTIN_COMMANDS = ["/clear", "/compare", "/help", "/load", "/profile", "/profiles", "/quit", "/regen", "/rename",
                    "/replay", "/resume", "/sampler", "/save", "/sessions", "/set", "/show", "/tokens", "/undo"]


@pytest.fixture(scope="module")
def m(tmp_path_factory, one_torch_thread) -> dict:
    return write_chat_models(tmp_path_factory.mktemp("repl"))


@pytest.fixture
def s(m, monkeypatch) -> ChatSession:
    monkeypatch.setenv("QUILL_PROFILES", str(m["two"]))
    return ChatSession("alpha")


def raw_reply(session: ChatSession, message: str) -> str:
    """What the REPL prints for a reply: the streamed text (not stripped)."""
    return "".join(e.text for e in session.send(message))


def script(session: ChatSession, text: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    failed = repl.run_script(session, io.StringIO(text), out, err)
    assert failed == err.getvalue().count("error: ")  # one count per line that failed
    return out.getvalue(), err.getvalue()


def error_of(session: ChatSession, line: str) -> QuillError:
    with pytest.raises(QuillError) as exc:
        commands.run(session, line)
    return exc.value


# --- the commands, through the registry --------------------------------------------------------

def test_help_lists_every_command_and_explains_one(s):
    text = commands.run(s, "/help")
    names = [e.name for e in commands.commands()]
    assert set(BUILTIN_COMMANDS) <= set(names) and names == sorted(names)
    lines = text.splitlines()
    assert lines[-2:] == ["", "Anything else you type is sent to the model."]
    assert [line.split()[0] for line in lines[:-2]] == names  # one line per command, in order
    said = "set a sampler option, max_new_tokens, seed, or the speakers' names (user_name, model_name)"
    assert "/set NAME VALUE" in text and said in text
    assert commands.run(s, "/help set") == f"/set NAME VALUE\n  {said}"
    assert commands.run(s, "/help /compare") == (
        "/compare CHAIN_A | CHAIN_B  or  /compare profile:A | profile:B\n"
        "  the last message through two sampler chains or profiles, with the same seed")
    exc = error_of(s, "/help sett")
    assert (exc.message, exc.hint) == ("unknown command /sett", "did you mean '/set'?")


def test_profile_and_profiles(s, m):
    assert commands.run(s, "/profile") == "profile alpha: alpha: short replies"
    assert commands.run(s, "/profiles") == ("* alpha  [user]  alpha: short replies\n"
                                            "  beta  [user]  beta: never stops by itself")
    commands.run(s, "/set seed 3")
    events = list(s.send("Speak"))
    assert isinstance(events[-1], Done)
    assert commands.run(s, "/profile beta") == (
        f"switched to profile beta ({m['b']}); the conversation is kept")
    assert s.profile.name == "beta" and s.loaded.step == 9 and len(s.turns) == 1 and s.seed == 42
    assert commands.run(s, "/profiles").splitlines()[1] == "* beta  [user]  beta: never stops by itself"
    exc = error_of(s, "/profile missing")
    assert (exc.message, exc.hint) == ("no profile named 'missing'", "profiles: alpha, beta")
    exc = error_of(s, "/profile alpah")
    assert (exc.message, exc.hint) == ("no profile named 'alpah'", "did you mean 'alpha'?")
    exc = error_of(s, "/profiles all")
    assert isinstance(exc, UsageError) and exc.hint == "usage: /profiles"
    assert s.profile.name == "beta"


def test_profiles_shows_a_broken_profile_with_its_error(s, m, tmp_path, monkeypatch):
    (tmp_path / "alpha.toml").write_text(ALPHA_TOML.replace("../models/a.safetensors", str(m["a"])), encoding="utf-8")
    (tmp_path / "broken.toml").write_text('checkpoint = "nowhere.safetensors"\n', encoding="utf-8")
    monkeypatch.setenv("QUILL_PROFILES", str(tmp_path))
    lines = commands.run(s, "/profiles").splitlines()
    assert lines[0] == "  alpha  [user]  alpha: short replies"  # another file than the session's alpha
    assert lines[1].startswith("  broken  [user]  ERROR: profile ") and "key checkpoint" in lines[1]


def test_sampler_set_and_show(s, m):
    assert commands.run(s, "/sampler") == "sampler chain: top_k,temperature"
    assert commands.run(s, "/set temperature 0.5") == "temperature.t = 0.5"
    assert commands.run(s, "/set   top_k.k   7 ") == "top_k.k = 7"
    assert commands.run(s, "/sampler top_k, top_p,temperature") == "sampler chain: top_k,top_p,temperature"
    assert s.options == {"top_k": {"k": 7}, "top_p": {"p": 0.95, "min_keep": 1}, "temperature": {"t": 0.5}}
    assert commands.run(s, "/set top_p.p 0.75") == "top_p.p = 0.75"
    assert commands.run(s, "/set max_new_tokens 30") == "max_new_tokens = 30"
    assert commands.run(s, "/set seed 8") == "seed = 8"
    assert commands.run(s, "/show") == (
        f"profile     alpha ({m['a']}, step 7)\n"
        "sampler     top_k,top_p,temperature\n"
        "options     top_k: k=7; top_p: p=0.75, min_keep=1; temperature: t=0.5\n"
        "generation  max_new_tokens 30, seed 8\n"
        "device      cpu, float32")
    commands.run(s, "/set seed random")
    commands.run(s, "/sampler greedy")
    assert commands.run(s, "/show").splitlines()[2:4] == [
        "options     none", "generation  max_new_tokens 30, seed random for each reply"]
    for line, message, hint in [
        ("/set temperature", "/set needs a name and a value", "for example /set temperature 0.7 or /set top_p.p 0.9"),
        ("/set", "/set needs a name and a value", "for example /set temperature 0.7 or /set top_p.p 0.9"),
        ("/set nope 1", "there is no setting 'nope'", "settings: max_new_tokens, seed, user_name, model_name"),
        ("/set greedy 1", "sampler 'greedy' has no options", None),
        ("/set max_new_tokens lots", "max_new_tokens must be a whole number, not 'lots'", None),
        ("/sampler top_k,tempurature", "no sampler named 'tempurature'", "did you mean 'temperature'?"),
    ]:
        exc = error_of(s, line)
        assert exc.message.startswith(message), (line, exc.message)
        if hint:
            assert exc.hint == hint
    assert (s.chain, s.max_new_tokens) == ("greedy", 30)


def test_regen_undo_clear_replay_compare_tokens_and_quit(s, m):
    commands.run(s, "/set seed 4")
    first = raw_reply(s, "Speak")
    raw_reply(s, "hear me speak")
    second = s.turns[1].reply
    events = commands.run(s, "/regen")
    assert not isinstance(events, str)
    events = list(events)
    assert isinstance(events[-1], Done) and s.turns[1].reply == second  # the seed is fixed
    assert commands.run(s, "/replay") == "reply 2 replayed: identical"
    assert commands.run(s, "/replay 1") == "reply 1 replayed: identical"
    assert s.turns[0].reply == first.strip()
    exc = error_of(s, "/replay one")
    assert (exc.message, exc.hint) == ("/replay takes a reply number, not 'one'", "usage: /replay [N]")
    exc = error_of(s, "/replay 3")
    assert (exc.message, exc.hint) == ("there is no reply 3 to replay", "replies: 1 to 2")
    same = s.compare("greedy", "greedy")[0].text
    shown = commands.run(s, "/compare greedy | greedy")
    assert re.fullmatch(rf"\[greedy\]  \d+ tokens/s, seed (\d+)\n{re.escape(same)}\n\n"
                        rf"\[greedy\]  \d+ tokens/s, seed \1\n{re.escape(same)}", shown), shown
    assert commands.run(s, "/compare top_k,temperature|greedy").startswith("[top_k,temperature]  ")
    for bad in ("/compare greedy", "/compare greedy |", "/compare | greedy", "/compare"):
        exc = error_of(s, bad)
        assert isinstance(exc, UsageError)
        assert (exc.message, exc.hint) == ("/compare needs two sampler chains (or profile:NAME) separated by |",
                                           "usage: /compare CHAIN_A | CHAIN_B  or  /compare profile:A | profile:B")
    tok = s.loaded.tokenizer
    assert commands.run(s, "/tokens Speak, all") == "10 tokens: " + " ".join(
        f'"{c}":{tok.encode(c)[0]}' for c in "Speak, all")
    exc = error_of(s, "/tokens")
    assert exc.message == "/tokens needs some text" and exc.hint == "usage: /tokens TEXT"
    assert commands.run(s, "/undo") == "forgot: 'hear me speak'"
    assert [t.user for t in s.turns] == ["Speak"]
    assert commands.run(s, "/clear") == "the conversation is cleared (settings are kept)"
    assert s.turns == [] and s.seed == 4
    for line, message in [("/undo", "nothing to undo"), ("/regen", "nothing to regenerate yet"),
                          ("/replay", "there are no replies to replay yet"),
                          ("/compare greedy | greedy", "say something first: /compare replies to the last message")]:
        assert error_of(s, line).message == message
    assert commands.run(s, "/quit") is commands.QUIT
    assert commands.run(s, "  /quit  ") is commands.QUIT


def test_save_and_load(s, m, tmp_path, monkeypatch):
    raw_reply(s, "Speak")
    raw_reply(s, "hear me speak")
    target = tmp_path / "chat.json"
    assert commands.run(s, f"/save {target}") == f"saved 2 turns to {target}"
    monkeypatch.chdir(tmp_path)
    said = commands.run(s, "/save")
    name = re.fullmatch(r"saved 2 turns to (quill-chat-\d{8}-\d{6}\.md)", said).group(1)
    assert (tmp_path / name).read_text(encoding="utf-8").startswith("# Quill chat with alpha")
    other = ChatSession("beta")
    assert commands.run(other, f"/load {target}") == f"loaded 2 turns from {target}"
    assert other.turns == s.turns
    exc = error_of(other, f"/load {name}")
    assert exc.message.startswith(f"transcript '{name}' is not a Quill JSON transcript")
    assert exc.hint == "load a .json transcript written by /save FILE.json"
    exc = error_of(other, "/load")
    assert isinstance(exc, UsageError) and exc.hint == "usage: /load FILE"
    assert len(other.turns) == 2


def test_an_unknown_command_suggests_the_closest(s):
    for line, hint in [("/shwo", "did you mean '/show'?"), ("/profil beta", "did you mean '/profile'?"),
                       ("/xyzzy", "/help lists the commands"), ("/", "/help lists the commands")]:
        exc = error_of(s, line)
        assert isinstance(exc, UsageError)
        assert (exc.message, exc.hint) == (f"unknown command {line.split()[0]}", hint)


# --- completion --------------------------------------------------------------------------------

def test_completion_of_commands_and_their_arguments(s):
    assert commands.complete(s, "/") == [e.name for e in commands.commands()]
    assert commands.complete(s, "/pro") == ["/profile", "/profiles"]
    assert commands.complete(s, "/q") == ["/quit"]
    assert commands.complete(s, "/zz") == []
    assert commands.complete(s, "/help se") == ["/sessions", "/set"]
    assert commands.complete(s, "/help set") == ["/set"]
    assert commands.complete(s, "/help sh") == ["/show"]
    assert commands.complete(s, "/profile ") == ["alpha", "beta"]
    assert commands.complete(s, "/profile b") == ["beta"]
    assert commands.complete(s, "/sampler to") == ["top_k", "top_p"]
    assert commands.complete(s, "/sampler top_k,te") == ["top_k,temperature"]
    assert commands.complete(s, "/sampler top_k,top_p,gr") == ["top_k,top_p,greedy"]
    assert commands.complete(s, "/sampler top_k, te") == ["temperature"]  # completes the word after the space
    assert commands.complete(s, "/compare gr") == ["greedy"]
    assert commands.complete(s, "/compare greedy | top_k,te") == ["top_k,temperature"]  # the second chain too
    assert commands.complete(s, "/compare greedy|te") == ["greedy|temperature"]
    assert commands.complete(s, "/set ") == ["max_new_tokens", "model_name", "seed", "temperature", "temperature.t", "top_k",
                                              "top_k.k", "user_name"]
    assert commands.complete(s, "/set te") == ["temperature", "temperature.t"]
    s.set_chain("top_p")
    assert commands.complete(s, "/set top") == ["top_p.min_keep", "top_p.p"]  # two options: no shorthand
    assert commands.complete(s, "/nope x") == []
    assert commands.complete(s, "/show x") == []


# --- a plugin's command that fails -------------------------------------------------------------

def boom(session, args):
    return 1 / 0


def picky(session, args):
    if not args:
        raise UsageError("/picky needs a thing")
    return f"picked {args}"


@pytest.fixture
def boom_plugin(s, monkeypatch):
    """The real built-ins plus a plugin `boomer` with a command that raises and one that is picky."""
    class Boomer:
        @hookimpl
        def quill_register_commands(self, register):
            register("/boom", boom, help="always fails", usage="/boom")
            register("/picky", picky, help="needs a thing", usage="/picky THING")

    monkeypatch.setattr(host_mod, "metadata", SimpleNamespace(entry_points=lambda group: []))
    add_builtin_plugin(monkeypatch, "boomer", Boomer())
    return s


def test_a_failing_plugin_command_becomes_an_error_naming_it_and_its_plugin(boom_plugin):
    s = boom_plugin
    exc = error_of(s, "/boom now")
    assert type(exc) is QuillError
    assert exc.message == "command /boom (plugin 'boomer') failed: ZeroDivisionError: division by zero"
    assert isinstance(exc.__cause__, ZeroDivisionError)
    exc = error_of(s, "/picky")
    assert (exc.message, exc.hint) == ("/picky needs a thing", "usage: /picky THING")
    assert commands.run(s, "/picky  apples ") == "picked apples"
    assert "/boom" in commands.complete(s, "/b")
    # and the chat goes on
    out, err = script(s, "/boom\n/show\n")
    assert err == "error: command /boom (plugin 'boomer') failed: ZeroDivisionError: division by zero\n"
    assert out.startswith("> /boom\n> /show\nprofile     alpha")


# --- the REPL on a script ----------------------------------------------------------------------

def test_run_script_writes_the_transcript_and_stops_at_quit(s, m, monkeypatch):
    twin = ChatSession("alpha")
    twin.set("seed", "5")
    first = raw_reply(twin, "Speak")
    twin.set_chain("greedy")
    second = raw_reply(twin, "hear me speak")
    assert first.strip() and second.strip()
    lines = io.StringIO("/set seed 5\nSpeak\n\n   \n/sampler greedy\nhear me speak\r\n/regen\n/bogus\n"
                        "/set temperature\n/quit\nYou are all resolved\n")
    out, err = io.StringIO(), io.StringIO()
    repl.run_script(s, lines, out, err)
    assert out.getvalue() == (
        "> /set seed 5\nseed = 5\n"
        f"> Speak\n{first}\n"
        "> /sampler greedy\nsampler chain: greedy\n"
        f"> hear me speak\n{second}\n"
        f"> /regen\n{second}\n"
        "> /bogus\n"
        "> /set temperature\n"
        "> /quit\n")
    assert err.getvalue() == ("error: unknown command /bogus\n  hint: /help lists the commands\n"
                              "error: /set needs a name and a value\n"
                              "  hint: for example /set temperature 0.7 or /set top_p.p 0.9\n")
    assert lines.readline() == "You are all resolved\n"  # not read: /quit ended the chat
    assert [t.user for t in s.turns] == ["Speak", "hear me speak"]
    assert [t.reply for t in s.turns] == [t.reply for t in twin.turns]


def notice(dropped: int) -> str:
    if dropped == 1:
        return "[the oldest turn no longer fits in the context window (64 tokens); the model no longer sees it]"
    return f"[the {dropped} oldest turns no longer fit in the context window (64 tokens); the model no longer sees them]"


def test_run_script_shows_notices_about_old_turns(s):
    out, err = script(s, "hear me speak\n" * 5)
    assert err == ""
    firsts = [t.provenance.first_turn for t in s.turns]
    assert firsts[0] == 0 and firsts[-1] >= 2  # three earlier turns never fit (20 + 3 * 21 tokens > 54)
    # each notice comes right after its message, before the reply
    want = [f"> hear me speak\n{notice(first)}" if first else "> hear me speak" for first in firsts]
    got = [line + (f"\n{next_line}" if next_line.startswith("[") else "")
           for line, next_line in zip(out.splitlines(), out.splitlines()[1:] + [""]) if line.startswith(">")]
    assert got == want
    assert sum(line.startswith("[") for line in out.splitlines()) == sum(1 for f in firsts if f)


class CancelWhenStreaming(io.StringIO):
    """An output that cancels the first reply as soon as it is sent its first streamed text."""

    def __init__(self, session):
        super().__init__()
        self.session, self.cancelled = session, False

    def write(self, text):
        if self.session.busy and text and not self.cancelled:
            self.session.cancel()
            self.cancelled = True
        return super().write(text)


def test_a_cancelled_reply_is_marked_stopped_and_the_script_goes_on(s):
    s.use_profile("beta")
    out, err = CancelWhenStreaming(s), io.StringIO()
    repl.run_script(s, io.StringIO("/set max_new_tokens 100000\nSpeak\n/set max_new_tokens 3\nhear me speak\n"), out, err)
    assert err.getvalue() == ""
    text = out.getvalue()
    head = "> /set max_new_tokens 100000\nmax_new_tokens = 100000\n> Speak\n"
    assert text.startswith(head)
    streamed, rest = text[len(head):].split("\n[stopped]\n")
    assert s.turns[0].reply == streamed.strip() and s.turns[0].provenance.reason == "cancelled"
    assert s.turns[0].provenance.new_tokens < 200  # stopped at once, not after 100000 tokens
    assert rest.startswith("> /set max_new_tokens 3\nmax_new_tokens = 3\n> hear me speak\n")
    assert s.turns[1].provenance.reason == "length" and s.turns[1].provenance.new_tokens == 3


# --- `quill chat` --------------------------------------------------------------------------------

def test_quill_chat_runs_a_script_from_stdin(m, monkeypatch):
    lines = ("/set seed 5\nSpeak\n/profile beta\nhear me speak\n/show\n/tokens Speak\n/bogus\n/quit\n"
             "never read\n")
    monkeypatch.setenv("QUILL_PROFILES", str(m["two"]))
    want_out, want_err = script(ChatSession("alpha"), lines)
    assert "switched to profile beta" in want_out and want_out.endswith("> /quit\n")
    out = run_quill("chat", "--profile", "alpha", input=lines.encode(),
                    env={"QUILL_PROFILES": str(m["two"]), "OMP_NUM_THREADS": "1"})
    assert out.stderr.decode() == want_err == "error: unknown command /bogus\n  hint: /help lists the commands\n"
    assert out.stdout.decode() == want_out
    assert out.returncode == 1  # every line ran, but one failed: a script can tell
    fine = run_quill("chat", "--profile", "alpha", input=b"/set seed 5\nSpeak\n",
                     env={"QUILL_PROFILES": str(m["two"]), "OMP_NUM_THREADS": "1"})
    assert (fine.returncode, fine.stderr) == (0, b"")


def chat_main(monkeypatch, capsys, folder: Path, text: str) -> tuple[int, str, str]:
    """`quill chat` in-process, with `text` on a stdin that is no terminal."""
    from tui.cli import main

    monkeypatch.setenv("QUILL_PROFILES", str(folder))
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    code = main(["chat"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_without_a_profile_uses_the_only_one_or_says_which_there_are(m, monkeypatch, capsys, tmp_path):
    assert chat_main(monkeypatch, capsys, m["one"], "/profile\n") == (
        0, "> /profile\nprofile alpha: alpha: short replies\n", "")
    assert chat_main(monkeypatch, capsys, m["two"], "/profile\n") == (
        1, "", "quill: error: several profiles: say which with --profile NAME\n  hint: profiles: alpha, beta\n")
    folder = tmp_path / "three"
    folder.mkdir()
    for name in ("alpha", "default", "zeta"):
        (folder / f"{name}.toml").write_text(ALPHA_TOML.replace("../models/a.safetensors", str(m["a"])))
    assert chat_main(monkeypatch, capsys, folder, "/profile\n") == (0, "> /profile\nprofile default: alpha: short replies\n", "")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = chat_main(monkeypatch, capsys, empty, "/profile\n")
    assert (code, out) == (1, "")
    assert err == (f"quill: error: there are no usable profiles to chat with\n"
                   f"  hint: write one in {empty} (see the README's Profiles section)\n")


# --- the interactive REPL, on a pseudo-terminal ------------------------------------------------

# Make the pty the child's controlling terminal (Ctrl-C then sends SIGINT), then run the CLI.
# SIGINT starts out ignored, as a shell leaves it for background work (CI scripts, `cmd &`): Ctrl-C must still work.
BOOT = ("import fcntl, runpy, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); sys.argv[0] = 'quill'; "
        "signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "runpy.run_module('tui.cli', run_name='__main__', alter_sys=True)")
ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|[\x08\r]")
PROMPT_STARTS = b"\x1b[?2004h"  # prompt_toolkit turns bracketed paste on when a prompt starts (in raw mode)
PROMPT_ENDS = b"\x1b[?2004l"  # ... and off when it returns the line (the terminal is back in cooked mode)


class Terminal:
    """`quill chat` on a pseudo-terminal, driven like a person at the keyboard."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-c", BOOT, *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=env, cwd=REPO, start_new_session=True)
        os.close(slave)
        self.raw = b""
        self.mark = 0  # where the next `expect` starts looking on the screen
        self.prompts = 0  # prompts answered so far

    def screen(self) -> str:
        return ESCAPES.sub(b"", self.raw).decode("utf-8", "replace")

    def _read(self, timeout: float) -> bool:
        """Read what the chat wrote; False once it has closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child is gone
            data = b""
        self.raw += data
        return bool(data)

    def wait_for(self, done, what: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()[-3000:]}")
            if not self._read(0.1) and not done():
                raise AssertionError(f"the chat ended before {what} (exit code {self.proc.poll()}); "
                                     f"the screen:\n{self.screen()[-3000:]}")

    def expect(self, text: str, timeout: float = 60) -> None:
        self.wait_for(lambda: text in self.screen()[self.mark:], repr(text), timeout)
        self.mark = self.screen().index(text, self.mark) + len(text)

    def at_prompt(self) -> None:
        self.wait_for(lambda: self.raw.count(PROMPT_STARTS) > self.prompts, "the prompt")
        self.prompts += 1

    def keys(self, data: bytes) -> None:
        os.write(self.master, data)

    def enter(self, text: str = "") -> None:
        """Type `text` and press Enter; returns once the prompt has given the line to the chat."""
        ended = self.raw.count(PROMPT_ENDS)
        self.keys(text.encode() + b"\r")
        self.wait_for(lambda: self.raw.count(PROMPT_ENDS) > ended, f"the chat to take {text!r}")

    def type(self, line: str) -> None:
        """Type a line at the next prompt and press Enter."""
        self.at_prompt()
        self.enter(line)

    def exit_code(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self._read(0.1)
        assert self.proc.poll() is not None, f"the chat did not end; the screen:\n{self.screen()[-3000:]}"
        end = time.monotonic() + 5
        while self._read(0.05) and time.monotonic() < end:  # what it wrote last
            pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(m, tmp_path):
    env = quill_env()
    env.update(QUILL_PROFILES=str(m["two"]), TERM="xterm", HOME=str(tmp_path / "home"),
               XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               PROMPT_TOOLKIT_NO_CPR="1", OMP_NUM_THREADS="1", COLUMNS="120", LINES="40")
    started = []

    def start(*args: str, **more: str) -> Terminal:
        started.append(Terminal(list(args), {**env, **more}))
        return started[-1]

    yield start
    for t in started:
        t.close()


def test_interactive_chat_on_a_terminal(terminal, m, tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_PROFILES", str(m["two"]))
    twin = ChatSession("alpha")
    twin.set("seed", "5")
    reply = raw_reply(twin, "Speak")
    assert len(reply.strip()) >= 3
    t = terminal("chat", "--plain", "--profile", "alpha")
    t.expect("Chatting with alpha. /help lists the commands; Esc Enter adds a line; Ctrl-D leaves.")
    t.type("/set seed 5")
    t.expect("seed = 5\n")
    t.type("Speak")
    t.expect(f"{reply}\n")  # streamed from the worker thread, as the twin says it
    # Tab completes a command, then a profile name
    t.at_prompt()
    t.keys(b"/sh\t")
    t.wait_for(lambda: "/show" in t.screen()[t.mark:], "/sh to complete")
    t.enter()
    t.expect("sampler     top_k,temperature\n")
    t.at_prompt()
    t.keys(b"/profile b\t")
    t.wait_for(lambda: "/profile beta" in t.screen()[t.mark:], "the profile name to complete")
    t.enter()
    t.expect("switched to profile beta")
    # Esc Enter puts a new line in the message
    t.at_prompt()
    t.keys(b"You are\x1b\rall resolved")
    t.wait_for(lambda: "all resolved" in t.screen()[t.mark:], "the second line")
    t.enter()
    save = tmp_path / "chat.json"
    t.type(f"/save {save}")
    t.expect(f"saved 2 turns to {save}")
    assert [turn["user"] for turn in json.loads(save.read_text())["turns"]] == ["Speak", "You are\nall resolved"]
    # Ctrl-C while a reply streams stops it; the chat goes on
    t.type("/set max_new_tokens 100000")
    t.expect("max_new_tokens = 100000\n")
    t.type("Speak")
    start = len(t.screen())
    t.wait_for(lambda: len(t.screen()) > start + 200, "the reply to stream")
    t.keys(b"\x03")
    t.expect("\n[stopped]\n")
    t.type("/show")
    t.expect("generation  max_new_tokens 100000, seed 42\n")
    # Ctrl-C during a command that takes long stops the command, not the chat
    t.type("/compare greedy | greedy")
    time.sleep(0.5)
    t.keys(b"\x03")
    t.expect("(interrupted)\n")
    t.type("/profile")
    t.expect("profile beta: beta: never stops by itself\n")
    t.type("/quit")
    assert t.exit_code() == 0
    assert "Traceback" not in t.screen() and "\nerror: " not in t.screen() and "quill: " not in t.screen()
    history = (tmp_path / "data" / "quill" / "history").read_text()
    assert "\n+/set seed 5\n" in history and "\n+You are\n+all resolved\n" in history


def test_ctrl_c_twice_at_an_empty_prompt_leaves(terminal, m):
    t = terminal("chat", "--plain", QUILL_PROFILES=str(m["one"]))  # the only profile: no --profile needed
    t.expect("Chatting with alpha.")
    t.at_prompt()
    t.keys(b"\x03")
    t.expect("(Ctrl-C again to leave)\n")
    t.type("/profile")  # anything in between starts over
    t.expect("profile alpha: alpha: short replies\n")
    t.at_prompt()
    t.keys(b"\x03")
    t.expect("(Ctrl-C again to leave)\n")
    t.at_prompt()
    t.keys(b"\x03")
    assert t.exit_code() == 0
    assert "Traceback" not in t.screen() and "interrupted" not in t.screen()


def test_ctrl_d_leaves(terminal):
    t = terminal("chat", "--plain", "--profile", "beta")
    t.expect("Chatting with beta.")
    t.at_prompt()
    t.keys(b"\x04")
    assert t.exit_code() == 0


def test_the_interactive_chat_resumes_the_last_saved_session(terminal, m, tmp_path):
    first = run_quill("chat", "--profile", "alpha", input=b"/set seed 5\nSpeak\n",
                      env={"QUILL_PROFILES": str(m["two"]), "XDG_DATA_HOME": str(tmp_path / "data"),
                           "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    reply = first.stdout.decode().split("> Speak\n")[1].splitlines()[0]
    t = terminal("chat", "--plain", "--resume", "last")
    t.expect(f"resumed session 1 with alpha: 1 turn\n> Speak\n{reply}\n")
    t.expect("Chatting with alpha.")
    t.type("/sessions")
    t.expect("Speak\n")
    t.type("/edit 1 First")  # edited on the terminal: the old branch stays, /branch goes back to it
    t.type("/branch 1")
    t.expect(f"switched to version 1 of 2 of message 1\n> Speak\n{reply}\n")
    t.type("/quit")
    assert t.exit_code() == 0
