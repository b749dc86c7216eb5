"""The saved-sessions store (gpt_runtime/store.py) and `quill sessions`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_runtime.errors import QuillError
from gpt_runtime.store import Store, short_title
from tests.helpers import one_line_error, run_quill

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "sessions.db") as s:
        yield s


def forked(store: Store) -> dict[str, int]:
    """A session: a question with two replies (a fork), the second one answered on."""
    chat = store.create_session("alpha")
    q = store.add_message(chat, None, "user", "Who art thou, stranger?")
    a = store.add_message(chat, q, "model", "A friend of Romeo.", {"seed": 3, "chain": "top_k"})
    b = store.add_message(chat, q, "model", "No one at all.")
    c = store.add_message(chat, b, "user", "Then go.")
    return {"chat": chat, "q": q, "a": a, "b": b, "c": c}


def test_tree_path_and_current_leaf(store):
    ids = forked(store)
    chat = ids["chat"]
    assert store.get(chat).current == ids["c"]  # the last message added is the current leaf
    assert [m.id for m in store.path(chat)] == [ids["q"], ids["b"], ids["c"]]
    assert [m.id for m in store.path(chat, ids["a"])] == [ids["q"], ids["a"]]
    assert store.path(chat)[0].parent is None and store.path(chat)[1].parent == ids["q"]
    store.set_current(chat, ids["a"])  # switch to the other branch
    assert [m.text for m in store.path(chat)] == ["Who art thou, stranger?", "A friend of Romeo."]
    assert store.path(chat)[1].provenance == {"seed": 3, "chain": "top_k"}
    assert store.path(store.create_session("beta")) == []


def test_siblings_and_children_after_a_fork(store):
    ids = forked(store)
    assert [m.id for m in store.siblings(ids["b"])] == [ids["a"], ids["b"]]
    assert [m.id for m in store.children(ids["q"])] == [ids["a"], ids["b"]]
    assert store.children(ids["a"]) == []
    assert [m.id for m in store.siblings(ids["q"])] == [ids["q"]]  # a root's siblings are its session's roots
    edit = store.add_message(ids["chat"], None, "user", "Who goes there?")  # an edited first message
    assert [m.id for m in store.siblings(ids["q"])] == [ids["q"], edit]
    assert store.get(ids["chat"]).title == "Who art thou, stranger?"  # the first user message named it


def test_messages_must_belong_to_their_session(store):
    ids = forked(store)
    other = store.create_session("alpha")
    with pytest.raises(QuillError, match=f"no message {ids['q']} in session {other}"):
        store.add_message(other, ids["q"], "model", "hi")
    with pytest.raises(QuillError, match="no message"):
        store.set_current(other, ids["a"])
    with pytest.raises(QuillError, match="role"):
        store.add_message(other, None, "assistant", "hi")
    assert store.get(other).messages == 0  # nothing was half-written


def test_list_rename_delete(store):
    ids = forked(store)
    other = store.create_session("beta", title="named at once")
    store.add_message(other, None, "user", "hello")
    listed = store.list_sessions()
    assert [(s.id, s.title, s.profile, s.messages) for s in listed] == [
        (other, "named at once", "beta", 1), (ids["chat"], "Who art thou, stranger?", "alpha", 4)]
    assert store.list_sessions(limit=1)[0].id == other
    store.rename(ids["chat"], "  the\nstranger ")
    assert store.get(ids["chat"]).title == "the stranger"
    store.delete(ids["chat"])
    assert [s.id for s in store.list_sessions()] == [other]
    left = store._db.execute("SELECT count(*) FROM messages WHERE session = ?", (ids["chat"],)).fetchone()[0]
    assert left == 0  # the messages went with it
    assert store.search("stranger") == []  # and out of the search index


def test_missing_session_lists_recent_ids(store):
    with pytest.raises(QuillError) as empty:
        store.get(5)
    assert empty.value.hint == "there are no saved sessions yet"
    first, second = store.create_session("a"), store.create_session("b")
    for call in (lambda: store.get(99), lambda: store.delete(99), lambda: store.rename(99, "x"),
                 lambda: store.add_message(99, None, "user", "x"), lambda: store.path(99)):
        with pytest.raises(QuillError, match="there is no saved session 99") as info:
            call()
        assert f"{second}, {first}" in info.value.hint


def test_default_title_is_one_short_line():
    assert short_title("\n  Hello,   world \nmore") == "Hello, world"
    long = short_title("word " * 40)
    assert len(long) <= 60 and long.endswith("…")


def test_search_with_fts_and_snippet(store):
    assert store.fts
    ids = forked(store)
    hits = store.search("romeo")
    assert [(h.session, h.message) for h in hits] == [(ids["chat"], ids["a"])]
    assert "[Romeo]" in hits[0].snippet
    assert [h.message for h in store.search("strang")] == [ids["q"]]  # a word matches as a prefix
    assert store.search('friend "of') and store.search("nothing-like-this") == []  # quotes do not break the query
    with pytest.raises(QuillError, match="search for what"):
        store.search("  ")


def test_search_without_fts(store):
    ids = forked(store)
    store.fts = False  # as on an SQLite built without FTS5
    hits = store.search("ROMEO friend")
    assert [h.message for h in hits] == [ids["a"]] and "[Romeo]" in hits[0].snippet
    assert store.search("100%") == []


def test_export_json_keeps_the_tree(store):
    ids = forked(store)
    data = json.loads(store.export(ids["chat"], "json"))
    assert data["format"] == "quill-session" and data["current"] == ids["c"]
    assert {m["id"]: m["parent"] for m in data["messages"]} == {
        ids["q"]: None, ids["a"]: ids["q"], ids["b"]: ids["q"], ids["c"]: ids["b"]}
    copy = store.import_session(store.export(ids["chat"], "json"))
    assert [m.text for m in store.path(copy)] == [m.text for m in store.path(ids["chat"])]
    first = store.path(copy)[0]
    assert [m.text for m in store.children(first.id)] == ["A friend of Romeo.", "No one at all."]
    assert store.children(first.id)[0].provenance == {"seed": 3, "chain": "top_k"}
    again = json.loads(store.export(copy, "json"))
    strip = lambda d: [(m["role"], m["text"], m["provenance"]) for m in d["messages"]]  # noqa: E731
    assert strip(again) == strip(data) and again["title"] == data["title"]
    with pytest.raises(QuillError, match="not a Quill session export"):
        store.import_session('{"format": "other"}')


def test_export_markdown_is_the_current_branch(store):
    ids = forked(store)
    text = store.export(ids["chat"], "md")
    assert text.startswith("# Who art thou, stranger?")
    assert "**You:** Then go." in text and "**alpha:** No one at all." in text
    assert "Romeo" not in text and "1 more message on other branches" in text


def test_file_is_private(tmp_path):
    path = tmp_path / "deep" / "sessions.db"
    old = os.umask(0o022)
    try:
        with Store(path) as s:
            s.add_message(s.create_session("a"), None, "user", "secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "sessions.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(QuillError, match="newer Quill") as info:
        Store(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_schema_1_file_gains_the_system_column_and_keeps_its_sessions(tmp_path):
    path = tmp_path / "sessions.db"
    with Store(path) as store:  # made now, then taken back to schema 1 (sessions without `system`)
        session, _ = store.start_session("alpha", None, "Who art thou?", "A friend.")
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE sessions DROP COLUMN system")
        db.execute("PRAGMA user_version = 1")
    with Store(path) as store:
        info = store.get(session)
        assert (info.title, info.system, info.messages) == ("Who art thou?", None, 2)
        store.set_system(session, "Be brief.\n")
        assert store.get(session).system == "Be brief.\n"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_corrupt_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is no database, just some bytes\n" * 200)
    with pytest.raises(QuillError, match="not a usable sessions database") as info:
        Store(path)
    assert "\n" not in str(info.value) and str(path) in info.value.message


def test_locked_file_is_one_line(tmp_path):
    path = tmp_path / "sessions.db"
    with Store(path) as first, Store(path, timeout=0.1) as second:
        chat = first.create_session("a")
        first._db.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
        with pytest.raises(QuillError, match="locked") as info:
            second.add_message(chat, None, "user", "hi")
        assert "\n" not in str(info.value) and str(path) in info.value.message
        first._db.execute("ROLLBACK")
        second.add_message(chat, None, "user", "hi")  # fine once the lock is gone


def test_two_stores_write_alternately(tmp_path):
    path = tmp_path / "sessions.db"
    with Store(path) as one, Store(path) as two:
        chat = one.create_session("a")
        parent = None
        for i in range(10):
            parent = (one if i % 2 else two).add_message(chat, parent, "user" if i % 2 else "model", f"turn {i}")
        for store in (one, two):
            assert [m.text for m in store.path(chat)] == [f"turn {i}" for i in range(10)]
        other = two.create_session("b")
        assert [s.id for s in one.list_sessions()] == [other, chat]


WRITER = """
import sys, time
from gpt_runtime.store import Store
store = Store(sys.argv[1])
chat = store.create_session("a")
parent = None
for i in range(3):
    parent = store.add_message(chat, parent, "user", f"kept {i}")
