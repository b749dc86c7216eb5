"""Chat conversations into a data directory for supervised fine-tuning (`quill prepare --chat`).

Two kinds of input file, any number of each:

- JSON Lines, one conversation a line, in the common format
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``:
  at most one leading system message, then user and assistant taking turns,
  ending with the assistant;
- Quill's own transcripts, the ``.json`` files that ``/save FILE.json`` writes.

Each conversation is laid out with the profile's chat template, by the very
function that lays out the chat's prompts (`ChatTemplate.segments`), so the
model learns the text it will be shown. The pieces are encoded one by one: the
loss mask is True on the model's pieces (its replies and model suffixes) and on
the end-of-text id that closes each conversation, False on the rest. A
conversation longer than the model's context loses its oldest turns, as the
chat's prompt does; one whose last turn alone is too long is left out.
"""

from __future__ import annotations

import json
import os
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .data_writer import SplitWriter, write_data_dir
from .errors import QuillError, QuillWarning
from .fileio import read_user_file
from .init_from import source_shape
from .profiles import ChatTemplate, Profile, get_profile
from .sources import tokenizer_source
from .tokenizer import Tokenizer, eos_id

ROLES = ("system", "user", "assistant")
FORMAT_HINT = ('one conversation a line: {"messages": [{"role": "user", "content": "..."}, '
               '{"role": "assistant", "content": "..."}]}')


@dataclass
class Conversation:
    """One conversation: its (user, model) turns and its own system text, if any."""

    turns: list[tuple[str, str]]
    system: str | None = None


