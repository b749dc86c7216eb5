"""The GPT model: causality, every architecture option, the bigram case, sizes, config errors, learning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gpt_runtime.model as model_module
from gpt_runtime.errors import QuillError
from gpt_runtime.model import GPT, GPTConfig

VOCAB = 23


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMBOS = list(itertools.product(("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "swiglu", "relu2"), (True, False)))


def tiny(**overrides) -> GPTConfig:
    values = dict(vocab_size=VOCAB, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    values.update(overrides)
    return GPTConfig(**values)


def loud(model: GPT, seed: int = 0) -> GPT:
    """Re-draw every parameter with a large spread, so that any leak of a later token shows up clearly.

    (At the default init, std 0.02, a leak could hide below float tolerance.)
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.eval()


def changed_positions(model: GPT, idx: torch.Tensor, t: int) -> tuple[float, float]:
    """Change token t; return (largest logit change before t, largest change at t and after)."""
    other = idx.clone()
    other[0, t] = (idx[0, t] + 1 + t) % VOCAB
    assert other[0, t] != idx[0, t]
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(other)
    diff = (a - b).abs().amax(dim=-1)[0]
    before = float(diff[:t].max()) if t else 0.0
    return before, float(diff[t:].max())


def check_causal(model: GPT, T: int) -> None:
    idx = torch.randint(VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    for t in range(T):
        before, after = changed_positions(model, idx, t)
        assert before <= 1e-5, f"changing token {t} changed an earlier position's logits by {before}"
        assert after > 1e-3, f"changing token {t} changed nothing at or after it ({after})"


@pytest.mark.parametrize("position,norm,mlp,tie", COMBOS)
def test_every_architecture_is_causal(position, norm, mlp, tie):
    model = loud(GPT(tiny(position=position, norm=norm, mlp=mlp, tie_embeddings=tie)).double())
    check_causal(model, T=12)


def test_the_causality_check_catches_a_leak(monkeypatch):
    """Attention without the causal mask must fail the check above: the check can fail."""
    real = F.scaled_dot_product_attention

    def leaky(q, k, v, is_causal=False, **kw):
        return real(q, k, v, is_causal=False, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", leaky)
    model = loud(GPT(tiny()).double())
    with pytest.raises(AssertionError, match="changed an earlier position"):
        check_causal(model, T=6)


@pytest.mark.parametrize("position,norm,mlp,tie", COMBOS)
def test_every_architecture_trains_with_finite_gradients(position, norm, mlp, tie):
    torch.manual_seed(0)
    model = GPT(tiny(position=position, norm=norm, mlp=mlp, tie_embeddings=tie, dropout=0.1)).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(VOCAB, (3, 12), generator=g)
    y = torch.randint(VOCAB, (3, 12), generator=g)
    logits, loss = model(x, y)
    assert logits.shape == (3, 12, VOCAB)
    # an untrained model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(VOCAB)) < 0.5
    loss.backward()
    names = dict(model.named_parameters())
    assert ("wpe.weight" in names) == (position == "learned")
    assert ("blocks.0.mlp.gate.weight" in names) == (mlp == "swiglu")
    assert (model.lm_head.weight is model.wte.weight) == tie
    for name, p in names.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_targets_of_minus_one_are_ignored():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    y = torch.randint(VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    masked = y.clone()
    masked[:, 5:] = -1
    logits, loss = model(x, masked)
    expected = F.cross_entropy(logits[:, :5].reshape(-1, VOCAB), y[:, :5].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_a_sequence_longer_than_the_context_is_a_clear_error():
    model = GPT(tiny(block_size=8))
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly the block size is fine
    with pytest.raises(QuillError, match=r"9 tokens is longer than the context window \(8\)"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_zero_layers_is_a_bigram_model(position):
    model = loud(GPT(tiny(n_layer=0, position=position)).double())
    assert model.wpe is None and len(model.blocks) == 0
    idx = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, _ = model(idx)
        # each position's logits are those of its token alone, wherever it stands
        alone, _ = model(idx.reshape(-1, 1))
        table, _ = model(torch.arange(VOCAB).reshape(-1, 1))
    assert torch.allclose(logits.reshape(-1, VOCAB), alone[:, 0], atol=1e-12)
    assert torch.allclose(logits, table[idx, 0], atol=1e-12)
    # and changing one token changes only its own position
    for t in range(12):
        other = idx.clone()
        other[:, t] = (idx[:, t] + 1) % VOCAB
        with torch.no_grad():
            changed = (model(other)[0] - logits).abs().amax(dim=-1)
        assert changed[:, t].min() > 1e-3
        others = torch.cat([changed[:, :t], changed[:, t + 1:]], dim=1)
        assert (others == 0).all()


# --- sizes ---------------------------------------------------------------------------------------

def expected_params(c: GPTConfig, with_positions: bool = False) -> int:
    """Parameter count from the architecture, worked out by hand."""
    C, V = c.n_embd, c.vocab_size
    norm = C * (2 if (c.norm == "layernorm" and c.bias) else 1)
    hidden = 64 * math.ceil(8 * C / 3 / 64) if c.mlp == "swiglu" else 4 * C
    if c.mlp == "swiglu":  # gate, up, down
        mlp = 3 * C * hidden + ((2 * hidden + C) if c.bias else 0)
    else:  # up, down
        mlp = 2 * C * hidden + ((hidden + C) if c.bias else 0)
    attn = 4 * C * C + (4 * C if c.bias else 0)
    block = 2 * norm + attn + mlp
    n = V * C + c.n_layer * block + norm + (0 if c.tie_embeddings else V * C)
    if with_positions and c.position == "learned" and c.n_layer > 0:
        n += c.block_size * C
    return n


@pytest.mark.parametrize("overrides", [
    {},
    {"bias": True},
    {"norm": "rmsnorm", "mlp": "swiglu"},
    {"mlp": "swiglu", "bias": True, "position": "rope"},
    {"mlp": "relu2", "tie_embeddings": False},
    {"n_layer": 0},
])
def test_num_params_matches_the_architecture(overrides):
    c = tiny(**overrides)
    model = GPT(c)
    assert model.num_params() == expected_params(c)
    assert model.num_params(exclude_positions=False) == expected_params(c, with_positions=True)
    assert model.num_params(exclude_positions=False) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_tied_and_untied_differ_by_one_embedding_matrix(mlp):
    tied, untied = GPT(tiny(mlp=mlp, tie_embeddings=True)), GPT(tiny(mlp=mlp, tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == VOCAB * 16


def test_flops_per_token():
    c = tiny(n_layer=2, n_embd=32, block_size=32)
    model = GPT(c)
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 32
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 32 * 8
    assert model.flops_per_token(seq_len=8) < model.flops_per_token()
    assert GPT(tiny(n_layer=0)).flops_per_token() == 6 * GPT(tiny(n_layer=0)).num_params()


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"n_embd": 30, "n_head": 4}, r"n_embd \(30\) must be a multiple of n_head \(4\)"),
    ({"position": "alibi"}, r"model position 'alibi' is not one of learned, rope"),
    ({"norm": "batchnorm"}, r"model norm 'batchnorm' is not one of layernorm, rmsnorm"),
    ({"mlp": "GELU"}, r"model mlp 'GELU' is not one of gelu, gelu_tanh, swiglu, relu2"),
    ({"position": "rope", "n_embd": 18, "n_head": 6}, r"rope needs an even head size; n_embd / n_head is 3"),
    ({"vocab_size": 0}, r"vocab_size must be at least 1, not 0"),
    ({"block_size": 0}, r"block_size must be at least 1"),
    ({"n_head": 0}, r"n_head must be at least 1"),
    ({"n_layer": -1}, r"n_layer must be 0 or more, not -1"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), not 1.0"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
])
def test_config_errors(overrides, message):
    with pytest.raises(QuillError, match=message):
        tiny(**overrides)


def test_odd_head_size_is_fine_with_learned_positions():
    GPT(tiny(position="learned", n_embd=18, n_head=6))


def test_config_from_dict_round_trip_and_unknown_key():
    c = tiny(position="rope", mlp="swiglu", tie_embeddings=False)
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(QuillError, match="unknown model config key 'n_layers'") as info:
        GPTConfig.from_dict({**c.to_dict(), "n_layers": 3})
    assert info.value.hint == "did you mean 'n_layer'?"


# --- learning ------------------------------------------------------------------------------------

PERIODIC = "hello world! "  # 'l' is followed by l, o or d: only context tells which


def _train_on_periodic(n_layer: int, steps: int) -> tuple[float, float]:
    """Train on PERIODIC repeated; return (final mean loss on all windows, bigram entropy of the text)."""
    chars = sorted(set(PERIODIC))
    text = PERIODIC * 40
    data = torch.tensor([chars.index(c) for c in text])
    block = 16
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=block, n_layer=n_layer, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        offsets = torch.randint(len(data) - block, (16,), generator=g)
        batch = torch.stack([data[o:o + block + 1] for o in offsets])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    windows = torch.stack([data[o:o + block + 1] for o in range(len(PERIODIC))])  # every phase
    with torch.no_grad():
        _, loss = model(windows[:, :-1], windows[:, 1:])
    # The conditional entropy H(next | current) of the periodic text, in nats: the floor for a bigram model.
    follows: dict[str, list[str]] = {}
    for a, b in zip(PERIODIC, PERIODIC[1:] + PERIODIC[0]):
        follows.setdefault(a, []).append(b)
    h = 0.0
    for nexts in follows.values():
        for b in set(nexts):
            p = nexts.count(b) / len(nexts)
            h -= len(nexts) / len(PERIODIC) * p * math.log(p)
    return loss.item(), h


def test_a_tiny_model_overfits_a_tiny_repeated_corpus():
    """Threshold: below 0.1 nats per token after 150 AdamW steps.

    The floor is not 0: the first target of a window is predicted from one character,
    so even a perfect model pays H(next | current) / block_size (about 0.02 nats here).
    """
    loss, bigram_entropy = _train_on_periodic(n_layer=1, steps=150)
    assert bigram_entropy > 0.3  # the text is not predictable from one character
    assert loss < 0.1, f"loss {loss:.4f} after 150 steps"


def test_a_bigram_model_cannot_beat_the_bigram_entropy():
    """What attention buys: with n_layer=0 the loss stays at or above H(next | current)."""
    loss, bigram_entropy = _train_on_periodic(n_layer=0, steps=150)
    assert loss >= bigram_entropy - 1e-3
    assert loss < bigram_entropy + 0.15  # but it does learn the bigram statistics


@pytest.mark.parametrize("head_size", [16, 64])
def test_attention_kernel_choice_does_not_change_results(head_size):
    # Small heads take the math kernel on CPU, larger ones the default (flash): same maths.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=2 * head_size)).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours, _ = model(idx)
        with sdpa_kernel([SDPBackend.MATH]):
            reference, _ = model(idx)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
