"""Saved chat sessions: one SQLite file, ``sessions.db`` in the user's data directory.

A session is a tree of messages. Each message names its `parent` (None for the
first), so editing a message or regenerating a reply adds a sibling instead of
replacing anything; ``sessions.current`` is the leaf the conversation is at,
and the conversation itself is the path from the root to that leaf::

    with Store(default_path()) as store:
        chat = store.create_session("shakespeare-char")
        q = store.add_message(chat, None, "user", "Who art thou?")
        a = store.add_message(chat, q, "model", "A friend.")
        b = store.add_message(chat, q, "model", "No one.")    # a second reply: a branch
        store.path(chat)                                       # [q, b]: the current branch
        store.siblings(b)                                      # [a, b]

The file is the owner's alone (0600). ``PRAGMA user_version`` is the schema
version: a file from a newer Quill is refused, not misread. WAL journaling and a
busy timeout let two chats use the file at once; each write is one transaction,
so a process killed mid-write loses at most that write. Message text is indexed
with FTS5 for `search` (a plain LIKE scan where SQLite lacks FTS5).

Nothing here imports torch, nor sqlite3 until a `Store` is opened.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from .errors import QuillError

SCHEMA_VERSION = 2  # 2: sessions.system
ROLES = ("system", "user", "model")
TITLE_LENGTH = 60

_TABLES = (
    """CREATE TABLE sessions(
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an id someone wrote down stays unambiguous
        title TEXT,
        profile TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        current INTEGER,
        system TEXT)""",
    """CREATE TABLE messages(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session INTEGER NOT NULL REFERENCES sessions ON DELETE CASCADE,
        parent INTEGER NULL REFERENCES messages,
        role TEXT NOT NULL CHECK(role IN ('system', 'user', 'model')),
        text TEXT NOT NULL,
        provenance TEXT NULL,
        created REAL NOT NULL)""",
    "CREATE INDEX messages_session ON messages(session)",
    "CREATE INDEX messages_parent ON messages(parent)",
)
_FTS = (  # an external-content index over messages.text, kept in step by triggers
    "CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id')",
    """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text); END""",
    """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text); END""",
    """CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text); END""",
)


@dataclass
class Message:
    """One message of a session's tree."""

    id: int
    session: int
    parent: int | None
    role: str  # system, user or model
    text: str
    provenance: dict[str, Any] | None  # a reply's `session.Provenance`, as a dict
    created: float  # seconds since the epoch


@dataclass
class SessionInfo:
    """A saved session: its title, profile, times, current leaf and number of messages."""

    id: int
    title: str | None  # None until the first user message names it
    profile: str
    created: float
    updated: float  # last used: the last message added, or the last branch switch
    current: int | None  # the leaf the conversation is at
    system: str | None  # the system text the chat set (/system); None: the profile's
    messages: int


class Hit(NamedTuple):
    """A search result: the session, the message, the words found [marked], who said it, and
    the session's title."""

    session: int
    message: int
    snippet: str
    role: str
    title: str | None


def hit_line(hit: Hit) -> str:
    """A search hit on one line, as `quill sessions search` and /find show it: where it is
    (SESSION:MESSAGE, which `--resume` and /resume take), the session's title, who said it, the words found."""
    who = "you" if hit.role == "user" else hit.role
    return f"{hit.session}:{hit.message}  {hit.title or '(untitled)'}  ({who})  {' '.join(hit.snippet.split())}"


def default_path() -> Path:
    """The user's sessions database: ``sessions.db`` in the data directory."""
    from .profiles import data_dir

    return data_dir() / "sessions.db"


def short_title(text: str) -> str:
    """A session's default title: the first line of its first user message, shortened."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = " ".join(line.split())
    return line if len(line) <= TITLE_LENGTH else line[:TITLE_LENGTH - 1].rstrip() + "…"


def when(seconds: float) -> str:
    """A time for people: local date, hours and minutes."""
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


class StoreLocked(QuillError):
    """Another process holds the database's write lock (for longer than the busy timeout)."""


