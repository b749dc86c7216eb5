"""Checks for plugin authors: does my sampler follow the rules of the protocol?

Call `check_sampler` from your plugin's tests (it needs no pytest)::

    from gpt_runtime.testing import check_sampler
    from my_plugin import Exclude

    def test_exclude_follows_the_rules():
        check_sampler(Exclude, {"id": 3})  # options go to Exclude(id=3)

It builds two samplers with ``factory(**options)`` and feeds each the same few
steps of an engine-like loop: random float32 logits with some tokens already
at ``-inf``, then a draw from ``softmax(logits)`` with the state's seeded
generator. An AssertionError names the first rule broken:

- the factory returns a fresh object each time (samplers keep per-generation state);
- `apply` returns a float32 tensor of the logits' shape, without NaN or +inf;
- every row keeps at least one token, and tokens at -inf stay at -inf;
- with the same seed, two fresh samplers give the same logits and draws,
  so randomness must come from ``state.generator``, not torch's global RNG.

`make_state` builds a `SamplerState` for your own tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .sampling import SamplerState

STEPS = 4  # enough to catch state kept wrongly from one step to the next
PROMPT_LENGTH = 8
MASKED_FRACTION = 0.3


def make_state(batch: int = 3, vocab_size: int = 50, prompt_length: int = PROMPT_LENGTH, step: int = 0,
               seed: int = 0, special_ids: Sequence[int] = ()) -> SamplerState:
    """A state whose context is `prompt_length` + `step` random tokens, with a generator seeded by `seed`."""
    import torch

    context = torch.Generator().manual_seed(seed + 1)  # apart from the sampling generator
    tokens = torch.randint(vocab_size, (batch, prompt_length + step), generator=context)
    return SamplerState(tokens, prompt_length, step, torch.Generator().manual_seed(seed), tuple(special_ids))


def check_sampler(factory: Callable[..., Any], options: dict[str, Any] | None = None, *,
                  vocab_size: int = 50, batch: int = 3) -> None:
    """Raise AssertionError if the sampler made by ``factory(**options)`` breaks a rule (see the module doc).

    `options` is a dict, so a sampler option may have any name (even ``vocab_size``
    or ``batch``); `vocab_size` and `batch` set the size of the test logits.
    """
    options = dict(options or {})
    first, second = factory(**options), factory(**options)
    label = f"sampler {getattr(first, 'name', '') or factory!r}"
    assert first is not second, f"{label}: the factory returned the same object twice; make a fresh sampler per call"
    assert callable(getattr(first, "apply", None)), f"{label}: {type(first).__name__} has no apply(logits, state) method"
    runs = [_run(sampler, label, vocab_size, batch) for sampler in (first, second)]
    for step, ((out_a, token_a), (out_b, token_b)) in enumerate(zip(*runs, strict=True)):
        assert out_a.equal(out_b), (
            f"{label}: two fresh samplers with the same seed returned different logits at step {step}; "
            "draw any randomness from state.generator")
        assert token_a.equal(token_b), f"{label}: the same seed drew different tokens at step {step}"


def _run(sampler: Any, label: str, vocab_size: int, batch: int) -> list[tuple[Any, Any]]:
    """Run `STEPS` steps of generation; return each step's (logits out, token drawn)."""
    import torch

    data = torch.Generator().manual_seed(1234)
    state = make_state(batch, vocab_size)
    results = []
    for step in range(STEPS):
        logits = torch.randn(batch, vocab_size, generator=data) * 3
        masked = torch.rand(batch, vocab_size, generator=data) < MASKED_FRACTION
        masked &= logits < logits.amax(dim=-1, keepdim=True)  # each row keeps its best token
        logits[masked] = float("-inf")
        state.step = step
        try:
            out = sampler.apply(logits.clone(), state)
        except Exception as exc:
            raise AssertionError(f"{label}: apply raised {type(exc).__name__}: {exc}") from exc
        _check_output(label, step, out, logits, masked)
        token = torch.multinomial(out.softmax(dim=-1), 1, generator=state.generator)
        state.tokens = torch.cat([state.tokens, token], dim=1)
        results.append((out.clone(), token))
    return results


def _check_output(label: str, step: int, out: Any, logits: Any, masked: Any) -> None:
    import torch

    where = f"{label} at step {step}"
    assert isinstance(out, torch.Tensor), f"{where}: apply returned {type(out).__name__}, not a tensor"
    assert out.shape == logits.shape, f"{where}: apply returned shape {tuple(out.shape)}, not {tuple(logits.shape)}"
    assert out.dtype == torch.float32, f"{where}: apply returned {out.dtype}, not torch.float32"
    assert not out.isnan().any(), f"{where}: apply returned NaN logits"
    assert not out.isposinf().any(), f"{where}: apply returned +inf logits; softmax would make them NaN"
    empty = out.isneginf().all(dim=-1)
    assert not empty.any(), f"{where}: apply removed every token of row {int(empty.nonzero()[0])}"
    revived = masked & ~out.isneginf()
    assert not revived.any(), (
        f"{where}: apply gave {int(revived.sum())} token(s) that were -inf on input a finite logit "
        "(tokens removed by earlier samplers must stay removed)")
