"""GPT-2's tokenizer files, read into Quill's BPE; and the `tokenizer.json` skeleton
that Quill's tokenizers fill in to leave for HuggingFace.

GPT-2's files spell each token as text: every byte has a printable stand-in
(`byte_alphabet`), and a token is the stand-ins of its bytes. `vocab.json` maps
those strings to ids, `merges.txt` lists the merges by rank. Reading them gives
a Quill `bpe` tokenizer that keeps GPT-2's numbering (its ``ids``), so the same
text gets the same ids as in transformers. Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import QuillError
from .fileio import read_user_file
from .tokenizer import Tokenizer, tokenizer_class

# What a special token looks like in a vocabulary: <|endoftext|>, <pad>, ...
_SPECIAL_LOOK = re.compile(r"<\|?[^\s<>]+\|?>")
# GPT-2's pre-split pattern (also Quill's `bpe` default, "gpt2").
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, indexed by byte value.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...)
    take the characters from U+0100 on, in byte order: space becomes 'Ġ'.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0x100
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(extra))
            extra += 1
    return out


def spell(piece: bytes, alphabet: list[str]) -> str:
    """A token's bytes as GPT-2 writes them in vocab.json."""
    return "".join(alphabet[b] for b in piece)


def bpe_model(vocab: dict[str, int], merges: list[str], unk_token: str | None = None) -> dict[str, Any]:
    """The `model` part of a `tokenizer.json`: plain BPE, merges as "left right" lines."""
    return {"type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges}


def tokenizer_json(model: dict[str, Any], tokenizer: Tokenizer, pre_tokenizer: dict | None, decoder: dict) -> dict[str, Any]:
    """A whole HuggingFace `tokenizer.json` around `model`, with `tokenizer`'s special tokens."""
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder, "model": model}


def read_gpt2_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a HuggingFace GPT-2 directory: vocab.json and merges.txt,
    else a byte-level BPE tokenizer.json. Errors name the file and what is wrong."""
    vocab_file, merges_file, json_file = (directory / n for n in ("vocab.json", "merges.txt", "tokenizer.json"))
    if vocab_file.is_file() and merges_file.is_file():
        vocab = read_json_object(vocab_file)
        merges = _merges_txt(merges_file)
        return _build(vocab, merges, {}, GPT2_PATTERN, f"{vocab_file} and {merges_file.name}")
    if json_file.is_file():
        return _from_tokenizer_json(json_file)
    missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
    raise QuillError(f"{directory} has no tokenizer: {' and '.join(missing)} missing, and no tokenizer.json",
                     hint="a GPT-2 directory holds vocab.json and merges.txt (or tokenizer.json) beside config.json")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, with errors naming it."""
    try:
        data = json.loads(read_user_file(path, "file").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuillError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise QuillError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _merges_txt(path: Path) -> list[tuple[str, str]]:
    try:
        lines = read_user_file(path, "merges file").decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise QuillError(f"{path} is not UTF-8 text") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise QuillError(f"{path}, line {number}: a merge is two tokens separated by one space, not {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _from_tokenizer_json(path: Path) -> Tokenizer:
    data = read_json_object(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise QuillError(f"{path} holds a {kind or 'malformed'} model, not byte-level BPE: quill import reads GPT-2's tokenizer")
    for key, allowed in (("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, "")),
                         ("dropout", (None, 0)), ("byte_fallback", (None, False)), ("ignore_merges", (None, False))):
        if model.get(key) not in allowed:
            raise QuillError(f"{path}: model.{key} is {json.dumps(model.get(key))}; GPT-2's tokenizer has none")
    if data.get("normalizer") is not None:
        raise QuillError(f"{path} has a normalizer ({json.dumps(data['normalizer'])[:80]}); GPT-2's tokenizer has none")
    pattern = _pattern_of(data.get("pre_tokenizer"), path)
    merges = []
    raw_merges = model.get("merges")
    for m in raw_merges if isinstance(raw_merges, list) else [raw_merges]:
        parts = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) and p for p in parts)):
            raise QuillError(f"{path}: malformed merge {m!r}")
        merges.append((parts[0], parts[1]))
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise QuillError(f"{path} has no model.vocab")
    added = data.get("added_tokens") or []
    if not (isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                            and type(t.get("id")) is int for t in added)):
        raise QuillError(f"{path}: added_tokens must be a list of {{\"id\": ..., \"content\": ...}} entries")
    return _build(vocab, merges, {t["content"]: t["id"] for t in added}, pattern, str(path))


def _pattern_of(pre: Any, path: Path) -> str:
    """The pre-split pattern of a byte-level pre-tokenizer: GPT-2's, or a Split's regex."""
    if pre is None:
        raise QuillError(f"{path} is not byte-level BPE (it has no pre-tokenizer): quill import reads GPT-2's kind of tokenizer",
                         hint="a char model exported by Quill needs no import: use its Quill checkpoint")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    steps = steps if isinstance(steps, list) and all(isinstance(step, dict) for step in steps) else []
    if steps and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("add_prefix_space"):
        if len(steps) == 1 and steps[0].get("use_regex", True):
            return GPT2_PATTERN
        split = steps[0] if len(steps) == 2 else {}
        regex = split.get("pattern", {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
        if (split.get("type") == "Split" and isinstance(regex, str) and split.get("behavior") == "Isolated"
                and not split.get("invert") and not steps[1].get("use_regex", True)):
            return regex
    raise QuillError(f"{path} does not pre-split text as GPT-2 does (pre_tokenizer {json.dumps(pre)[:120]})",
                     hint="quill import reads byte-level BPE tokenizers without a prefix space")


def _build(vocab: dict[str, Any], merges: list[tuple[str, str]], specials: dict[str, int], pattern: str, source: str) -> Tokenizer:
    """A Quill BPE tokenizer with the same ids as `vocab` (token string -> id)."""
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise QuillError(f"{source}: the vocabulary's ids must be whole numbers, 0 or more")
    alphabet = byte_alphabet()
    missing = [b for b, ch in enumerate(alphabet) if ch not in vocab]
    if missing:
        raise QuillError(f"{source}: the vocabulary lacks {len(missing)} of the 256 bytes (e.g. byte {missing[0]}, "
                         f"spelled {alphabet[missing[0]]!r}), so some text could not be encoded")
    ids = [vocab[ch] for ch in alphabet]
    pairs = []
    for rank, (left, right) in enumerate(merges):
        for token in (left, right, left + right):
            if token not in vocab:
                raise QuillError(f"{source}: merge {rank} ({left!r} {right!r}) uses {token!r}, which is not in the vocabulary")
        pairs.append((vocab[left], vocab[right]))
        ids.append(vocab[left + right])
    made = set(ids)
    specials = {name: i for name, i in specials.items() if i not in made}
    # A token no byte or merge makes is a special token if it looks like one (GPT-2's
    # <|endoftext|>); any other could never be produced, and would decode wrongly.
    for name, i in vocab.items():
        if i not in made and i not in specials.values():
            if not _SPECIAL_LOOK.fullmatch(name):
                raise QuillError(f"{source}: the vocabulary's {name!r} (id {i}) is made by no merge and is not a "
                                 "special token, which Quill's BPE cannot hold")
            specials[name] = i
    try:
        return tokenizer_class("bpe").from_content({"pattern": pattern, "merges": [list(p) for p in pairs], "ids": ids}, specials)
    except QuillError as exc:
        raise QuillError(f"{source}: {exc.message}", hint=exc.hint) from None
