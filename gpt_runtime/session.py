"""The chat session: one conversation with a profile's model, for any interface.

A `ChatSession` holds the active profile, the sampler chain and its options,
the conversation, and where every reply came from. `send` streams a reply as
events (the engine's `Token` and `Done`, plus `Notice` for things the user
should know); `cancel` stops a reply in flight from another thread. Nothing
here prints or reads the keyboard: the plain REPL and the TUI both drive it.

Every reply carries its `Provenance`: checkpoint (file hash and step),
tokenizer fingerprint, sampler chain and options, seed and speed, enough to
replay it exactly (`replay`).

Every conversation is saved as it happens in the sessions database
(`gpt_runtime.store`, ``sessions.db`` in the data directory), unless the chat
was started with ``save=False`` or the profile says ``[session] save = false``.
The saved session is created at the first completed exchange; each completed
reply then adds the message and the reply in one transaction, so a process
killed mid-reply loses at most that reply. /undo and /regen move the saved
session's current message back (the old reply stays in its tree, a sibling);
/clear and /load start a new saved session on the next exchange; `resume`
carries on with a saved one. Saving never breaks the chat: should it fail, it
stops for this chat, and `job_notices` says so once, and why.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .backend import get_backend
from .checkpoint import load_checkpoint
from .config import load_toml
from .errors import QuillError, UsageError, did_you_mean
from .fileio import atomic_write_bytes, file_sha256, read_user_file
from .jobs import TRAINING, Jobs, check_arguments
from .plugins import get_registry
from .profiles import ChatTemplate, Profile, get_profile, is_name
from .sampling import build_chain, check_seed, settings_from_strings
from .store import StoreLocked
from .turns import Fork, Provenance, Turn, path_to, tree_entries, tree_from_messages, tree_from_transcript, turn_entry


@dataclass
class Notice:
    """A one-line message for the user, e.g. that old turns left the context window."""

    text: str


@dataclass
class Side:
    """One side of a `ChatSession.compare`: which chain or profile, its reply, the shared seed, its speed."""

    side: str
    text: str
    seed: int
    tokens_per_second: float


class _Reply:
    """The events of one reply. The session stays busy from `send` until they are
    exhausted or the stream is closed (or dropped), not just while they are read."""

    def __init__(self, events: Iterator[Any], busy: threading.Lock) -> None:
        self._events, self._busy, self._open = events, busy, True

    def __iter__(self) -> _Reply:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._events)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reading the reply and free the session."""
        if self._open:
            self._open = False
            self._events.close()
            self._busy.release()

    __del__ = close


def checkpoint_id(path: Path) -> str:
    """The checkpoint's SHA-256, shortened as provenance records it."""
    return file_sha256(path)[:16]


@dataclass
class _Loaded:
    """A profile's model, loaded and prepared on its backend."""

    profile: Profile
    model: Any
    tokenizer: Any
    step: int
    sha256: str
    device: str
    dtype: str
    quantize: str
    path: str  # how it generates (calibrate.GenerationPath.name), measured or asked for
    fingerprint: str  # the tokenizer's: hashing a 50,000-merge tokenizer per reply would show


def _load(profile: Profile) -> _Loaded:
    from .calibrate import prepare  # imports torch: loaded when first used

    backend = get_backend(profile.device)
    ckpt = load_checkpoint(profile.checkpoint, device=backend.device)
    model, choice = prepare(ckpt.model, backend, profile.dtype, profile.quantize)
    path = choice.path
    return _Loaded(profile, model, ckpt.tokenizer, ckpt.step, checkpoint_id(profile.checkpoint), backend.name,
                   path.dtype, path.quantize, path.name, ckpt.tokenizer.fingerprint)


def _check_train_job(args) -> None:
    """What a background training run needs beyond `quill train`'s own checks."""
    if args.nproc != 1:  # a job is one process: --nproc N would quietly train in one
        raise UsageError(f"/train runs in one process, not --nproc {args.nproc}",
                         hint="for data-parallel training, run `quill train --nproc N ...` in a shell")
    told = set(load_toml(args.config)) if args.config else set()  # flags are only set when given
    told |= {name for name in ("data", "out") if hasattr(args, name)}
    if "out" not in told or not ("data" in told or args.resume):  # a job writes only where it is told
        raise UsageError("/train needs --data DIR and --out RUN",
                         hint="usage: /train --data DIR --out RUN [quill train flags], or /train --out RUN --resume")


