"""The turns of a conversation, and the tree they make.

A `Turn` is one exchange: a user message and the model's reply, with the reply's
`Provenance`. Turns make a tree: each follows its `parent`; an edited message is a
new turn beside the old one, and a regenerated reply a new turn of the same message
(the same `asked`). The chat (`session.ChatSession`) holds the tree and the path
through it that is the conversation; here are the turns themselves, and how a tree
is read back from a saved session's messages or a /save transcript and written out.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Provenance:
    """Everything that decided one reply; `ChatSession.replay` uses it to redo the reply."""

    profile: str
    checkpoint: str
    checkpoint_sha256: str  # first 16 hex digits of the file's SHA-256
    step: int
    tokenizer_fingerprint: str
    chain: str
    options: dict[str, dict[str, Any]]
    seed: int
    max_new_tokens: int
    first_turn: int  # the oldest turn the prompt held (older ones had left the context window)
    reason: str = ""
    new_tokens: int = 0
    tokens_per_second: float = 0.0
    template: dict[str, Any] = field(default_factory=dict)  # the chat template the prompt was laid out with
    dtype: str = ""  # what the model computed in: replies in another dtype differ in the last digits
    quantize: str = "none"
    path: str = ""  # the generation path (calibrate.GenerationPath.name): float32, bfloat16, int8, ... graph


_ASKED = itertools.count(1)  # tells user messages apart: the turns of one message's replies share its number


@dataclass
class Turn:
    """One exchange: what the user said and what the model replied.

    The conversation is a tree of turns: each follows its `parent` (None for a
    first one). An edited message is a new turn beside the old one, under the same
    parent; a regenerated reply is a new turn with the same `asked` (the same
    message). `ChatSession.turns` is the path from the first turn to the current one.
    """

    user: str
    reply: str = ""
    provenance: Provenance | None = None
    saved: tuple[int, int] | None = field(default=None, compare=False, repr=False)  # (message, reply) ids in the store
    parent: Turn | None = field(default=None, compare=False, repr=False)
    asked: int = field(default_factory=lambda: next(_ASKED), compare=False, repr=False)
    seen: int = field(default=0, compare=False, repr=False)  # when it was last on the path: a switch back goes there


@dataclass
class Fork:
    """A message of the conversation that has other versions: `ChatSession.forks`."""

    index: int  # the turn (0-based)
    role: str  # "user": edits of the message; "model": replies to it
    versions: list[Turn]  # oldest first
    current: int  # which of them is on the path


def turn_entry(t: Turn) -> dict[str, Any]:
    """A turn as a /save transcript holds it."""
    return {"user": t.user, "reply": t.reply, "provenance": asdict(t.provenance) if t.provenance else None}


def tree_entries(tree: list[Turn]) -> list[dict[str, Any]]:
    """The turns of `tree`, each naming its parent's index and the first turn of the message it answers ("asks")."""
    index = {id(t): i for i, t in enumerate(tree)}
    first: dict[int, int] = {}
    for i, t in enumerate(tree):
        first.setdefault(t.asked, i)
    return [{**turn_entry(t), "parent": index.get(id(t.parent)), "asks": first[t.asked]} for t in tree]


def path_to(turn: Turn) -> list[Turn]:
    """The turns from the first to `turn`."""
    path = []
    while turn is not None:
        path.append(turn)
        turn = turn.parent
    return path[::-1]


def tree_from_messages(messages: list[Any], at: int | None) -> tuple[list[Turn], Turn | None, bool]:
    """The turns of a saved session's messages (`store.Message`s), the turn message `at` is
    in (a user message: its last reply), and whether `at` is a message with no reply. A user
    message whose reply was never saved is left out, with what follows it."""
    users, replies, asked, tree = {}, {}, {}, []
    for m in sorted(messages, key=lambda m: m.id):
        if m.role == "user":
            users[m.id] = m
        elif m.role == "model" and m.parent in users:
            question = users[m.parent]
            parent = replies.get(question.parent)
            if question.parent is not None and parent is None:
                continue  # it follows an exchange that was not kept
            key = asked.setdefault(question.id, next(_ASKED))
            replies[m.id] = Turn(question.text, m.text, provenance_from(m.provenance), (question.id, m.id), parent, key, m.id)
            tree.append(replies[m.id])
    if at in replies:
        return tree, replies[at], False
    answers = [t for t in tree if t.saved[0] == at]
    if answers:
        return tree, max(answers, key=lambda t: t.seen), False
    return tree, replies.get(users[at].parent) if at in users else None, at in users


def tree_from_transcript(data: dict[str, Any]) -> tuple[list[Turn], Turn | None]:
    """The turns of a /save JSON transcript and its current one (one branch before version 2)."""
    def turn(t: dict[str, Any], parent: Turn | None) -> Turn:
        if not isinstance(t["user"], str) or not isinstance(t["reply"], str):
            raise ValueError("a turn's user and reply are text")
        return Turn(t["user"], t["reply"], Provenance(**t["provenance"]) if t.get("provenance") else None, parent=parent)

    if "tree" not in data:
        tree: list[Turn] = []
        for t in data["turns"]:
            tree.append(turn(t, tree[-1] if tree else None))
        return tree, tree[-1] if tree else None
    tree = []
    for i, t in enumerate(data["tree"]):
        parent = t["parent"]
        if parent is not None and not 0 <= parent < i or not 0 <= t["asks"] <= i:
            raise ValueError(f"turn {i} of its tree names a turn after it")
        tree.append(turn(t, None if parent is None else tree[parent]))
        tree[-1].asked = tree[t["asks"]].asked if t["asks"] < i else tree[-1].asked
        tree[-1].seen = i + 1  # below a switch, the newest turn (as a saved session resumes)
    current = data["current"]
    if current is not None and not 0 <= current < len(tree):
        raise ValueError(f"its current turn {current} is not in its tree")
    return tree, None if current is None else tree[current]


def provenance_from(data: dict[str, Any] | None) -> Provenance | None:
    try:
        return Provenance(**data) if data else None
    except TypeError:  # saved by a Quill whose provenance had other fields
        return None
