"""Chat data for fine-tuning: one layout for the chat's prompts and the training text,
JSON Lines and transcripts read and checked, the loss mask, truncation, `quill prepare --chat`.

A module fixture writes tiny checkpoints with a character tokenizer (so a token is a
character, and expected token counts are lengths of strings) and profiles for them in
a user profile directory of their own. Expected texts and masks are written out
literally here, not computed with the code under test.
"""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_runtime.chat_data import BadConversation, Conversation, fit_conversation, prepare_chat, read_conversations, val_count
from gpt_runtime.data import DataDir
from gpt_runtime.errors import QuillError
from gpt_runtime.profiles import ChatTemplate
from gpt_runtime.session import ChatSession, Turn
from helpers import one_line_error, run_quill

VOCAB = string.ascii_letters + string.digits + " .,!?'\n:<>-"
SHORT_BLOCK = 48

TINY = '''description = "tiny: a system text, no names"
checkpoint = "{long}"

[template]
system = "A talk.\\n"
user_prefix = "U: "
user_suffix = "\\n"
model_prefix = "M: "
model_suffix = "\\n"
stop = ["\\n"]
'''
NAMED = '''description = "named speakers"
checkpoint = "{long}"

[template]
user_prefix = "{{user}}> "
user_suffix = "\\n"
model_prefix = "{{model}}> "
model_suffix = "\\n\\n"
stop = ["\\n\\n", "{{user}}>"]
user_name = "Ann"
model_name = "Bot"
'''
SHORT = TINY.replace("{long}", "{short}").replace("tiny:", "short:")
NO_PREFIX = TINY.replace('model_prefix = "M: "', 'model_prefix = ""')
NO_EOS = TINY.replace("{long}", "{no_eos}")


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict:
    """Checkpoints with context 256 (long), 40 (short) and one whose tokenizer has no
    end-of-text token; profiles tiny, named, short, no-prefix and no-eos for them."""
    import torch

    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.model import GPT, GPTConfig
    from gpt_runtime.tokenizer import train_tokenizer
    from plugins.bpe_tokenizer import BPETokenizer
    from plugins.char_tokenizer import CharTokenizer

    root = tmp_path_factory.mktemp("chat-data")
    char = CharTokenizer.train(VOCAB)
    no_eos = BPETokenizer.from_content(train_tokenizer("bpe", VOCAB * 3, 260).content(), {})
    paths = {}
    for name, tok, block in (("long", char, 256), ("short", char, SHORT_BLOCK), ("no_eos", no_eos, 16)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=1, n_head=2, n_embd=16))
        paths[name] = str(root / f"{name}.safetensors")
        save_checkpoint(paths[name], model, tok, step=1)
    profiles = root / "profiles"
    profiles.mkdir()
    for name, text in (("tiny", TINY), ("named", NAMED), ("short", SHORT), ("no-prefix", NO_PREFIX), ("no-eos", NO_EOS)):
        (profiles / f"{name}.toml").write_text(text.format(**paths), encoding="utf-8")
    return {"root": root, "profiles": profiles, "tok": char}


@pytest.fixture
def profiles(disk, monkeypatch) -> Path:
    monkeypatch.setenv("QUILL_PROFILES", str(disk["profiles"]))
    return disk["profiles"]