class ChatSession:
    """A conversation with the model of a profile; UI-agnostic and thread-safe to cancel."""

    def __init__(self, profile: Profile | str, save: bool | None = None, store: str | os.PathLike | None = None) -> None:
        """`save`: whether to save the chat (None: as the profile says); `store`: the sessions
        database (default: `store.default_path()`, looked up when first used)."""
        self.jobs = Jobs()
        self.save_wanted = save
        self.store_path = Path(store) if store is not None else None
        self.saved_id: int | None = None  # the saved session this chat appends to, once there is one
        self.save_error: str | None = None  # why saving stopped, if it did
        self._pending_title: str | None = None  # /rename before anything was saved
        self._notices: list[Notice] = []
        self._notices_lock = threading.Lock()
        self._threads: int | None = None  # torch's thread count before any job ran
        self._dropped_told = 0  # turns left out of the prompt that the user has been told about
        self.turns: list[Turn] = []  # the current branch: the path from the first turn to the current one
        self.tree: list[Turn] = []  # every turn of every branch, oldest first
        self._clock = itertools.count(1)  # marks when a turn was last on the path
        self._before: list[Turn] = []  # the path before the reply in flight: where a failed message goes back to
        self.system: str | None = None  # the system text /system set for this conversation (None: the profile's)
        self.resumed_at: int | None = None  # after a resume at a message: the turn that holds it
        self.probs = 0  # with N > 0, reply tokens carry their probability and the N likeliest (the TUI's view)
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self._busy_with = ""  # "reply" or "loading", while busy
        self.use_profile(profile)
        self._check_store()

    # --- settings -----------------------------------------------------------------

    def use_profile(self, profile: Profile | str) -> None:
        """Switch to another profile (its model, chain and limits); the conversation stays."""
        profile = get_profile(profile) if isinstance(profile, str) else profile
        self._claim("loading")  # loading takes seconds: nothing may start a reply meanwhile
        try:
            self.loaded = _load(profile)
            self.chain = profile.chain
            self.options = {name: dict(values) for name, values in profile.options.items()}
            self.max_new_tokens = profile.max_new_tokens
            self.seed = profile.seed
            self.template = profile.template  # `/set user_name` changes a copy
            if self.system is not None:
                self.template = replace(self.template, system=self.system)
            self._dropped_told = 0
        finally:
            self._busy.release()

    @property
    def profile(self) -> Profile:
        return self.loaded.profile

    def set_chain(self, spec: str) -> None:
        """Use another sampler chain; options of samplers that stay are kept."""
        self._not_loading()
        kept = {name: values for name, values in self.options.items() if name in spec.split(",")}
        chain = build_chain(spec, kept)
        self.chain, self.options = chain.spec, chain.settings()

    def setting_names(self) -> list[str]:
        """What `set` accepts: the limits, the speakers' names, each option of each sampler
        in the chain as SAMPLER.OPTION, and SAMPLER alone for a one-option sampler."""
        return ["max_new_tokens", "seed", "user_name", "model_name",
                *(f"{n}.{o}" for n, v in self.options.items() for o in v),
                *(n for n, v in self.options.items() if len(v) == 1)]

    def set(self, name: str, value: str) -> str:
        """Set ``max_new_tokens``, ``seed`` or a sampler option (``top_p.p``, or
        ``temperature`` for a one-option sampler); returns what was set, for display."""
        self._not_loading()
        if name == "max_new_tokens":
            number = _whole(name, value)
            if number < 1:
                raise QuillError(f"max_new_tokens must be at least 1, not {number}")
            self.max_new_tokens = number
            return f"max_new_tokens = {number}"
        if name in ("user_name", "model_name"):
            if not is_name(value):
                raise QuillError(f"{name} must be one line of text, not {value!r}")
            self.template = replace(self.template, **{name: value.strip()})
            unused = "" if self.template.uses_names() else " (this profile's template does not use the names)"
            return f"{name} = {value.strip()}{unused}"
        if name == "seed":
            if value.strip().lower() in ("none", "random", ""):
                self.seed = None
                return "seed = random for each reply"
            number = _whole(name, value)
            check_seed(number, "seed")
            self.seed = number
            return f"seed = {number}"
        known = self.setting_names()
        if name not in known and "." not in name:
            if name not in get_registry().names("samplers"):
                raise QuillError(f"there is no setting {name!r}", hint=did_you_mean(name, known) or
                                 f"settings: {', '.join(known)}")
        (sampler, values), = settings_from_strings([f"{name}={value}"]).items()
        options = {n: dict(v) for n, v in self.options.items()}
        options.setdefault(sampler, {}).update(values)
        chain = build_chain(self.chain, options)
        self.options = chain.settings()
        option, = values
        return f"{sampler}.{option} = {self.options[sampler][option]!r}"

    def describe(self) -> dict[str, Any]:
        """What `/show` shows: profile, chain, options, limits, device and dtype."""
        return {"profile": self.profile.name, "checkpoint": str(self.profile.checkpoint), "step": self.loaded.step,
                "chain": self.chain, "options": self.options, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "device": self.loaded.device, "dtype": self.loaded.dtype,
                "quantize": self.loaded.quantize, "path": self.loaded.path,
                **({"user_name": self.template.user_name, "model_name": self.template.model_name}
                   if self.template.uses_names() else {})}

    # --- talking ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a reply is streaming."""
        return self._busy.locked()

    def cancel(self) -> None:
        """Stop the reply in flight (from any thread) within one token; it keeps what it said."""
        self._cancel.set()

    def _refusal(self) -> QuillError:
        if self._busy_with == "loading":
            return QuillError("a model is still loading; wait a moment")
        return QuillError("a reply is still streaming; wait for it, or cancel it first")

    def _idle(self) -> None:
        """Refuse to change the conversation while a reply streams or a model loads."""
        if self._busy.locked():
            raise self._refusal()

    def _not_loading(self) -> None:
        """Refuse a setting while a profile loads: the new profile's would replace it.
        (While a reply streams, a setting is for the next reply: that one's are fixed.)"""
        if self._busy.locked() and self._busy_with == "loading":
            raise self._refusal()

    def _claim(self, what: str = "reply") -> None:
        """Mark the session busy with `what`, or refuse if it already is."""
        if not self._busy.acquire(blocking=False):
            raise self._refusal()
        self._busy_with = what

    def _stream(self, index: int, turn: Turn | None = None) -> Iterator[Any]:
        """Claim the session now and stream the reply of turn `index` (into `turn`, a new
        version of it, if given); released when the stream ends or is closed, so nothing
        can change the conversation in between."""
        self._claim()
        self._cancel.clear()  # now, not when the reply starts: a cancel in between is kept
        self._before = self.turns
        return _Reply(self._reply(index, turn=turn), self._busy)

    def send(self, message: str) -> Iterator[Any]:
        """Add `message` and stream the reply: `Notice`, `Token` and finally `Done` events.

        Iterate to the end (a cancelled reply ends quickly): the session is busy
        until then, and a second `send` meanwhile is refused, never interleaved.
        """
        stream = self._stream(len(self.turns))  # claims the session before the turn is added
        self._grow(Turn(message, parent=self.turns[-1] if self.turns else None))
        return stream

    def edit(self, n: int, text: str) -> Iterator[Any]:
        """Ask message `n` (1-based) again as `text` and stream the reply: the conversation
        forks there, and the old branch is kept (`versions`, `switch`)."""
        if not text.strip():
            raise UsageError("/edit needs the message's new text", hint="/edit N TEXT")
        if not self.turns:
            raise QuillError("there are no messages to edit yet")
        if not 1 <= n <= len(self.turns):
            raise QuillError(f"there is no message {n} to edit",
                             hint=f"your messages are numbered 1 to {len(self.turns)}" if len(self.turns) > 1
                             else "your only message is number 1")
        stream = self._stream(n - 1)
        self.turns = self.turns[:n - 1]
        self._dropped_told = min(self._dropped_told, n - 1)
        self._grow(Turn(text, parent=self.turns[-1] if self.turns else None))
        return stream

    def _grow(self, turn: Turn) -> None:
        """Put a new turn at the end of the conversation, and in its tree."""
        self.turns = [*self.turns, turn]
        self.tree.append(turn)
        self._mark()

    def _mark(self) -> None:
        stamp = next(self._clock)
        for turn in self.turns:
            turn.seen = stamp

    def context_used(self) -> tuple[int, int]:
        """(tokens, block size): how much of the context window the conversation fills,
        counting from the oldest turn the next prompt will hold."""
        _, _, used = self._fit(self.turns, "", self.loaded, self.template)
        block = self.loaded.model.config.block_size
        return min(used, block), block

    def _prompt(self, index: int, first_turn: int | None = None, loaded: _Loaded | None = None,
                template: ChatTemplate | None = None) -> tuple[str, int]:
        """The prompt for turn `index` and the first turn it holds (older ones are dropped
        to fit; `first_turn` fixes it, for a replay).

        `loaded` lays it out for another profile's model (for /compare); `template`
        replaces the session's (for a replay, or another profile's).
        """
        loaded = loaded or self.loaded
        template = template or self.template
        if first_turn is not None:
            history = [(t.user, t.reply) for t in self.turns[first_turn:index]]
            return template.render(history, self.turns[index].user), first_turn
        text, start, _ = self._fit(self.turns[:index], self.turns[index].user, loaded, template)
        return text, start

    def _fit(self, turns: list[Turn], message: str, loaded: _Loaded, template: ChatTemplate) -> tuple[str, int, int]:
        """`message` after as many of the latest `turns` as the context holds, room kept for
        the reply: (prompt, index of the first turn held, its tokens). Turns are added from
        the newest back, so no text longer than a context's worth is ever encoded."""
        block = loaded.model.config.block_size
        room = block - min(self.max_new_tokens, block // 4)
        encode = loaded.tokenizer.encode
        start, text = len(turns), template.render([], message)
        used = len(encode(text))
        while start > 0:
            longer = template.render([(t.user, t.reply) for t in turns[start - 1:]], message)
            tokens = len(encode(longer))
            if tokens > room:
                break
            start, text, used = start - 1, longer, tokens
        return text, start, used

    def _reply(self, index: int, provenance: Provenance | None = None, turn: Turn | None = None) -> Iterator[Any]:
        from .generate import Done, generate  # imports torch: loaded when first used

        self._share_cores()
        turn = turn or self.turns[index]
        template = self.template
        if provenance is None:
            text, first = self._prompt(index)
            if first > self._dropped_told:
                self._dropped_told = first
                what = "the oldest turn no longer fits" if first == 1 else f"the {first} oldest turns no longer fit"
                yield Notice(f"{what} in the context window ({self.loaded.model.config.block_size} tokens); "
                             "the model no longer sees " + ("it" if first == 1 else "them"))
            chain, options, seed, limit = self.chain, self.options, self.seed, self.max_new_tokens
        else:
            if provenance.template:
                template = ChatTemplate(**provenance.template)
            text, first = self._prompt(index, provenance.first_turn, template=template)
            chain, options, seed, limit = provenance.chain, provenance.options, provenance.seed, provenance.max_new_tokens
            if provenance.reason == "cancelled":  # the same tokens, up to where it was stopped
                limit = provenance.new_tokens
        events = generate(self.loaded.model, self.loaded.tokenizer, text, chain=build_chain(chain, options),
                          max_new_tokens=limit, stop=template.stop_strings(), seed=seed, cancel=self._cancel,
                          probs=self.probs)
        reply = []
        try:
            for event in events:
                reply.append(event.text)
                if isinstance(event, Done):
                    turn.reply = "".join(reply).strip()
                    turn.provenance = Provenance(
                        self.profile.name, str(self.profile.checkpoint), self.loaded.sha256, self.loaded.step,
                        self.loaded.fingerprint, chain, options, event.seed, limit, first,
                        event.reason, event.new_tokens, round(event.tokens_per_second, 1), asdict(template),
                        self.loaded.dtype, self.loaded.quantize, self.loaded.path)
                    if turn is not self.turns[index]:  # a new reply (/regen): the old one stays in the tree
                        self.turns = [*self.turns[:index], turn]
                        self.tree.append(turn)
                        self._mark()
                    if provenance is None:  # a replay changes nothing
                        self._save()
                yield event
        except Exception:
            if turn.provenance is None and turn is self.turns[-1]:  # a message whose first reply failed:
                self.turns = self._before  # as if it was never sent
                self.tree = [t for t in self.tree if t is not turn]
            raise

    def regenerate(self) -> Iterator[Any]:
        """A new reply to the last message (a new seed unless the seed is fixed); the
        previous reply is kept as another version of it."""
        if not self.turns:
            raise QuillError("nothing to regenerate yet")
        last = self.turns[-1]  # the old reply stays until the new one is done
        return self._stream(len(self.turns) - 1, Turn(last.user, parent=last.parent, asked=last.asked))

    # --- branches -----------------------------------------------------------------

    def _by_parent(self) -> dict[int, list[Turn]]:
        groups: dict[int, list[Turn]] = {}
        for turn in self.tree:
            groups.setdefault(id(turn.parent), []).append(turn)
        return groups

    def versions(self, index: int, role: str = "user", groups: dict | None = None) -> tuple[list[Turn], int]:
        """The versions of message `index` (0-based) of the conversation, oldest first, and
        which one is current. For "user": its edits, each as the turn last seen on its
        branch; for "model": the replies to it."""
        turn = self.turns[index]
        near = (groups if groups is not None else self._by_parent()).get(id(turn.parent), [])
        if role == "model":
            found = [t for t in near if t.asked == turn.asked]
        else:
            latest: dict[int, Turn] = {}
            for t in near:
                if t.asked not in latest or t.seen > latest[t.asked].seen:
                    latest[t.asked] = t
            latest[turn.asked] = turn
            found = list(latest.values())
        if not any(t is turn for t in found):
            found.append(turn)
        return found, next(k for k, t in enumerate(found) if t is turn)

    def forks(self) -> list[Fork]:
        """The messages of the current branch that have other versions, first to last."""
        groups, found = self._by_parent(), []
        for index in range(len(self.turns)):
            for role in ("user", "model"):
                versions, current = self.versions(index, role, groups)
                if len(versions) > 1:
                    found.append(Fork(index, role, versions, current))
        return found

    def switch(self, index: int, role: str, version: int) -> None:
        """Go to version `version` (0-based) of message `index`: the conversation becomes
        that branch, down to where it was when last seen."""
        self._idle()
        if not 0 <= index < len(self.turns):
            raise QuillError(f"there is no message {index + 1}")
        versions, _ = self.versions(index, role)
        if not 0 <= version < len(versions):
            what = "reply" if role == "model" else "message"
            raise QuillError(f"{what} {index + 1} has {len(versions)} version{'s' if len(versions) > 1 else ''}, "
                             f"not a version {version + 1}")
        self._go(versions[version])

    def _go(self, turn: Turn) -> None:
        """Make the conversation the branch through `turn`, and below it the turns that were
        on the path with it when it was last there (none were, if an /undo had left it last)."""
        path = path_to(turn)
        groups = self._by_parent()
        while groups.get(id(path[-1])):
            newest = max(groups[id(path[-1])], key=lambda t: t.seen)
            if newest.seen < path[-1].seen:
                break
            path.append(newest)
        self.turns = path
        self._mark()
        self._dropped_told = 0
        leaf = path[-1].saved
        if self.saved_id is not None and leaf is not None:
            self._update_saved(lambda store: store.set_current(self.saved_id, leaf[1]))

    def undo(self) -> Turn:
        """Forget the last exchange; returns it."""
        if not self.turns:
            raise QuillError("nothing to undo")
        self._idle()
        self._dropped_told = min(self._dropped_told, len(self.turns) - 1)
        turn, self.turns = self.turns[-1], self.turns[:-1]  # it stays in the tree, as in the saved session
        self._mark()  # a switch back here does not bring it back
        if turn.saved is not None:  # the saved session goes back too; the exchange stays in its tree
            back = self.turns[-1].saved[1] if self.turns and self.turns[-1].saved else None
            self._update_saved(lambda store: store.set_current(self.saved_id, back))
        return turn

    def clear(self) -> None:
        """Forget the whole conversation (the settings stay); the next message starts a new saved session."""
        self._idle()
        self.turns, self.tree = [], []
        self._dropped_told = 0
        self.saved_id, self._pending_title = None, None

    def replay(self, n: int) -> tuple[str, str]:
        """Redo reply `n` (1-based) from its provenance: (the reply then, the reply now).

        The same checkpoint, chain, options, seed and history give the same text.
        """
        self._idle()
        if not self.turns:
            raise QuillError("there are no replies to replay yet")
        if not 1 <= n <= len(self.turns) or self.turns[n - 1].provenance is None:
            raise QuillError(f"there is no reply {n} to replay", hint=f"replies: 1 to {len(self.turns)}")
        turn = self.turns[n - 1]
        if turn.provenance.checkpoint_sha256 != self.loaded.sha256:
            raise QuillError(f"reply {n} came from another checkpoint ({turn.provenance.checkpoint})",
                             hint=f"switch to its profile first: /profile {turn.provenance.profile}")
        p = turn.provenance
        if p.path and p.path != self.loaded.path:
            raise QuillError(f"reply {n} was generated along the {p.path} path; this profile now generates "
                             f"along {self.loaded.path}", hint="pin it to replay exactly: "
                             f"QUILL_GENERATION_PATH='{p.path}', or the profile's [backend] dtype and quantize")
        if p.dtype and (p.dtype, p.quantize) != (self.loaded.dtype, self.loaded.quantize):
            raise QuillError(f"reply {n} was computed in {p.dtype} (weights: {p.quantize}), "
                             f"this profile computes in {self.loaded.dtype} (weights: {self.loaded.quantize})",
                             hint="replay it with a profile that uses the same dtype and quantization")
        before, provenance = turn.reply, turn.provenance
        self._claim()
        self._cancel.clear()
        try:
            for _ in self._reply(n - 1, provenance):
                pass
            return before, turn.reply
        finally:
            turn.reply, turn.provenance = before, provenance
            self._busy.release()

    def compare(self, *sides: str) -> list[Side]:
        """The last message's reply from each side, all with one seed.

        A side is a sampler chain (run on this profile's model; options of
        samplers in the current chain carry over) or ``profile:NAME`` (that
        profile's model, chain, options and template). The conversation is not changed.
        """
        from .generate import Done, generate  # imports torch: loaded when first used

        if not self.turns:
            raise QuillError("say something first: /compare replies to the last message")
        self._claim()
        self._cancel.clear()  # Escape (cancel) stops the side being written, and skips the rest
        try:
            seed = self.seed if self.seed is not None else secrets.randbits(63)
            results = []
            for side in sides:
                if side.startswith("profile:"):
                    loaded = _load(get_profile(side.removeprefix("profile:")))
                    chain = build_chain(loaded.profile.chain, loaded.profile.options)
                else:
                    loaded = self.loaded
                    chain = build_chain(side, {n: v for n, v in self.options.items() if n in side.split(",")})
                template = self.template if loaded is self.loaded else loaded.profile.template
                text, _ = self._prompt(len(self.turns) - 1, loaded=loaded, template=template)
                parts = []
                for event in generate(loaded.model, loaded.tokenizer, text, chain=chain, seed=seed,
                                      max_new_tokens=self.max_new_tokens, stop=template.stop_strings(),
                                      cancel=self._cancel):
                    parts.append(event.text)
                results.append(Side(side if side.startswith("profile:") else chain.spec, "".join(parts).strip(),
                                    seed, round(event.tokens_per_second, 1) if isinstance(event, Done) else 0.0))
            return results
        finally:
            self._busy.release()

    def to_dict(self) -> dict[str, Any]:
        """The conversation with its provenance, as saved by ``/save FILE.json``: `turns` is the
        current branch, `tree` every turn of every branch (`turns.tree_entries`), `current`
        the index of the current turn."""
        known = {id(t) for t in self.tree}
        tree = self.tree + [t for t in self.turns if id(t) not in known]  # turns set by hand are kept too
        index = {id(t): i for i, t in enumerate(tree)}
        return {"format": "quill-transcript", "version": 2, "profile": self.profile.name, "system": self.system,
                "turns": [turn_entry(t) for t in self.turns], "tree": tree_entries(tree),
                "current": index[id(self.turns[-1])] if self.turns else None}

    def to_markdown(self) -> str:
        """The conversation as Markdown, each reply followed by its provenance."""
        lines = [f"# Quill chat with {self.profile.name}", ""]
        for i, t in enumerate(self.turns, 1):
            lines += [f"**You ({i}):** {t.user}", "", f"**{self.profile.name}:** {t.reply}", ""]
            if t.provenance:
                p = t.provenance
                options = "; ".join(f"{name} {', '.join(f'{k}={v}' for k, v in values.items())}"
                                    for name, values in p.options.items() if values)
                lines += [f"<sub>checkpoint {p.checkpoint} (sha256 {p.checkpoint_sha256}, step {p.step}), "
                          f"tokenizer {p.tokenizer_fingerprint}, chain {p.chain}" + (f" ({options})" if options else "")
                          + f", seed {p.seed}, {p.new_tokens} tokens at {p.tokens_per_second:g} tokens/s, "
                          f"ended by {p.reason}</sub>", ""]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the transcript: JSON for a .json file, else Markdown. Returns the path."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False) if path.suffix == ".json" else self.to_markdown()
        try:
            atomic_write_bytes(path, text.encode("utf-8"))
        except OSError as exc:
            raise QuillError(f"cannot write {str(path)!r}: {exc.strerror}") from None
        return path

    def load(self, path: str | Path) -> int:
        """Replace the conversation with a transcript saved as JSON by ``/save`` (or a session
        exported by ``quill sessions export --format json``), every branch of it; returns the
        number of turns of its current branch."""
        self._idle()
        where = f"transcript {str(path)!r}"
        try:
            data = json.loads(read_user_file(path, "transcript").decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") not in ("quill-transcript", "quill-session"):
                raise ValueError("not a Quill transcript")
            if data["format"] == "quill-session":
                from .store import Message

                tree, leaf, _ = tree_from_messages([Message(session=0, **m) for m in data["messages"]], data.get("current"))
            else:
                tree, leaf = tree_from_transcript(data)
            system = data.get("system")
            if system is not None and not isinstance(system, str):
                raise ValueError(f"its system text is {system!r}")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            hint = "load a .json transcript written by /save FILE.json" if Path(path).suffix != ".json" else None
            raise QuillError(f"{where} is not a Quill JSON transcript ({exc})", hint=hint) from None
        self.tree, self.turns = tree, path_to(leaf) if leaf else []
        self._clock = itertools.count(max((t.seen for t in tree), default=0) + 1)  # after the saved ids of an export
        self._mark()
        self.set_system(system, save=False)
        self._dropped_told = 0
        self.saved_id, self._pending_title = None, None  # saved, every branch, as a new session
        return len(self.turns)

    def set_system(self, text: str | None, save: bool = True) -> str:
        """Use `text` as the template's system text for this conversation (None: the profile's
        own); saved with the session. A line end is added to a text that has none, so that the
        first message starts on a line of its own. Returns what was set, for display."""
        if text is not None and text.strip() and not text.endswith("\n"):
            text += "\n"
        self._not_loading()
        self.system = text if text is None or text.strip() else ""
        self.template = replace(self.template, system=self.profile.template.system if text is None else self.system)
        if save and self.saved_id is not None:
            self._update_saved(lambda store: store.set_system(self.saved_id, self.system))
        if text is None:
            return "the system text is the profile's again"
        return f"system text: {self.system.strip()!r}" if self.system else "no system text"

    # --- saved sessions -----------------------------------------------------------

    @property
    def saving(self) -> bool:
        """Whether this chat is being saved: asked for (or the profile's [session] save), and not failed."""
        wanted = self.profile.save if self.save_wanted is None else self.save_wanted
        return wanted and self.save_error is None

    def _open_store(self):
        """The sessions database, opened for one operation (replies and commands run on other
        threads than the one that made the session: a connection is not shared between them)."""
        from .store import Store, default_path

        return Store(self.store_path or default_path())

    def _check_store(self) -> None:
        """Say at once, not at the first reply, that a sessions database there is unusable
        (corrupt, from a newer Quill): the chat goes on unsaved. None is made for this."""
        from .store import default_path

        if self.saving and (self.store_path or default_path()).exists():
            self._saving(lambda store: None, "this chat is not saved")

    def _saving(self, write, failed: str = "this chat is no longer saved") -> None:
        """Run `write(store)` if the chat is saved; a failure stops saving, with one notice."""
        if not self.saving:
            return
        try:
            with self._open_store() as store:
                write(store)
        except StoreLocked as exc:  # another chat is writing: this exchange is saved with the next one
            self._tell(f"not saved this time: {exc.message}; saving tries again at the next reply")
        except (QuillError, sqlite3.Error, OSError) as exc:
            reason = exc.message if isinstance(exc, QuillError) else f"{type(exc).__name__}: {exc}"
            self.save_error = reason
            self._tell(f"{failed}: {reason}")

    def _update_saved(self, change) -> None:
        """`change(store)` the chat's saved session, unless it was deleted meanwhile (the
        next reply saves the chat again, as a new session)."""
        self._saving(lambda store: change(store) if store.exists(self.saved_id) else None)

    def _tell(self, text: str) -> None:
        """A notice for `job_notices` (replies run on another thread than the interface's)."""
        with self._notices_lock:
            self._notices.append(Notice(text))

    def _save(self) -> None:
        """Save every turn not saved yet (the new exchange or reply; after /load, every branch),
        each under its parent, and leave the saved session at this chat's current turn."""
        def write(store) -> None:
            if self.saved_id is not None and not store.exists(self.saved_id):  # `quill sessions rm` meanwhile
                self.saved_id = None
                for turn in self.tree:
                    turn.saved = None
                self._tell("the saved session of this chat was deleted; the chat is saved again, as a new session")
            last = None
            for turn in [t for t in self.tree if t.saved is None]:
                asked = next((t.saved[0] for t in self.tree if t.asked == turn.asked and t.saved), None)
                if self.saved_id is None:  # the session and its first exchange in one transaction
                    self.saved_id, turn.saved = store.start_session(self.profile.name, self._pending_title, turn.user,
                                                                    turn.reply, turn.provenance, system=self.system)
                    self._pending_title = None
                elif asked is not None:  # another reply to a saved message
                    turn.saved = (asked, store.add_message(self.saved_id, asked, "model", turn.reply, turn.provenance))
                else:
                    parent = turn.parent.saved[1] if turn.parent is not None else None
                    turn.saved = store.add_exchange(self.saved_id, parent, turn.user, turn.reply, turn.provenance)
                last = turn.saved[1]
            leaf = self.turns[-1].saved if self.turns else None
            if last is not None and leaf is not None and leaf[1] != last:
                store.set_current(self.saved_id, leaf[1])
            if store.get(self.saved_id).profile != self.profile.name:  # /profile switched: resume with this one
                store.set_profile(self.saved_id, self.profile.name)

        self._saving(write)

    def sessions(self, limit: int = 20):
        """The saved sessions, the latest used first (`store.SessionInfo`s); none, and no
        database made, when nothing was ever saved."""
        from .store import default_path

        if not (self.store_path or default_path()).exists():
            return []
        with self._open_store() as store:
            return store.list_sessions(limit)

    def search(self, words: str, limit: int = 20):
        """The saved messages holding every one of `words` (`store.Hit`s, best first); none,
        and no database made, when nothing was ever saved."""
        from .store import default_path

        if not (self.store_path or default_path()).exists():
            return []
        with self._open_store() as store:
            return store.search(words, limit)

    def rename(self, title: str) -> str:
        """Title this chat's saved session (before the first exchange: the session it will start)."""
        from .store import check_title

        title = check_title(title)
        if self.saved_id is None:
            if not self.saving:
                raise QuillError("this chat is not being saved, so it has no title",
                                 hint=self.save_error or "it was started with --no-save, or its profile says "
                                                         "[session] save = false")
            self._pending_title = title
            return f"the saved session will be titled {title!r} from the first reply"
        with self._open_store() as store:
            store.rename(self.saved_id, title)
        return f"session {self.saved_id} is now titled {title!r}"

    def resume(self, ref: str | int, switch_profile: bool = True, message: int | None = None) -> tuple[int, list[str]]:
        """Carry on with saved session `ref` (its id, or "last"): its tree replaces the
        conversation, at its current message, or at `message` (a search hit; or ref
        "SESSION:MESSAGE") and below it the branch last used, and new exchanges are added to
        it. Switches to its profile, if there is one by that name (and `switch_profile`).
        Returns the session's id and what the user should know."""
        self._idle()
        ref, at = _split_ref(ref)
        message = at if message is None else message
        with self._open_store() as store:
            info = _find_session(store, ref)
            messages = store.messages(info.id)
        if message is not None and not any(m.id == message for m in messages):
            raise QuillError(f"there is no message {message} in session {info.id}",
                             hint=f"`quill sessions show {info.id}` shows its messages")
        tree, leaf, unanswered = tree_from_messages(messages, info.current if message is None else message)
        said = []
        if info.profile != self.profile.name:
            try:
                get_profile(info.profile)
            except QuillError:
                said.append(f"its profile {info.profile!r} is not there any more: chatting with {self.profile.name}")
            else:
                if switch_profile:
                    self.use_profile(info.profile)
                else:
                    said.append(f"it was held with profile {info.profile}; chatting with {self.profile.name} as asked")
        self._idle()
        self.tree, self.turns = tree, path_to(leaf) if leaf else []
        self._clock = itertools.count(max((t.seen for t in tree), default=0) + 1)
        self.saved_id, self._pending_title = info.id, None
        if message is not None and leaf is not None:
            self._go(leaf)
            self.resumed_at = len(path_to(leaf)) - 1
        else:
            self._mark()
            self.resumed_at = None
        self.set_system(info.system, save=False)
        self._dropped_told = 0
        if unanswered and message is None:  # the next exchange goes on from the last reply
            said.append("its last message had no reply and is left out")
        if not self.saving:
            said.append("this chat is not saved, so the session is not added to")
        return info.id, said

    # --- jobs ---------------------------------------------------------------------

    def _share_cores(self) -> None:
        """Leave a core to each running job: torch's threads wait for each other at
        every operation, so one thread that must share its core with a job slows a
        reply tenfold (measured with benchmarks/chat_bench.py)."""
        import torch

        if self._threads is None:
            self._threads = torch.get_num_threads()
        running = sum(job.status == "running" for job in self.jobs.all())
        torch.set_num_threads(max(1, min(self._threads, (os.cpu_count() or 1) - running)))

    def start_job(self, kind: str, argv: list[str]):
        """Start a background `train`, `finetune` or `eval` job; arguments as for `quill train`,
        `quill finetune` or `quill eval`.

        The arguments are checked here first, so a typo or a missing corpus is
        reported at once instead of by a failed job.
        """
        args = check_arguments(kind, argv)
        if kind == "train":
            _check_train_job(args)
        missing = [path for path in getattr(args, "inputs", []) if not Path(path).exists()]
        if missing:
            raise UsageError(f"nothing at {', '.join(repr(p) for p in missing)}", hint="name files or directories that exist")
        data = getattr(args, "data", None)
        if data is not None and not Path(data).exists():
            raise UsageError(f"no data at {data!r}", hint="prepare a corpus first: quill prepare CORPUS --tokenizer T --out DIR")
        return self.jobs.start(kind, argv)

    def job_notices(self) -> list[Notice]:
        """What the jobs reported since the last call, as one-line notices (and that saving
        the chat stopped, should it have).

        A training job that finishes becomes a profile (in the user's profile
        directory, with this profile's sampler and template) that `/profile` can switch to;
        a fine-tuning job wrote its own (with its parent profile's).
        """
        with self._notices_lock:  # the reply's thread adds to them
            notices, self._notices = self._notices, []
        while not self.jobs.events.empty():
            job, event = self.jobs.events.get_nowait()
            kind = event.get("event")
            if kind == "note":
                notices.append(Notice(f"job {job.id}: {event['text']}"))
            elif kind == "finished" and job.kind == "finetune" and not job.result.get("profile"):
                notices.append(Notice(f"job {job.id} stopped ({job.result.get('stopped')}) at step {job.result.get('steps')}; "
                                      f"continue it with /finetune --out {job.result['out']} --resume"))
            elif kind == "finished" and job.kind in TRAINING:
                # A fine-tune wrote its profile itself (its parent's settings); a training run gets the chat's.
                name = job.profile = job.result["profile"] if job.kind == "finetune" else self._adopt(job.result["out"])
                notices.append(Notice(f"job {job.id} finished training {job.result['out']}; profile {name!r} is ready: "
                                      f"/profile {name}"))
            elif kind == "finished":
                notices.append(Notice(job.describe()))
            elif kind == "cancelled":
                saved = f"; its last checkpoint is in {job.result['out']}" if job.result and job.kind in TRAINING else ""
                notices.append(Notice(f"job {job.id} cancelled{saved}"))
            elif kind == "failed":
                notices.append(Notice(f"job {job.id} failed: {job.error}"))
        return notices

    def _adopt(self, run_dir: str) -> str:
        """Write a profile for a freshly trained run, with this chat's sampler, limits and template; returns its name."""
        from .finetune import adopt

        settings = replace(self.profile, chain=self.chain, options=self.options, max_new_tokens=self.max_new_tokens,
                           template=self.template)
        return adopt(run_dir, self.profile, settings=settings, description=f"trained in the chat from profile {self.profile.name}")


def _split_ref(ref: str | int) -> tuple[str, int | None]:
    """A saved session's reference, and the message it names: "12:345" is message 345 of session 12."""
    session, colon, message = str(ref).strip().partition(":")
    if not colon:
        return session, None
    try:
        return session, int(message)
    except ValueError:
        raise QuillError(f"a message of a saved session is SESSION:MESSAGE, two numbers, not {str(ref)!r}",
                         hint="`quill sessions search WORDS` shows where each message is") from None


def _find_session(store, ref: str | int):
    """The saved session `ref` names: an id, or "last" (the one used last); ":MESSAGE" after it is ignored."""
    ref, _ = _split_ref(ref)
    if str(ref).strip().lower() == "last":
        recent = store.list_sessions(1)
        if not recent:
            raise QuillError("there are no saved sessions yet", hint="chats are saved as they happen: start one")
        return recent[0]
    try:
        number = int(ref)
    except ValueError:
        raise QuillError(f"a saved session is a number or `last`, not {str(ref)!r}",
                         hint="`quill sessions list` (or /sessions) shows them") from None
    return store.get(number)


def saved_profile(ref: str | int, store: str | os.PathLike | None = None) -> str | None:
    """The profile saved session `ref` was held with, if there is a profile by that name now."""
    from .store import Store, default_path

    with Store(store or default_path()) as opened:
        name = _find_session(opened, ref).profile
    try:
        get_profile(name)
    except QuillError:
        return None
    return name


def _whole(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise QuillError(f"{name} must be a whole number, not {value!r}") from None
