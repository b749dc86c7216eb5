"""Saved sessions: resuming a long one, a long one on screen, and search. Prints JSON.

    python benchmarks/sessions_bench.py [--profile NAME] [--corpus FILE] [--runs N]

The sessions are made up, not chatted: user messages and replies are lines and
speeches of the corpus (generated words where there is none), each reply with the
provenance of a real reply of the profile. Every database lives in a temporary
data directory (XDG_DATA_HOME), the user's own is never opened.

- `resume_ms`: `ChatSession.resume(id)` of a session of 1,000 messages (500
  exchanges, and 20 more branches: 10 edits and 10 regenerated replies) on a
  chat whose model is loaded: what resuming costs beyond the chat's start-up
  (median of 3 x --runs); target 300 ms. `resume_read_ms` is its part in SQLite
  (opening the file and `Store.messages`, the JSON provenance decoded);
- `tui_ready_s` and `tui_resume_ready_s`: the full-screen chat run headless
  (in-process, 120x40, the model already imported once, so mostly the app's own
  start), from starting the app to the greeting shown, without and with
  ``resume=ID``; with it, to the session's last turns (`tui.conversation.SHOWN_TURNS` of
  them: earlier ones are shown as the user scrolls up) mounted, laid out and scrolled to
  the end (medians of --runs, alternated). `tui_resume_extra_s` is the
  difference; target 0.3 s. `tui_resume_mount_ms`: its part in the app's
  `loaded` (making and mounting the message widgets); the rest is Textual's
  styling and layout of them. `tui_resume_max_loop_lag_ms`: the longest a 10 ms
  timer on the app's event loop was late meanwhile (the screen frozen);
- `max_loop_lag_ms_1000_messages`: the longest a 10 ms timer on the app's event
  loop was late while a reply of --reply-tokens tokens streamed under the
  resumed 1,000 messages (the measure of tui_bench.py's `max_loop_lag_ms`);
  target 50 ms. `max_loop_lag_ms_empty`: the same reply in a chat with no
  earlier messages. Meanwhile, `draw_ms_*`: the app's 10 Hz draw
  (`QuillApp.tick`), and `layout_ms_*`: Textual's layout of the screen
  (`Screen._refresh_layout`, private), each call's longest and median time;
  `streamed_tokens_per_s_*`: the reply's speed (the layout holds Python's lock);
- `search_ms`: `Store.search(words)` (limit 20) over 10,000 saved messages
  (20 sessions of 250 exchanges), the database open: per query, the median and the
  longest of --search-runs; a rare word, a common word, two words, and a prefix.
  `search_worst_ms` is the longest of them all; target 50 ms. `search_like_ms`:
  the same queries by the LIKE scan used where SQLite has no FTS5, for information;
- `build_s`: writing the 1,000-message session by `Store.add_exchange` and
  `add_message`, one transaction each, as a chat saves it (the 10,000 for search
  go in by `Store.import_session`, one transaction a session).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import DEFAULT_CORPUS, machine_info  # noqa: E402

EXCHANGES = 500  # 1,000 messages on the resumed branch
EDITS = REGENS = 10  # branches beside it
SEARCH_SESSIONS, SEARCH_EXCHANGES = 20, 250  # 10,000 messages
SIZE = (120, 40)
TARGETS = {"resume_ms": 300, "tui_resume_extra_s": 0.3, "max_loop_lag_ms_1000_messages": 50, "search_worst_ms": 50}

# Words for a made-up corpus where there is no real one; the queries below are among them.
COMMON = ("the and to of i you my a that in is not with it for be his your this but he have as thou so him will what "
          "thy me by all do good lord king kinsman kind kingdom shall sir now come our love here well our more "
          "than let them at no if there are man would").split()


# --- the text -------------------------------------------------------------------------

def speeches(corpus: Path | None, seed: int = 1) -> list[str]:
    """Speeches (blocks between blank lines, the speaker's name line dropped) of `corpus`,
    or made-up ones: a few words to a few lines each."""
    if corpus is not None and corpus.is_file():
        blocks = corpus.read_text(encoding="utf-8", errors="replace").split("\n\n")
        found = [b.split("\n", 1)[1].strip() for b in blocks if "\n" in b.strip()]
        found = [b for b in found if b]
        if len(found) > 1000:
            return found
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mer", "dan", "ti", "su", "ber", "wen", "for", "ath", "el", "is", "ron", "ga", "mi", "ul"]
    vocabulary = list(COMMON) + ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(4000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf, as words go
    out = []
    for _ in range(7000):
        lines = [" ".join(rng.choices(vocabulary, weights, k=rng.randint(3, 10))).capitalize() + rng.choice(".,;?!")
                 for _ in range(rng.choice([1, 1, 2, 3, 4, 6, 9]))]
        out.append("\n".join(lines))
    return out


def exchanges(pieces: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (user message, reply): a user's line or two, a speech in reply (as the model stops at a blank line)."""
    out = []
    for _ in range(n):
        asked = "\n".join(rng.choice(pieces).splitlines()[:rng.choice([1, 1, 2])])
        reply = rng.choice(pieces)
        out.append((asked[:300], reply[:800]))
    return out


def real_provenance(profile: str) -> dict:
    """The provenance of a real reply of `profile`, as a dict (and the chat, its model loaded)."""
    from gpt_runtime.session import ChatSession

    session = ChatSession(profile, save=False)
    session.set("max_new_tokens", "8")
    list(session.send("hi"))
    return dataclasses.asdict(session.turns[-1].provenance)


def varied(provenance: dict, reply: str, rng: random.Random) -> dict:
    return {**provenance, "seed": rng.getrandbits(63), "new_tokens": len(reply), "max_new_tokens": 400,
            "reason": rng.choice(["stop", "stop", "stop", "length"]), "tokens_per_second": round(rng.uniform(380, 520), 1)}


# --- the databases ------------------------------------------------------------------

def build_long_session(file: Path, profile: str, provenance: dict, pieces: list[str], seed: int = 2) -> tuple[int, float]:
    """One session of EXCHANGES exchanges (its current branch) and EDITS + REGENS branches
    beside it, written as a chat writes them; returns its id and the seconds it took."""
    from gpt_runtime.store import Store

    rng = random.Random(seed)
    start = time.perf_counter()
    with Store(file) as store:
        pairs = exchanges(pieces, EXCHANGES, rng)
        (asked, answer) = (None, None)
        session = None
        ids = []
        for user, reply in pairs:
            if session is None:
                session, (asked, answer) = store.start_session(profile, None, user, reply, varied(provenance, reply, rng))
            else:
                asked, answer = store.add_exchange(session, answer, user, reply, varied(provenance, reply, rng))
            ids.append((asked, answer))
        leaf = answer
        at = rng.sample(range(1, EXCHANGES - 1), EDITS + REGENS)
        for user, reply in exchanges(pieces, EDITS, rng):  # /edit: another message under the same reply
            store.add_exchange(session, ids[at.pop() - 1][1], user, reply, varied(provenance, reply, rng))
        for _, reply in exchanges(pieces, REGENS, rng):  # /regen: another reply to the same message
            store.add_message(session, ids[at.pop()][0], "model", reply, varied(provenance, reply, rng))
        store.set_current(session, leaf)  # back on the long branch, as after /branch
        assert len(store.path(session)) == 2 * EXCHANGES
    return session, time.perf_counter() - start


def build_search_db(file: Path, profile: str, provenance: dict, pieces: list[str], seed: int = 3) -> list[str]:
    """SEARCH_SESSIONS sessions of SEARCH_EXCHANGES exchanges; returns every message's text."""
    from gpt_runtime.store import Store

    rng = random.Random(seed)
    texts = []
    now = time.time()
    with Store(file) as store:
        for s in range(SEARCH_SESSIONS):
            messages = []
            for user, reply in exchanges(pieces, SEARCH_EXCHANGES, rng):
                parent = messages[-1]["id"] if messages else None
                messages.append({"id": len(messages) + 1, "parent": parent, "role": "user", "text": user,
                                 "provenance": None, "created": now})
                messages.append({"id": len(messages) + 1, "parent": len(messages), "role": "model", "text": reply,
                                 "provenance": varied(provenance, reply, rng), "created": now})
                texts += [user, reply]
            store.import_session({"format": "quill-session", "title": messages[0]["text"][:60], "profile": profile,
                                  "created": now, "updated": now, "system": None, "messages": messages,
                                  "current": messages[-1]["id"]})
    return texts


def queries(texts: list[str]) -> dict[str, str]:
    """A rare word (in two messages), a common word, two words and a prefix."""
    words = [set(re.findall(r"\w+", t.lower())) for t in texts]
    counts = Counter(w for ws in words for w in ws)
    rare = sorted(w for w, c in counts.items() if c == 2 and len(w) >= 6)
    return {"rare": rare[len(rare) // 2] if rare else "zzz",
            "common": "the" if counts["the"] else counts.most_common(1)[0][0],
            "two_words": "good lord",
            "prefix": "kin"}


def found(texts: list[str], query: str) -> int:
    """How many messages hold every word of `query` as a prefix of a word (as FTS5's
    unicode61 tokenizer splits words, near enough)."""
    words = [set(re.findall(r"\w+", t.lower())) for t in texts]
    return sum(all(any(w.startswith(q) for w in ws) for q in query.split()) for ws in words)


# --- measures -------------------------------------------------------------------------

def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def time_resume(profile: str, file: Path, session_id: int, runs: int) -> dict:
    from gpt_runtime.session import ChatSession
    from gpt_runtime.store import Store

    chat = ChatSession(profile, store=file)
    chat.resume(str(session_id))  # once first: SQLite's pages and Python's imports warm, as in a chat
    assert len(chat.turns) == EXCHANGES and len(chat.tree) == EXCHANGES + EDITS + REGENS, (len(chat.turns), len(chat.tree))
    times, reads = [], []
    for _ in range(runs):
        start = time.perf_counter()
        chat.resume(str(session_id))
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with Store(file) as store:
            store.messages(session_id)
        reads.append(time.perf_counter() - start)
    return {"resume_ms": ms(statistics.median(times)), "resume_max_ms": ms(max(times)),
            "resume_read_ms": ms(statistics.median(reads))}


class LoopLag:
    """A 10 ms timer on the app's event loop, and how late it was each time."""

    def __init__(self, app) -> None:
        self.lags: list[float] = []
        self.expected = time.perf_counter() + 0.01

        def beat() -> None:
            now = time.perf_counter()
            self.lags.append(max(0.0, now - self.expected))
            self.expected = now + 0.01

        self.timer = app.set_interval(0.01, beat)

    def stop(self) -> dict:
        self.timer.stop()
        return {"max": ms(max(self.lags, default=0)), "p99": ms(sorted(self.lags)[int(len(self.lags) * 0.99)]) if self.lags else 0}


def views(app, role: str | None = None) -> list:
    from tui.widgets import MessageView

    return [v for v in app.query(MessageView) if role is None or v.role == role]


class Timed:
    """The time each call of a method of `obj` takes, while `on`; set on the instance, so a
    timer made later (the app's 10 Hz draw) calls it through this."""

    def __init__(self, obj, name: str) -> None:
        self.times: list[float] = []
        self.on = False
        method = getattr(obj, name)

        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if self.on:
                    self.times.append(time.perf_counter() - begin)

        setattr(obj, name, timed)

    def figures(self) -> dict:
        return {"max": ms(max(self.times, default=0)), "median": ms(statistics.median(self.times)) if self.times else 0,
                "count": len(self.times)}


async def launch(profile: str, resume: str | None, stream_tokens: int = 0) -> dict:
    """Start the app headless; the seconds to ready (the greeting; with `resume`, the
    conversation shown to its end), and with `stream_tokens`, the loop's lateness while a
    reply of that length streams.

    The app is watched with plain sleeps, not `Pilot.pause`, which sends a message to every
    widget and waits for each: with 1,000 messages on screen that alone loads the loop."""
    from tui.app import QuillApp
    from tui.conversation import SHOWN_TURNS

    start = time.perf_counter()
    app = QuillApp(profile, resume=resume)
    draws = Timed(app, "tick")  # before the app mounts, which starts the 10 Hz timer
    mounting = Timed(app, "loaded")  # called from the loading thread, through the attribute
    mounting.on = True
    out: dict = {}
    async with app.run_test(size=SIZE):
        lag = LoopLag(app)
        conversation = app.query_one("#conversation")

        def ready() -> bool:
            if app.profile_name is None or not str(app.loading.text).startswith("Profile"):
                return False
            if resume is None:
                return True
            shown = views(app)  # the last SHOWN_TURNS turns; the rest come as the user scrolls up
            return (app.conversation.shown == (max(0, EXCHANGES - SHOWN_TURNS), EXCHANGES)
                    and len(shown) >= 2 * min(EXCHANGES, SHOWN_TURNS) + 2
                    and shown[-1].role == "output" and shown[-1].is_mounted
                    and conversation.max_scroll_y > 0 and conversation.scroll_y >= conversation.max_scroll_y - 1)

        while not ready():
            if time.perf_counter() - start > 60:
                raise SystemExit(f"the app was not ready after 60 s (resume={resume}; turns shown {app.conversation.shown}, "
                                 f"{len(views(app))} messages, scrolled {conversation.scroll_y} of {conversation.max_scroll_y})")
            await asyncio.sleep(0.005)
        out["ready_s"] = time.perf_counter() - start
        out["start_lag"] = lag.stop()
        out["mount_ms"] = mounting.figures()["max"]
        if stream_tokens:
            await asyncio.sleep(0.5)  # the start-up's last draws done
            # Textual's layout of the screen: a private method, timed only where there is one
            layouts = Timed(app.screen, "_refresh_layout") if hasattr(app.screen, "_refresh_layout") else None
            draws.on = True
            if layouts is not None:
                layouts.on = True
            out.update(await stream_lag(app, stream_tokens))
            out["draw_ms"], out["layout_ms"] = draws.figures(), layouts.figures() if layouts else None
    return out


async def stream_lag(app, tokens: int) -> dict:
    session = app.session
    session.set("max_new_tokens", str(tokens))
    session.set("seed", "7")
    session.template = dataclasses.replace(session.template, stop=[])  # run to the full length
    lag = LoopLag(app)
    app.run_line("Tell me a long tale of the king.")
    await asyncio.sleep(0.1)
    while app.streaming:
        await asyncio.sleep(0.05)
    result = lag.stop()
    done = session.turns[-1].provenance
    return {"stream_lag": result, "streamed_tokens": done.new_tokens, "streamed_tokens_per_s": done.tokens_per_second}


def time_tui(profile: str, session_id: int, runs: int, reply_tokens: int) -> dict:
    asyncio.run(launch(profile, None))  # a first start: imports, the model file in the page cache
    plain, resumed = [], []
    for _ in range(runs):  # alternated, so a busy moment of the machine falls on both
        plain.append(asyncio.run(launch(profile, None)))
        resumed.append(asyncio.run(launch(profile, str(session_id))))
    empty = asyncio.run(launch(profile, None, stream_tokens=reply_tokens))
    full = asyncio.run(launch(profile, str(session_id), stream_tokens=reply_tokens))
    ready = statistics.median(r["ready_s"] for r in plain)
    ready_resumed = statistics.median(r["ready_s"] for r in resumed)
    return {"tui_ready_s": round(ready, 3), "tui_resume_ready_s": round(ready_resumed, 3),
            "tui_resume_extra_s": round(ready_resumed - ready, 3),
            "tui_resume_mount_ms": statistics.median(r["mount_ms"] for r in resumed),
            "tui_resume_max_loop_lag_ms": max(r["start_lag"]["max"] for r in resumed),
            "max_loop_lag_ms_1000_messages": full["stream_lag"]["max"],
            "p99_loop_lag_ms_1000_messages": full["stream_lag"]["p99"],
            "draw_ms_1000_messages": full["draw_ms"], "layout_ms_1000_messages": full["layout_ms"],
            "max_loop_lag_ms_empty": empty["stream_lag"]["max"], "draw_ms_empty": empty["draw_ms"],
            "layout_ms_empty": empty["layout_ms"],
            "streamed_tokens": full["streamed_tokens"],
            "streamed_tokens_per_s_1000_messages": full["streamed_tokens_per_s"],
            "streamed_tokens_per_s_empty": empty["streamed_tokens_per_s"]}


def time_search(file: Path, texts: list[str], runs: int) -> dict:
    from gpt_runtime.store import Store

    asked = queries(texts)
    out: dict = {"search_messages": len(texts), "search_queries": {k: [q, found(texts, q)] for k, q in asked.items()}}
    start = time.perf_counter()
    with Store(file) as store:
        out["store_open_ms"] = ms(time.perf_counter() - start)
        if not store.fts:
            out["search_note"] = "this SQLite has no FTS5: search_ms is the LIKE scan"
        for key, fts in (("search_ms", store.fts), ("search_like_ms", False)):
            store.fts = fts
            figures = {}
            for kind, query in asked.items():
                store.search(query)  # warm
                times = []
                for _ in range(runs):
                    begin = time.perf_counter()
                    hits = store.search(query)
                    times.append(time.perf_counter() - begin)
                figures[kind] = {"median": ms(statistics.median(times)), "max": ms(max(times)), "hits": len(hits)}
            out[key] = figures
    out["search_worst_ms"] = max(f["max"] for f in out["search_ms"].values())
    out["search_worst_median_ms"] = max(f["median"] for f in out["search_ms"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="shakespeare-char")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="text for the messages (made-up words if it is missing)")
    parser.add_argument("--runs", type=int, default=3, help="app starts of each kind, and resumes x3 (default 3)")
    parser.add_argument("--search-runs", type=int, default=20, help="times each query runs (default 20)")
    parser.add_argument("--reply-tokens", type=int, default=500, help="the streamed reply's length (default 500)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="quill-sessions-bench-") as tmp:
        os.environ["XDG_DATA_HOME"] = tmp  # the app's sessions database: $XDG_DATA_HOME/quill/sessions.db
        from gpt_runtime.store import default_path

        pieces = speeches(args.corpus if args.corpus.is_file() else None)
        provenance = real_provenance(args.profile)
        long_db, search_db = default_path(), Path(tmp) / "search.db"
        session_id, build = build_long_session(long_db, args.profile, provenance, pieces)
        texts = build_search_db(search_db, args.profile, provenance, pieces)
        results = {"machine": machine_info(), "profile": args.profile,
                   "text": str(args.corpus) if args.corpus.is_file() else "made-up words",
                   "messages": 2 * EXCHANGES, "branches": EDITS + REGENS, "build_s": round(build, 2),
                   "database_mb": round(long_db.stat().st_size / 1e6, 2)}
        results.update(time_resume(args.profile, long_db, session_id, 3 * args.runs))
        results.update(time_search(search_db, texts, args.search_runs))
        gc.collect()
        results.update(time_tui(args.profile, session_id, args.runs, args.reply_tokens))
    results["targets"] = TARGETS
    for name, target in TARGETS.items():
        results[name + "_met"] = results[name] <= target
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
