"""Chats saved as they happen (gpt_runtime.store), and resumed: the session, the commands,
`quill chat --resume` in the REPL and the full-screen app, and a chat killed mid-reply."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_runtime import commands
from gpt_runtime.errors import QuillError
from gpt_runtime.session import ChatSession
from gpt_runtime.store import Store, default_path
from helpers import quill_env, run_quill
from pilot import run, until, views

pytestmark = pytest.mark.usefixtures("one_torch_thread", "data_home")  # saved chats of each test its own
REPO = Path(__file__).resolve().parent.parent


def say(session: ChatSession, text: str) -> str:
    list(session.send(text))
    return session.turns[-1].reply


def saved(session_id: int) -> list[tuple[str, str]]:
    with Store(default_path()) as store:
        return [(m.role, m.text) for m in store.path(session_id)]


def conversation(session: ChatSession) -> list[tuple[str, str]]:
    return [pair for t in session.turns for pair in (("user", t.user), ("model", t.reply))]


def test_a_chat_is_saved_as_it_happens_and_only_once_something_was_said(chat_profiles):
    s = ChatSession("alpha")
    s.set("seed", "5")
    assert s.saving and not default_path().exists()  # opening a chat leaves nothing
    say(s, "Speak")
    say(s, "hear me speak")
    with Store(default_path()) as store:
        (info,) = store.list_sessions()
        assert (info.id, info.profile, info.title, info.messages) == (s.saved_id, "alpha", "Speak", 4)
        path = store.path(info.id)
    assert [(m.role, m.text) for m in path] == conversation(s)
    assert path[1].provenance["seed"] == 5 and path[1].provenance["checkpoint_sha256"] == s.loaded.sha256
    assert [m.parent for m in path] == [None, path[0].id, path[1].id, path[2].id]  # one line, for now


def test_undo_regen_and_clear_keep_the_saved_path_equal_to_the_conversation(chat_profiles):
    s = ChatSession("alpha")
    for text in ("Speak", "hear me speak", "First"):
        say(s, text)
    first = s.saved_id
    s.undo()
    assert saved(first) == conversation(s)
    old = s.turns[-1].saved[1]
    list(s.regenerate())
    assert saved(first) == conversation(s)
    with Store(default_path()) as store:
        assert [m.id for m in store.siblings(old)] == [old, s.turns[-1].saved[1]]  # the old reply stays, a sibling
    s.undo(), s.undo()
    assert saved(first) == []
    say(s, "Resolved")  # a new first message, in the same saved session
    assert saved(first) == conversation(s) and s.saved_id == first
    before = conversation(s)
    s.clear()
    say(s, "Before we proceed")
    assert s.saved_id != first and saved(s.saved_id) == conversation(s)
    assert saved(first) == before  # the cleared chat stays saved as it was


def test_a_cancelled_reply_is_saved_as_it_stopped_and_a_replay_saves_nothing(chat_profiles):
    s = ChatSession("beta")  # never stops by itself
    s.set("max_new_tokens", "5")
    say(s, "Speak")
    s.set("max_new_tokens", "100000")
    events = s.send("hear me speak")
    next(events)
    s.cancel()
    list(events)
    assert s.turns[-1].provenance.reason == "cancelled"
    assert saved(s.saved_id) == conversation(s)
    s.replay(1)
    with Store(default_path()) as store:
        assert store.get(s.saved_id).messages == 4


def test_resume_carries_on_with_the_saved_session_and_its_profile(chat_profiles):
    first = ChatSession("beta")
    first.set("max_new_tokens", "5")
    say(first, "Speak")
    say(first, "hear me speak")
    s = ChatSession("alpha")
    number, said = s.resume("last")
    assert (number, said, s.profile.name) == (first.saved_id, [], "beta")
    assert conversation(s) == conversation(first)
    assert s.turns[1].provenance == first.turns[1].provenance
    say(s, "First")
    assert s.saved_id == first.saved_id and saved(first.saved_id) == conversation(s)
    # a session whose profile is gone resumes with the chat's profile, saying so
    (chat_profiles / "beta.toml").unlink()
    other = ChatSession("alpha")
    _, said = other.resume(str(first.saved_id))
    assert other.profile.name == "alpha" and said == ["its profile 'beta' is not there any more: chatting with alpha"]
    assert len(other.turns) == 3


def test_resuming_a_session_that_is_not_there_lists_the_recent_ones(chat_profiles):
    s = ChatSession("alpha")
    with pytest.raises(QuillError, match="there are no saved sessions yet"):
        s.resume("last")
    say(s, "Speak")
    with pytest.raises(QuillError) as info:
        s.resume("99")
    assert info.value.message == "there is no saved session 99"
    assert info.value.hint == f"recent sessions: {s.saved_id}; see `quill sessions list`"
    with pytest.raises(QuillError, match="a saved session is a number or `last`, not 'x'"):
        s.resume("x")


def test_no_save_and_the_profiles_session_save_setting(chat_profiles):
    s = ChatSession("alpha", save=False)
    say(s, "Speak")
    assert not s.saving and s.saved_id is None and not default_path().exists()
    text = (chat_profiles / "alpha.toml").read_text()
    (chat_profiles / "quiet.toml").write_text(text + "\n[session]\nsave = false\n")
    q = ChatSession("quiet")
    say(q, "Speak")
    assert q.saved_id is None and not default_path().exists()
    assert ChatSession("quiet", save=True).saving  # --no-save's opposite is not a flag, but the session may ask


def test_a_corrupt_database_stops_saving_with_one_notice_and_the_chat_goes_on(chat_profiles):
    default_path().parent.mkdir(parents=True)
    default_path().write_bytes(b"this is not a database" * 100)
    s = ChatSession("alpha")
    (notice,) = s.job_notices()  # said as the chat opens, not at the first reply
    assert notice.text.startswith(f"this chat is not saved: {str(default_path())!r} is not a usable sessions database")
    say(s, "Speak")
    assert not s.saving and s.save_error
    say(s, "hear me speak")
    list(s.regenerate())
    s.undo()
    assert s.job_notices() == [] and len(s.turns) == 1  # told once; the chat goes on
    with pytest.raises(QuillError, match="not a usable sessions database"):
        commands.run(s, "/sessions")


def test_a_lock_held_by_another_chat_skips_one_save_and_the_next_reply_saves_both(chat_profiles, monkeypatch):
    s = ChatSession("alpha")
    say(s, "Speak")
    monkeypatch.setattr(ChatSession, "_open_store", lambda self: Store(default_path(), timeout=0.1))
    other = Store(default_path(), timeout=0.1)
    try:
        other._db.execute("BEGIN IMMEDIATE")  # another chat in the middle of a write
        say(s, "hear me")
        (notice,) = s.job_notices()
        assert "not saved this time" in notice.text and "locked" in notice.text and s.saving
        other._db.execute("ROLLBACK")
        say(s, "and again")
    finally:
        other.close()
    assert saved(s.saved_id) == conversation(s)  # the skipped exchange was saved with the next one


def test_sessions_lists_nothing_and_makes_no_database_when_nothing_was_saved(chat_profiles):
    s = ChatSession("alpha", save=False)
    say(s, "Speak")
    assert s.sessions() == [] and not default_path().exists()


def test_the_sessions_resume_and_rename_commands(chat_profiles):
    s = ChatSession("alpha")
    assert commands.run(s, "/sessions") == "no saved sessions yet"
    assert commands.run(s, "/rename  My   chat ") == "the saved session will be titled 'My chat' from the first reply"
    say(s, "Speak")
    listing = commands.run(s, "/sessions").splitlines()
    assert listing[0].split() == ["id", "last", "used", "messages", "profile", "title"]
    assert listing[1].split()[0] == f"{s.saved_id}*" and listing[1].endswith("alpha             My chat")
    assert commands.run(s, "/rename Second") == f"session {s.saved_id} is now titled 'Second'"
    other = ChatSession("beta")
    result = commands.run(other, f"/resume {s.saved_id}")
    assert isinstance(result, commands.Resumed) and result.kept == 0
    assert result == f"resumed session {s.saved_id} with alpha: 1 turn"
    assert conversation(other) == conversation(s)
    with pytest.raises(QuillError, match="/resume needs"):
        commands.run(other, "/resume")


# --- `quill chat` ------------------------------------------------------------------------------

def chat(*args: str, input: str) -> subprocess.CompletedProcess:
    return run_quill("chat", *args, input=input.encode(),
                     env={"OMP_NUM_THREADS": "1", "QUILL_PROFILES": os.environ["QUILL_PROFILES"]})


def test_quill_chat_resume_shows_the_earlier_turns_and_goes_on_and_no_save(chat_profiles):
    first = chat("--profile", "beta", input="/set max_new_tokens 5\nSpeak\n")
    assert first.returncode == 0, first.stderr
    reply = first.stdout.decode().split("> Speak\n")[1].splitlines()[0]
    again = chat("--resume", input="hear me speak\n/sessions\n")  # no --profile: the session's, beta
    out = again.stdout.decode()
    assert again.returncode == 0, again.stderr
    assert out.startswith(f"resumed session 1 with beta: 1 turn\n> Speak\n{reply}\n> hear me speak\n")
    assert "\n   1*  " in out
    nothing = chat("--profile", "alpha", "--no-save", input="First\n")
    assert nothing.returncode == 0
    with Store(default_path()) as store:
        assert [(i.id, i.messages) for i in store.list_sessions()] == [(1, 4)]
    missing = chat("--resume", "7", input="")
    assert missing.returncode == 1
    assert missing.stderr.decode() == ("quill: error: there is no saved session 7\n"
                                       "  hint: recent sessions: 1; see `quill sessions list`\n")


def test_a_chat_killed_mid_reply_keeps_the_exchanges_before(chat_profiles):
    env = quill_env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "QUILL_PROFILES": str(chat_profiles)})
    proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "chat", "--profile", "beta"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        proc.stdin.write(b"/set max_new_tokens 5\nSpeak\n/set max_new_tokens 100000\nhear me speak\n")
        proc.stdin.flush()
        seen = b""
        end = time.monotonic() + 60
        while b"> hear me speak\n" not in seen or len(seen.split(b"> hear me speak\n")[1]) < 20:
            data = os.read(proc.stdout.fileno(), 4096)
            assert data and time.monotonic() < end, (seen, proc.stderr.read() if not data else b"")
            seen += data
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the long second reply
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first_reply = seen.split(b"> Speak\n")[1].split(b"\n")[0].decode()
    again = chat("--resume", "last", input="")
    assert again.returncode == 0, again.stderr
    assert again.stdout.decode() == f"resumed session 1 with beta: 1 turn\n> Speak\n{first_reply}\n"


def test_the_full_screen_chat_resumes_a_session_with_its_messages(chat_profiles):
    from tui.app import QuillApp

    first = ChatSession("beta")
    first.set("max_new_tokens", "5")
    say(first, "Speak")
    say(first, "hear me speak")
    app = QuillApp(None, resume="last")  # as `quill chat --resume` makes it

    async def steps(pilot) -> None:
        await until(pilot, lambda: len(views(app, "user")) == 2)
        assert [v.text for v in views(app, "user")] == ["Speak", "hear me speak"]
        assert [v.text for v in views(app, "model")] == [t.reply for t in first.turns]
        assert views(app, "output")[-1].text == f"resumed session {first.saved_id} with beta: 2 turns"
        assert app.session.profile.name == "beta" and app.session.saved_id == first.saved_id

    run(app, steps)


def test_a_full_disk_stops_saving_and_the_chat_goes_on(chat_profiles):
    """The sessions database can grow by 16 KiB only (a file-size limit, as a full disk): the
    chat opens, saves while it can, then says once that saving stopped, and goes on."""
    import resource

    Store(default_path()).close()  # an existing database, as after earlier chats
    limit = default_path().stat().st_size + 16384  # (over SQLite's 32 KiB of shared memory)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = quill_env({"OMP_NUM_THREADS": "1", "QUILL_PROFILES": str(chat_profiles)})
    words = ["Speak", "Hear", "First", "Citizen", "Before", "Resolved"]
    script = "/set max_new_tokens 4\n" + "".join(f"{word} {'x' * 2000}\n" for word in words)  # long, to fill it
    out = subprocess.run([sys.executable, "-m", "tui.cli", "chat", "--profile", "beta"], input=script.encode(),
                         capture_output=True, env=env, cwd=REPO, preexec_fn=small_files)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert text.count("[this chat is no longer saved: cannot use the sessions database") == 1, text[:3000]
    assert "disk" in text and "not saved:" not in text  # it opened fine, and stopped later
    replies = [part.split("\n", 1)[1] for part in text.split("\n> ")[1:]]
    assert len(replies) == len(words) and all(reply.strip() for reply in replies)  # every message had its reply
    with Store(default_path()) as store:
        saved = [m.text.split()[0] for m in store.path(store.list_sessions()[0].id)][::2] if store.list_sessions() else []
    assert 1 <= len(saved) < len(words) and saved == words[:len(saved)]  # what was saved before the disk filled


def test_the_saved_session_follows_the_profile_and_is_saved_again_if_deleted(chat_profiles):
    s = ChatSession("alpha")
    s.set("max_new_tokens", "4")
    say(s, "Speak")
    s.use_profile("beta")
    say(s, "hear me")
    with Store(default_path()) as store:
        assert store.get(s.saved_id).profile == "beta"  # a resume goes on with the profile used last
        store.delete(s.saved_id)
    first = s.saved_id
    say(s, "First")
    (notice,) = s.job_notices()
    assert "was deleted" in notice.text and s.saving and s.saved_id != first
    assert saved(s.saved_id) == conversation(s)
    other = ChatSession("alpha")
    _, said = other.resume("last", switch_profile=False)  # `quill chat --profile alpha --resume`
    assert said == ["it was held with profile beta; chatting with alpha as asked"]


def test_branching_in_the_plain_chat_and_resuming_at_a_search_hit(chat_profiles):
    script = ("/set max_new_tokens 4\nSpeak\nhear me\n/edit 2 Citizen speak\n/branch\n/branch 1\n"
              "/system Be brief\n/find Citizen\n")
    out = chat("--profile", "beta", input=script)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "message 2: 2 versions\n  1. hear me\n  2. Citizen speak  (current)\n" in text
    assert "switched to version 1 of 2 of message 2\n> hear me\n" in text
    assert "system text: 'Be brief'" in text
    hits = json.loads(run_quill("sessions", "search", "Citizen", "--json").stdout)
    (hit,) = [h for h in hits if h["role"] == "user"]
    assert f"{hit['session']}:{hit['message']}  " in text.split("> /find Citizen\n")[1]
    again = chat("--resume", f"{hit['session']}:{hit['message']}", input="")
    assert again.returncode == 0, again.stderr
    lines = again.stdout.decode().splitlines()
    assert lines[0] == f"resumed session {hit['session']} with beta: 2 turns"
    assert [line for line in lines if line.startswith("> ")] == ["> Speak", "> Citizen speak"]


def test_a_database_from_a_newer_quill_is_said_as_the_plain_chat_opens_and_the_chat_goes_on(chat_profiles):
    import sqlite3

    Store(default_path()).close()
    with sqlite3.connect(default_path()) as db:
        db.execute("PRAGMA user_version = 99")
    out = chat("--profile", "beta", input="/set max_new_tokens 4\nSpeak\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0].startswith(f"[this chat is not saved: the sessions database {str(default_path())!r} was written "
                               "by a newer Quill (schema 99")
    assert lines[-2] == "> Speak" and lines[-1].strip()  # and it replied