class BadConversation(QuillError):
    """A conversation that cannot be trained on; `reason` is how `--skip-bad` counts it."""

    def __init__(self, message: str, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


# --- reading ------------------------------------------------------------------------------

def read_conversations(path: str | os.PathLike) -> Iterator[Conversation | BadConversation]:
    """The conversations of one file, each bad one as its `BadConversation` (not raised,
    so the caller decides whether to stop or skip): a transcript, else JSON Lines."""
    path = Path(path)
    data = read_user_file(path, "chat file")
    transcript = _transcript(data) if path.suffix == ".json" else None
    if transcript is not None:
        yield _checked(lambda: _from_transcript(transcript, f"transcript {str(path)!r}"))
        return
    for number, line in enumerate(data.splitlines(), 1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a byte-order mark is not part of the first line
        if line.strip():
            yield _checked(lambda: _from_line(line, f"{str(path)!r}, line {number}"))


def _checked(read: Callable[[], Conversation]) -> Conversation | BadConversation:
    try:
        return read()
    except BadConversation as exc:
        return exc


def _transcript(data: bytes) -> dict | None:
    """The file as a Quill transcript, or None if it is not one (then it is read as JSON Lines)."""
    try:
        whole = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None
    return whole if isinstance(whole, dict) and whole.get("format") == "quill-transcript" else None


def _from_line(line: bytes, where: str) -> Conversation:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadConversation(f"{where} is not UTF-8 text", "not JSON") from None
    except ValueError as exc:
        raise BadConversation(f"{where} is not JSON ({exc.msg})", "not JSON", hint=FORMAT_HINT) from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise BadConversation(f'{where} has no "messages" list', "malformed", hint=FORMAT_HINT)
    return _from_messages(record["messages"], where)


def _from_messages(messages: list, where: str) -> Conversation:
    """Check roles, contents and their order; pair the turns."""
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise BadConversation(f"{where}: message {number} is not an object", "malformed", hint=FORMAT_HINT)
        if message.get("role") not in ROLES:
            raise BadConversation(f"{where}: message {number} has unknown role {message.get('role')!r}",
                                  "unknown role", hint="roles are system, user and assistant")
        if not isinstance(message.get("content"), str):
            raise BadConversation(f"{where}: message {number} has content {message.get('content')!r}, not a string",
                                  "content not a string")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    if not rest:
        raise BadConversation(f"{where}: the conversation is empty", "empty")
    for index, message in enumerate(rest):
        expected = ("user", "assistant")[index % 2]
        if message["role"] != expected:
            number = index + 1 + (system is not None)
            raise BadConversation(f"{where}: message {number} is {message['role']!r} where {expected!r} was due",
                                  "not alternating", hint="after at most one leading system message, "
                                  "user and assistant take turns")
    if len(rest) % 2:
        raise BadConversation(f"{where}: the conversation ends with the user's message, not the assistant's",
                              "no final reply", hint="end each conversation with the assistant's reply")
    return Conversation([(rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest), 2)], system)


def _from_transcript(data: dict, where: str) -> Conversation:
    turns = data.get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadConversation(f'{where} has no "turns" list of objects', "malformed",
                              hint="use a .json transcript written by /save FILE.json")
    if not turns:
        raise BadConversation(f"{where}: the conversation is empty", "empty")
    for number, turn in enumerate(turns, 1):
        for key in ("user", "reply"):
            if not isinstance(turn.get(key), str):
                raise BadConversation(f"{where}: turn {number} has {key} {turn.get(key)!r}, not a string",
                                      "content not a string")
    return Conversation([(t["user"], t["reply"]) for t in turns])


def load_conversations(paths: list[str | os.PathLike], skip_bad: bool = False) -> tuple[list[Conversation], Counter]:
    """Every conversation of `paths`, in order, and the bad ones skipped ({reason: count});
    without `skip_bad` the first bad one is raised."""
    good, skipped = [], Counter()
    for path in paths:
        for item in read_conversations(path):
            if isinstance(item, BadConversation):
                if not skip_bad:
                    raise QuillError(item.message, hint=item.hint or "fix it, or leave bad conversations out with --skip-bad")
                skipped[item.reason] += 1
            else:
                good.append(item)
    return good, skipped


# --- encoding -----------------------------------------------------------------------------

def encode_conversation(template: ChatTemplate, conversation: Conversation, encode: Callable[[str], list[int]],
                        eos: int) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a whole conversation: each piece of its layout encoded on its own
    (so no token straddles the boundary of the mask), then the end-of-text id that ends it."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, own in template.segments(conversation.turns, system=conversation.system):
        piece = encode(text)
        ids += piece
        mask += [own] * len(piece)
    # The stop that ends the conversation: the model learns to emit it after its last reply.
    return ids + [eos], mask + [True]


def fit_conversation(template: ChatTemplate, conversation: Conversation, tok: Tokenizer, limit: int
                     ) -> tuple[list[int], list[bool], int] | None:
    """(ids, mask, turns dropped) with the oldest turns dropped until at most `limit` tokens
    are left (the system text stays), as the chat's prompt drops them; None if even the
    last turn alone is longer."""
    eos = eos_id(tok)
    encode = lru_cache(maxsize=None)(tok.encode)  # each turn's pieces are encoded once, however often tried

    def encoded(start: int) -> tuple[list[int], list[bool]]:
        return encode_conversation(template, Conversation(conversation.turns[start:], conversation.system), encode, eos)

    ids, mask = encoded(0)
    if len(ids) <= limit:  # the usual case: it fits whole
        return ids, mask, 0
    start = len(conversation.turns) - 1
    ids, mask = encoded(start)
    if len(ids) > limit:
        return None
    while start > 1:  # from the newest back while the next older turn fits (all of them did not)
        longer = encoded(start - 1)
        if len(longer[0]) > limit:
            break
        start, (ids, mask) = start - 1, longer
    return ids, mask, start


# --- the data directory -------------------------------------------------------------------

def chat_profile(profile: Profile | str) -> tuple[Profile, Tokenizer, int]:
    """The profile, its checkpoint's tokenizer and block size, checked for chat data."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if not profile.template.model_prefix:
        raise QuillError(f"profile {profile.name!r} has no model prefix in its chat template, so nothing marks "
                         "where the model's turn starts", hint=f"set [template] model_prefix in {str(profile.path)!r}")
    tok = tokenizer_source(profile.checkpoint)
    if eos_id(tok) is None:
        raise QuillError(f"the tokenizer of profile {profile.name!r} has no end-of-text token (<eos> or <|endoftext|>), "
                         "so nothing could end a conversation", hint="fine-tune a model whose tokenizer has one")
    return profile, tok, source_shape(str(profile.checkpoint))[1]["block_size"]


def val_count(lengths: list[int], val_fraction: float, min_tokens: int = 0) -> int:
    """How many of the last conversations (of these token `lengths`) are kept for validation:
    the asked-for share, at least one when asked for and there are two or more, and more while
    they hold no more than `min_tokens` (validation draws whole windows of the model's
    context), but not beyond a quarter of them."""
    n = len(lengths)
    if not val_fraction or n < 2:
        return 0
    count = min(n - 1, max(1, round(n * val_fraction)))
    while count < n // 4 and sum(lengths[n - count:]) <= min_tokens:
        count += 1
    return count


def prepare_chat(inputs: list[str | os.PathLike], profile: Profile | str, out_dir: str | os.PathLike,
                 val_fraction: float = 0.1, skip_bad: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Lay out, encode and mask the conversations of `inputs` for `profile`'s model into
    `out_dir` (train/val .bin and .mask, meta.json, tokenizer.json). Returns the metadata."""
    from .corpus_prepare import unknown_summary

    if not 0.0 <= val_fraction < 1.0:
        raise QuillError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    profile, tok, block_size = chat_profile(profile)
    conversations, skipped = load_conversations(inputs, skip_bad)
    documents, truncated, unknown = _encode_all(conversations, profile.template, tok, block_size + 1, skipped, progress)
    if not documents:
        raise QuillError(f"no conversation is left to train on ({_describe(skipped) or 'the files hold none'})",
                         hint="give conversations that fit the model's context of "
                              f"{block_size} tokens" if skipped.get("too long") else None)
    n_val = val_count([len(ids) for ids, _ in documents], val_fraction, block_size + 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = [SplitWriter(out, "train", tok.vocab_size, masked=True), SplitWriter(out, "val", tok.vocab_size, masked=True)]
    try:
        for index, (ids, mask) in enumerate(documents):
            splits[index >= len(documents) - n_val].write(ids, mask)
    except BaseException:
        for split in splits:
            split.discard()
        raise
    return write_data_dir(out, splits, tok, {
        "inputs": [str(path) for path in inputs], "profile": profile.name, "chat_template": asdict(profile.template),
        "block_size": block_size, "val_fraction": val_fraction, "conversations": len(documents),
        "val_conversations": n_val, "truncated": truncated, "skipped": dict(skipped), "unknown_chars": unknown_summary(unknown),
        "loss_tokens": sum(sum(mask) for _, mask in documents)})


def _encode_all(conversations: list[Conversation], template: ChatTemplate, tok: Tokenizer, limit: int,
                skipped: Counter, progress: Callable[[int, int], None] | None) -> tuple[list, int, Counter]:
    """Every conversation that fits as (ids, mask); counts the truncated ones and the characters
    the tokenizer lacks, and adds the ones too long to `skipped`. All are held (compactly)
    until the split is known."""
    documents, truncated, unknown = [], 0, Counter()
    # The tokenizer warns about <unk> once per character; here they are counted and summed up instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuillWarning)
        for number, conversation in enumerate(conversations, 1):
            for text in (conversation.system or "", *(part for turn in conversation.turns for part in turn)):
                unknown.update(tok.missing(text))
            fitted = fit_conversation(template, conversation, tok, limit)
            if fitted is None:
                skipped["too long"] += 1
            else:
                ids, mask, dropped = fitted
                truncated += dropped > 0
                documents.append((array("I", ids), bytes(mask)))  # 4 bytes a token, not a list of ints
            if progress:
                progress(number, len(conversations))
    return documents, truncated, unknown


def _describe(skipped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
