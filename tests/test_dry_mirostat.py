"""The DRY and Mirostat v2 samplers, on hand-made logits and token histories.

Expected penalties, truncations and mu updates are worked out by hand in each
test; both samplers also pass `check_sampler`.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpt_runtime import plugins as host_mod
from gpt_runtime.errors import QuillError
from gpt_runtime.sampling import Sampler, SamplerState, build_chain
from gpt_runtime.testing import check_sampler
from plugins.samplers import suffix_matches

NEG = float("-inf")


def sampler(name: str, **options) -> Sampler:
    """A built-in sampler, found through the registry as the engine finds it."""
    return host_mod.get_registry().get("samplers", name).obj(**options)


def state_for(*context: list[int], step: int = 0, special_ids: tuple[int, ...] = ()) -> SamplerState:
    tokens = torch.tensor(context, dtype=torch.long)
    return SamplerState(tokens, tokens.shape[1], step, torch.Generator().manual_seed(0), special_ids)


def dry(context: list[int], logits: list[float] | None = None, special_ids: tuple[int, ...] = (), **options) -> list[float]:
    """DRY's logits for one row after `context` (zeros over 10 tokens unless given)."""
    rows = torch.tensor([logits or [0.0] * 10])
    return sampler("dry", **options).apply(rows, state_for(context, special_ids=special_ids))[0].tolist()


def penalised(out: list[float], base: list[float] | None = None) -> dict[int, float]:
    """{token: how much its logit dropped}, for the tokens that changed."""
    base = base or [0.0] * len(out)
    return {i: round(b - o, 6) for i, (o, b) in enumerate(zip(out, base, strict=True)) if o != b}


# --- DRY ---------------------------------------------------------------------------------

def test_suffix_matches_finds_where_the_end_of_the_context_repeated():
    # ... 1 2 | 3 ... 1 2: position 2 follows a copy of the last two tokens
    assert suffix_matches([1, 2, 3, 1, 2]) == [0, 0, 2, 0, 0]
    assert suffix_matches([7, 7, 7, 7]) == [0, 1, 2, 3]
    assert suffix_matches([]) == []


def test_dry_penalises_exactly_the_token_that_extends_a_repeat():
    # "5 1 2 3 9 | 1 2 3": after 1 2 3 came 9, so 9 would extend a 3-token repeat.
    out = dry([5, 1, 2, 3, 9, 1, 2, 3], multiplier=0.8, base=1.75, allowed_length=2)
    assert penalised(out) == {9: round(0.8 * 1.75 ** (3 - 2), 6)}


def test_dry_takes_the_longest_repeat_of_each_token_and_keeps_removed_ones_removed():
    # The context ends "0 1 2". 4 follows "1 2" (length 2) and "0 1 2" (length 3): the longer counts.
    # 6 follows "2" only (length 1).
    logits = [1.0, NEG, 0.5, 0.0, 2.0, 0.0, 0.0, NEG, 0.0, 0.0]
    out = dry([2, 6, 1, 2, 4, 5, 0, 1, 2, 4, 3, 0, 1, 2], logits, multiplier=1.0, base=2.0, allowed_length=1)
    assert penalised(out, logits) == {4: 2.0 ** (3 - 1), 6: 2.0 ** (1 - 1)}
    assert out[1] == NEG and out[7] == NEG


def test_dry_respects_allowed_length():
    context = [5, 1, 2, 9, 1, 2]  # 9 would extend a 2-token repeat
    assert penalised(dry(context, multiplier=1.0, allowed_length=2)) == {9: 1.0}
    assert penalised(dry(context, multiplier=1.0, allowed_length=3)) == {}


def test_dry_repeats_never_span_a_sequence_breaker():
    context = [5, 1, 2, 3, 9, 1, 2, 3]
    # 1 is a breaker: the repeat is only "2 3", so the penalty is for length 2, not 3.
    assert penalised(dry(context, multiplier=1.0, base=2.0, breaker_ids="1")) == {9: 1.0}
    # the last token is a breaker: nothing repeats past it.
    assert penalised(dry(context, multiplier=1.0, breaker_ids="3,8")) == {}
    # a breaker is never penalised, even when it would extend a repeat.
    assert penalised(dry(context, multiplier=1.0, breaker_ids="9")) == {}


