"""The chat session, in-process: streaming, provenance and replay, cancelling,
refusing a second reply, trimming old turns, settings, profiles, transcripts, compare.

One module fixture writes two tiny checkpoints and two profiles (`alpha`: short
replies ended by its template's stop strings; `beta`: another model whose replies
never stop by themselves, for cancelling). Every expected reply is worked out
independently with `generate_text` on the checkpoint, with the prompt built from
the profile's template.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import astuple
from types import SimpleNamespace

import pytest
import torch

import plugins.backends as backends
from gpt_runtime import commands
from gpt_runtime.backend import get_backend
from gpt_runtime.checkpoint import load_checkpoint
from gpt_runtime.errors import QuillError, UsageError
from gpt_runtime.generate import Done, Token, generate_text
from gpt_runtime.profiles import ChatTemplate
from gpt_runtime.sampling import build_chain
from gpt_runtime.session import ChatSession, Notice, Provenance, Turn
from helpers import CHAT_BLOCK, write_chat_models

BLOCK = CHAT_BLOCK
ALPHA_LIMIT = 10
ROOM = BLOCK - min(ALPHA_LIMIT, BLOCK // 4)  # what the session keeps for the prompt
ALPHA_OPTIONS = {"top_k": {"k": 20}, "temperature": {"t": 0.9}}
ALPHA_TEMPLATE = ChatTemplate(system="", user_prefix="A: ", user_suffix="\n", model_prefix="F: ", model_suffix="\n",
                              stop=["\n", "A:"])
# Messages use only characters of SAMPLE_TEXT: others become <unk> with a warning.
MESSAGES = ["Speak", "hear me speak", "You are all resolved", "First", "Resolved", "Before we proceed"]


@pytest.fixture(scope="module")
def m(tmp_path_factory, one_torch_thread) -> dict:
    info = write_chat_models(tmp_path_factory.mktemp("chat"))
    for name in ("a", "b"):
        ckpt = load_checkpoint(info[name])
        info[f"model_{name}"], info[f"tok_{name}"] = ckpt.model, ckpt.tokenizer
    info["sha_a"] = hashlib.sha256(info["a"].read_bytes()).hexdigest()[:16]
    info["sha_b"] = hashlib.sha256(info["b"].read_bytes()).hexdigest()[:16]
    return info


@pytest.fixture
def s(m, monkeypatch) -> ChatSession:
    """A session with profile alpha (profiles alpha and beta in QUILL_PROFILES)."""
    monkeypatch.setenv("QUILL_PROFILES", str(m["two"]))
    return ChatSession("alpha")


def expected(m, prompt: str, seed: int, chain: str = "top_k,temperature", options=ALPHA_OPTIONS,
             limit: int = ALPHA_LIMIT, model: str = "a", stop=ALPHA_TEMPLATE.stop) -> str:
    """The reply worked out without the session."""
    return generate_text(m[f"model_{model}"], m[f"tok_{model}"], prompt, chain=build_chain(chain, options), seed=seed,
                         max_new_tokens=limit, stop=stop).strip()


def history(session: ChatSession, first: int, index: int) -> list[tuple[str, str]]:
    return [(t.user, t.reply) for t in session.turns[first:index]]


def drain(events) -> list:
    return list(events)


# --- sending and provenance ---------------------------------------------------------------------

def test_the_suite_runs_sessions_on_the_cpu_even_where_a_gpu_is_available(m, monkeypatch):
    # conftest pins QUILL_DEVICE=cpu, so a machine with a GPU gets the expected texts worked out here
    monkeypatch.setattr(backends.CudaBackend, "is_available", lambda self: True)
    monkeypatch.setenv("QUILL_PROFILES", str(m["two"]))
    session = ChatSession("alpha")  # its profile says nothing of devices: `auto`
    assert session.loaded.device == "cpu" and next(session.loaded.model.parameters()).device.type == "cpu"
    done = drain(session.send("Speak"))[-1]
    assert session.turns[0].reply == expected(m, "A: Speak\nF: ", done.seed)
    monkeypatch.delenv("QUILL_DEVICE")
    assert get_backend("auto").name == "cuda"  # unpinned, this machine's `auto` would have been the GPU


def test_a_reply_streams_tokens_then_done_and_records_where_it_came_from(s, m):
    events = drain(s.send("Speak"))
    assert events and isinstance(events[-1], Done)
    assert all(isinstance(e, Token) for e in events[:-1])
    done = events[-1]
    turn, = s.turns
    assert turn.user == "Speak"
    assert turn.reply == "".join(e.text for e in events).strip()
    assert turn.reply == expected(m, "A: Speak\nF: ", done.seed)
    assert not any(stop in turn.reply for stop in ALPHA_TEMPLATE.stop)
    p = turn.provenance
    assert p == Provenance(profile="alpha", checkpoint=str(m["a"]), checkpoint_sha256=m["sha_a"], step=7,
                           tokenizer_fingerprint=m["fingerprint"], chain="top_k,temperature", options=ALPHA_OPTIONS,
                           seed=done.seed, max_new_tokens=ALPHA_LIMIT, first_turn=0, reason=done.reason,
                           new_tokens=done.new_tokens, tokens_per_second=round(done.tokens_per_second, 1),
                           template=vars(ALPHA_TEMPLATE), dtype="float32", quantize="none", path="float32")
    assert done.reason in ("stop", "eos", "length") and 0 <= done.seed < 2**63
    assert not s.busy


def test_every_reply_gets_a_new_random_seed_unless_one_is_set(s, m):
    for message in MESSAGES[:3]:
        drain(s.send(message))
    seeds = [t.provenance.seed for t in s.turns]
    assert len(set(seeds)) == 3
    assert s.set("seed", "1234") == "seed = 1234"
    drain(s.send("Speak"))
    drain(s.send("Speak"))
    assert [t.provenance.seed for t in s.turns[3:]] == [1234, 1234]
    assert s.turns[-1].provenance.tokens_per_second > 0 or s.turns[-1].provenance.new_tokens <= 1


def test_probabilities_come_with_the_tokens_when_asked_and_change_nothing(s):
    s.set("seed", "4")
    plain = drain(s.send("Speak"))
    s.undo()
    s.probs = 3
    shown = drain(s.send("Speak"))
    assert [e.text for e in shown] == [e.text for e in plain]  # the same reply
    tokens = [e for e in shown if isinstance(e, Token)]
    assert tokens and all(0 < t.prob <= 1 and len(t.top) == 3 for t in tokens)
    assert all(t.top[0][2] >= t.top[1][2] >= t.top[2][2] for t in tokens)
    assert all(t.prob is None for t in plain if isinstance(t, Token))


def test_the_speed_is_recorded(s):
    s.set("max_new_tokens", "40")
    s.set_chain("temperature")  # no stop until the limit or <eos>
    s.set("seed", "3")
    for _ in range(3):
        drain(s.send("Speak"))
        if s.turns[-1].provenance.new_tokens > 5:
            break
    p = s.turns[-1].provenance
    assert p.new_tokens > 5 and p.tokens_per_second > 0 and p.max_new_tokens == 40


# --- replay -------------------------------------------------------------------------------------

def test_replay_reproduces_each_reply_after_more_turns_and_other_settings(s):
    for message in MESSAGES[:3]:
        drain(s.send(message))
    replies = [t.reply for t in s.turns]
    provenances = [t.provenance for t in s.turns]
    assert len(set(replies)) > 1  # the model says different things
    for n in (1, 2, 3):
        assert s.replay(n) == (replies[n - 1], replies[n - 1])
    # other settings now: replay uses the ones in the provenance
    s.set("temperature", "0.3")
    s.set("max_new_tokens", "3")
    s.set("seed", "7")
    s.set_chain("greedy")
    drain(s.send(MESSAGES[3]))
    for n in (1, 2, 3):
        assert s.replay(n) == (replies[n - 1], replies[n - 1])
    assert s.replay(4) == (s.turns[3].reply, s.turns[3].reply)
    # the conversation itself is left as it was
    assert [t.reply for t in s.turns[:3]] == replies
    assert [t.provenance for t in s.turns[:3]] == provenances
    assert s.turns[3].provenance.chain == "greedy" and s.turns[3].provenance.max_new_tokens == 3


def test_replay_of_a_reply_that_is_not_there(s):
    with pytest.raises(QuillError, match="no replies to replay yet"):
        s.replay(1)
    drain(s.send("Speak"))
    for n in (0, 2, -1):
        with pytest.raises(QuillError) as exc:
            s.replay(n)
        assert (exc.value.message, exc.value.hint) == (f"there is no reply {n} to replay", "replies: 1 to 1")


# --- cancelling and refusing a second reply -----------------------------------------------------

def test_cancel_from_another_thread_stops_the_reply_and_the_chat_goes_on(s, m):
    s.use_profile("beta")
    s.set("max_new_tokens", "100000")  # far longer than the context: only cancel ends it
    events, started = [], threading.Event()

    def consume():
        for event in s.send("Speak"):
            events.append(event)
            started.set()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    assert started.wait(30)
    assert s.busy
    threading.Timer(0.05, s.cancel).start()
    worker.join(30)
    assert not worker.is_alive() and not s.busy
    done = events[-1]
    assert isinstance(done, Done) and done.reason == "cancelled"
    assert 1 <= done.new_tokens < 100000 and sum(isinstance(e, Token) for e in events) == done.new_tokens
    turn = s.turns[0]
    assert turn.reply == "".join(e.text for e in events).strip() and turn.reply
    assert turn.provenance.reason == "cancelled" and turn.provenance.new_tokens == done.new_tokens
    # a cancelled reply is replayed exactly: the same tokens, up to where it was stopped
    assert s.replay(1) == (turn.reply, turn.reply)
    # the chat goes on, and an old cancel does not stop the next reply
    s.set("max_new_tokens", "15")
    s.cancel()  # nothing streaming: forgotten when the next reply starts
    events = drain(s.send("hear me speak"))
    assert events[-1].reason == "length" and events[-1].new_tokens == 15
    assert len(s.turns) == 2 and s.turns[1].reply


def test_cancel_stops_a_compare_too(s):
    s.use_profile("beta")
    drain(s.send("Speak"))
    s.set("max_new_tokens", "100000")  # only cancel ends it in good time
    results = []
    worker = threading.Thread(target=lambda: results.extend(s.compare("greedy", "top_k,temperature")), daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while not s.busy and time.monotonic() < deadline:  # a cancel before the compare starts is forgotten
        time.sleep(0.01)
    time.sleep(0.2)
    s.cancel()
    worker.join(30)
    assert not worker.is_alive() and not s.busy and len(results) == 2
    assert all(len(side.text) < 5000 for side in results)  # far from 100,000 tokens each


def test_cancel_after_the_first_token_in_the_same_thread(s):
    s.use_profile("beta")
    s.set("max_new_tokens", "100000")
    events = s.send("Speak")
    first = next(events)
    assert isinstance(first, Token)
    t0 = time.perf_counter()
    s.cancel()
    rest = drain(events)
    assert time.perf_counter() - t0 < 2.0
    assert rest[-1].reason == "cancelled" and rest[-1].new_tokens == 1  # it stops before the next token
    assert s.turns[0].reply == "".join(e.text for e in [first, *rest]).strip()


def test_a_second_send_while_a_reply_streams_is_refused_never_interleaved(s):
    s.use_profile("beta")
    s.set("max_new_tokens", "100000")
    events = s.send("Speak")
    first = next(events)
    assert s.busy
    with pytest.raises(QuillError) as exc:
        s.send("hear me speak")
    assert exc.value.message == "a reply is still streaming; wait for it, or cancel it first"
    # nor anything else that would start a reply or change the conversation under it
    for action in (s.regenerate, lambda: s.replay(1), s.undo, s.clear, lambda: s.use_profile("alpha")):
        with pytest.raises(QuillError, match="a reply is still streaming"):
            action()
    assert [t.user for t in s.turns] == ["Speak"] and s.profile.name == "beta"
    s.cancel()
    rest = drain(events)
    assert rest[-1].reason == "cancelled"
    assert s.turns[0].reply == "".join(e.text for e in [first, *rest]).strip()
    s.set("max_new_tokens", "5")
    assert drain(s.send("hear me speak"))[-1].new_tokens == 5
    assert [t.user for t in s.turns] == ["Speak", "hear me speak"]


def test_the_session_is_busy_from_send_not_from_the_first_event(s):
    # a UI hands the stream to a worker; nothing may change the conversation before it starts
    events = s.send("Speak")
    assert s.busy
    for action in (lambda: s.send("again"), s.undo, s.clear, lambda: s.compare("greedy", "greedy")):
        with pytest.raises(QuillError, match="a reply is still streaming"):
            action()
    assert [t.user for t in s.turns] == ["Speak"]
    assert isinstance(drain(events)[-1], Done) and not s.busy
    # a stream closed (or dropped) before it was read frees the session
    events = s.regenerate()
    assert s.busy
    events.close()
    assert not s.busy
    del events
    s.send("hear me speak")  # dropped unread
    assert not s.busy


def test_settings_sent_while_a_profile_loads_are_refused_not_lost(s, monkeypatch):
    # They used to be reported as set, then overwritten by the profile that finished loading
    import gpt_runtime.session as session_module

    load, loading, go = session_module._load, threading.Event(), threading.Event()

    def slow_load(profile):
        loading.set()
        assert go.wait(30)
        return load(profile)

    monkeypatch.setattr(session_module, "_load", slow_load)
    switch = threading.Thread(target=s.use_profile, args=("beta",), daemon=True)
    switch.start()
    assert loading.wait(30)
    for action in (lambda: s.set("max_new_tokens", "3"), lambda: s.set("top_k.k", "2"), lambda: s.set_chain("greedy")):
        with pytest.raises(QuillError, match="a model is still loading"):
            action()
    go.set()
    switch.join(30)
    assert s.profile.name == "beta" and s.set("max_new_tokens", "3") == "max_new_tokens = 3"
    assert s.max_new_tokens == 3


def test_replies_do_not_hash_the_tokenizer_again(s, monkeypatch):
    # The fingerprint hashes the whole tokenizer (50,000 merges for GPT-2's): once per load
    tokenizer_class = type(s.loaded.tokenizer)
    hashed = []
    fingerprint = tokenizer_class.fingerprint
    monkeypatch.setattr(tokenizer_class, "fingerprint", property(lambda self: hashed.append(1) or fingerprint.fget(self)))
    first, second = drain(s.send("Speak"))[-1], drain(s.send("Speak on"))[-1]
    assert isinstance(first, Done) and isinstance(second, Done)
    assert hashed == [] and s.turns[1].provenance.tokenizer_fingerprint == fingerprint.fget(s.loaded.tokenizer)


def test_a_second_send_from_another_thread_while_streaming_is_refused(s):
    s.use_profile("beta")
    s.set("max_new_tokens", "100000")
    started, refused = threading.Event(), []

    def consume():
        for _ in s.send("Speak"):
            started.set()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    assert started.wait(30)
    try:
        s.send("hear me speak")
    except QuillError as exc:
        refused.append(exc.message)
    s.cancel()
    worker.join(30)
    assert refused == ["a reply is still streaming; wait for it, or cancel it first"]
    assert len(s.turns) == 1 and s.turns[0].provenance.reason == "cancelled"


# --- the context window --------------------------------------------------------------------------

def test_old_turns_leave_the_prompt_with_a_notice_and_the_prompt_fits(s, m):
    s.set("seed", "11")
    held_history = False
    told = 0
    for index, message in enumerate(MESSAGES):
        events = drain(s.send(message))
        text, first = s._prompt(index)
        assert first == s.turns[index].provenance.first_turn
        assert text == ALPHA_TEMPLATE.render(history(s, first, index), message)
        assert len(m["tok_a"].encode(text)) <= ROOM  # the prompt fits, with room for the reply
        if first > 0:  # and holds as much history as fits
            longer = ALPHA_TEMPLATE.render(history(s, first - 1, index), message)
            assert len(m["tok_a"].encode(longer)) > ROOM
        held_history |= 0 < first < index
        notices = [e for e in events if isinstance(e, Notice)]
        if first <= told:  # told once per turn that leaves, not again with every reply
            assert notices == []
        else:
            told = first
            what = ("the oldest turn no longer fits" if first == 1 else f"the {first} oldest turns no longer fit")
            it = "it" if first == 1 else "them"
            assert notices == [Notice(f"{what} in the context window ({BLOCK} tokens); the model no longer sees {it}")]
            assert isinstance(events[0], Notice)
        assert s.turns[index].reply == expected(m, text, 11)
    assert s.turns[-1].provenance.first_turn >= 2 and held_history
    # a reply whose oldest turns had left is replayed from the same, shorter history
    for n in range(1, len(MESSAGES) + 1):
        assert s.replay(n) == (s.turns[n - 1].reply, s.turns[n - 1].reply)


# --- settings ------------------------------------------------------------------------------------

def test_set_sampler_options_limits_and_seed(s):
    assert s.set("temperature", "0.5") == "temperature.t = 0.5"
    assert s.set("top_k", "5") == "top_k.k = 5"
    assert s.set("top_k.k", "7") == "top_k.k = 7"
    assert s.options == {"top_k": {"k": 7}, "temperature": {"t": 0.5}}
    assert s.set("max_new_tokens", "30") == "max_new_tokens = 30" and s.max_new_tokens == 30
    assert s.set("seed", "12") == "seed = 12" and s.seed == 12
    assert s.set("seed", str(2**64 - 1)) == f"seed = {2**64 - 1}"
    assert s.set("seed", "random") == "seed = random for each reply" and s.seed is None
    s.set_chain("top_k,top_p,temperature")
    assert s.set("top_p.p", "0.5") == "top_p.p = 0.5"
    assert s.options == {"top_k": {"k": 7}, "top_p": {"p": 0.5, "min_keep": 1}, "temperature": {"t": 0.5}}
    assert s.describe() == {"profile": "alpha", "checkpoint": str(s.profile.checkpoint), "step": 7,
                            "chain": "top_k,top_p,temperature", "options": s.options, "max_new_tokens": 30,
                            "seed": None, "device": "cpu", "dtype": "float32", "quantize": "none", "path": "float32"}


@pytest.mark.parametrize(("name", "value", "message"), [
    ("top_p.p", "0.5", "'top_p' is not in the sampler chain top_k,temperature"),
    ("bogus", "1", "there is no setting 'bogus'"),
    ("max_new_token", "1", "there is no setting 'max_new_token'"),
    ("top_k.x", "1", "sampler 'top_k' has no option 'x'"),
    ("temperature", "abc", "temperature.t must be a number, not 'abc'"),
    ("temperature", "-1", "temperature.t = -1.0 is out of range"),
    ("top_k", "0", "top_k.k = 0 is out of range"),
    ("max_new_tokens", "0", "max_new_tokens must be at least 1, not 0"),
    ("max_new_tokens", "many", "max_new_tokens must be a whole number, not 'many'"),
    ("max_new_tokens", "2.5", "max_new_tokens must be a whole number, not '2.5'"),
    ("seed", "-1", "seed must be from 0 to 2**64 - 1, not -1"),
    ("seed", str(2**64), f"seed must be from 0 to 2**64 - 1, not {2**64}"),
    ("seed", "lucky", "seed must be a whole number, not 'lucky'"),
])
def test_set_refuses_bad_names_and_values_and_changes_nothing(s, name, value, message):
    before = (s.chain, s.options, s.max_new_tokens, s.seed)
    with pytest.raises(QuillError) as exc:
        s.set(name, value)
    assert exc.value.message == message
    assert (s.chain, s.options, s.max_new_tokens, s.seed) == before


def test_set_chain_keeps_the_options_of_samplers_that_stay(s):
    s.set("top_k", "7")
    s.set("temperature", "0.5")
    s.set_chain("top_p,top_k,greedy")
    assert s.chain == "top_p,top_k,greedy"
    assert s.options == {"top_p": {"p": 0.95, "min_keep": 1}, "top_k": {"k": 7}, "greedy": {}}
    s.set_chain("top_k,temperature")  # temperature left the chain: its 0.5 is forgotten
    assert s.options == {"top_k": {"k": 7}, "temperature": {"t": 0.8}}
    with pytest.raises(UsageError, match="no sampler named 'tempurature'") as exc:
        s.set_chain("top_k,tempurature")
    assert exc.value.hint == "did you mean 'temperature'?"
    assert (s.chain, s.options) == ("top_k,temperature", {"top_k": {"k": 7}, "temperature": {"t": 0.8}})


def test_use_profile_switches_the_model_and_keeps_the_conversation(s, m):
    drain(s.send("Speak"))
    first = s.turns[0]
    s.set("temperature", "0.2")
    s.use_profile("beta")
    assert (s.profile.name, s.loaded.step, s.loaded.sha256) == ("beta", 9, m["sha_b"])
    assert (s.chain, s.options, s.max_new_tokens, s.seed) == (
        "logit_bias,top_k,temperature", {"logit_bias": {"bias": "3:-inf"}, "top_k": {"k": 30}, "temperature": {"t": 0.8}},
        20, 42)
    assert s.turns == [first]
    drain(s.send("hear me speak"))
    p = s.turns[1].provenance
    assert (p.profile, p.checkpoint, p.checkpoint_sha256, p.step, p.seed) == ("beta", str(m["b"]), m["sha_b"], 9, 42)
    beta = ChatTemplate(user_prefix="You: ", user_suffix="\n", model_prefix="Bot: ", model_suffix="\n", stop=["@"])
    assert s.turns[1].reply == expected(m, beta.render(history(s, p.first_turn, 1), "hear me speak"), 42,
                                        "logit_bias,top_k,temperature", s.options, 20, "b", ["@"])
    # reply 1 came from alpha's checkpoint: replaying it needs alpha
    with pytest.raises(QuillError) as exc:
        s.replay(1)
    assert exc.value.message == f"reply 1 came from another checkpoint ({m['a']})"
    assert exc.value.hint == "switch to its profile first: /profile alpha"
    assert s.replay(2) == (s.turns[1].reply, s.turns[1].reply)
    with pytest.raises(QuillError) as exc:
        s.use_profile("gamma")
    assert (exc.value.message, exc.value.hint) == ("no profile named 'gamma'", "profiles: alpha, beta")
    assert s.profile.name == "beta" and len(s.turns) == 2
    s.use_profile("alpha")
    assert s.replay(1) == (first.reply, first.reply)
    assert s.options == ALPHA_OPTIONS  # the profile's own settings come back


# --- regenerate, undo, clear ---------------------------------------------------------------------

def test_regenerate_undo_and_clear(s, m):
    with pytest.raises(QuillError, match="nothing to regenerate yet"):
        s.regenerate()
    with pytest.raises(QuillError, match="nothing to undo"):
        s.undo()
    drain(s.send("Speak"))
    drain(s.send("hear me speak"))
    old = s.turns[1].provenance
    events = drain(s.regenerate())
    assert isinstance(events[-1], Done) and len(s.turns) == 2
    new = s.turns[1].provenance
    assert new.seed == events[-1].seed != old.seed  # a new random seed
    assert s.turns[1].reply == expected(m, ALPHA_TEMPLATE.render(history(s, new.first_turn, 1), "hear me speak"), new.seed)
    s.set("seed", "5")
    drain(s.regenerate())
    fixed = s.turns[1].reply
    drain(s.regenerate())
    assert s.turns[1].reply == fixed and s.turns[1].provenance.seed == 5  # a fixed seed: the same reply
    turn = s.undo()
    assert isinstance(turn, Turn) and turn.user == "hear me speak" and turn.reply == fixed
    assert [t.user for t in s.turns] == ["Speak"]
    s.set("temperature", "0.4")
    s.clear()
    assert s.turns == [] and s.seed == 5 and s.options["temperature"] == {"t": 0.4}
    with pytest.raises(QuillError, match="nothing to regenerate yet"):
        s.regenerate()


# --- transcripts ---------------------------------------------------------------------------------

def test_save_json_and_load_round_trip_keeps_provenance(s, m, tmp_path, monkeypatch):
    for message in MESSAGES[:3]:
        drain(s.send(message))
    path = s.save(tmp_path / "chat.json")
    assert path == tmp_path / "chat.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert (data["format"], data["version"], data["profile"]) == ("quill-transcript", 2, "alpha")
    assert [t["user"] for t in data["turns"]] == MESSAGES[:3]
    assert data["turns"][0]["provenance"]["checkpoint_sha256"] == m["sha_a"]
    other = ChatSession("beta")
    drain(other.send("Resolved"))
    assert other.load(path) == 3
    assert other.turns == s.turns  # users, replies and provenance, field by field
    other.use_profile("alpha")
    assert other.replay(2) == (s.turns[1].reply, s.turns[1].reply)  # the provenance still replays
    drain(other.send("First"))
    assert len(other.turns) == 4


def test_save_markdown_shows_the_provenance(s, m, tmp_path):
    s.set("seed", "77")
    drain(s.send("Speak"))
    drain(s.send("hear me speak"))
    text = s.save(tmp_path / "chat.md").read_text(encoding="utf-8")
    t1, t2 = s.turns
    assert text.startswith("# Quill chat with alpha\n\n**You (1):** Speak\n\n" f"**alpha:** {t1.reply}\n\n")
    assert "**You (2):** hear me speak" in text and f"**alpha:** {t2.reply}" in text
    p = t1.provenance
    assert (f"<sub>checkpoint {m['a']} (sha256 {m['sha_a']}, step 7), tokenizer {m['fingerprint']}, "
            f"chain top_k,temperature (top_k k=20; temperature t=0.9), seed 77, {p.new_tokens} tokens at "
            f"{p.tokens_per_second:g} tokens/s, ended by {p.reason}</sub>") in text
    assert text.count("<sub>checkpoint") == 2


def test_loading_something_that_is_not_a_json_transcript_is_a_clear_error(s, tmp_path):
    drain(s.send("Speak"))
    before = list(s.turns)
    s.save(tmp_path / "chat.md")
    with pytest.raises(QuillError) as exc:
        s.load(tmp_path / "chat.md")
    assert exc.value.message.startswith(f"transcript {str(tmp_path / 'chat.md')!r} is not a Quill JSON transcript (")
    assert exc.value.hint == "load a .json transcript written by /save FILE.json"
    for name, content, why in [
        ("other.json", '{"format": "something-else", "turns": []}', "not a Quill transcript"),
        ("list.json", "[1, 2]", "not a Quill transcript"),
        ("short.json", '{"format": "quill-transcript", "turns": [{"user": "x"}]}', "'reply'"),
        ("odd.json", '{"format": "quill-transcript", "turns": [{"user": "x", "reply": "y", "provenance": {"a": 1}}]}',
         "unexpected keyword argument 'a'"),
        ("cut.json", '{"format": "quill-tr', "Unterminated string"),
    ]:
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(QuillError) as exc:
            s.load(tmp_path / name)
        assert exc.value.message.startswith(f"transcript {str(tmp_path / name)!r} is not a Quill JSON transcript (")
        assert why in exc.value.message and exc.value.hint is None
    with pytest.raises(QuillError, match="does not exist"):
        s.load(tmp_path / "missing.json")
    with pytest.raises(QuillError, match="cannot write"):
        s.save(tmp_path / "chat.md" / "chat.json")  # inside a file
    assert s.turns == before  # nothing was replaced


# --- compare -------------------------------------------------------------------------------------

def test_compare_runs_the_last_message_through_two_chains_with_one_seed(s, m):
    with pytest.raises(QuillError, match="say something first"):
        s.compare("greedy", "greedy")
    drain(s.send("Speak"))
    drain(s.send("hear me speak"))
    turns = [(t.user, t.reply, t.provenance) for t in s.turns]
    # a random seed, drawn once: the same sampling chain twice gives the same text
    one, two = s.compare("top_k,temperature", "top_k,temperature")
    assert one.side == two.side == "top_k,temperature" and one.text == two.text and one.seed == two.seed
    # (a random seed may end the reply at its first token: no text, and no speed to speak of)
    assert all(side.tokens_per_second > 0 for side in (one, two) if side.text)
    greedy = [(side.side, side.text) for side in s.compare("greedy", "top_k,greedy")]
    prompt, _ = s._prompt(1)
    want = expected(m, prompt, 0, "greedy", {})
    assert greedy == [("greedy", want), ("top_k,greedy", want)]
    # with a fixed seed, the current chain gives exactly what send gives
    s.set("seed", "9")
    s.set("temperature", "1.5")
    drain(s.send("Resolved"))
    prompt, _ = s._prompt(2)
    assert [(side.side, side.text) for side in s.compare("top_k,temperature", "temperature")] == [
        ("top_k,temperature", s.turns[2].reply),
        ("temperature", expected(m, prompt, 9, "temperature", {"temperature": {"t": 1.5}}))]
    assert [(t.user, t.reply, t.provenance) for t in s.turns[:2]] == turns and len(s.turns) == 3
    with pytest.raises(QuillError, match="no sampler named 'nope'"):
        s.compare("greedy", "nope")


def test_compare_two_profiles_each_with_its_model_chain_and_template(s, m):
    s.set("seed", "5")
    drain(s.send("Speak"))
    (a, text_a, seed_a, _), (b, text_b, seed_b, _) = [astuple(side) for side in s.compare("profile:alpha", "profile:beta")]
    assert seed_a == seed_b == 5
    assert (a, b) == ("profile:alpha", "profile:beta")
    assert text_a == s.turns[0].reply  # alpha is the current profile: the same reply as send gave
    beta_prompt = ChatTemplate(user_prefix="You: ", user_suffix="\n", model_prefix="Bot: ", model_suffix="\n",
                               stop=["@"]).render([], "Speak")
    assert text_b == expected(m, beta_prompt, 5, "logit_bias,top_k,temperature",
                              {"logit_bias": {"bias": "3:-inf"}, "top_k": {"k": 30}}, model="b", stop=["@"])
    assert s.profile.name == "alpha" and len(s.turns) == 1  # nothing changed
    with pytest.raises(QuillError, match="no profile named 'gamma'"):
        s.compare("greedy", "profile:gamma")


PLAY_TOML = r'''checkpoint = "../models/a.safetensors"
[sampler]
chain = "temperature"
[generation]
max_new_tokens = 12
seed = 3
[template]
user_prefix = "{user}:\n"
user_suffix = "\n\n"
model_prefix = "{model}:\n"
model_suffix = "\n\n"
stop = ["\n\n", "\n{user}:"]
user_name = "First"
model_name = "All"
'''


def test_speakers_names_fill_the_template_and_can_be_changed_mid_chat(m, monkeypatch, tmp_path):
    folder = tmp_path / "profiles"
    (folder / "play").mkdir(parents=True)  # a profile in a folder of its own: NAME/profile.toml
    (folder / "play" / "profile.toml").write_text(PLAY_TOML.replace("../models/a.safetensors", str(m["a"])))
    monkeypatch.setenv("QUILL_PROFILES", str(folder))
    s = ChatSession("play")
    assert s.profile.name == "play"
    drain(s.send("Speak"))
    assert s._prompt(0)[0] == "First:\nSpeak\n\nAll:\n"
    assert s.turns[0].reply == expected(m, "First:\nSpeak\n\nAll:\n", 3, "temperature", {}, 12,
                                        stop=["\n\n", "\nFirst:"])
    assert s.set("user_name", " Citizen ") == "user_name = Citizen"
    assert s.set("model_name", "Before") == "model_name = Before"
    assert "speakers    you are Citizen, the model is Before" in commands.run(s, "/show")
    drain(s.send("hear me speak"))
    want = f"Citizen:\nSpeak\n\nBefore:\n{s.turns[0].reply}\n\nCitizen:\nhear me speak\n\nBefore:\n"
    assert s._prompt(1, first_turn=0)[0] == want
    want = s._prompt(1)[0]  # what fits the 64-token context
    assert want.endswith("Citizen:\nhear me speak\n\nBefore:\n")
    assert s.turns[1].reply == expected(m, want, 3, "temperature", {}, 12, stop=["\n\n", "\nCitizen:"])
    assert s.turns[1].provenance.template["user_name"] == "Citizen"
    # a replay uses the names the reply was made with, whatever they are now
    s.set("user_name", "Speak")
    assert commands.run(s, "/replay 2") == "reply 2 replayed: identical"
    for bad in ("", "two\nlines"):
        with pytest.raises(QuillError, match="user_name must be one line of text"):
            s.set("user_name", bad)
    # names in a template without placeholders change nothing, and say so
    monkeypatch.setenv("QUILL_PROFILES", str(m["two"]))
    s.use_profile("alpha")
    assert s.set("user_name", "X") == "user_name = X (this profile's template does not use the names)"
    assert "speakers" not in commands.run(s, "/show")


def test_the_templates_stop_strings_end_replies_and_are_not_part_of_them(s):
    s.set_chain("temperature")
    s.set("temperature", "1.5")
    s.set("max_new_tokens", "16")
    reasons = set()
    for seed in range(8):
        s.set("seed", str(seed))
        events = drain(s.send("Speak"))
        raw = "".join(e.text for e in events)
        assert "\n" not in raw and "A:" not in raw
        assert s.turns[-1].reply == raw.strip()
        reasons.add(events[-1].reason)
        s.clear()
    assert "stop" in reasons



def test_a_reply_leaves_a_core_to_each_running_job(s, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    torch.set_num_threads(4)
    try:
        running = SimpleNamespace(status="running")
        s.jobs._jobs = {1: running, 2: SimpleNamespace(status="finished")}
        drain(s.send("First"))
        assert torch.get_num_threads() == 3  # one job running: one core left to it
        running.status = "finished"
        drain(s.send("Second"))
        assert torch.get_num_threads() == 4  # back to what it was
    finally:
        s.jobs._jobs = {}
        torch.set_num_threads(1)


def test_a_cancel_between_send_and_the_first_token_is_kept(s):
    events = s.send("Speak")  # not started yet
    s.cancel()
    done = drain(events)[-1]
    assert done.reason == "cancelled" and done.new_tokens == 0


def test_replay_uses_the_template_the_reply_was_made_with(s, m):
    s.set("seed", "3")
    drain(s.send("Speak"))
    reply = s.turns[0].reply
    s.profile.template.user_prefix = "Someone else: "  # the profile's template changes afterwards
    try:
        assert s.replay(1) == (reply, reply)
    finally:
        s.profile.template.user_prefix = "A: "