store._db.execute("BEGIN IMMEDIATE")
for i in range(50):
    store._db.execute("INSERT INTO messages(session, parent, role, text, created) VALUES (?, ?, 'user', ?, 0)",
                      (chat, parent, f"lost {i}"))
store._db.execute("UPDATE sessions SET title = 'lost' WHERE id = ?", (chat,))
print(chat, flush=True)
time.sleep(60)
"""


def test_killed_writer_keeps_what_it_committed(tmp_path):
    path = tmp_path / "sessions.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        chat = int(proc.stdout.readline())  # mid-transaction now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    with Store(path) as store:
        assert [m.text for m in store.path(chat)] == ["kept 0", "kept 1", "kept 2"]
        assert store.get(chat).messages == 3 and store.get(chat).title == "kept 0"
        store.add_message(chat, store.get(chat).current, "model", "still writable")
        assert store.search("lost") == []


# --- `quill sessions` ----------------------------------------------------------------------


@pytest.fixture
def data_home(tmp_path):
    home = tmp_path / "data"
    with Store(home / "quill" / "sessions.db") as store:
        ids = forked(store)
        ids["other"] = store.create_session("beta", title="second chat")
    return home, ids


def test_cli_list_show_export_search_rm(data_home):
    home, ids = data_home
    env = {"XDG_DATA_HOME": str(home)}
    out = run_quill("sessions", "list", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "TITLE", "PROFILE", "MESSAGES", "LAST", "USED"]
    assert "second chat" in lines[1] and "Who art thou, stranger?" in lines[2] and " 4 " in lines[2]
    listed = json.loads(run_quill("sessions", "list", "--json", env=env).stdout)
    assert [s["id"] for s in listed] == [ids["other"], ids["chat"]]

    shown = run_quill("sessions", "show", str(ids["chat"]), env=env).stdout.decode()
    assert "Then go." in shown and "branch 2 of 2" in shown and "Romeo" not in shown
    data = json.loads(run_quill("sessions", "show", str(ids["chat"]), "--json", env=env).stdout)
    assert [m["id"] for m in data["path"]] == [ids["q"], ids["b"], ids["c"]]

    tree = json.loads(run_quill("sessions", "export", str(ids["chat"]), "--format", "json", env=env).stdout)
    assert len(tree["messages"]) == 4
    md = run_quill("sessions", "export", str(ids["chat"]), env=env).stdout.decode()
    assert md.startswith("# Who art thou, stranger?")

    found = run_quill("sessions", "search", "romeo", env=env).stdout.decode()
    assert found.startswith(f"{ids['chat']}:{ids['a']}  Who art thou, stranger?  (model)  A friend of [Romeo].\n")
    assert found.endswith(f"quill chat --resume {ids['chat']}:{ids['a']}\n")
    hits = json.loads(run_quill("sessions", "search", "romeo", "--json", env=env).stdout)
    assert hits == [{"session": ids["chat"], "message": ids["a"], "snippet": "A friend of [Romeo].", "role": "model",
                     "title": "Who art thou, stranger?"}]

    assert run_quill("sessions", "rm", str(ids["chat"]), env=env).returncode == 0
    message, hint = one_line_error(run_quill("sessions", "show", str(ids["chat"]), env=env))
    assert message == f"there is no saved session {ids['chat']}" and str(ids["other"]) in hint


def test_cli_bad_ids_and_files(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path)}
    message, hint = one_line_error(run_quill("sessions", "rm", "3", env=env))
    assert message == "there is no saved session 3" and hint == "there are no saved sessions yet"
    one_line_error(run_quill("sessions", "show", "three", env=env), code=2)
    assert run_quill("sessions", "list", env=env).stdout.decode().startswith("no saved sessions yet")
    assert stat.S_IMODE((tmp_path / "quill" / "sessions.db").stat().st_mode) == 0o600
    (tmp_path / "quill" / "sessions.db").write_bytes(b"garbage" * 1000)
    message, _ = one_line_error(run_quill("sessions", "list", env=env))
    assert "not a usable sessions database" in message and "sessions.db" in message
    help_text = run_quill("sessions", "--help", env=env).stdout.decode()
    assert "examples:" in help_text and "quill sessions search" in help_text