def test_dry_treats_special_tokens_as_breakers():
    assert penalised(dry([5, 1, 2, 3, 9, 1, 2, 3], multiplier=1.0, special_ids=(2,))) == {}


def test_dry_window_limits_the_search():
    context = [1, 2, 9, 0, 0, 0, 1, 2]
    assert penalised(dry(context, multiplier=1.0)) == {9: 1.0}
    assert penalised(dry(context, multiplier=1.0, window=6)) == {}


def test_dry_multiplier_zero_is_a_no_op():
    logits = torch.tensor([[0.5, 1.0, NEG, 2.0]])
    out = sampler("dry").apply(logits, state_for([1, 2, 3, 1, 2]))
    assert out is logits and out.tolist() == [[0.5, 1.0, NEG, 2.0]]


def test_dry_works_per_row():
    rows = torch.zeros(2, 6)
    out = sampler("dry", multiplier=1.0).apply(rows, state_for([1, 2, 3, 1, 2], [4, 5, 0, 4, 5]))
    assert penalised(out[0].tolist()) == {3: 1.0} and penalised(out[1].tolist()) == {0: 1.0}


def test_dry_penalty_of_a_huge_repeat_stays_finite():
    out = dry([1] * 600, [0.0, 3.0], multiplier=5.0, base=100.0)
    assert out[0] == 0.0 and math.isfinite(out[1]) and out[1] < -1e5


@pytest.mark.parametrize(("text", "message"), [
    ("1,x", "dry.breaker_ids: 'x' in '1,x' is not a token id"),
    ("-3", "dry.breaker_ids: token id -3 in '-3' is negative"),
])
def test_dry_rejects_malformed_breakers(text, message):
    with pytest.raises(QuillError) as exc:
        sampler("dry", breaker_ids=text)
    assert exc.value.message == message


def test_dry_breakers_given_as_text_are_the_tokens_whose_text_contains_them():
    pieces = [b"a", b"b", b"\n", b"c", b"d:", b"e", b"f", b"g", b"h", b"i"]
    context = [5, 0, 1, 3, 9, 0, 1, 3]  # 9 would extend "0 1 3" (length 3)
    rows = torch.tensor([[0.0] * 10])

    def with_pieces(context, **options):
        tokens = torch.tensor([context])
        state = SamplerState(tokens, tokens.shape[1], 0, torch.Generator().manual_seed(0), (), pieces)
        return penalised(sampler("dry", multiplier=1.0, base=2.0, **options).apply(rows.clone(), state)[0].tolist())

    assert with_pieces(context) == {9: 2.0}  # the defaults ("\n", ":", ...) are not in this context
    # "d:" holds a colon, one of llama.cpp's default breakers: no repeat spans it.
    assert with_pieces([5, 0, 4, 3, 9, 0, 4, 3]) == {}
    assert with_pieces(context, breakers='["a"]') == {9: 1.0}  # "a" breaks "0 1 3" down to "1 3"
    assert with_pieces(context, breakers="[]") == {9: 2.0}


@pytest.mark.parametrize("text", ["nope", '["ok", ""]', '{"a": 1}', "[3]"])
def test_dry_rejects_breakers_that_are_not_a_json_list_of_texts(text):
    with pytest.raises(QuillError, match="dry.breakers: .* is not a JSON list of non-empty strings"):
        sampler("dry", breakers=text)


# --- Mirostat v2 ---------------------------------------------------------------------------

def bits(*probs: float) -> list[float]:
    """Logits whose softmax is `probs` (which sum to 1)."""
    return [math.log(p) if p else NEG for p in probs]


def kept(out: torch.Tensor) -> list[int]:
    return torch.nonzero(~out[0].isneginf()).view(-1).tolist()


