"""`quill generate` and `quill samplers` through the real CLI, in subprocesses.

A module fixture writes a tiny checkpoint; another starts every command at once,
two at a time (each pays about 2 s for importing torch; usage errors are caught
before that and cost little). Each test works out in-process what its commands
must print and waits only for those, so a command that fails fails only its tests.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from gpt_runtime.checkpoint import load_checkpoint, save_checkpoint
from gpt_runtime.errors import QuillWarning
from gpt_runtime.generate import generate, generate_text
from gpt_runtime.model import GPT, GPTConfig
from gpt_runtime.sampling import build_chain, settings_from_strings
from helpers import SAMPLE_TEXT, one_line_error, quill_later, side_by_side
from plugins.char_tokenizer import CharTokenizer
from plugins.samplers import SAMPLERS

BLOCK = 16
SPACE_ID = 5  # the char tokenizer's ids: <pad> <unk> <bos> <eos>, then "\n", " ", ...
LONG_CHAIN = ("repetition_penalty,frequency_penalty,presence_penalty,logit_bias,dry,top_k,top_p,min_p,typical,"
              "temperature,mirostat_v2")
LONG_SETTINGS = ["repetition_penalty.penalty=1.3", "frequency_penalty.penalty=0.2", "presence_penalty.penalty=0.1",
                 f"logit_bias.bias={SPACE_ID}:-inf,6:1.5", "top_k=20", "top_p.p=0.9", "min_p=0.02", "typical=0.95",
                 "temperature=0.9", "dry.multiplier=0.8", "dry.breaker_ids=4", "mirostat_v2.tau=4"]  # 4 is "\n"
UNKNOWN_PROMPT = "All: Æq"  # "Æ" and "q" are not in the corpus
LONG_PROMPT = SAMPLE_TEXT[:40]


def ok(out: subprocess.CompletedProcess, warns: bool = False) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, err[-3000:]
    if warns:
        assert err and all(line.startswith("quill: warning: ") for line in err.splitlines()), err
    else:
        assert err == "", err
    return out.stdout.decode("utf-8")


def usage_error(out: subprocess.CompletedProcess) -> tuple[str, str | None]:
    """Exit code 2 with one error line and at most a hint: (message, hint)."""
    return one_line_error(out, 2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_torch_thread) -> Path:
    """A tiny checkpoint of an untrained model whose greedy text varies."""
    path = tmp_path_factory.mktemp("generate") / "model.safetensors"
    tok = CharTokenizer.train(SAMPLE_TEXT)
    assert tok.encode(" ") == [SPACE_ID]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)  # untrained, but its greedy text varies
    save_checkpoint(path, model, tok, step=1)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt):
    """The checkpoint as `quill generate` loads it: what the CLI's text is checked against."""
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def tok(loaded) -> CharTokenizer:
    return loaded.tokenizer


