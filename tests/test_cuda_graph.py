"""The CUDA graph decoding path (decode.GraphStep) against eager decoding on the same GPU.

Marked `cuda` (`make test-gpu`): conftest skips the file where no CUDA device is.
The models are tiny; capture takes milliseconds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from generation_helpers import BLOCK, cancelled_after, greedy_without_eos, ids_of, tiny_gpt
from generation_helpers import run as run_generation
from gpt_runtime.backend import get_backend
from gpt_runtime.decode import GraphStep, Step, step_for
from gpt_runtime.generate import Done, generate_batch
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.inference import prepare_model
from gpt_runtime.sampling import Sampler, build_chain
from helpers import SAMPLE_TEXT, add_builtin_plugin
from plugins.char_tokenizer import CharTokenizer

pytestmark = pytest.mark.cuda


class Owner:
    """What claims a graph's cache (a window does): anything a weak reference can point to."""


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train(SAMPLE_TEXT)


def on_cuda(model, dtype=torch.float32, graph=True):
    return prepare_model(copy.deepcopy(model), get_backend("cuda"), dtype, graph=graph)


@pytest.fixture(scope="module")
def pair(tok):
    """The same tiny model prepared eager and with a captured step, float32."""
    model = tiny_gpt(tok.vocab_size)
    return on_cuda(model, graph=False), on_cuda(model)


@pytest.mark.parametrize("arch", [dict(), dict(position="rope", norm="rmsnorm", mlp="swiglu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_captured_step_gives_eager_greedy_text(tok, arch, dtype):
    model = tiny_gpt(tok.vocab_size, **arch)
    eager, graphed = on_cuda(model, dtype, graph=False), on_cuda(model, dtype)
    chain = greedy_without_eos(tok)
    want, _ = run_generation(eager, tok, "First", chain=chain, max_new_tokens=20)
    got, done = run_generation(graphed, tok, "First", chain=chain, max_new_tokens=20)
    assert ids_of(got) == ids_of(want) and done.reason == "length"
    step = graphed.__dict__["_graph_step"]
    assert isinstance(step, GraphStep) and step.graph is not None and step.capture_seconds < 5


def test_the_captured_step_computes_the_eager_logits(tok, pair):
    eager, graphed = pair
    owner = Owner()
    g, e = step_for(graphed, owner), Step(eager)
    assert isinstance(g, GraphStep)
    prompt = torch.tensor([[1, 2, 3, 4, 5]], device="cuda")
    with torch.inference_mode():
        gc, ec = g.new_cache(), e.new_cache()
        graphed(prompt, cache=gc), eager(prompt, cache=ec)
        for token in (6, 7, 8, 9):
            idx = torch.tensor([token], device="cuda")
            torch.testing.assert_close(g(idx, gc), e(idx, ec), atol=1e-4, rtol=1e-4)
    assert gc.length == ec.length == 9


def test_a_second_window_while_the_first_is_alive_decodes_eagerly(pair):
    _, graphed = pair
    first, second = Owner(), Owner()
    assert isinstance(step_for(graphed, first), GraphStep)
    assert type(step_for(graphed, second)) is Step  # the static cache is taken
    del first
    assert isinstance(step_for(graphed, second), GraphStep)


def test_past_the_context_window_the_graph_follows_the_sliding_window(tok, pair):
    eager, graphed = pair
    chain = greedy_without_eos(tok)
    want, _ = run_generation(eager, tok, "First", chain=chain, max_new_tokens=3 * BLOCK)
    got, done = run_generation(graphed, tok, "First", chain=chain, max_new_tokens=3 * BLOCK)
    assert ids_of(got) == ids_of(want) and len(got) == 3 * BLOCK


def test_stop_strings_probabilities_and_sampling_seeds_on_the_graph(tok, pair):
    eager, graphed = pair
    chain = build_chain("top_k,temperature", {"top_k": {"k": 5}, "temperature": {"t": 1.5}})
    want, _ = run_generation(eager, tok, "First", chain=chain, max_new_tokens=30, seed=3, probs=2)
    got, _ = run_generation(graphed, tok, "First", chain=chain, max_new_tokens=30, seed=3, probs=2)
    assert ids_of(got) == ids_of(want)
    assert [t.top[0][0] for t in got] == [t.top[0][0] for t in want]
    text = "".join(t.text for t in want)
    stop = text[5:7]
    tokens, done = run_generation(graphed, tok, "First", chain=chain, max_new_tokens=30, seed=3, stop=stop)
    assert done.reason == "stop" and stop not in "".join(t.text for t in tokens)


def test_cancel_stops_the_graph_within_one_token(tok, pair):
    _, graphed = pair
    events = cancelled_after(graphed, tok, 3)
    assert isinstance(events[-1], Done) and events[-1].reason == "cancelled" and len(events) <= 5


def test_beam_search_and_batches_run_eagerly_on_a_graph_prepared_model(tok, pair):
    eager, graphed = pair
    beam = build_chain("beam", {"beam": {"num_beams": 3}})
    assert ids_of(run_generation(graphed, tok, "First", chain=beam, max_new_tokens=12)[0]) == \
        ids_of(run_generation(eager, tok, "First", chain=beam, max_new_tokens=12)[0])
    one = build_chain("beam", {"beam": {"num_beams": 1}})  # one row, reordered: stepped eagerly
    assert ids_of(run_generation(graphed, tok, "First", chain=one, max_new_tokens=12)[0]) == \
        ids_of(run_generation(eager, tok, "First", chain=one, max_new_tokens=12)[0])
    greedy = greedy_without_eos(tok)  # and the graph's own cache is used again afterwards
    assert ids_of(run_generation(graphed, tok, "First", chain=greedy, max_new_tokens=20)[0]) == \
        ids_of(run_generation(eager, tok, "First", chain=greedy, max_new_tokens=20)[0])
    chain = build_chain("top_k")
    assert generate_batch(graphed, tok, "First", 3, chain=chain, max_new_tokens=10, seed=1).texts == \
        generate_batch(eager, tok, "First", 3, chain=chain, max_new_tokens=10, seed=1).texts


def test_a_plugin_sampler_sees_plain_logits_on_the_graph(tok, pair, monkeypatch):
    seen = []

    class Spy(Sampler):
        """Records what it is given; changes nothing."""

        name = "spy"

        def apply(self, logits, state):
            seen.append((logits.device.type, logits.dtype, tuple(logits.shape)))
            return logits

    class SpyPlugin:
        @hookimpl
        def quill_register_samplers(self, register):
            register("spy", Spy)

    add_builtin_plugin(monkeypatch, "spy_plugin", SpyPlugin())
    _, graphed = pair
    run_generation(graphed, tok, "First", chain=build_chain("spy,greedy"), max_new_tokens=5)
    assert seen == [("cuda", torch.float32, (1, graphed.config.vocab_size))] * 5