def test_mirostat_truncates_tokens_more_surprising_than_mu():
    # surprises: 1, 2, 3, 3 bits; mu starts at 2 * tau
    logits = bits(0.5, 0.25, 0.125, 0.125)
    assert kept(sampler("mirostat_v2", tau=1.0).apply(torch.tensor([logits]), state_for([0]))) == [0, 1]
    assert kept(sampler("mirostat_v2", tau=1.6).apply(torch.tensor([logits]), state_for([0]))) == [0, 1, 2, 3]
    # mu = 0 would remove everything: the likeliest token stays
    assert kept(sampler("mirostat_v2", tau=0.0).apply(torch.tensor([logits]), state_for([0]))) == [0]


def test_mirostat_updates_mu_from_the_surprise_of_each_drawn_token():
    # Surprises 1, 2, 3, 3 bits; tau 1, eta 0.5, so mu starts at 2. Worked by hand:
    # step 0: mu 2 keeps {0, 1} (renormalised 2/3, 1/3); 1 is drawn, surprise log2(3): mu 2 - 0.5 (log2(3) - 1)
    # step 1: mu 1.7075 keeps {0} (probability 1); 0 is drawn, surprise 0: mu + 0.5
    # step 2: mu 2.2075 keeps {0, 1} again; 1 is drawn: mu - 0.5 (log2(3) - 1)
    excess = math.log2(3) - 1
    expected = [([0, 1], 2.0), ([0], 2.0 - 0.5 * excess), ([0, 1], 2.5 - 0.5 * excess), (None, 2.5 - excess)]
    miro = sampler("mirostat_v2", tau=1.0, eta=0.5)
    logits = bits(0.5, 0.25, 0.125, 0.125)
    context = [0]
    for step, ((kept_ids, mu), drawn) in enumerate(zip(expected, [1, 0, 1, None], strict=True)):
        out = miro.apply(torch.tensor([logits]), state_for(context, step=step))
        assert miro.mu.item() == pytest.approx(mu), f"step {step}"
        if kept_ids is not None:
            assert kept(out) == kept_ids, f"step {step}"
            context.append(drawn)


def test_mirostat_calling_again_at_the_same_step_gives_the_same_logits():
    miro = sampler("mirostat_v2", tau=1.0, eta=0.5)
    logits = torch.tensor([bits(0.5, 0.25, 0.125, 0.125)])
    miro.apply(logits.clone(), state_for([0], step=0))
    first = miro.apply(logits.clone(), state_for([0, 1], step=1))
    again = miro.apply(logits.clone(), state_for([0, 1], step=1))  # as Chain does to find a failing sampler
    assert first.equal(again)


def test_mirostat_is_reproducible_by_seed_in_a_chain():
    def draws(seed: int) -> list[int]:
        chain = build_chain("temperature,mirostat_v2", {"mirostat_v2": {"tau": "2.0"}}).fresh()
        data = torch.Generator().manual_seed(99)
        state = SamplerState(torch.tensor([[0]]), 1, 0, torch.Generator().manual_seed(seed))
        tokens = []
        for step in range(20):
            state.step = step
            out = chain.apply(torch.randn(1, 30, generator=data) * 3, state)
            token = torch.multinomial(out.softmax(dim=-1), 1, generator=state.generator)
            state.tokens = torch.cat([state.tokens, token], dim=1)
            tokens.append(int(token))
        return tokens

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


# --- both ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "options"), [
    ("dry", {}),
    ("dry", {"multiplier": 0.8}),
    ("dry", {"multiplier": 3.0, "base": 10.0, "allowed_length": 1, "breaker_ids": "0,1", "window": 0}),
    ("mirostat_v2", {}),
    ("mirostat_v2", {"tau": 0.5, "eta": 1.0}),
    ("mirostat_v2", {"tau": 0.0}),
])
def test_dry_and_mirostat_pass_check_sampler(name, options):
    check_sampler(host_mod.get_registry().get("samplers", name).obj, options, vocab_size=8, batch=2)
    check_sampler(host_mod.get_registry().get("samplers", name).obj, options)


def test_mirostat_goes_after_temperature_in_suggested_chains():
    from gpt_runtime.sampling import _insert

    assert _insert(["dry", "mirostat_v2"], "temperature") == ["dry", "temperature", "mirostat_v2"]
    assert _insert(["temperature", "mirostat_v2"], "dry") == ["dry", "temperature", "mirostat_v2"]
