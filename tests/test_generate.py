"""The generation engine, in-process: KV cache, text streaming, `generate`, batches, beams, inference setup.

Real (tiny, untrained) GPTs check that the KV cache changes nothing; hand-built
stand-in models whose logits are a fixed table check the engine's logic with
values worked out by hand.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from generation_helpers import ARCHITECTURES, BANNED, BLOCK, cancelled_after, greedy_without_eos, ids_of, run, tiny_gpt
from gpt_runtime import plugins as host_mod
from gpt_runtime.errors import QuillError, QuillWarning
from gpt_runtime.generate import (Done, TextStream, Token, Window, _beam_search, generate, generate_batch, generate_text,
                                  prompt_ids)
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime import inference
from gpt_runtime.inference import Bf16Linear, bf16_packing_unavailable, cache_dtype, prepare_model
from gpt_runtime.model import GPT, GPTConfig, KVCache
from gpt_runtime.sampling import Option, Sampler, SamplerError, build_chain
from helpers import SAMPLE_TEXT
from plugins import backends
from plugins.bpe_tokenizer import BPETokenizer
from plugins.char_tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train(SAMPLE_TEXT)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return tiny_gpt(tok.vocab_size)


def text_of(tokens: list[Token], done: Done) -> str:
    return "".join(t.text for t in tokens) + done.text


def greedy() -> object:
    return build_chain("greedy")


class TableModel(nn.Module):
    """A stand-in GPT whose next-token logits depend only on the last token: row `last` of `table`."""

    def __init__(self, table: torch.Tensor, block_size: int = 64) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone().float(), requires_grad=False)
        self.config = GPTConfig(vocab_size=table.size(-1), block_size=block_size, n_layer=0, n_head=1, n_embd=1)
        self.inputs: list[list[list[int]]] = []

    def forward(self, idx, targets=None, cache=None):
        self.inputs.append(idx.tolist())
        if cache is not None:
            cache.length += idx.size(1)
        return self.table[idx[:, -1]][:, None, :], None


def fixed_logits(logits: torch.Tensor, **options) -> TableModel:
    """A stand-in whose logits are always `logits`, whatever the context."""
    return TableModel(logits.expand(len(logits), -1), **options)


# --- the KV cache changes nothing ---------------------------------------------------------------------

@pytest.mark.parametrize("position,norm", ARCHITECTURES)
def test_greedy_with_the_cache_equals_recomputing_the_whole_context(tok, position, norm):
    model = tiny_gpt(tok.vocab_size, position=position, norm=norm)
    prompt = tok.encode("First Citizen")
    n = BLOCK - len(prompt) + 1  # the longest run that never needs to drop context
    tokens, done = run(model, tok, prompt, chain=greedy_without_eos(tok), max_new_tokens=n)
    banned = [tok.special_tokens[name] for name in (*BANNED, "<eos>")]
    context, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([context[-BLOCK:]]))[0][0, -1]
            logits[banned] = float("-inf")
            expected.append(int(logits.argmax()))
            context.append(expected[-1])
    assert ids_of(tokens) == expected
    assert done.reason == "length" and done.new_tokens == n
    assert len(set(expected)) > 3  # a varied sequence, not one token repeated


@pytest.mark.parametrize("position,norm", ARCHITECTURES)
def test_a_cache_fed_in_chunks_gives_the_plain_forward_logits(position, norm):
    model = tiny_gpt(40, seed=1, position=position, norm=norm, mlp="swiglu")
    idx = torch.randint(40, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    ends = [5, 8, 11, 14, *range(15, 25)]  # a prefill, chunks of 3 (start > 0, T > 1: the masked path), then 1 at a time
    start = 0
    with torch.no_grad():
        for end in ends:
            cached, _ = model(idx[:, start:end], cache=cache)
            plain, _ = model(idx[:, :end])
            assert cached.shape == (2, 1, 40) and cache.length == end
            torch.testing.assert_close(cached, plain[:, -1:], atol=1e-5, rtol=1e-5)
            start = end
        with pytest.raises(QuillError, match="sequence of 33 tokens is longer than the context window"):
            model(idx[:, :9], cache=cache)  # 24 cached + 9


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_after_the_window_slides_its_logits_are_a_plain_forward_over_the_tokens_kept(tok, position):
    model = tiny_gpt(tok.vocab_size, position=position)
    ids = tok.encode(SAMPLE_TEXT[:BLOCK])
    window = Window(model, ids, 1)
    assert window.cache.length == BLOCK
    keep = BLOCK - BLOCK // 4
    with torch.no_grad():
        window.append(torch.tensor([7]))  # the cache is full: the oldest quarter goes
        assert window.cache.length == keep and window.tokens[0].tolist() == ids + [7]
        torch.testing.assert_close(window.logits, model(window.tokens[:, -keep:])[0][:, -1], atol=1e-5, rtol=1e-5)
        for token in (9, 11):  # and decoding goes on from the rebuilt cache
            window.append(torch.tensor([token]))
        assert window.cache.length == keep + 2
        torch.testing.assert_close(window.logits, model(window.tokens[:, -(keep + 2):])[0][:, -1], atol=1e-5, rtol=1e-5)


def test_rows_that_share_a_prompt_run_it_once(model, tok):
    prompt = tok.encode("First Citizen")
    seen = []  # the (batch, tokens) shape of every forward call
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        # Only the prompt goes through forward; each step runs decode.Step, for all rows at once
        batch = generate_batch(model, tok, prompt, 4, chain=greedy_without_eos(tok), max_new_tokens=5)
        assert seen == [(1, len(prompt))] and len(batch.texts) == 4
        seen.clear()
        chain = build_chain("logit_bias,beam", {"logit_bias": {"bias": f"{tok.special_tokens['<eos>']}:-inf"},
                                                "beam": {"num_beams": 3}})
        run(model, tok, prompt, chain=chain, max_new_tokens=5)
        assert seen == [(1, len(prompt))]
    finally:
        hook.remove()


def test_a_window_copies_its_prefill_to_every_row_and_the_rows_then_go_their_own_ways(model, tok):
    ids = tok.encode("First Citizen")
    with torch.no_grad():
        one, three = Window(model, ids, 1), Window(model, ids, 3)
        assert torch.equal(three.logits, one.logits.expand(3, -1)) and torch.equal(three.tokens, one.tokens.expand(3, -1))
        assert torch.equal(three.cache.kv, one.cache.kv.expand(-1, -1, 3, -1, -1, -1))
        three.append(torch.tensor([7, 9, 11]))  # each row writes its own copy of the cache
        for row, token in enumerate((7, 9, 11)):
            alone = Window(model, ids + [token], 1)
            assert three.tokens[row].tolist() == ids + [token]
            torch.testing.assert_close(three.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_generation_goes_on_past_the_context_window(model, tok):
    n = 3 * BLOCK
    tokens, done = run(model, tok, "First", chain=greedy_without_eos(tok), max_new_tokens=n)
    assert len(tokens) == n and done.reason == "length" and done.prompt_tokens == 5
    tokens, done = run(model, tok, "First", max_new_tokens=n, seed=0)  # sampling, too
    assert done.reason == "eos" or len(tokens) == n


# --- TextStream ------------------------------------------------------------------------------------------

def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(piece) for piece in pieces]


def test_a_stop_string_split_across_tokens_is_caught_and_never_shown():
    stream = TextStream(["END"])
    assert feed_all(stream, [b"the E", b"N", b"D of it"]) == ["the ", "", ""]
    assert stream.matched == "END" and stream.flush() == ""


def test_text_that_only_looks_like_a_stop_string_is_released_when_it_diverges():
    stream = TextStream(["END"])
    assert feed_all(stream, [b"E", b"N", b"d", b"!"]) == ["", "", "ENd", "!"]
    assert stream.matched is None
    stream = TextStream(["END"])  # the held "E" goes out once a second "E" restarts the match
    assert feed_all(stream, [b"E", b"E", b"N", b"D"]) == ["", "E", "", ""]
    assert stream.matched == "END"


def test_the_earliest_of_several_stop_strings_wins():
    stream = TextStream(["b", "\n\n", ""])  # an empty stop string is ignored
    assert stream.feed(b"a\n\nb") == "a" and stream.matched == "\n\n"
    stream = TextStream(["xyz", "yq"])
    assert feed_all(stream, [b"-xy", b"q"]) == ["-", "x"] and stream.matched == "yq"


def test_multibyte_characters_split_across_tokens():
    tok = BPETokenizer([])  # bytes only: every multi-byte character spans several tokens
    text = "é😀 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    stream = TextStream()
    out = [stream.feed(tok.pieces[i]) for i in ids]
    assert out == ["", "é", "", "", "", "😀", " ", "o", "k"]
    assert stream.flush() == ""
    stream = TextStream(["😀 o"])  # a stop string with a multi-byte character, caught byte by byte
    out = []
    for i in ids:
        out.append(stream.feed(tok.pieces[i]))
        if stream.matched:
            break
    assert "".join(out) == "é" and len(out) == 8


def test_flush_releases_what_was_held_back():
    stream = TextStream(["END"])
    assert stream.feed(b"ab EN") == "ab "
    assert stream.flush() == "EN"
    stream = TextStream()
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.flush() == "\ufffd"  # a character cut off at the very end


# --- generate() -------------------------------------------------------------------------------------------

def test_stop_strings_end_generation_and_are_never_emitted(model, tok):
    full = generate_text(model, tok, "First", chain=greedy(), max_new_tokens=30)
    assert len(full) == 30
    stop = full[10:13]
    at = full.find(stop)
    assert at >= 5
    tokens, done = run(model, tok, "First", chain=greedy(), max_new_tokens=30, stop=["never said", stop])
    assert text_of(tokens, done) == full[:at]
    assert done.reason == "stop" and done.stop == stop
    assert ids_of(tokens) == tok.encode(full[:at + len(stop)])  # every token, the stop string's own included
    assert all(t.text == "" for t in tokens[at:])


def test_eos_ends_generation():
    tok = CharTokenizer(list("abcdef"))
    eos = tok.special_tokens["<eos>"]
    logits = torch.zeros(tok.vocab_size)
    logits[eos] = 5.0
    tokens, done = run(fixed_logits(logits), tok, "ab", chain=greedy(), max_new_tokens=10)
    assert tokens == [] and done.reason == "eos" and done.new_tokens == 0 and done.text == ""
    logits[eos] = 1.0  # p(eos) = e / (e + 6): sampled runs end there sooner or later
    for seed in range(3):
        tokens, done = run(fixed_logits(logits), tok, "ab", chain=build_chain("temperature", {"temperature": {"t": 1}}),
                           max_new_tokens=200, seed=seed)
        assert done.reason == "eos" and len(tokens) < 200 and eos not in ids_of(tokens)


def test_special_tokens_are_never_sampled(tok):
    specials = tok.special_tokens
    logits = torch.zeros(tok.vocab_size)
    for name in BANNED:  # by far the likeliest, yet never to be produced
        logits[specials[name]] = 50.0
    logits[specials["<eos>"]] = -50.0
    chain = build_chain("temperature", {"temperature": {"t": 1}})
    tokens, done = run(fixed_logits(logits), tok, "All", chain=chain, max_new_tokens=200, seed=0)
    ids = ids_of(tokens)
    assert len(ids) == 200 and not set(ids) & set(specials.values())
    assert len(set(ids)) > (tok.vocab_size - 4) // 2  # the rest are equally likely: sampling reaches most of them
    logits[tok.stoi["k"]] = 3.0
    tokens, _ = run(fixed_logits(logits), tok, "All", chain=greedy(), max_new_tokens=5)
    assert text_of(tokens, _) == "kkkkk"


def test_zero_and_one_new_tokens(model, tok):
    tokens, done = run(model, tok, "First", max_new_tokens=0, seed=1)
    assert tokens == [] and done.reason == "length" and done.new_tokens == 0
    assert done.prompt_tokens == 5 and done.first_token_seconds is None and done.tokens_per_second == 0.0
    tokens, done = run(model, tok, "First", chain=greedy(), max_new_tokens=1)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("First")]))[0][0, -1]
    logits[[tok.special_tokens[n] for n in BANNED]] = float("-inf")
    assert ids_of(tokens) == [int(logits.argmax())] and done.reason == "length" and done.new_tokens == 1
    assert done.first_token_seconds is not None
    with pytest.raises(QuillError, match="max_new_tokens must be 0 or more, not -1"):
        list(generate(model, tok, "First", max_new_tokens=-1))


def test_an_empty_prompt_starts_from_bos(model, tok):
    bos = tok.special_tokens["<bos>"]
    tokens, done = run(model, tok, "", chain=greedy(), max_new_tokens=10)
    assert done.prompt_tokens == 1
    assert ids_of(tokens) == ids_of(run(model, tok, [bos], chain=greedy(), max_new_tokens=10)[0])
    stand_in = fixed_logits(torch.zeros(tok.vocab_size))
    run(stand_in, tok, "", max_new_tokens=2, seed=0)
    assert stand_in.inputs[0] == [[bos]]


def test_an_empty_prompt_without_bos_starts_from_eos_or_id_0():
    tok = CharTokenizer(list("ab"))
    tok.special_tokens = {"<pad>": 0, "<unk>": 1, "<eos>": 3}
    assert prompt_ids(tok, "") == [3] and prompt_ids(tok, "ba") == [5, 4]
    tok.special_tokens = {"<pad>": 0}
    assert prompt_ids(tok, "") == [0]


def test_a_prompt_longer_than_the_context_keeps_its_end(model, tok):
    ids = tok.encode(SAMPLE_TEXT[:50])
    with pytest.warns(QuillWarning, match=r"the prompt is 50 tokens, longer than the context window \(32\); "
                                          r"its first 18 tokens were dropped"):
        tokens, done = run(model, tok, SAMPLE_TEXT[:50], chain=greedy(), max_new_tokens=8)
    assert done.prompt_dropped == 18 and done.prompt_tokens == BLOCK
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuillWarning)  # a prompt that fits: no warning
        expected, fitting = run(model, tok, ids[-BLOCK:], chain=greedy(), max_new_tokens=8)
    assert ids_of(tokens) == ids_of(expected) and fitting.prompt_dropped == 0


def test_prompt_ids_outside_the_vocabulary_are_an_error(model, tok):
    for bad in ([5, tok.vocab_size], [-1, 5]):
        with pytest.raises(QuillError, match=rf"token ids outside the model's vocabulary \(0..{tok.vocab_size - 1}\)"):
            list(generate(model, tok, bad))
    with pytest.raises(QuillError, match="the prompt has no tokens"):
        list(generate(model, tok, []))


def test_probs_are_the_models_softmax_without_the_never_produced_tokens(model, tok):
    chain = lambda: build_chain("top_k,temperature", {"top_k": {"k": 5}, "temperature": {"t": 0.5}})  # noqa: E731
    tokens, _ = run(model, tok, "First", chain=chain(), max_new_tokens=6, seed=2, probs=3)
    context = tok.encode("First")
    never = [tok.special_tokens[n] for n in ("<pad>", "<unk>", "<bos>")]
    for token in tokens:
        with torch.no_grad():
            logits = model(torch.tensor([context]))[0][0, -1]
        logits[never] = float("-inf")
        probs = logits.softmax(dim=-1)  # before the chain: no top-k, no temperature
        values, top_ids = probs.topk(3)
        assert token.prob == pytest.approx(float(probs[token.id]), abs=1e-6)
        assert [i for i, _, _ in token.top] == top_ids.tolist()
        assert [p for _, _, p in token.top] == pytest.approx(values.tolist(), abs=1e-6)
        assert [text for _, text, _ in token.top] == [tok.pieces[i].decode() for i in top_ids.tolist()]
        context.append(token.id)
    without, _ = run(model, tok, "First", chain=chain(), max_new_tokens=6, seed=2)
    assert ids_of(without) == ids_of(tokens) and all(t.prob is None and t.top is None for t in without)
    with pytest.raises(QuillError, match="probs must be a whole number, 0 or more, not -1"):
        generate(model, tok, "First", probs=-1)


# --- cancelling from another thread ---------------------------------------------------------------------

def test_cancel_set_by_another_thread_stops_within_one_token(model, tok):
    *tokens, done = cancelled_after(model, tok, 4)
    assert 4 <= len(tokens) <= 5
    assert done.reason == "cancelled" and done.new_tokens == len(tokens)


def test_a_timer_cancels_a_running_generation(tok):
    class Slow(TableModel):
        def forward(self, idx, targets=None, cache=None):
            time.sleep(0.002)  # a few ms per token, so the timer fires mid-generation
            return super().forward(idx, targets, cache)

    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    table[:, tok.stoi["a"]] = 1.0
    cancel = threading.Event()
    timer = threading.Timer(0.05, cancel.set)
    after_cancel = 0
    timer.start()
    try:
        for event in generate(Slow(table), tok, "All", chain=greedy(),
                              max_new_tokens=100_000, cancel=cancel):
            if isinstance(event, Token) and cancel.is_set():
                after_cancel += 1
    finally:
        timer.cancel()
    assert event.reason == "cancelled" and 0 < event.new_tokens < 100_000
    assert after_cancel <= 1


def test_cancel_set_before_the_start(model, tok):
    cancel = threading.Event()
    cancel.set()
    tokens, done = run(model, tok, "First", max_new_tokens=10, cancel=cancel)
    assert tokens == [] and done.reason == "cancelled"
    tokens, done = run(model, tok, "First", chain=build_chain("beam"), max_new_tokens=10, cancel=cancel)
    assert tokens == [] and done.reason == "cancelled"


# --- seeds and batches ---------------------------------------------------------------------------------------

def hot() -> object:
    return build_chain("top_k,top_p,temperature", {"temperature": {"t": 1.5}})


def test_a_seed_replays_a_generation(model, tok):
    def sample(seed):
        tokens, done = run(model, tok, "First", chain=hot(), max_new_tokens=30, seed=seed)
        return ids_of(tokens), done

    (a, done), (b, _), (c, _) = sample(3), sample(3), sample(4)
    assert a == b and a != c and done.seed == 3
    unseeded, done = sample(None)
    assert isinstance(done.seed, int) and sample(done.seed)[0] == unseeded


def test_generate_batch_rows(model, tok):
    batch = generate_batch(model, tok, "First", 4, chain=hot(), max_new_tokens=20, seed=3)
    rows = batch.texts
    assert len(rows) == 4 and len(set(rows)) > 1 and batch.seed == 3
    assert generate_batch(model, tok, "First", 4, chain=hot(), max_new_tokens=20, seed=3).texts == rows
    assert generate_batch(model, tok, "First", 4, chain=hot(), max_new_tokens=20, seed=4).texts != rows
    assert all(set(row) <= set(tok.chars) for row in rows)
    unseeded = generate_batch(model, tok, "First", 2, chain=hot(), max_new_tokens=20)
    assert generate_batch(model, tok, "First", 2, chain=hot(), max_new_tokens=20, seed=unseeded.seed).texts == unseeded.texts
    text = generate_text(model, tok, "First", chain=greedy(), max_new_tokens=20)
    assert len(text) == 20
    assert generate_batch(model, tok, "First", 3, chain=greedy(), max_new_tokens=20).texts == [text] * 3
    stop = text[8:11]
    assert generate_batch(model, tok, "First", 2, chain=greedy(), max_new_tokens=20, stop=stop).texts == [text[:text.find(stop)]] * 2
    with pytest.raises(QuillError, match="the batch needs at least 1 sequence, not 0"):
        generate_batch(model, tok, "First", 0)
    with pytest.raises(QuillError, match="max_new_tokens must be 0 or more, not -5"):
        generate_batch(model, tok, "First", 2, max_new_tokens=-5)
    with pytest.raises(QuillError, match="for beam search use generate"):
        generate_batch(model, tok, "First", 2, chain=build_chain("beam"))


def test_bad_arguments_fail_at_the_call_not_at_the_first_token(model, tok):
    with pytest.raises(QuillError, match="max_new_tokens must be 0 or more"):
        generate(model, tok, "First", max_new_tokens=-1)
    with pytest.raises(QuillError, match="probs must be a whole number"):
        generate(model, tok, "First", probs=True)
    with pytest.raises(QuillError, match="the seed must be from 0 to 2\\*\\*64 - 1, not -1"):
        generate(model, tok, "First", seed=-1)
    with pytest.raises(QuillError, match="the seed must be"):
        generate(model, tok, "First", seed=2**64)


def test_a_model_vocabulary_padded_beyond_the_tokenizer_never_yields_unknown_ids(tok):
    torch.manual_seed(0)
    padded = GPT(GPTConfig(vocab_size=tok.vocab_size + 20, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        padded.lm_head.weight[tok.vocab_size:] += 5.0  # the padding ids are by far the likeliest
    ids = [e.id for e in generate(padded, tok, "First", chain=build_chain("top_k"), max_new_tokens=30, seed=0) if isinstance(e, Token)]
    assert ids and max(ids) < tok.vocab_size
    small = GPT(GPTConfig(vocab_size=tok.vocab_size - 1, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(QuillError, match="is smaller than its tokenizer's"):
        generate(small, tok, "First")


# --- beam search ----------------------------------------------------------------------------------------------

BEAM_TOK = CharTokenizer(list("ABCDEFabcdefghij"))


def markov(edges: dict[str, dict[str, float]], block_size: int = 64) -> TableModel:
    """A stand-in whose next-token probabilities after each token are `edges` (anything unlisted: 1e-9)."""
    def index(name: str) -> int:
        return BEAM_TOK.special_tokens[name] if name.startswith("<") else BEAM_TOK.stoi[name]

    table = torch.full((BEAM_TOK.vocab_size, BEAM_TOK.vocab_size), 1e-9)
    for source, targets in edges.items():
        for target, p in targets.items():
            table[index(source), index(target)] = p
    return TableModel(table.log(), block_size)


# From the start A is likelier, but after A the next token is spread thinly; after B one token is almost certain.
GREEDY_TRAP = markov({
    "<bos>": {"A": 0.6, "B": 0.4},
    "A": {"a": 0.13, **{c: 0.87 / 7 for c in "bcdefgh"}},
    "B": {"i": 0.99, "j": 0.01},
    **{c: {"<eos>": 1.0} for c in "abcdefghij"},
})
# A short sequence that ends at once ("A"), a slightly longer one ("AB"), and a long, likely one ("CDEF").
LENGTHS = markov({
    "<bos>": {"A": 0.6, "C": 0.4},
    "A": {"<eos>": 0.55, "B": 0.45},
    "B": {"<eos>": 1.0},
    "C": {"D": 1.0}, "D": {"E": 1.0}, "E": {"F": 1.0}, "F": {"<eos>": 1.0},
})


def beam(model, max_new_tokens=10, stop=(), **options) -> tuple[str, Done]:
    tokens, done = run(model, BEAM_TOK, "", chain=build_chain("beam", {"beam": options}), max_new_tokens=max_new_tokens, stop=stop)
    return text_of(tokens, done), done


def test_beam_search_finds_the_sequence_greedy_misses():
    tokens, done = run(GREEDY_TRAP, BEAM_TOK, "", chain=greedy(), max_new_tokens=10)
    assert text_of(tokens, done) == "Aa" and done.reason == "eos"
    text, done = beam(GREEDY_TRAP, num_beams=2)
    assert text == "Bi" and done.reason == "eos" and done.new_tokens == 2
    assert beam(GREEDY_TRAP, num_beams=1)[0] == "Aa"  # one beam is greedy
    ids = [BEAM_TOK.special_tokens["<bos>"]]
    chain = build_chain("beam", {"beam": {"num_beams": 2}})
    assert _beam_search(GREEDY_TRAP, BEAM_TOK, ids, chain, chain.beam, 10, torch.Generator()) == (BEAM_TOK.encode("Bi"), True, False)


def test_early_stopping_ends_at_the_first_num_beams_finished():
    # finished by step 2: "A" (log .33 / 2) and "AB" (log .27 / 3); "CDEF" (log .4 / 5) finishes at step 4
    text, done = beam(LENGTHS, num_beams=2, early_stopping=True)
    assert text == "AB" and done.reason == "eos"
    text, done = beam(LENGTHS, num_beams=2, early_stopping=False)
    assert text == "CDEF" and done.reason == "eos"


def test_length_penalty_decides_between_short_and_long():
    assert beam(LENGTHS, num_beams=2, early_stopping=False, length_penalty=1.0)[0] == "CDEF"
    assert beam(LENGTHS, num_beams=2, early_stopping=False, length_penalty=-1.0)[0] == "A"  # favours short output
    assert beam(LENGTHS, num_beams=2, early_stopping=True, length_penalty=1.0)[0] == "AB"
    assert beam(LENGTHS, num_beams=2, early_stopping=True, length_penalty=0.0)[0] == "A"  # plain sum of log p


def test_beam_out_of_tokens_returns_the_best_running_beam():
    # after 2 tokens: running "CD" (log .4 / 2) beats the finished "A" (log .33 / 2) and running "AB"
    text, done = beam(LENGTHS, max_new_tokens=2, num_beams=2, early_stopping=False)
    assert text == "CD" and done.reason == "length" and done.new_tokens == 2


def test_beam_output_stops_at_a_stop_string():
    text, done = beam(LENGTHS, num_beams=2, early_stopping=False, stop=["E"])
    assert text == "CD" and done.reason == "stop" and done.stop == "E" and done.new_tokens == 3


class PairModel(nn.Module):
    """A stand-in whose logits depend on the last two tokens; it reads the earlier one back from its KV cache.

    `pairs[(previous, last)]` overrides `markov`'s row for `last`; the token ids are
    kept in the cache as a real model keeps keys and values, so rows that are not
    reordered with their beams see the wrong history.
    """

    def __init__(self, markov: TableModel, pairs: dict[tuple[str, str], dict[str, float]], block_size: int = 64) -> None:
        super().__init__()
        V = BEAM_TOK.vocab_size
        table = markov.table.detach()[None].expand(V, V, V).clone()  # (previous, last, next)
        for (previous, last), targets in pairs.items():
            row = torch.full((V,), 1e-9)
            for target, p in targets.items():
                row[BEAM_TOK.special_tokens.get(target, BEAM_TOK.stoi.get(target))] = p
            table[BEAM_TOK.stoi[previous], BEAM_TOK.stoi[last]] = row.log()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = GPTConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=1)

    def forward(self, idx, targets=None, cache=None):
        start, T = cache.length, idx.size(1)
        cache.kv[0, 0, :, 0, start:start + T, 0] = idx.float()
        cache.length = start + T
        history = cache.kv[0, 0, :, 0, :start + T, 0].long()
        return self.table[history[:, -2 if start + T > 1 else -1], history[:, -1]][:, None, :], None


@pytest.mark.parametrize("block_size", [64, 2])
def test_beam_rows_take_their_cache_and_tokens_with_them(block_size):
    # At step 1 the beams swap rows ("Bi" from row 1 comes first). After (B, i) comes <eos>, as in
    # GREEDY_TRAP; a row that kept A's history would see (A, i) and go on with "c" instead.
    # With a context of 2 the window slides at step 1 and rebuilds the cache from its tokens.
    model = PairModel(GREEDY_TRAP, {("A", "i"): {"c": 1.0}, ("B", "a"): {"c": 1.0}}, block_size)
    text, done = beam(model, num_beams=2)
    assert text == "Bi" and done.reason == "eos"


def test_beam_search_goes_on_past_the_context_window(model, tok):
    chain = build_chain("logit_bias,beam", {"logit_bias": {"bias": f"{tok.special_tokens['<eos>']}:-inf"},
                                            "beam": {"num_beams": 3}})
    tokens, done = run(model, tok, "First", chain=chain, max_new_tokens=2 * BLOCK)
    assert len(tokens) == 2 * BLOCK and done.reason == "length"
    cycle = markov({"<bos>": {"a": 1.0}, **{c: {n: 1.0} for c, n in zip("abcdef", "bcdefa")}}, block_size=4)
    text, done = beam(cycle, max_new_tokens=12, num_beams=2)
    assert text == "abcdefabcdef" and done.reason == "length"


def test_beam_search_has_no_token_probabilities(model, tok):
    with pytest.raises(QuillError, match="not available with beam search"):
        list(generate(model, tok, "First", chain=build_chain("beam"), probs=2))


# --- a sampler that fails mid-generation ------------------------------------------------------------------------

class Flaky(Sampler):
    """Passes the logits through, then raises at step `after`."""

    name = "flaky"
    options = {"after": Option(3, "the step that fails", low=0)}

    def apply(self, logits, state):
        if state.step >= self.after:
            raise RuntimeError(f"broke at step {state.step}")
        return logits


@pytest.fixture
def flaky_plugin(monkeypatch):
    """The built-in samplers plus a plugin `flaky_plugin` registering the sampler `flaky`."""
    class FlakyPlugin:
        @hookimpl
        def quill_register_samplers(self, register):
            register("flaky", Flaky)

    monkeypatch.setattr(host_mod, "metadata", SimpleNamespace(entry_points=lambda group: []))
    monkeypatch.setitem(sys.modules, "_quill_test_flaky", FlakyPlugin())
    monkeypatch.setattr(host_mod, "BUILTINS", (("samplers", "plugins.samplers"), ("flaky_plugin", "_quill_test_flaky")))
    host_mod.get_plugin_host.cache_clear()


def test_a_sampler_failing_mid_generation_is_an_error_naming_it_and_its_plugin(flaky_plugin, model, tok):
    events = []
    with pytest.raises(SamplerError) as info:
        for event in generate(model, tok, "First", chain=build_chain("top_k,flaky"), max_new_tokens=20, seed=0):
            events.append(event)
    assert info.value.message == ("sampler 'flaky' (plugin 'flaky_plugin') raised RuntimeError: broke at step 3; "
                                  "generation stopped")
    assert [type(e) for e in events] == [Token] * 3
    good, done = run(model, tok, "First", chain=build_chain("top_k"), max_new_tokens=20, seed=0)
    assert ids_of(good)[:3] == ids_of(events)  # the flaky sampler changed nothing before it broke
    assert done.reason in ("length", "eos") and (len(good) == 20 or done.reason == "eos")


# --- inference setup -------------------------------------------------------------------------------------------

def logits_of(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0].float()


def linears(model: GPT) -> list[nn.Module]:
    """The attention and MLP projections of every block."""
    return [child for block in model.blocks for parent in (block.attn, block.mlp)
            for name, child in parent.named_children() if name in ("qkv", "proj", "gate", "up", "down")]


@pytest.mark.skipif(bf16_packing_unavailable() is not None, reason=f"bf16 packing: {bf16_packing_unavailable()}")
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_bf16_on_a_cpu_with_bf16_kernels_packs_the_linears_and_stays_close_to_float32(mlp):
    reference = tiny_gpt(40, mlp=mlp, tie_embeddings=True)
    idx = torch.randint(40, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = logits_of(reference, idx)
    model = prepare_model(copy.deepcopy(reference), backends.CpuBackend(), torch.bfloat16)
    assert all(isinstance(m, Bf16Linear) and m.packed is not None for m in linears(model))
    assert len(linears(model)) == 2 * (4 if mlp == "gelu" else 5)
    assert isinstance(model.lm_head, Bf16Linear) and model.lm_head.weight is None  # only the packed copy
    assert model.wte.weight.dtype == torch.float32 and cache_dtype(model) == torch.float32
    got = logits_of(model, idx)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    tokens, done = run(model, CharTokenizer([chr(c) for c in range(97, 133)]), [5, 6, 7], chain=greedy(), max_new_tokens=40)
    assert done.new_tokens == len(tokens) and (len(tokens) == 40 or done.reason == "eos")


def test_bf16_where_packing_is_unavailable_keeps_plain_bf16_weights(monkeypatch):
    # What an AVX2-only CPU gets: prepare_model asks inference.bf16_packing_unavailable, as doctor does
    monkeypatch.setattr(inference, "bf16_packing_unavailable", lambda: "oneDNN has no bf16 kernels for this CPU")
    reference = tiny_gpt(40)
    idx = torch.randint(40, (2, 20), generator=torch.Generator().manual_seed(0))
    model = prepare_model(copy.deepcopy(reference), backends.CpuBackend(), torch.bfloat16)
    assert linears(model) and all(m.packed is None and m.weight.dtype == torch.bfloat16 for m in linears(model))
    expected = logits_of(reference, idx)
    assert (logits_of(model, idx) - expected).abs().max() < 0.05 * expected.abs().max()


def test_int8_off_the_cpu_is_refused_naming_the_backend():
    cuda = backends.CudaBackend()
    assert "CPU backend only, not cuda" in inference.int8_unavailable(cuda)
    assert inference.int8_unavailable(backends.CpuBackend()) is None


def test_unknown_quantization_is_an_error(model):
    with pytest.raises(QuillError, match="unknown quantization 'int4'") as info:
        prepare_model(copy.deepcopy(model), backends.CpuBackend(), torch.float32, quantize="int4")
    assert info.value.hint == "use none or int8"


def test_the_cpu_keeps_its_kv_cache_in_float32(model):
    assert cache_dtype(model) == torch.float32
    assert cache_dtype(copy.deepcopy(model).to(torch.bfloat16)) == torch.float32  # on the CPU, always


# --- backends, as `quill generate` meets them ---------------------------------------------------------------------

def test_generate_on_an_unavailable_backend_lists_the_available_ones(monkeypatch, capsys, tmp_path, model, tok):
    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, tok, step=1)
    monkeypatch.setattr(backends.CudaBackend, "is_available", lambda self: False)
    monkeypatch.setattr(backends.MpsBackend, "is_available", lambda self: True)
    assert main(["generate", str(path), "--device", "cuda", "--prompt", "First"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == ["quill: error: backend 'cuda' is not available on this machine", "  hint: available: cpu, mps"]
    monkeypatch.setattr(backends.MpsBackend, "is_available", lambda self: False)
    assert main(["generate", str(path), "--prompt", "First", "--sampler", "greedy", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == generate_text(model, tok, "First", chain=greedy(), max_new_tokens=12)


def test_a_prepared_model_is_not_prepared_again_and_int8_buffers_move_with_it():
    model = prepare_model(tiny_gpt(40), backends.CpuBackend(), torch.float32, quantize="int8")
    with pytest.raises(QuillError, match="already prepared"):
        prepare_model(model, backends.CpuBackend(), torch.bfloat16)
    names = {name for name, _ in model.named_buffers()}
    assert any(name.endswith("scale") for name in names)
    assert not any("qweight" in key or "scale" in key for key in model.state_dict())  # derived: never saved
