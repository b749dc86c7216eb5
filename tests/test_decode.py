"""The flat decoding steps (decode.py) against GPT.forward, and the CPU weight formats against float32."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from generation_helpers import tiny_gpt
from gpt_runtime.decode import GraphStep, Step, step_for
from gpt_runtime.inference import Bf16Linear, Int8Linear, fbgemm_unavailable, prepare_model
from gpt_runtime.model import KVCache
from plugins import backends

ARCHITECTURES = [dict(position=p, norm=n, mlp=m, bias=b, tie_embeddings=t) for p, n, m, b, t in itertools.product(
    ("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "gelu_tanh", "swiglu", "relu2"), (False, True), (True,))]
ARCHITECTURES.append(dict(tie_embeddings=False, bias=True))


def stepped_logits(model, prompt: torch.Tensor, follow: torch.Tensor) -> torch.Tensor:
    """Prefill `prompt` (rows, T), then feed `follow` (rows, N) one column at a time through `Step`."""
    step = Step(model)
    cache = KVCache(model.config, prompt.size(0), prompt.device, step.cache_dtype)
    out = [model(prompt, cache=cache)[0][:, -1].float()]
    for column in follow.unbind(1):
        out.append(step(column, cache))
    return torch.stack(out, 1)


def forward_logits(model, prompt: torch.Tensor, follow: torch.Tensor) -> torch.Tensor:
    """The same positions' logits from one plain forward pass over everything."""
    whole = torch.cat([prompt, follow], 1)
    logits, _ = model(whole)
    return logits[:, prompt.size(1) - 1:].float()


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: "-".join(str(v) for v in a.values()))
@torch.inference_mode()
def test_the_flat_step_computes_what_forward_computes(arch):
    model = tiny_gpt(40, **arch)
    g = torch.Generator().manual_seed(1)
    prompt, follow = torch.randint(40, (3, 5), generator=g), torch.randint(40, (3, 9), generator=g)
    expected = forward_logits(model, prompt, follow)
    got = stepped_logits(model, prompt, follow)
    assert got.shape == expected.shape == (3, 10, 40)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_full_cache_is_refused_by_the_step():
    model = tiny_gpt(40, block_size=4)
    step = Step(model)
    cache = step.new_cache()
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        with pytest.raises(Exception, match=r"the KV cache is full \(4 positions\)"):
            step(torch.tensor([5]), cache)


def test_a_model_prepared_without_a_graph_decodes_eagerly_on_every_device():
    model = prepare_model(tiny_gpt(40), backends.CpuBackend(), torch.float32)
    assert type(step_for(model, Window())) is Step and type(step_for(model)) is Step


def test_graphs_are_refused_off_cuda():
    with pytest.raises(Exception, match="CUDA graphs need the cuda backend, not cpu"):
        prepare_model(tiny_gpt(40), backends.CpuBackend(), torch.float32, graph=True)


# --- the CPU's weight formats --------------------------------------------------------------------

def prepared(arch: dict, dtype: torch.dtype, quantize: str = "none"):
    reference = tiny_gpt(40, **arch)
    return reference, prepare_model(copy.deepcopy(reference), backends.CpuBackend(), dtype, quantize)


