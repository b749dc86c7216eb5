"""The sampler protocol, the built-in samplers and `gpt_runtime.testing.check_sampler`.

Each built-in is run on small hand-made logits whose expected result is worked
out by hand in the test; the chain and option parsing are driven the way the
CLI drives them, from text.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from gpt_runtime import plugins as host_mod
from gpt_runtime.errors import QuillError, UsageError
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.sampling import (
    BeamSearch,
    Chain,
    ChainLink,
    Option,
    Sampler,
    SamplerError,
    SamplerState,
    build_chain,
    check_sampler_class,
    settings_from_strings,
)
from gpt_runtime.testing import check_sampler, make_state

NEG = float("-inf")
BUILTIN_SAMPLERS = [
    "beam", "dry", "frequency_penalty", "greedy", "logit_bias", "min_p", "mirostat_v2", "presence_penalty",
    "repetition_penalty", "temperature", "top_k", "top_p", "typical",
]


def sampler(name: str, **options) -> Sampler:
    """A built-in sampler, found through the registry as the engine finds it."""
    return host_mod.get_registry().get("samplers", name).obj(**options)


def state_for(*context: list[int], prompt_length: int | None = None, special_ids: tuple[int, ...] = ()) -> SamplerState:
    tokens = torch.tensor(context, dtype=torch.long)
    return SamplerState(tokens, tokens.shape[1] if prompt_length is None else prompt_length, 0,
                        torch.Generator().manual_seed(0), special_ids)


def run(name: str, logits, state: SamplerState | None = None, **options) -> torch.Tensor:
    rows = torch.tensor(logits, dtype=torch.float32)
    rows = rows[None] if rows.dim() == 1 else rows
    return sampler(name, **options).apply(rows, state or state_for([0]))


def kept(out: torch.Tensor) -> list[list[int]]:
    """The token ids left (not -inf) in each row."""
    return [torch.nonzero(~row.isneginf()).view(-1).tolist() for row in out]


def log(*probs: float) -> list[float]:
    return [math.log(p) if p else NEG for p in probs]


# --- registration ------------------------------------------------------------------

def test_builtin_samplers_are_registered_by_the_samplers_plugin():
    registry = host_mod.get_registry()
    # other installed plugins (`make test` installs examples/quill-xtc) add their own
    builtins = [entry for entry in registry.entries("samplers") if entry.plugin == "samplers"]
    assert sorted(entry.name for entry in builtins) == BUILTIN_SAMPLERS
    for entry in builtins:
        assert entry.obj.name == entry.name
        assert entry.obj.__doc__ and entry.obj.__doc__.strip(), f"{entry.name} has no docstring for `quill samplers`"
    assert registry.get("samplers", "beam").obj is BeamSearch


def test_loading_the_samplers_plugin_does_not_import_torch():
    import subprocess

    code = "import plugins.samplers, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- temperature -------------------------------------------------------------------------

def test_temperature_divides_the_logits():
    assert run("temperature", [1.0, -2.0, 0.0, NEG], t=0.5).tolist() == [[2.0, -4.0, 0.0, NEG]]
    assert run("temperature", [1.0, -2.0, 0.0, NEG], t=2).tolist() == [[0.5, -1.0, 0.0, NEG]]


def test_temperature_zero_keeps_only_the_argmax():
    assert run("temperature", [[1.0, 3.0, 2.0], [5.0, NEG, 5.0]], t=0).tolist() == [[NEG, 3.0, NEG], [5.0, NEG, NEG]]


def test_temperature_so_small_it_overflows_becomes_greedy():
    # 3 / 1e-40 is far beyond float32: without care this row would be +inf (NaN after softmax)
    assert run("temperature", [[1.0, 3.0, -2.0], [-50.0, -60.0, NEG]], t=1e-40).tolist() == [[NEG, 3.0, NEG], [-50.0, NEG, NEG]]


# --- top_k -------------------------------------------------------------------------------

def test_top_k_keeps_exactly_k_even_on_ties():
    out = run("top_k", [[1.0, 5.0, 5.0, 5.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]], k=2)
    assert [len(ids) for ids in kept(out)] == [2, 2]
    assert set(kept(out)[0]) <= {1, 2, 3} and out[0][~out[0].isneginf()].tolist() == [5.0, 5.0]
    assert out[1].tolist() == [4.0, 3.0, NEG, NEG, NEG]


def test_top_k_at_least_the_vocabulary_is_a_no_op():
    logits = torch.tensor([[1.0, NEG, 2.0]])
    out = sampler("top_k", k=3).apply(logits, state_for([0]))
    assert out is logits and out.tolist() == [[1.0, NEG, 2.0]]


def test_top_k_with_fewer_tokens_left_than_k_keeps_them_removed():
    assert run("top_k", [NEG, 1.0, NEG, 2.0, 0.5], k=3).tolist() == [[NEG, 1.0, NEG, 2.0, 0.5]]
    assert run("top_k", [NEG, 1.0, NEG, 2.0, NEG], k=3).tolist() == [[NEG, 1.0, NEG, 2.0, NEG]]


# --- top_p -------------------------------------------------------------------------------

@pytest.mark.parametrize(("p", "expected"), [
    (0.4, [1]),           # 0.5 alone reaches 0.4
    (0.5, [1]),           # ... and exactly 0.5
    (0.8, [1, 3]),        # 0.5 + 0.3 = 0.8 reaches it exactly
    (0.81, [1, 3, None]),  # needs one of the 0.1 tokens (either: they tie)
    (1.0, [0, 1, 2, 3]),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    out = run("top_p", log(0.1, 0.5, 0.1, 0.3), p=p)
    ids = kept(out)[0]
    assert len(ids) == len(expected)
    assert {e for e in expected if e is not None} <= set(ids)


def test_top_p_works_per_row():
    out = run("top_p", [log(0.5, 0.3, 0.1, 0.1), log(0.25, 0.25, 0.25, 0.25)], p=0.6)
    assert kept(out)[0] == [0, 1]
    assert len(kept(out)[1]) == 3  # 0.25 + 0.25 < 0.6 <= 0.75 (which three is a tie)


def test_top_p_min_keep_keeps_more_than_p_needs():
    ids = kept(run("top_p", log(0.1, 0.5, 0.1, 0.3), p=0.1, min_keep=3))[0]
    assert len(ids) == 3 and {1, 3} <= set(ids)


def test_top_p_beyond_the_first_look_scans_the_whole_vocabulary():
    # 1000 equally likely tokens: 0.5005 of the mass needs 501 of them, far more than a first top-64 look
    out = run("top_p", [0.0] * 1000, p=0.5005)
    assert len(kept(out)[0]) == 501


def test_top_p_ignores_removed_tokens():
    # the -inf token has probability 0: the rest are renormalised to [0.5, 0.25, 0.25]
    out = run("top_p", [NEG, math.log(2), 0.0, 0.0], p=0.7)
    assert kept(out)[0][0] == 1 and len(kept(out)[0]) == 2 and out[0, 0] == NEG


# --- min_p -------------------------------------------------------------------------------

@pytest.mark.parametrize(("p", "expected"), [
    (0.0, [0, 1, 2, 3]),
    (0.19, [0, 1, 2, 3]),  # 0.1 >= 0.19 * 0.5
    (0.25, [0, 1]),        # 0.1 < 0.125 <= 0.3
    (0.7, [0]),            # 0.3 < 0.35
    (1.0, [0]),
])
def test_min_p_removes_tokens_below_p_times_the_top(p, expected):
    out = run("min_p", log(0.5, 0.3, 0.1, 0.1), p=p)
    assert kept(out) == [expected]
    assert out[0, expected].tolist() == pytest.approx(log(0.5, 0.3, 0.1, 0.1)[: len(expected)])


def test_min_p_one_keeps_every_token_tied_at_the_top():
    assert kept(run("min_p", [2.0, 1.0, 2.0, NEG], p=1.0)) == [[0, 2]]


# --- typical -------------------------------------------------------------------------------

# probs [0.5, 0.3, 0.1, 0.1]: entropy H = -(0.5 ln 0.5 + 0.3 ln 0.3 + 0.2 ln 0.1) = 1.1683;
# |-ln p - H| = 0.475 (0.5), 0.036 (0.3), 1.134 (0.1): typical order is token 1, token 0, then 2 and 3.
@pytest.mark.parametrize(("p", "expected"), [
    (0.25, [1]),         # the most typical token is not the most likely one
    (0.5, [0, 1]),
    (0.7, [0, 1]),
    (0.85, [0, 1, None]),
    (1.0, [0, 1, 2, 3]),
])
def test_typical_keeps_the_tokens_closest_to_the_entropy(p, expected):
    ids = kept(run("typical", log(0.5, 0.3, 0.1, 0.1), p=p))[0]
    assert len(ids) == len(expected)
    assert {e for e in expected if e is not None} <= set(ids)


def test_typical_ignores_removed_tokens():
    # without the -inf token the row is [0.5, 0.3, 0.1, 0.1] again
    ids = kept(run("typical", log(0.5, 0.3, 0, 0.1, 0.1), p=0.25))[0]
    assert ids == [1]


# --- penalties ---------------------------------------------------------------------------------

LOGITS = [2.0, -2.0, 1.0, 0.5, 3.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = run("repetition_penalty", LOGITS, state_for([0, 1, 0]), penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 3.0]]
    out = run("repetition_penalty", LOGITS, state_for([0, 1]), penalty=0.5)  # < 1 encourages
    assert out.tolist() == [[4.0, -1.0, 1.0, 0.5, 3.0]]


def test_repetition_penalty_window_counts_the_prompt_too():
    context = state_for([0, 1, 2, 3], prompt_length=3)  # tokens 0..2 are the prompt, 3 was generated
    assert run("repetition_penalty", LOGITS, context, penalty=2.0, window=2).tolist() == [[2.0, -2.0, 0.5, 0.25, 3.0]]
    assert run("repetition_penalty", LOGITS, context, penalty=2.0, window=0).tolist() == [[1.0, -4.0, 0.5, 0.25, 3.0]]
    assert run("repetition_penalty", LOGITS, context, penalty=2.0, window=100).tolist() == [[1.0, -4.0, 0.5, 0.25, 3.0]]


def test_frequency_penalty_subtracts_per_occurrence():
    context = state_for([0, 0, 1, 0])
    assert run("frequency_penalty", LOGITS, context, penalty=0.5).tolist() == [[0.5, -2.5, 1.0, 0.5, 3.0]]
    assert run("frequency_penalty", LOGITS, context, penalty=0.5, window=2).tolist() == [[1.5, -2.5, 1.0, 0.5, 3.0]]


def test_presence_penalty_subtracts_once_per_token():
    context = state_for([0, 0, 1, 0])
    assert run("presence_penalty", LOGITS, context, penalty=0.5).tolist() == [[1.5, -2.5, 1.0, 0.5, 3.0]]
    assert run("presence_penalty", LOGITS, context, penalty=0.5, window=1).tolist() == [[1.5, -2.0, 1.0, 0.5, 3.0]]


def test_penalties_work_per_row():
    context = state_for([0, 0], [4, 2])
    out = run("frequency_penalty", [LOGITS, LOGITS], context, penalty=1.0)
    assert out.tolist() == [[0.0, -2.0, 1.0, 0.5, 3.0], [2.0, -2.0, 0.0, 0.5, 2.0]]


@pytest.mark.parametrize(("name", "options"), [
    ("repetition_penalty", {"penalty": 0.5}),
    ("frequency_penalty", {"penalty": -3.0}),
    ("presence_penalty", {"penalty": -3.0}),
])
def test_penalties_never_revive_removed_tokens_nor_touch_special_ones(name, options):
    context = state_for([0, 1, 1, 4], special_ids=(4,))
    out = run(name, [NEG, 1.0, 1.0, 1.0, 1.0], context, **options)
    assert out[0, 0] == NEG
    assert out[0, 1] > 1.0  # a negative penalty encourages the repeated token
    assert out[0, 2:].tolist() == [1.0, 1.0, 1.0]  # 4 is special: never penalised


# --- logit_bias ---------------------------------------------------------------------------------

def test_logit_bias_parses_ids_and_values():
    assert sampler("logit_bias", bias=" 12:-5, 40:+2.5,0:-inf,3:1e6 ").biases == {12: -5.0, 40: 2.5, 0: NEG, 3: 1e6}
    assert sampler("logit_bias").biases == {}


def test_logit_bias_adds_to_the_logits_and_bans():
    out = run("logit_bias", [[0.0, 0.0, 0.0, 0.0, NEG], [1.0, 2.0, 3.0, 4.0, 5.0]], bias="1:+2,3:-inf,4:+100")
    assert out.tolist() == [[0.0, 2.0, 0.0, NEG, NEG], [1.0, 4.0, 3.0, NEG, 105.0]]  # 4 stays removed in row 0


@pytest.mark.parametrize(("text", "message"), [
    ("12", "'12' in '12' is not ID:VALUE"),
    ("a:1", "'a:1' in 'a:1' is not ID:VALUE"),
    ("12:x", "'12:x' in '12:x' is not ID:VALUE"),
    ("1:2,", "'' in '1:2,' is not ID:VALUE"),
    ("1:2;3:4", "'1:2;3:4' in '1:2;3:4' is not ID:VALUE"),
    ("-1:2", "token id -1 in '-1:2' is negative"),
    ("1:nan", "'1:nan' in '1:nan' has no usable value"),
    ("1:inf", "'1:inf' in '1:inf' has no usable value"),
    ("1:-1e7", "'1:-1e7' in '1:-1e7' has no usable value"),
    ("1:2,1:3", "token 1 appears twice in '1:2,1:3'"),
])
def test_logit_bias_rejects_malformed_text(text, message):
    with pytest.raises(QuillError) as exc:
        build_chain("logit_bias", {"logit_bias": {"bias": text}})
    assert exc.value.message == f"logit_bias.bias: {message}"
    if "ID:VALUE" in message or "negative" in message:
        assert exc.value.hint == "write ID:VALUE,ID:VALUE, e.g. 12:-5,40:+2.5 (-inf bans a token)"
    elif "usable" in message:
        assert exc.value.hint == "use a number from -1e+06 to 1e+06, or -inf to ban the token"


def test_logit_bias_id_outside_the_vocabulary_is_an_error_naming_it():
    with pytest.raises(QuillError) as exc:
        run("logit_bias", [0.0] * 5, bias="2:1,7:-1")
    assert exc.value.message == "token id 7 in logit_bias.bias is outside the model's vocabulary (ids 0 to 4)"
    assert exc.value.hint == "drop 7 from logit_bias.bias; `quill tokenizer encode` shows a text's token ids"
    chain = build_chain("logit_bias", {"logit_bias": {"bias": "7:-1"}})
    with pytest.raises(SamplerError) as exc:  # through a chain: the sampler and its plugin are named, the hint kept
        chain.apply(torch.zeros(1, 5), state_for([0]))
    assert exc.value.message == ("sampler 'logit_bias' (plugin 'samplers') failed: token id 7 in logit_bias.bias "
                                 "is outside the model's vocabulary (ids 0 to 4); generation stopped")
    assert exc.value.hint == "drop 7 from logit_bias.bias; `quill tokenizer encode` shows a text's token ids"


def test_logit_bias_never_bans_every_token():
    with pytest.raises(QuillError, match="bans every token still allowed"):
        run("logit_bias", [0.0, 1.0, 2.0], bias="0:-inf,1:-inf,2:-inf")
    with pytest.raises(QuillError, match="bans every token still allowed"):  # the others were removed earlier
        run("logit_bias", [NEG, 1.0, NEG], bias="1:-inf")
    chain = build_chain("top_k,logit_bias", {"top_k": {"k": "1"}, "logit_bias": {"bias": "2:-inf"}})
    with pytest.raises(SamplerError) as exc:  # through a chain: named, with the sampler's own hint
        chain.apply(torch.tensor([[0.0, 1.0, 2.0]]), state_for([0]))
    assert exc.value.message == ("sampler 'logit_bias' (plugin 'samplers') failed: logit_bias.bias '2:-inf' "
                                 "bans every token still allowed; generation stopped")
    assert exc.value.hint == "ban fewer tokens, or put logit_bias earlier in the chain"


# --- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "option", "value", "parsed", "needs"), [
    ("top_p", "p", "0", 0.0, "0 < top_p.p <= 1"),
    ("top_p", "p", "1.5", 1.5, "0 < top_p.p <= 1"),
    ("typical", "p", "0", 0.0, "0 < typical.p <= 1"),
    ("temperature", "t", "-0.1", -0.1, "0 <= temperature.t"),
    ("top_k", "k", "0", 0, "1 <= top_k.k"),
    ("repetition_penalty", "penalty", "0", 0.0, "0 < repetition_penalty.penalty"),
    ("presence_penalty", "window", "-1", -1, "0 <= presence_penalty.window"),
    ("beam", "num_beams", "65", 65, "1 <= beam.num_beams <= 64"),
    ("dry", "base", "0.5", 0.5, "1 <= dry.base"),
    ("dry", "allowed_length", "0", 0, "1 <= dry.allowed_length"),
    ("mirostat_v2", "eta", "1.5", 1.5, "0 <= mirostat_v2.eta <= 1"),
])
def test_options_out_of_range_are_rejected(name, option, value, parsed, needs):
    with pytest.raises(QuillError) as exc:
        build_chain(name, {name: {option: value}})
    assert (exc.value.message, exc.value.hint) == (f"{name}.{option} = {parsed!r} is out of range", f"it needs {needs}")


def test_text_option_values_are_parsed_to_their_types():
    chain = build_chain("beam,top_k,top_p,temperature", {
        "top_p": {"p": "0.9", "min_keep": " 3 "}, "top_k": {"k": "7"}, "temperature": {"t": 1},
        "beam": {"early_stopping": "No", "length_penalty": "-0.5"},
    })
    assert chain.settings() == {
        "beam": {"num_beams": 4, "length_penalty": -0.5, "early_stopping": False},
        "top_k": {"k": 7}, "top_p": {"p": 0.9, "min_keep": 3}, "temperature": {"t": 1.0},
    }
    assert type(chain.settings()["temperature"]["t"]) is float
    assert build_chain("beam", {"beam": {"early_stopping": "YES"}}).beam.early_stopping is True
    assert build_chain("beam", {"beam": {"early_stopping": "0"}}).beam.early_stopping is False


@pytest.mark.parametrize(("name", "option", "value", "message"), [
    ("top_k", "k", "4.5", "top_k.k must be a whole number, not '4.5'"),
    ("top_k", "k", 4.0, "top_k.k must be a whole number, not 4.0"),
    ("top_k", "k", True, "top_k.k must be a whole number, not True"),
    ("top_p", "p", "most", "top_p.p must be a number, not 'most'"),
    ("top_p", "p", "nan", "top_p.p must be a finite number, not nan"),
    ("beam", "early_stopping", "maybe", "beam.early_stopping must be true or false, not 'maybe'"),
    ("logit_bias", "bias", 3, "logit_bias.bias must be text, not 3"),
])
def test_options_of_the_wrong_type_are_rejected(name, option, value, message):
    with pytest.raises(QuillError) as exc:
        build_chain(name, {name: {option: value}})
    assert exc.value.message == message


def test_unknown_option_suggests_the_closest():
    with pytest.raises(QuillError) as exc:
        build_chain("top_p", {"top_p": {"min_kept": "2"}})
    assert (exc.value.message, exc.value.hint) == ("sampler 'top_p' has no option 'min_kept'", "did you mean 'min_keep'?")
    with pytest.raises(QuillError) as exc:
        sampler("top_p", zzz=1)
    assert exc.value.hint == "its options: p, min_keep"


@pytest.mark.parametrize("value", [None, "x", 3])
def test_an_option_of_an_unsupported_type_is_a_clear_error(value):
    with pytest.raises(QuillError) as exc:
        Option(None).convert(value, "odd.opt")
    assert (exc.value.message, exc.value.hint) == (
        "odd.opt has a default of unsupported type NoneType (None)",
        "an option's default must be an int, float, bool or str; its type is the option's type")


# --- checking a registered class -------------------------------------------------------------------

def sampler_class(name="mine", options=None, apply=True, base=Sampler):
    """A sampler class with the given name and options, for `check_sampler_class`."""
    body = {"name": name, "options": {} if options is None else options}
    if apply:
        body["apply"] = lambda self, logits, state: logits
    return type("Mine", (base,), body)


def test_check_sampler_class_accepts_every_builtin():
    for entry in host_mod.get_registry().entries("samplers"):
        check_sampler_class(entry.name, entry.obj)
    check_sampler_class("mine", sampler_class(options={"n": Option(2, low=1), "on": Option(True), "s": Option("a")}))


@pytest.mark.parametrize(("cls", "message", "hint"), [
    (dict, "sampler 'mine' must be a subclass of gpt_runtime.sampling.Sampler, not <class 'dict'>", None),
    (None, "sampler 'mine' must be a subclass of gpt_runtime.sampling.Sampler, not None", None),
    (sampler_class(name=""), "sampler 'mine' is registered with a class that has no name", "set name = 'mine' on Mine"),
    (sampler_class(name="other"), "sampler 'mine' is registered with a class whose name is 'other'", "set name = 'mine' on Mine"),
    (sampler_class(apply=False), "sampler 'mine': Mine does not define apply(logits, state)", None),
    (sampler_class(options=[Option(1)]),
     "sampler 'mine': Mine.options must be a dict of option names to gpt_runtime.sampling.Option, not list", None),
    (sampler_class(options={"t": 0.5}), "sampler 'mine': option 't' must be a gpt_runtime.sampling.Option, not 0.5",
     "write 't': Option(default, help)"),
    (sampler_class(options={"top-k": Option(1)}), "sampler 'mine': option name 'top-k' is not a valid identifier", None),
    (sampler_class(options={"apply": Option(1)}), "sampler 'mine': option name 'apply' would hide Sampler.apply", "rename the option"),
    (sampler_class(options={"t": Option(0.0, low=0, low_open=True)}),
     "sampler 'mine': the default of option 't' is invalid: mine.t = 0.0 is out of range", "it needs 0 < mine.t"),
    (sampler_class(options={"k": Option(80, high=64)}),
     "sampler 'mine': the default of option 'k' is invalid: mine.k = 80 is out of range", "it needs mine.k <= 64"),
    (sampler_class(options={"p": Option(float("nan"))}),
     "sampler 'mine': the default of option 'p' is invalid: mine.p must be a finite number, not nan", None),
    (sampler_class(options={"x": Option(None)}),
     "sampler 'mine': the default of option 'x' is invalid: mine.x has a default of unsupported type NoneType (None)",
     "an option's default must be an int, float, bool or str; its type is the option's type"),
    (sampler_class(options={"xs": Option([1, 2])}),
     "sampler 'mine': the default of option 'xs' is invalid: mine.xs has a default of unsupported type list ([1, 2])",
     "an option's default must be an int, float, bool or str; its type is the option's type"),
])
def test_check_sampler_class_rejects_a_broken_class(cls, message, hint):
    with pytest.raises(QuillError) as exc:
        check_sampler_class("mine", cls)
    assert (exc.value.message, exc.value.hint) == (message, hint)


# --- chains and settings ---------------------------------------------------------------------------

def test_build_chain_keeps_the_order_and_reports_greedy_and_beam():
    chain = build_chain(" repetition_penalty , top_k,temperature ")
    assert chain.spec == "repetition_penalty,top_k,temperature"
    assert (chain.greedy, chain.beam) == (False, None)
    assert build_chain("top_k,greedy").greedy is True
    beam = build_chain("beam,top_k", {"beam": {"num_beams": "2"}})
    assert beam.beam.num_beams == 2 and not beam.greedy


def test_chain_applies_samplers_in_order():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    out = build_chain("top_k,temperature", {"top_k": {"k": 2}, "temperature": {"t": 0.5}}).apply(logits, state_for([0]))
    assert out.tolist() == [[8.0, 6.0, NEG, NEG]]


@pytest.mark.parametrize(("spec", "settings", "message", "hint"), [
    ("top_kk", None, "no sampler named 'top_kk'", "did you mean 'top_k'?"),
    ("top_k,top_p,top_k", None, "sampler 'top_k' appears twice in the chain 'top_k,top_p,top_k'", None),
    ("", None, "sampler chain '' is not a comma-separated list of sampler names", "for example top_k,top_p,temperature"),
    ("top_k,,top_p", None, "sampler chain 'top_k,,top_p' is not a comma-separated list of sampler names", "for example top_k,top_p,temperature"),
    ("top_k", {"top_p": {"p": 0.5}}, "'top_p' is not in the sampler chain top_k", "add it to the chain, e.g. --sampler top_k,top_p"),
    # the suggestion puts a filter where it has an effect: before a trailing temperature, greedy or beam
    ("top_k,top_p,temperature", {"min_p": {"p": 0.1}}, "'min_p' is not in the sampler chain top_k,top_p,temperature",
     "add it to the chain, e.g. --sampler top_k,top_p,min_p,temperature"),
    ("top_k,temperature,greedy", {"min_p": {"p": 0.1}}, "'min_p' is not in the sampler chain top_k,temperature,greedy",
     "add it to the chain, e.g. --sampler top_k,min_p,temperature,greedy"),
    ("greedy", {"top_k": {"k": 3}}, "'top_k' is not in the sampler chain greedy", "add it to the chain, e.g. --sampler top_k,greedy"),
    ("top_k,beam", {"temperature": {"t": 0.5}}, "'temperature' is not in the sampler chain top_k,beam",
     "add it to the chain, e.g. --sampler top_k,temperature,beam"),
    ("top_k,temperature", {"greedy": {}}, "'greedy' is not in the sampler chain top_k,temperature",
     "add it to the chain, e.g. --sampler top_k,temperature,greedy"),
])
def test_build_chain_errors_are_usage_errors(spec, settings, message, hint):
    with pytest.raises(UsageError) as exc:
        build_chain(spec, settings)
    assert (exc.value.message, exc.value.hint) == (message, hint)


def test_settings_from_strings_resolves_one_option_shorthands():
    assert settings_from_strings(["temperature=0.7"]) == {"temperature": {"t": "0.7"}}
    assert settings_from_strings(["top_p.p=0.9", "top_p.min_keep = 2", "min_p=0.1"]) == {
        "top_p": {"p": "0.9", "min_keep": "2"}, "min_p": {"p": "0.1"}}
    assert settings_from_strings([]) == {}


@pytest.mark.parametrize(("items", "message", "hint"), [
    (["top_p=0.9"], "sampler 'top_p' has 2 options; say which, as top_p.OPTION=0.9", "its options: p, min_keep"),
    (["greedy=1"], "sampler 'greedy' has no options; say which, as greedy.OPTION=1", "its options: none"),
    (["temprature=0.7"], "no sampler named 'temprature'", "did you mean 'temperature'?"),
    (["temperature"], "setting 'temperature' is not name.option=value", "for example top_p.p=0.9 or temperature=0.7"),
])
def test_settings_from_strings_errors(items, message, hint):
    with pytest.raises(UsageError) as exc:
        settings_from_strings(items)
    assert (exc.value.message, exc.value.hint) == (message, hint)


# --- a failing sampler plugin ----------------------------------------------------------------------

class Misbehaving(Sampler):
    """Fails in the way its `how` option says."""

    name = "shaky"
    options = {"how": Option("raise")}

    def apply(self, logits, state):
        if self.how == "raise":
            raise ZeroDivisionError("float division by zero")
        if self.how == "shape":
            return logits[:, :-1]
        if self.how == "none":
            return None
        if self.how == "nan":
            return logits * float("nan")
        if self.how == "empty":
            return logits.fill_(NEG)
        if self.how == "posinf":
            return logits.index_fill_(1, torch.tensor([1]), float("inf"))
        if self.how == "double":
            return logits.double()
        raise QuillError("the sampler's own, well-described failure")


@pytest.fixture
def shaky_plugin(monkeypatch):
    """The real built-ins plus a plugin `shaky` registering the `shaky` sampler."""
    class Shaky:
        @hookimpl
        def quill_register_samplers(self, register):
            register("shaky", Misbehaving)

    monkeypatch.setattr(host_mod, "metadata", SimpleNamespace(entry_points=lambda group: []))
    monkeypatch.setitem(sys.modules, "_quill_test_shaky", Shaky())
    monkeypatch.setattr(host_mod, "BUILTINS", (("samplers", "plugins.samplers"), ("shaky", "_quill_test_shaky")))
    host_mod.get_plugin_host.cache_clear()


@pytest.mark.parametrize(("how", "what"), [
    ("raise", "raised ZeroDivisionError: float division by zero"),
    ("shape", "returned (2, 3) torch.float32 instead of torch.float32 logits of shape (2, 4)"),
    ("none", "returned NoneType instead of torch.float32 logits of shape (2, 4)"),
    ("nan", "returned NaN logits"),
    ("empty", "removed every token"),
    ("posinf", "returned +inf logits"),
    ("double", "returned (2, 4) torch.float64 instead of torch.float32 logits of shape (2, 4)"),
])
def test_a_failing_sampler_becomes_an_error_naming_it_and_its_plugin(shaky_plugin, how, what):
    chain = build_chain("top_k,shaky", {"top_k": {"k": "2"}, "shaky": {"how": how}})
    with pytest.raises(SamplerError) as exc:
        chain.apply(torch.zeros(2, 4), state_for([0], [1]))
    assert exc.value.message == f"sampler 'shaky' (plugin 'shaky') {what}; generation stopped"
    assert exc.value.hint == "use a chain without 'shaky', or report it to the plugin's author"


def test_a_quill_error_from_a_sampler_keeps_its_words_and_names_the_plugin():
    chain = Chain([ChainLink("shaky", Misbehaving(how="quill"), "elsewhere")])
    with pytest.raises(SamplerError) as exc:
        chain.apply(torch.zeros(1, 3), state_for([0]))
    assert exc.value.message == "sampler 'shaky' (plugin 'elsewhere') failed: the sampler's own, well-described failure; generation stopped"
    assert exc.value.hint == "use a chain without 'shaky', or report it to the plugin's author"  # it gave none of its own


def test_a_quill_error_hint_from_a_sampler_is_kept():
    class Explains(Sampler):
        name = "explains"

        def apply(self, logits, state):
            raise QuillError("needs a longer prompt", hint="give it at least 3 tokens")

    with pytest.raises(SamplerError) as exc:
        Chain([ChainLink("explains", Explains(), "helpful")]).apply(torch.zeros(1, 3), state_for([0]))
    assert (exc.value.message, exc.value.hint) == (
        "sampler 'explains' (plugin 'helpful') failed: needs a longer prompt; generation stopped", "give it at least 3 tokens")


# --- check_sampler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_SAMPLERS)
def test_check_sampler_passes_every_builtin_with_its_defaults(name):
    check_sampler(host_mod.get_registry().get("samplers", name).obj)


@pytest.mark.parametrize(("name", "options"), [
    ("temperature", {"t": 0}),
    ("temperature", {"t": 1e-40}),
    ("temperature", {"t": 3.0}),
    ("top_k", {"k": 1}),
    ("top_p", {"p": 0.3, "min_keep": 4}),
    ("min_p", {"p": 1.0}),
    ("typical", {"p": 0.2}),
    ("repetition_penalty", {"penalty": 0.5, "window": 0}),
    ("frequency_penalty", {"penalty": -2.0, "window": 3}),
    ("presence_penalty", {"penalty": 50.0}),
    ("logit_bias", {"bias": "0:-inf,1:+3,49:-2"}),
    ("dry", {"multiplier": 2.0, "allowed_length": 1, "window": 0}),
    ("mirostat_v2", {"tau": 1.0, "eta": 0.5}),
    ("beam", {"num_beams": 2}),
])
def test_check_sampler_passes_builtins_with_strong_settings(name, options):
    check_sampler(host_mod.get_registry().get("samplers", name).obj, options, vocab_size=50, batch=2)


class Exclude(Sampler):
    """The example from the `gpt_runtime.sampling` docstring, plus noise drawn from the generator."""

    name = "exclude"
    options = {"id": Option(0, "the token id to ban", low=0)}

    def apply(self, logits, state):
        logits[:, self.id] = NEG
        return logits + torch.rand(logits.shape, generator=state.generator)


def test_check_sampler_passes_options_with_any_name():
    class Sized(Sampler):
        """Options named like check_sampler's own keywords reach the sampler."""

        name = "sized"
        options = {"vocab_size": Option(1, low=1), "batch": Option(2, low=1)}

        def apply(self, logits, state):
            return logits

    made = []

    def factory(**options):
        made.append(options)
        return Sized(**options)

    check_sampler(factory, {"vocab_size": 9, "batch": 4}, vocab_size=20, batch=2)
    assert made == [{"vocab_size": 9, "batch": 4}] * 2
    check_sampler(factory)
    assert made[-1] == {}