def jsonl(path: Path, *conversations) -> Path:
    """Write `conversations` (lists of (role, content), or raw lines) as JSON Lines."""
    lines = [c if isinstance(c, str) else json.dumps({"messages": [{"role": r, "content": t} for r, t in c]})
             for c in conversations]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(*texts: str, system: str | None = None) -> list[tuple[str, str]]:
    """A conversation in JSON Lines' roles: user and assistant by turns."""
    return ([("system", system)] if system is not None else []) + [
        ("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)]


def train_text(data: DataDir, split: str = "train") -> tuple[str, str]:
    """(all the text of a split, the text where the loss counts), decoded."""
    ids, mask = data.tokens(split).tolist(), data.mask(split).tolist()
    return data.tokenizer.decode(ids), data.tokenizer.decode([i for i, keep in zip(ids, mask) if keep])


# --- one layout for the chat and the training data ---------------------------------------

def test_segments_join_to_the_prompt_and_flag_only_the_models_text():
    template = ChatTemplate(system="Sys\n", user_prefix="{user}: ", user_suffix="\n", model_prefix="{model}: ",
                            model_suffix="\n", user_name="Ann", model_name="Bot")
    turns = [("hi", "hello"), ("again", "")]
    assert template.segments(turns, "bye") == [
        ("Sys\nAnn: hi\nBot: ", False), ("hello\n", True), ("Ann: again\nBot: ", False), ("\n", True),
        ("Ann: bye\nBot: ", False)]
    assert template.render(turns, "bye") == "Sys\nAnn: hi\nBot: hello\nAnn: again\nBot: \nAnn: bye\nBot: "
    # A training conversation: no message to answer; its own system text replaces the template's, as given.
    assert template.segments(turns[:1], system="{user} is here. ") == [
        ("{user} is here. Ann: hi\nBot: ", False), ("hello\n", True)]
    assert ChatTemplate(system="").segments([], "x") == [("User: x\nQuill: ", False)]


def random_conversation(rng: random.Random, turns: int) -> list[tuple[str, str]]:
    words = ["thou", "art", "fair", "Good morrow", "\n", "sweet", "!", "ROMEO:", " ", "what"]
    return [("".join(rng.choices(words, k=rng.randint(0, 6))), "".join(rng.choices(words, k=rng.randint(0, 6))))
            for _ in range(turns)]


def check_layouts_agree(session: ChatSession, seed: int) -> None:
    """For conversations of 1 to 4 turns: the training layout, up to its last model prefix,
    is the prompt the session builds for the last message (from the oldest turn it holds:
    the session drops turns to fit, and so does the training data)."""
    rng = random.Random(seed)
    held_all = 0
    for n in range(1, 5):
        turns = random_conversation(rng, n)
        session.turns = [Turn(user, reply) for user, reply in turns]
        prompt, first = session._prompt(n - 1)
        held_all += first == 0
        segments = session.template.segments(turns[first:])
        assert segments[-1][1] is True  # the layout ends with the model's last reply
        assert "".join(text for text, _ in segments[:-1]) == prompt
        assert segments[-1][0] == turns[-1][1] + session.template._fill(session.template.model_suffix)
    assert held_all >= 2  # most prompts hold the whole conversation


def test_the_training_layout_is_the_chats_prompt_for_the_shipped_profile(monkeypatch, one_torch_thread):
    monkeypatch.delenv("QUILL_SHIPPED_PROFILES")  # this test looks at the shipped profile
    session = ChatSession("shakespeare-char")
    assert session.template.uses_names()
    check_layouts_agree(session, 0)
    session.set("user_name", "HAMLET")  # names changed in the chat are the names laid out
    check_layouts_agree(session, 1)
    assert "HAMLET:\n" in session._prompt(0)[0]


@pytest.mark.parametrize("name", ["tiny", "named"])
def test_the_training_layout_is_the_chats_prompt_for_other_templates(profiles, name):
    session = ChatSession(name)
    check_layouts_agree(session, 2)
    assert ("Ann> " in session._prompt(0)[0]) == (name == "named")


# --- reading and checking conversations ---------------------------------------------------

def test_json_lines_and_transcripts_make_one_masked_data_directory(profiles, tmp_path):
    lines = jsonl(tmp_path / "chats.jsonl", chat("Hi", "Hello.", system="Be kind.\n"), chat("a", "b", "c", "d"))
    session = ChatSession("tiny")
    session.turns = [Turn("How are you?", "Well."), Turn("Bye", "Farewell!")]
    saved = session.save(tmp_path / "saved.json")
    meta = prepare_chat([lines, saved], "tiny", tmp_path / "out", val_fraction=0)
    data = DataDir.open(tmp_path / "out")
    everything, trained = train_text(data)
    assert everything == ("Be kind.\nU: Hi\nM: Hello.\n<eos>"  # its own system text
                          "A talk.\nU: a\nM: b\nU: c\nM: d\n<eos>"
                          "A talk.\nU: How are you?\nM: Well.\nU: Bye\nM: Farewell!\n<eos>")
    assert trained == "Hello.\n<eos>" + "b\nd\n<eos>" + "Well.\nFarewell!\n<eos>"
    assert meta["conversations"] == 3 and meta["val_tokens"] == 0 and meta["mask"] is True
    assert meta["loss_tokens"] == len(trained) - 3 * (len("<eos>") - 1)  # each "<eos>" is one token
    assert meta["chat_template"] == {"system": "A talk.\n", "user_prefix": "U: ", "user_suffix": "\n",
                                     "model_prefix": "M: ", "model_suffix": "\n", "stop": ["\n"],
                                     "user_name": "User", "model_name": "Quill"}
    assert meta["profile"] == "tiny" and meta["inputs"] == [str(lines), str(saved)]
    assert meta["truncated"] == 0 and meta["skipped"] == {}


def test_the_mask_is_true_exactly_on_the_replies_their_suffixes_and_the_end(profiles, tmp_path):
    lines = jsonl(tmp_path / "c.jsonl", chat("Hi", "Yo"))
    prepare_chat([lines], "named", tmp_path / "out", val_fraction=0)
    data = DataDir.open(tmp_path / "out")
    ids, mask = data.tokens("train").tolist(), data.mask("train").tolist()
    text = "Ann> Hi\nBot> Yo\n\n"
    assert len(ids) == len(text) + 1
    assert mask == [False] * len("Ann> Hi\nBot> ") + [True] * len("Yo\n\n") + [True]
    assert ids[-1] == data.tokenizer.special_tokens["<eos>"]
    assert data.tokenizer.decode(ids[:-1]) == text


def test_characters_the_tokenizer_lacks_are_counted_not_warned_about_one_by_one(profiles, tmp_path):
    import warnings

    lines = jsonl(tmp_path / "c.jsonl", chat("Grüß dich", "Ça va? ½"), chat("ü", "ß"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        meta = prepare_chat([lines], "tiny", tmp_path / "out", val_fraction=0)
    unknown = meta["unknown_chars"]
    assert unknown["occurrences"] == 6 and sorted(unknown["first"]) == sorted("üßÇ½") and unknown["distinct"] == 4


def test_user_text_that_spells_a_special_token_stays_text(profiles, tmp_path):
    prepare_chat([jsonl(tmp_path / "c.jsonl", chat("<eos>", "ok"))], "tiny", tmp_path / "out", val_fraction=0)
    ids = DataDir.open(tmp_path / "out").tokens("train").tolist()
    assert ids.count(3) == 1 and ids[-1] == 3  # <eos> is id 3 of a char tokenizer: only the real end


BAD_LINES = [
    ('{"messages": [{"role": "narrator", "content": "x"}]}', "unknown role", "unknown role 'narrator'"),
    ('{"messages": []}', "empty", "empty"),
    ('{"messages": [{"role": "system", "content": "x"}]}', "empty", "empty"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "content not a string", "content 5, not a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "not alternating", "message 2 is 'user' where 'assistant' was due"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "system", "content": "c"}, {"role": "assistant", "content": "d"}]}',
     "not alternating", "message 3 is 'system'"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "not alternating", "message 1 is 'assistant' where 'user' was due"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "no final reply", "ends with the user's message"),
    ('{"messages": [{"role": "user", "content": "a"}', "not JSON", "is not JSON"),
    ('{"turns": []}', "malformed", 'has no "messages" list'),
]


@pytest.mark.parametrize("line, reason, said", BAD_LINES, ids=[reason for _, reason, _ in BAD_LINES])
def test_a_bad_conversation_is_named_by_file_and_line_or_skipped_and_counted(profiles, tmp_path, line, reason, said):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "chats.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")  # the blank line 2 is not a conversation
    with pytest.raises(QuillError) as caught:
        prepare_chat([path], "tiny", tmp_path / "out")
    assert caught.value.message.startswith(f"{str(path)!r}, line 3") and said in caught.value.message
    assert not (tmp_path / "out" / "meta.json").exists()
    meta = prepare_chat([path], "tiny", tmp_path / "out", skip_bad=True)
    assert meta["skipped"] == {reason: 1} and meta["conversations"] == 2


def test_a_bad_transcript_is_named_by_file(profiles, tmp_path):
    path = tmp_path / "t.json"
    for turns, said, reason in (([], "the conversation is empty", "empty"),
                                ([{"user": "a", "reply": None}], "turn 1 has reply None, not a string",
                                 "content not a string")):
        path.write_text(json.dumps({"format": "quill-transcript", "version": 1, "turns": turns}), encoding="utf-8")
        (item,) = read_conversations(path)
        assert isinstance(item, BadConversation) and item.reason == reason
        assert item.message == f"transcript {str(path)!r}: {said}"


def test_a_template_without_a_model_prefix_or_a_tokenizer_without_an_end_is_refused(profiles, tmp_path):
    lines = jsonl(tmp_path / "c.jsonl", chat("a", "b"))
    with pytest.raises(QuillError, match="profile 'no-prefix' has no model prefix"):
        prepare_chat([lines], "no-prefix", tmp_path / "out")
    with pytest.raises(QuillError, match="tokenizer of profile 'no-eos' has no end-of-text token"):
        prepare_chat([lines], "no-eos", tmp_path / "out")


# --- fitting the context, and the validation split -----------------------------------------

def test_a_long_conversation_loses_its_oldest_turns_and_one_too_long_is_skipped(profiles, disk, tmp_path):
    template = ChatTemplate(system="A talk.\n", user_prefix="U: ", user_suffix="\n", model_prefix="M: ",
                            model_suffix="\n", stop=["\n"])
    turns = [("one", "first"), ("two", "second"), ("three", "third")]
    tok, limit = disk["tok"], SHORT_BLOCK + 1
    whole = "A talk.\nU: one\nM: first\nU: two\nM: second\nU: three\nM: third\n"
    last_two = "A talk.\nU: two\nM: second\nU: three\nM: third\n"
    assert len(last_two) + 1 <= limit < len(whole) + 1  # the last two turns fit, all three do not
    ids, mask, dropped = fit_conversation(template, Conversation(turns), tok, limit)
    assert tok.decode(ids) == last_two + "<eos>" and dropped == 1
    assert tok.decode([i for i, keep in zip(ids, mask) if keep]) == "second\nthird\n<eos>"
    assert fit_conversation(template, Conversation([("hi", "x" * 45)]), tok, limit) is None
    exact = Conversation([("hi", "x" * (limit - len("A talk.\nU: hi\nM: \n") - 1))])  # exactly the limit
    assert len(fit_conversation(template, exact, tok, limit)[0]) == limit

    lines = jsonl(tmp_path / "c.jsonl", chat(*(t for turn in turns for t in turn)), chat("hi", "x" * 45), chat("a", "b"))
    meta = prepare_chat([lines], "short", tmp_path / "out", val_fraction=0)
    assert (meta["truncated"], meta["skipped"], meta["conversations"]) == (1, {"too long": 1}, 2)
    assert meta["block_size"] == SHORT_BLOCK
    assert train_text(DataDir.open(tmp_path / "out"))[0] == last_two + "<eos>" + "A talk.\nU: a\nM: b\n<eos>"


def test_the_last_conversations_are_kept_for_validation(profiles, tmp_path):
    assert [val_count([5] * n, 0.1) for n in (0, 1, 2, 10, 25)] == [0, 0, 1, 1, 2]
    assert val_count([5] * 10, 0.0) == 0 and val_count([5] * 3, 0.9) == 2
    # Too few tokens for one window of the context: more conversations, up to a quarter of them.
    assert val_count([5] * 10, 0.1, min_tokens=12) == 2 and val_count([5] * 20, 0.1, min_tokens=100) == 5
    lines = jsonl(tmp_path / "c.jsonl", *(chat(f"q{i}", f"r{i}") for i in range(5)))
    meta = prepare_chat([lines], "tiny", tmp_path / "out")
    data = DataDir.open(tmp_path / "out")
    assert meta["val_conversations"] == 1  # a quarter of 5 is no more than the one asked for
    assert train_text(data, "val") == ("A talk.\nU: q4\nM: r4\n<eos>", "r4\n<eos>")
    assert train_text(data)[0].count("<eos>") == 4


# --- the command line ---------------------------------------------------------------------

def test_quill_prepare_chat_end_to_end(disk, tmp_path):
    env = {"QUILL_PROFILES": str(disk["profiles"])}
    lines = jsonl(tmp_path / "c.jsonl", chat("Hi", "Hello."), '{"messages": []}', chat("a", "b"), chat("c", "d"))
    out = tmp_path / "out"
    args = ("prepare", "--chat", str(lines), "--profile", "tiny", "--out", str(out), "--val-fraction", "0.3")
    message, hint = one_line_error(run_quill(*args, env=env))
    assert message == f"{str(lines)!r}, line 2: the conversation is empty" and "--skip-bad" in hint
    done = run_quill(*args, "--skip-bad", env=env)
    assert done.returncode == 0, done.stderr.decode()
    said = done.stdout.decode()
    assert "3 conversations (1 for validation)" in said and "skipped: 1 (1 empty)" in said and "truncated: 0" in said
    data = DataDir.open(out)
    end = 1  # the end-of-text token
    assert data.mask("train").tolist() == [False] * len("A talk.\nU: Hi\nM: ") + [True] * (len("Hello.\n") + end) + \
        [False] * len("A talk.\nU: a\nM: ") + [True] * (len("b\n") + end)
    assert train_text(data, "val") == ("A talk.\nU: c\nM: d\n<eos>", "d\n<eos>")
    trained = len("Hello.\n") + len("b\n") + len("d\n") + 3 * end
    assert f"{trained / (data.meta['train_tokens'] + data.meta['val_tokens']):.0%} of them the model's" in said

    message, hint = one_line_error(run_quill(*args, "--skip-bad", env=env))
    assert "already holds prepared data" in message and "--force" in hint
    assert run_quill(*args, "--skip-bad", "--force", env=env).returncode == 0
    message, _ = one_line_error(run_quill("prepare", "--chat", str(lines), "--out", str(out), env=env), code=2)
    assert message.startswith("--chat needs --profile NAME")


def test_prepare_help_names_the_chat_flags_and_imports_no_torch():
    code = ("import sys\nfrom tui.cli import main\ntry:\n    main(['prepare', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.stderr.decode().strip().splitlines()[-1] == "False"
    said = out.stdout.decode()
    assert all(flag in said for flag in ("--chat FILE", "--profile", "--skip-bad", "--force", "quill prepare --chat"))