@pytest.mark.parametrize("arch", [dict(), dict(position="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True)])
@torch.inference_mode()
def test_bf16_weights_keep_float32_activations_and_stay_close(arch):
    reference, model = prepared(arch, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Bf16Linear)]
    assert len(linears) == 1 + 2 * (5 if arch else 4)  # every block's projections and the output head
    assert model.wte.weight.dtype == torch.float32  # the embedding table, norms and cache stay float32
    g = torch.Generator().manual_seed(2)
    prompt, follow = torch.randint(40, (1, 12), generator=g), torch.randint(40, (1, 6), generator=g)
    expected = forward_logits(reference, prompt, follow)
    scale = expected.abs().max()
    # The prompt takes the many-rows path (weights widened), each step the few-rows one (bf16 products)
    got = stepped_logits(model, prompt, follow)
    assert got.dtype == torch.float32
    assert 0 < (got - expected).abs().max() < 0.05 * scale  # oneDNN-packed (AVX512) runs the prompt in bf16 too


@pytest.mark.skipif(fbgemm_unavailable() is not None, reason=f"fbgemm: {fbgemm_unavailable()}")
@torch.inference_mode()
def test_int8_weights_use_fbgemm_on_x86_for_prompts_and_steps_alike():
    reference, model = prepared({}, torch.float32, "int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.packed is not None and m.qweight is None for m in layers)  # only fbgemm's copy is kept
    g = torch.Generator().manual_seed(3)
    prompt, follow = torch.randint(40, (2, 12), generator=g), torch.randint(40, (2, 6), generator=g)
    expected = forward_logits(reference, prompt, follow)
    got = stepped_logits(model, prompt, follow)
    assert 0 < (got - expected).abs().max() < 0.05 * expected.abs().max()


@torch.inference_mode()
def test_int8_without_fbgemm_falls_back_to_the_portable_kernel(monkeypatch):
    from gpt_runtime import inference

    monkeypatch.setattr(inference, "fbgemm_unavailable", lambda: "no x86 int8 engine (a test)")
    reference, model = prepared({}, torch.float32, "int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.packed is None and m.qweight.dtype == torch.int8 for m in layers)
    idx = torch.randint(40, (2, 10), generator=torch.Generator().manual_seed(4))
    expected, got = reference(idx)[0], model(idx)[0]
    assert 0 < (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("arch", [dict(), dict(position="rope", norm="rmsnorm", mlp="swiglu"), dict(position="rope", bias=True)])
@torch.inference_mode()
def test_the_step_a_cuda_graph_captures_computes_the_eager_logits(arch):
    # What GraphStep records (whole-window attention under a mask, the position a tensor) runs
    # on any device; here it is checked on the CPU, uncaptured, past a refilled cache too.
    model = tiny_gpt(40, **arch)
    graph, eager = GraphStep(model), Step(model)
    gc, ec = graph.new_cache(), eager.new_cache()
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    model(prompt, cache=gc), model(prompt, cache=ec)
    for t in range(6, 30):
        idx = torch.tensor([t % 40])
        graph.idx.copy_(idx)
        graph.pos.fill_(gc.length)
        got = graph._replayable()
        gc.length += 1
        torch.testing.assert_close(got, eager(idx, ec), atol=2e-5, rtol=1e-5)
    assert gc is graph.new_cache() and gc.length == 0  # one cache, handed out again


# --- the CUDA graph's bookkeeping, on the CPU: capture and replay stood in for -----------------------------

class Window:
    """What claims a graph's cache: anything a weak reference can point to."""


@pytest.fixture
def replayed(monkeypatch):
    """GraphStep with its capture replaced: "replay" recomputes what the graph records, into the same
    logits tensor, so everything around the graph (its one cache, ownership, reuse) runs on the CPU."""
    from types import SimpleNamespace

    def capture(self):
        def replay():
            self.graph.replays += 1
            self.logits.copy_(self._replayable())
        self.logits = self._replayable()
        self.graph = SimpleNamespace(replay=replay, replays=0)
        self.capture_seconds = 0.0

    monkeypatch.setattr(GraphStep, "_capture", capture)

    def graph_model(**arch):
        model = tiny_gpt(40, **arch)
        model.decode_graph = True  # what prepare_model(..., graph=True) records on CUDA
        return model
    return graph_model


def greedy_ids(model, tok, n: int, chain=None) -> list[int]:
    from generation_helpers import greedy_without_eos, ids_of, run

    return ids_of(run(model, tok, [1, 2, 3], chain=chain or greedy_without_eos(tok), max_new_tokens=n)[0])


@pytest.fixture(scope="module")
def tok():
    from plugins.char_tokenizer import CharTokenizer

    return CharTokenizer([chr(c) for c in range(97, 133)])  # 36 pieces + 4 specials: 40 ids


@torch.inference_mode()
def test_the_replayed_step_decodes_as_eager_past_the_window_and_after_a_one_beam_search(replayed, tok):
    from gpt_runtime.sampling import build_chain

    model = replayed(position="rope")
    eager = copy.deepcopy(model)
    eager.decode_graph = False
    want = greedy_ids(eager, tok, 80)  # 80 > 2 x the 32-token window: the cache is refilled twice
    assert greedy_ids(model, tok, 80) == want
    graph = model.__dict__["_graph_step"]
    assert graph.graph.replays > 0 and graph.buffer is graph.static.kv
    beam = build_chain("beam", {"beam": {"num_beams": 1}})  # one row that beam search reorders
    replays = graph.graph.replays
    assert greedy_ids(model, tok, 10, beam) == greedy_ids(eager, tok, 10, beam)
    assert graph.graph.replays == replays  # a reordered cache is no longer the captured buffer: eager
    assert greedy_ids(model, tok, 80) == want and graph.graph.replays > replays  # the buffer is back in use


def test_a_second_window_decodes_eagerly_while_the_first_holds_the_graph(replayed):
    model = replayed()
    first, second = Window(), Window()
    assert isinstance(step_for(model, first), GraphStep)
    assert type(step_for(model, second)) is Step
    del first
    assert isinstance(step_for(model, second), GraphStep)


def test_calibration_compares_each_replayed_step_not_the_last_one(replayed, monkeypatch):
    from gpt_runtime import calibrate
    from gpt_runtime.calibrate import GenerationPath

    model = replayed(block_size=64)
    trials = calibrate.measure(model, backends.CpuBackend(), [GenerationPath("float32"), GenerationPath("float32", graph=True)])
    graph = trials[1]
    assert graph.path == "float32 graph" and graph.kl < 1e-6 and graph.agreement == 1.0
    # Refused, if at all, for time (a busy machine can slow one prompt twofold), never for what it computed.
    assert not graph.refused or graph.refused.startswith("prefill")