def test_check_sampler_passes_a_plugin_that_draws_from_the_generator():
    check_sampler(Exclude, {"id": 3})
    check_sampler(Exclude, {"id": 6}, vocab_size=7, batch=1)


def broken(body):
    """A sampler class whose apply is `body(logits, state)`."""
    return type("Broken", (Sampler,), {"name": "broken", "apply": lambda self, logits, state: body(logits, state)})


@pytest.mark.parametrize(("body", "message"), [
    (lambda x, s: x.nan_to_num(neginf=0.0), r"sampler 'broken' at step 0: apply gave \d+ token\(s\) that were -inf on input a finite logit"),
    (lambda x, s: x.index_fill_(1, torch.tensor([0]), float("nan")), "apply returned NaN logits"),
    (lambda x, s: x.index_fill_(1, torch.tensor([0]), float("inf")), r"apply returned \+inf logits"),
    (lambda x, s: x[:, :-1], r"apply returned shape \(3, 49\), not \(3, 50\)"),
    (lambda x, s: x.double(), "apply returned torch.float64, not torch.float32"),
    (lambda x, s: x.tolist(), "apply returned list, not a tensor"),
    (lambda x, s: x.fill_(NEG), "apply removed every token of row 0"),
    (lambda x, s: x + torch.rand(x.shape), "two fresh samplers with the same seed returned different logits at step 0; draw any randomness from state.generator"),
    (lambda x, s: x * float("nan") if s.step == 2 else x, "sampler 'broken' at step 2: apply returned NaN logits"),
    (lambda x, s: x[:, 10**6], "apply raised IndexError"),
])
def test_check_sampler_catches_broken_samplers(body, message):
    with pytest.raises(AssertionError, match=message):
        check_sampler(broken(body))


def test_check_sampler_catches_state_leaking_between_generations():
    class Stateful(Sampler):
        name = "leaky"
        calls = 0  # on the class: shared by every "fresh" sampler

        def apply(self, logits, state):
            type(self).calls += 1
            return logits - type(self).calls

    with pytest.raises(AssertionError, match="sampler 'leaky': two fresh samplers with the same seed returned different logits at step 0"):
        check_sampler(Stateful)


def test_check_sampler_catches_a_factory_that_reuses_its_object():
    shared = sampler("top_k")
    with pytest.raises(AssertionError, match="sampler 'top_k': the factory returned the same object twice"):
        check_sampler(lambda **options: shared)


def test_make_state_builds_a_seeded_context():
    state = make_state(batch=2, vocab_size=10, prompt_length=5, step=3, seed=7)
    assert state.tokens.shape == (2, 8) and state.tokens.dtype == torch.long
    assert int(state.tokens.max()) < 10 and state.generated.shape == (2, 3)
    again = make_state(batch=2, vocab_size=10, prompt_length=5, step=3, seed=7)
    assert state.tokens.equal(again.tokens)
    assert torch.rand(3, generator=state.generator).equal(torch.rand(3, generator=again.generator))