class Store:
    """The sessions in one SQLite file; opened (and created, 0600) on construction.

    Every method that writes does so in one transaction of its own. Errors a
    user can meet (a missing session, a corrupt or locked file, a file from a
    newer Quill) are `QuillError`s of one line that name the file or the id.
    """

    def __init__(self, file: str | os.PathLike, timeout: float = 5.0) -> None:
        import sqlite3

        self._sqlite = sqlite3
        self.file = Path(file)
        _create_private(self.file)
        with self._errors():
            self._db = sqlite3.connect(self.file, timeout=timeout, isolation_level=None)
        try:
            with self._errors():
                self._db.row_factory = sqlite3.Row
                self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._migrate()
                self.fts = self._has_fts()
        except BaseException:
            self._db.close()
            raise

    # --- opening --------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors about the file, as one-line QuillErrors that name it."""
        try:
            yield
        except self._sqlite.DatabaseError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise StoreLocked(f"the sessions database {str(self.file)!r} is locked by another process ({text})",
                                 hint="try again in a moment, when the other chat has finished writing") from None
            if "not a database" in text or "malformed" in text:
                raise QuillError(f"{str(self.file)!r} is not a usable sessions database ({text})",
                                 hint="move it aside and Quill starts a new one") from None
            if isinstance(exc, self._sqlite.OperationalError):
                raise QuillError(f"cannot use the sessions database {str(self.file)!r}: {text}") from None
            raise

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction (taking the write lock at once, so it never fails half-way on a lock)."""
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise QuillError(f"the sessions database {str(self.file)!r} was written by a newer Quill "
                             f"(schema {version}; this Quill reads schema {SCHEMA_VERSION})",
                             hint="upgrade Quill, or move the file aside")
        with self._write() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == 1:
                db.execute("ALTER TABLE sessions ADD COLUMN system TEXT")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # another process may have just made it
                for statement in _TABLES:
                    db.execute(statement)
                db.execute("SAVEPOINT fts")
                try:
                    for statement in _FTS:
                        db.execute(statement)
                except self._sqlite.OperationalError as exc:
                    if "fts5" not in str(exc):
                        raise
                    db.execute("ROLLBACK TO fts")  # this SQLite has no FTS5: search scans instead
                db.execute("RELEASE fts")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _has_fts(self) -> bool:
        try:
            self._db.execute("SELECT rowid FROM messages_fts LIMIT 0")
            return True
        except self._sqlite.OperationalError:
            return False

    # --- reading rows ---------------------------------------------------------------

    @staticmethod
    def _message(row: Any) -> Message:
        data = dict(row)
        data["provenance"] = json.loads(data["provenance"]) if data["provenance"] else None
        return Message(**data)

    def _missing(self, session: int) -> QuillError:
        recent = [str(row[0]) for row in self._db.execute("SELECT id FROM sessions ORDER BY updated DESC, id DESC LIMIT 5")]
        hint = f"recent sessions: {', '.join(recent)}; see `quill sessions list`" if recent else "there are no saved sessions yet"
        return QuillError(f"there is no saved session {session}", hint=hint)

    def _get_message(self, message: int, session: int | None = None) -> Message:
        row = self._db.execute("SELECT * FROM messages WHERE id = ?", (message,)).fetchone()
        if row is None or (session is not None and row["session"] != session):
            where = f" in session {session}" if session is not None else ""
            raise QuillError(f"there is no message {message}{where}")
        return self._message(row)

    def _check_session(self, session: int) -> None:
        if self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session,)).fetchone() is None:
            raise self._missing(session)

    # --- sessions -------------------------------------------------------------------

    def create_session(self, profile: str, title: str | None = None, system: str | None = None) -> int:
        """A new, empty session with `profile`; without a title, its first user message names it.
        `system`: the system text the chat uses in place of the profile's."""
        with self._write() as db:
            return self._insert_session(db, profile, title, system)

    @staticmethod
    def _insert_session(db: Any, profile: str, title: str | None, system: str | None) -> int:
        now = time.time()
        return db.execute("INSERT INTO sessions(title, profile, created, updated, system) VALUES (?, ?, ?, ?, ?)",
                          (check_title(title) if title is not None else None, profile, now, now, system)).lastrowid

    def get(self, session: int) -> SessionInfo:
        """The session `session`; a QuillError listing the recent ids if there is none."""
        with self._errors():
            row = self._db.execute("SELECT s.*, (SELECT count(*) FROM messages m WHERE m.session = s.id) AS messages "
                                   "FROM sessions s WHERE s.id = ?", (session,)).fetchone()
            if row is None:
                raise self._missing(session)
            return SessionInfo(**dict(row))

    def list_sessions(self, limit: int = 20) -> list[SessionInfo]:
        """The last `limit` sessions used, the latest first, with their numbers of messages."""
        with self._errors():
            rows = self._db.execute("SELECT s.*, (SELECT count(*) FROM messages m WHERE m.session = s.id) AS messages "
                                    "FROM sessions s ORDER BY s.updated DESC, s.id DESC LIMIT ?", (limit,))
            return [SessionInfo(**dict(row)) for row in rows]

    def rename(self, session: int, title: str) -> None:
        title = check_title(title)
        with self._write() as db:
            if db.execute("UPDATE sessions SET title = ? WHERE id = ?", (title, session)).rowcount == 0:
                raise self._missing(session)

    def exists(self, session: int) -> bool:
        """Whether there is a session `session` (it may have been deleted by another process)."""
        with self._errors():
            return self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session,)).fetchone() is not None

    def set_profile(self, session: int, profile: str) -> None:
        """Record the profile the chat now uses (the one a resume switches to)."""
        with self._write() as db:
            if db.execute("UPDATE sessions SET profile = ? WHERE id = ?", (profile, session)).rowcount == 0:
                raise self._missing(session)

    def set_system(self, session: int, system: str | None) -> None:
        """Save the system text the chat uses (None: the profile's)."""
        with self._write() as db:
            if db.execute("UPDATE sessions SET system = ? WHERE id = ?", (system, session)).rowcount == 0:
                raise self._missing(session)

    def delete(self, session: int) -> None:
        """Delete a session and all its messages."""
        with self._write() as db:
            if db.execute("DELETE FROM sessions WHERE id = ?", (session,)).rowcount == 0:
                raise self._missing(session)

    # --- messages -------------------------------------------------------------------

    def add_message(self, session: int, parent: int | None, role: str, text: str,
                    provenance: Any = None) -> int:
        """Add a message under `parent` (None: a first message) and make it the current leaf.

        `provenance` is a reply's `Provenance` (or a dict of it). A parent that
        already has children gets one more: a branch.
        """
        if role not in ROLES:
            raise QuillError(f"a message's role is one of {', '.join(ROLES)}, not {role!r}")
        if is_dataclass(provenance):
            provenance = asdict(provenance)
        now = time.time()
        with self._write() as db:
            self._check_session(session)
            if parent is not None:
                self._get_message(parent, session)
            message = db.execute("INSERT INTO messages(session, parent, role, text, provenance, created) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (session, parent, role, text, json.dumps(provenance) if provenance else None, now)).lastrowid
            db.execute("UPDATE sessions SET current = ?, updated = ?, title = coalesce(title, ?) WHERE id = ?",
                       (message, now, short_title(text) if role == "user" and text.strip() else None, session))
            return message

    def add_exchange(self, session: int, parent: int | None, user: str, reply: str,
                     provenance: Any = None) -> tuple[int, int]:
        """A user message under `parent` and the model's reply to it, in one transaction
        (a process killed meanwhile saves neither); returns their ids. The reply becomes current."""
        with self._write() as db:
            self._check_session(session)
            if parent is not None:
                self._get_message(parent, session)
            return self._insert_exchange(db, session, parent, user, reply, provenance)

    def start_session(self, profile: str, title: str | None, user: str, reply: str,
                      provenance: Any = None, system: str | None = None) -> tuple[int, tuple[int, int]]:
        """A new session with its first exchange, in one transaction (so no empty session is
        ever left behind); returns its id and the exchange's ids."""
        with self._write() as db:
            session = self._insert_session(db, profile, title, system)
            return session, self._insert_exchange(db, session, None, user, reply, provenance)

    @staticmethod
    def _insert_exchange(db: Any, session: int, parent: int | None, user: str, reply: str, provenance: Any) -> tuple[int, int]:
        if is_dataclass(provenance):
            provenance = asdict(provenance)
        now = time.time()
        insert = "INSERT INTO messages(session, parent, role, text, provenance, created) VALUES (?, ?, ?, ?, ?, ?)"
        asked = db.execute(insert, (session, parent, "user", user, None, now)).lastrowid
        answer = db.execute(insert, (session, asked, "model", reply, json.dumps(provenance) if provenance else None, now)).lastrowid
        db.execute("UPDATE sessions SET current = ?, updated = ?, title = coalesce(title, ?) WHERE id = ?",
                   (answer, now, short_title(user) if user.strip() else None, session))
        return asked, answer

    def set_current(self, session: int, message: int | None) -> None:
        """Make `message` the current leaf: switch to its branch (None: back before the first message)."""
        with self._write() as db:
            self._check_session(session)
            if message is not None:
                self._get_message(message, session)
            db.execute("UPDATE sessions SET current = ?, updated = ? WHERE id = ?", (message, time.time(), session))

    def path(self, session: int, leaf: int | None = None) -> list[Message]:
        """The conversation from its first message to `leaf` (the current one by default)."""
        leaf = self.get(session).current if leaf is None else leaf
        if leaf is None:
            return []
        with self._errors():
            self._get_message(leaf, session)
            rows = self._db.execute(
                "WITH RECURSIVE up(id, depth) AS (SELECT ?, 0 UNION ALL "
                "SELECT m.parent, up.depth + 1 FROM messages m JOIN up ON m.id = up.id WHERE m.parent IS NOT NULL) "
                "SELECT m.* FROM up JOIN messages m ON m.id = up.id ORDER BY up.depth DESC", (leaf,))
            return [self._message(row) for row in rows]

    def get_message(self, message: int) -> Message:
        with self._errors():
            return self._get_message(message)

    def children(self, message: int) -> list[Message]:
        """The replies to `message` (or edits of the next one), oldest first."""
        with self._errors():
            self._get_message(message)
            return [self._message(row) for row in
                    self._db.execute("SELECT * FROM messages WHERE parent = ? ORDER BY id", (message,))]

    def siblings(self, message: int) -> list[Message]:
        """The messages that share `message`'s parent, itself included, oldest first."""
        with self._errors():
            m = self._get_message(message)
            return [self._message(row) for row in self._db.execute(
                "SELECT * FROM messages WHERE session = ? AND parent IS ? ORDER BY id", (m.session, m.parent))]

    def messages(self, session: int) -> list[Message]:
        """Every message of a session, every branch, oldest first (a parent before its children)."""
        with self._errors():
            self._check_session(session)
            return [self._message(row) for row in
                    self._db.execute("SELECT * FROM messages WHERE session = ? ORDER BY id", (session,))]

    # --- search and export ----------------------------------------------------------

    def search(self, text: str, limit: int = 20) -> list[Hit]:
        """Messages holding every word of `text` (a word also matches as a prefix), best first."""
        words = text.split()
        if not words:
            raise QuillError("search for what? give one or more words")
        with self._errors():
            if self.fts:
                query = " ".join('"' + word.replace('"', '""') + '"*' for word in words)
                rows = self._db.execute(
                    "SELECT m.session, m.id, snippet(messages_fts, 0, '[', ']', '…', 12), m.role, s.title "
                    "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid JOIN sessions s ON s.id = m.session "
                    "WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?", (query, limit))
                return [Hit(*row) for row in rows]
            like = " AND ".join(["m.text LIKE ? ESCAPE '\\'"] * len(words))
            patterns = ["%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for word in words]
            rows = self._db.execute(f"SELECT m.session, m.id, m.text, m.role, s.title FROM messages m "
                                    f"JOIN sessions s ON s.id = m.session WHERE {like} ORDER BY m.id DESC LIMIT ?",
                                    (*patterns, limit))
            return [Hit(session, message, _snippet(body, words[0]), role, title) for session, message, body, role, title in rows]

    def export(self, session: int, format: str = "json") -> str:
        """The session as text: "json" keeps the whole tree (`import_session` reads it back),
        "md" is the current branch as Markdown."""
        info = self.get(session)
        if format == "json":
            messages = [{k: v for k, v in asdict(m).items() if k != "session"} for m in self.messages(session)]
            return json.dumps({"format": "quill-session", "version": SCHEMA_VERSION, **asdict(info),
                               "messages": messages}, indent=1, ensure_ascii=False)
        if format != "md":
            raise QuillError(f"sessions export as json or md, not {format!r}")
        path = self.path(session)
        lines = [f"# {info.title or 'Untitled session'}", "",
                 f"<sub>Quill session {info.id} with {info.profile}, started {when(info.created)}</sub>", ""]
        names = {"user": "You", "model": info.profile, "system": "System"}
        if info.system is not None:
            lines += [f"**System:** {info.system.strip()}", ""]
        for m in path:
            lines += [f"**{names[m.role]}:** {m.text}", ""]
            if m.provenance:
                p = m.provenance
                lines += ["<sub>" + ", ".join(f"{key} {p[key]}" for key in ("checkpoint", "step", "chain", "seed")
                                              if key in p) + "</sub>", ""]
        if info.messages > len(path):
            more = info.messages - len(path)
            lines += [f"<sub>{more} more message{'s' if more > 1 else ''} on other branches "
                      "(`quill sessions export ID --format json` keeps them all)</sub>", ""]
        return "\n".join(lines)

    def import_session(self, data: str | dict[str, Any]) -> int:
        """A new session from an export in JSON, its tree and current leaf as they were; returns its id."""
        try:
            data = json.loads(data) if isinstance(data, str) else data
            if data.get("format") != "quill-session":
                raise ValueError("not a Quill session export")
            messages = sorted(data["messages"], key=lambda m: m["id"])
            with self._write() as db:
                session = db.execute("INSERT INTO sessions(title, profile, created, updated, system) VALUES (?, ?, ?, ?, ?)",
                                     (data["title"], data["profile"], data["created"], data["updated"],
                                      data.get("system"))).lastrowid
                ids: dict[int, int] = {}
                for m in messages:
                    if m["role"] not in ROLES:
                        raise ValueError(f"message {m['id']} has role {m['role']!r}")
                    parent = None if m["parent"] is None else ids[m["parent"]]
                    ids[m["id"]] = db.execute(
                        "INSERT INTO messages(session, parent, role, text, provenance, created) VALUES (?, ?, ?, ?, ?, ?)",
                        (session, parent, m["role"], m["text"],
                         json.dumps(m["provenance"]) if m.get("provenance") else None, m["created"])).lastrowid
                current = data.get("current")
                db.execute("UPDATE sessions SET current = ? WHERE id = ?",
                           (None if current is None else ids[current], session))
                return session
        except (ValueError, KeyError, TypeError, AttributeError, self._sqlite.IntegrityError) as exc:
            raise QuillError(f"not a Quill session export ({type(exc).__name__}: {exc})") from None


def check_title(title: str) -> str:
    title = " ".join(title.split())
    if not title:
        raise QuillError("a session's title cannot be empty")
    return title


def _snippet(text: str, word: str, around: int = 30) -> str:
    """The text around the first `word` in it, the word [marked] (search without FTS5)."""
    at = text.lower().find(word.lower())
    if at < 0:
        return " ".join(text.split())[:2 * around]
    start, end = max(0, at - around), min(len(text), at + len(word) + around)
    piece = (text[start:at] + "[" + text[at:at + len(word)] + "]" + text[at + len(word):end])
    return ("…" if start else "") + " ".join(piece.split()) + ("…" if end < len(text) else "")


def _create_private(path: Path) -> None:
    """Create `path` empty and readable by its owner alone (0600), unless it exists.

    SQLite gives its -wal and -shm files the database's permissions.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise QuillError(f"cannot create the sessions database {str(path)!r}: {exc.strerror}") from None
