"""The shipped models: they validate, load offline without unpickling, chat as a
play, and write real words. Nothing here reads the corpus: the word list in
tests/data holds its vocabulary."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from helpers import run_quill

from gpt_runtime.checkpoint import load_checkpoint, read_metadata
from gpt_runtime.generate import Done
from gpt_runtime.profiles import (
    SHIPPED_DEFAULT,
    SHIPPED_DIR,
    default_profile,
    find_profiles,
    load_profile,
)
from gpt_runtime.session import ChatSession

SHIPPED = ["shakespeare-bpe", "shakespeare-char"]
WORDS = {line.strip() for line in (Path(__file__).parent / "data" / "shakespeare_words.txt").read_text().splitlines()
         if line.strip() and not line.startswith("#")}
# Measured with the test's own seeds and messages (and stated in the char model's card);
# a little slack for other CPUs' arithmetic.
CHAR_WORD_VALIDITY = 0.95  # measured: 385 of 393 words (98.0%) at these seeds and messages
MESSAGES = ["Good morrow, fair lady.", "What news from the court?", "Wilt thou love me?", "Where is the king?"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """The shipped profiles, and no user profiles."""
    monkeypatch.delenv("QUILL_SHIPPED_PROFILES")
    monkeypatch.setenv("QUILL_PROFILES", str(tmp_path / "none"))


def words_of(text: str) -> list[str]:
    return [w for w in (m.strip("'").lower() for m in re.findall(r"[A-Za-z']+", text)) if w]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate_and_their_tokenizers_match_their_checkpoints(name, isolated):
    path = SHIPPED_DIR / name / "profile.toml"
    profile = load_profile(path)  # checks keys, files and the tokenizer fingerprint
    meta = read_metadata(profile.checkpoint)
    assert profile.name == name and profile.tokenizer_fingerprint == meta["tokenizer_fingerprint"]
    ckpt = load_checkpoint(profile.checkpoint)
    assert ckpt.tokenizer.fingerprint == profile.tokenizer_fingerprint
    assert profile.checkpoint.suffix == ".safetensors" and profile.checkpoint.stat().st_size <= 10_000_000
    # each has its recipe and its card beside it
    assert (path.parent / "train.toml").is_file() and (path.parent / "README.md").is_file()
    assert re.search(r"val loss \d\.\d\d", profile.description), profile.description
    out = run_quill("profiles", "validate", str(path))
    assert out.returncode == 0 and out.stdout.decode().startswith(f"ok: profile '{name}'")


def test_profiles_list_shows_both_shipped_models_with_their_val_loss(isolated, tmp_path):
    out = run_quill("profiles", "list", env={"QUILL_PROFILES": str(tmp_path / "none")})
    lines = out.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    for line in lines:
        assert "[shipped]" in line and re.search(r"val loss \d\.\d\d", line), line
    assert default_profile() == SHIPPED_DEFAULT == "shakespeare-char"
    assert [e.name for e in find_profiles() if e.error is None] == SHIPPED


def test_loading_a_shipped_model_never_touches_the_network(isolated, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in SHIPPED:
        session = ChatSession(name)
        session.set("max_new_tokens", "5")
        assert isinstance(list(session.send("Hark"))[-1], Done)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_user_speaks_as_one_character_and_the_model_answers_as_another(name, isolated):
    s = ChatSession(name)
    ended = 0
    for seed in range(5):
        s.clear()
        s.set("seed", str(seed))
        done = list(s.send("Good morrow, fair lady."))[-1]
        assert s._prompt(0)[0] == "ROMEO:\nGood morrow, fair lady.\n\nJULIET:\n"
        reply = s.turns[0].reply
        assert reply and "\n\n" not in reply and not reply.startswith("ROMEO")
        # a turn of a play: it ends at the end of the speech (the blank line), not mid-flow
        ended += done.reason == "stop" and done.stop == "\n\n"
    assert ended >= 3, ended
    s.set("user_name", "HAMLET")
    s.set("model_name", "OPHELIA")
    list(s.send("Where is the king?"))
    assert s._prompt(1)[0].endswith("HAMLET:\nWhere is the king?\n\nOPHELIA:\n")


def test_a_seeded_reply_is_the_same_in_every_run(isolated, tmp_path):
    script = b"/set seed 11\nWhat news from the court?\n"
    env = {"QUILL_PROFILES": str(tmp_path / "none")}
    first, second = run_quill("chat", input=script, env=env), run_quill("chat", input=script, env=env)
    assert first.returncode == 0 and first.stderr == b""
    assert first.stdout == second.stdout
    s = ChatSession(SHIPPED_DEFAULT)
    s.set("seed", "11")
    list(s.send("What news from the court?"))
    assert first.stdout.decode() == ("> /set seed 11\nseed = 11\n> What news from the court?\n"
                                     f"{s.turns[0].reply}\n")


def test_the_char_models_replies_are_mostly_real_words(isolated):
    s = ChatSession(SHIPPED_DEFAULT)
    total = valid = 0
    for seed in range(8):
        s.clear()
        s.set("seed", str(seed))
        list(s.send(MESSAGES[seed % len(MESSAGES)]))
        words = words_of(s.turns[0].reply)
        total += len(words)
        valid += sum(w in WORDS for w in words)
    assert total >= 50  # a few hundred characters
    assert valid / total >= CHAR_WORD_VALIDITY, (valid, total)