def in_process(loaded, prompt: str, spec: str, settings: list[str] = (), **options) -> str:
    """The text generating in this process gives (its warnings are the CLI tests' business)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuillWarning)
        return generate_text(loaded.model, loaded.tokenizer, prompt,
                             chain=build_chain(spec, settings_from_strings(list(settings))), **options)


@pytest.fixture(scope="module")
def greedy(loaded) -> str:
    return in_process(loaded, "First", "greedy", max_new_tokens=30)


@pytest.fixture(scope="module")
def stop(greedy) -> str:
    """A stop string from the middle of the greedy text."""
    return greedy[8:11]


def commands(ckpt: Path, stop: str) -> dict[str, list[str]]:
    """Every command the tests run, by name: the ones that generate first, as they take longest."""
    def gen(*args: str) -> list[str]:
        return ["generate", str(ckpt), *args]

    chain_args = ["--prompt", "All:", "--sampler", LONG_CHAIN, "--max-new-tokens", "40"]
    for setting in LONG_SETTINGS:
        chain_args += ["--set", setting]
    return {
        # generating: about 2 s each
        "chain_a": gen(*chain_args, "--seed", "11"),
        "chain_b": gen(*chain_args, "--seed", "11"),
        "chain_c": gen(*chain_args, "--seed", "12"),
        "chain_stop": gen(*chain_args, "--seed", "11", "--stop", "\\n"),  # the CLI reads \n as a newline
        "greedy": gen("--prompt", "First", "--sampler", "greedy", "--max-new-tokens", "30", "--device", "cpu"),
        "probs": gen("--prompt", "First", "--sampler", "greedy", "--max-new-tokens", "5", "--show-probs", "2"),
        "beams": gen("--prompt", "First", "--num-beams", "3", "--max-new-tokens", "12"),
        "stop": gen("--prompt", "First", "--sampler", "greedy", "--max-new-tokens", "30", "--stop", "never\\n", "--stop", stop),
        "unknown": gen("--prompt", UNKNOWN_PROMPT, "--sampler", "greedy", "--max-new-tokens", "10"),
        "long": gen("--prompt", LONG_PROMPT, "--sampler", "greedy", "--max-new-tokens", "10"),
        "bf16": gen("--prompt", "First", "--sampler", "greedy", "--max-new-tokens", "10", "--dtype", "bfloat16"),
        "int8": gen("--prompt", "First", "--sampler", "greedy", "--max-new-tokens", "10", "--quantize", "int8"),
        # listing and usage errors: no torch, quick
        "samplers": ["samplers"],
        "samplers_json": ["samplers", "--json"],
        "unknown_sampler": gen("--sampler", "top_k,tempurature"),
        "unknown_option": gen("--sampler", "top_p", "--set", "top_p.pp=0.5"),
        "top_p_0": gen("--set", "top_p.p=0"),
        "top_p_1.5": gen("--set", "top_p.p=1.5"),
        "temperature_-1": gen("--set", "temperature=-1"),
        "set_without_equals": gen("--set", "temperature"),
        "set_outside_chain": gen("--set", "min_p.p=0.1"),
        "num_beams_0": gen("--num-beams", "0"),
        "max_new_tokens_-1": gen("--max-new-tokens", "-1"),
        "show_probs_-1": gen("--show-probs", "-1"),
        "show_probs_with_beams": gen("--num-beams", "2", "--show-probs"),
        "beams_twice": gen("--num-beams", "2", "--set", "beam.num_beams=3"),
        "seed_negative": gen("--seed", "-1"),
        "seed_too_big": gen("--seed", str(2**64)),
    }


@pytest.fixture(scope="module")
def out(ckpt, stop) -> Iterator[dict[str, Future[subprocess.CompletedProcess]]]:
    """Every command, started two at a time, one torch thread each: futures by name."""
    jobs = {name: quill_later(*args, env={"OMP_NUM_THREADS": "1"}) for name, args in commands(ckpt, stop).items()}
    with side_by_side(jobs) as futures:
        yield futures


def test_a_long_chain_of_every_filter_and_penalty(out, loaded, tok):
    a = ok(out["chain_a"].result())
    # the CLI builds the chain and seeds the draw exactly as the engine does
    assert a == in_process(loaded, "All:", LONG_CHAIN, LONG_SETTINGS, max_new_tokens=40, seed=11)
    assert 0 < len(tok.encode(a)) <= 40 and set(a) <= set(tok.chars)
    assert " " not in a  # logit_bias banned it
    assert ok(out["chain_b"].result()) == a, "the same --seed must give the same text"
    assert ok(out["chain_c"].result()) != a, "another --seed should give another text"
    assert "\n" in a[1:] and ok(out["chain_stop"].result()) == a[:a.index("\n")]


def test_greedy_and_beam_search(out, loaded, greedy):
    assert len(greedy) == 30 and len(set(greedy)) > 5
    assert ok(out["greedy"].result()) == greedy
    beams = in_process(loaded, "First", "beam", ["beam.num_beams=3"], max_new_tokens=12)  # --num-beams alone: just beam
    assert ok(out["beams"].result()) == beams and len(beams) > 0


def test_stop_strings(out, greedy, stop):
    assert greedy.find(stop) >= 4
    text = ok(out["stop"].result())
    assert text == greedy[:greedy.find(stop)] and stop not in text and len(text) >= 4


def test_show_probs_prints_a_line_per_token(out, loaded, tok, greedy):
    lines = ok(out["probs"].result()).splitlines()
    tokens = list(generate(loaded.model, tok, "First", chain=build_chain("greedy"), max_new_tokens=5, probs=2))[:-1]
    assert len(lines) == len(tokens) == 5
    for line, token in zip(lines, tokens):
        match = re.fullmatch(r"('.*?')\s+(\d+\.\d\d)%   (.*)", line)
        assert match, line
        assert ast.literal_eval(match[1]) == tok.pieces[token.id].decode()
        assert float(match[2]) == pytest.approx(100 * token.prob, abs=0.006)
        alternatives = re.findall(r"('(?:[^'\\]|\\.)*') (\d+\.\d)%", match[3])
        assert [(ast.literal_eval(t), float(p)) for t, p in alternatives] == [
            (text, pytest.approx(100 * p, abs=0.06)) for _, text, p in token.top]
    assert "".join(ast.literal_eval(re.match(r"'.*?'", line)[0]) for line in lines) == greedy[:5]


def test_other_dtypes_generate(out, tok):
    for name in ("bf16", "int8"):
        text = ok(out[name].result())
        assert 0 < len(text) <= 10 and set(text) <= set(tok.chars)


def test_unknown_characters_are_named_and_generation_goes_on(out, loaded):
    result = out["unknown"].result()
    assert ok(result, warns=True) == in_process(loaded, UNKNOWN_PROMPT, "greedy", max_new_tokens=10)
    assert result.stderr.decode() == "quill: warning: 2 character(s) not in the char vocabulary became <unk>: 'q' 'Æ'\n"


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(out, loaded):
    result = out["long"].result()
    expected = in_process(loaded, LONG_PROMPT, "greedy", max_new_tokens=10)
    assert ok(result, warns=True) == expected and len(expected) > 0
    assert result.stderr.decode() == ("quill: warning: the prompt is 40 tokens, longer than the context window (16); "
                                      "its first 24 tokens were dropped\n")


def test_samplers_lists_every_builtin_with_its_options(out):
    rows = {row["name"]: row for row in json.loads(ok(out["samplers_json"].result()))}
    text = ok(out["samplers"].result())
    assert {cls.name for cls in SAMPLERS} <= set(rows) and len(SAMPLERS) == 13
    for cls in SAMPLERS:
        row = rows[cls.name]
        assert row["plugin"] == "samplers"
        assert row["description"] == cls.__doc__.strip().splitlines()[0]
        assert row["options"] == {
            name: {"type": option.type.__name__, "default": option.default, "range": option.describe_range(), "help": option.help}
            for name, option in cls.options.items()}
        assert f"{cls.name}  [plugin samplers]  {row['description']}" in text.splitlines()
        for name, option in cls.options.items():
            assert f"    {cls.name}.{name} = {option.default!r}  ({option.type.__name__}" in text
    assert rows["top_p"]["options"]["p"]["default"] == 0.95 and rows["top_p"]["options"]["p"]["range"] == "0 < value <= 1"
    assert "    temperature.t = 0.8  (float, 0 <= t)  " in text


@pytest.mark.parametrize(("name", "message", "hint"), [
    ("unknown_sampler", "no sampler named 'tempurature'", "did you mean 'temperature'?"),
    ("unknown_option", "sampler 'top_p' has no option 'pp'", "did you mean 'p'?"),
    ("top_p_0", "top_p.p = 0.0 is out of range", "it needs 0 < top_p.p <= 1"),
    ("top_p_1.5", "top_p.p = 1.5 is out of range", "it needs 0 < top_p.p <= 1"),
    ("temperature_-1", "temperature.t = -1.0 is out of range", "it needs 0 <= temperature.t"),
    ("set_without_equals", "setting 'temperature' is not name.option=value", "for example top_p.p=0.9 or temperature=0.7"),
    ("set_outside_chain", "'min_p' is not in the sampler chain top_k,top_p,temperature",
     "add it to the chain, e.g. --sampler top_k,top_p,min_p,temperature"),
    ("num_beams_0", "--num-beams must be at least 1, not 0", None),
    ("max_new_tokens_-1", "--max-new-tokens must be 0 or more, not -1", None),
    ("show_probs_-1", "--show-probs must be 0 or more, not -1", None),
    ("show_probs_with_beams", "--show-probs does not work with beam search", "drop --show-probs, or --num-beams and beam"),
    ("beams_twice", "--num-beams and --set beam.num_beams both set the number of beams; give one", None),
    ("seed_negative", "--seed must be from 0 to 2**64 - 1, not -1", None),
    ("seed_too_big", f"--seed must be from 0 to 2**64 - 1, not {2**64}", None),
])
def test_bad_generate_options_are_one_line_usage_errors(out, name, message, hint):
    assert usage_error(out[name].result()) == (message, hint)
