"""Built-in plugin `samplers`: the logits filters and penalties Quill ships with.

The protocol is `gpt_runtime.sampling.Sampler`. Every `apply` here works on the
whole (batch, vocab) tensor at once and runs once per generated token, so each
one takes the cheapest route it can: a no-op setting returns at once, and the
nucleus-style filters look at a partial top-k before falling back to the whole
vocabulary. Tokens already at ``-inf`` are never brought back.

torch is imported inside functions only: this module is loaded for every
`quill` command, including the tokenizer commands that must not pay for torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gpt_runtime.errors import QuillError
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.sampling import BeamSearch, Greedy, Option, Sampler, SamplerState, keep_argmax

if TYPE_CHECKING:
    import torch

NEG_INF = float("-inf")
# Float32 sums of probabilities are off by a few ulps; a prefix this close to p
# counts as reaching it, so that p=0.8 over [0.5, 0.3, ...] keeps two tokens.
_MASS_TOLERANCE = 1e-6
# How many candidates the nucleus filters look at first; most distributions put
# p of their mass in far fewer tokens than the vocabulary holds.
_FIRST_LOOK = 64


def keep_smallest_mass(logits: torch.Tensor, probs: torch.Tensor, order: torch.Tensor,
                       p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep the fewest tokens, taken by descending `order`, whose `probs` sum reaches `p`.

    At least `min_keep` tokens stay (unless fewer were left to begin with: a
    token already at -inf stays there).
    """
    import torch

    vocab = logits.shape[-1]
    k = min(vocab, max(min_keep, _FIRST_LOOK))
    while True:
        idx = order.topk(k, dim=-1).indices  # sorted, so a prefix of a full sort
        mass = probs.gather(1, idx).cumsum(dim=-1)
        if k == vocab or bool((mass[:, -1] >= p - _MASS_TOLERANCE).all()):
            break
        k = min(vocab, k * 16)
    before = torch.cat([mass.new_zeros(mass.shape[0], 1), mass[:, :-1]], dim=-1)
    keep = before < p - _MASS_TOLERANCE
    keep[:, :min_keep] = True
    remove = torch.ones_like(logits, dtype=torch.bool).scatter_(1, idx, ~keep)
    return logits.masked_fill_(remove, NEG_INF)


def recent_context(logits: torch.Tensor, state: SamplerState, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `window` context tokens (0: all) as (batch, W) ids, and which of them count.

    Special tokens (padding, <bos>, ...) do not count: they are structure, not
    repeated text, and padding would otherwise penalise itself. The penalties
    work on these W positions only, never on the whole vocabulary.
    """
    import torch

    context = state.tokens if window == 0 else state.tokens[:, -window:]
    context = context.to(device=logits.device, dtype=torch.long)
    counts = torch.ones_like(context, dtype=torch.bool)
    for special in state.special_ids:
        counts &= context != special
    return context, counts


class Temperature(Sampler):
    """Sharpen (t < 1) or flatten (t > 1) the distribution by dividing the logits by t.

    t = 0 keeps only the most likely token, as greedy decoding does.
    """

    name = "temperature"
    options = {"t": Option(0.8, "the divisor; 0 means always the most likely token", low=0)}

    def apply(self, logits, state):
        import torch

        if self.t == 0:
            return keep_argmax(logits)
        if self.t == 1:
            return logits
        out = logits / self.t
        if self.t < 1:
            # A tiny t can overflow finite logits to +inf (or a whole row to
            # -inf); such a row was meant to be greedy, so make it exactly that.
            finite = torch.isfinite(out.amax(dim=-1, keepdim=True))
            if not bool(finite.all()):
                out = torch.where(finite, out, keep_argmax(logits))
        return out


class TopK(Sampler):
    """Keep only the k most likely tokens (exactly k, even when several tie at the k-th)."""

    name = "top_k"
    options = {"k": Option(40, "how many tokens to keep", low=1)}

    def apply(self, logits, state):
        if self.k >= logits.shape[-1]:
            return logits
        top = logits.topk(self.k, dim=-1)
        return logits.fill_(NEG_INF).scatter_(1, top.indices, top.values)


class TopP(Sampler):
    """Nucleus sampling: keep the fewest most likely tokens whose probabilities sum to at least p."""

    name = "top_p"
    options = {
        "p": Option(0.95, "the probability mass to keep", low=0, low_open=True, high=1),
        "min_keep": Option(1, "keep at least this many tokens", low=1),
    }

    def apply(self, logits, state):
        if self.p >= 1:
            return logits
        probs = logits.softmax(dim=-1)
        return keep_smallest_mass(logits, probs, probs, self.p, self.min_keep)


class MinP(Sampler):
    """Remove tokens less than p times as likely as the most likely token."""

    name = "min_p"
    options = {"p": Option(0.05, "the fraction of the top probability a token needs", low=0, high=1)}

    def apply(self, logits, state):
        if self.p == 0:
            return logits
        # prob_i < p * prob_max  <=>  logit_i < logit_max + log(p): no softmax needed.
        floor = logits.amax(dim=-1, keepdim=True) + math.log(self.p)
        return logits.masked_fill_(logits < floor, NEG_INF)


class Typical(Sampler):
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprise is closest to the entropy.

    Tokens are ranked by |-log p - H|, and the fewest of them whose
    probabilities sum to at least p are kept.
    """

    name = "typical"
    options = {"p": Option(0.95, "the probability mass to keep", low=0, low_open=True, high=1)}

    def apply(self, logits, state):
        if self.p >= 1:
            return logits
        logp = logits.log_softmax(dim=-1)
        probs = logp.exp()
        entropy = -(probs * logp).nansum(dim=-1, keepdim=True)  # 0 * -inf is NaN: removed tokens add nothing
        # Ranked by closeness to typical; removed tokens get -inf and come last.
        order = -(entropy + logp).abs()
        return keep_smallest_mass(logits, probs, order, self.p)


class RepetitionPenalty(Sampler):
    """Make tokens from the recent context less likely (CTRL, Keskar et al., 2019).

    Positive logits of those tokens are divided by the penalty, negative ones
    multiplied by it; a penalty below 1 encourages repetition instead.
    """

    name = "repetition_penalty"
    options = {
        "penalty": Option(1.1, "how much to discourage repeated tokens; 1 is off", low=0, low_open=True),
        "window": Option(64, "how many recent tokens count (prompt included); 0 is the whole context", low=0),
    }

    def apply(self, logits, state):
        import torch

        if self.penalty == 1:
            return logits
        context, counts = recent_context(logits, state, self.window)
        seen = logits.gather(1, context)
        penalised = torch.where(seen > 0, seen / self.penalty, seen * self.penalty)
        # A token repeated in the window is written several times, always with the same value.
        return logits.scatter_(1, context, torch.where(counts, penalised, seen))


class FrequencyPenalty(Sampler):
    """Subtract the penalty from a token's logit once for every time it occurs in the recent context."""

    name = "frequency_penalty"
    options = {
        "penalty": Option(0.5, "subtracted per occurrence; negative encourages repetition"),
        "window": Option(64, "how many recent tokens count (prompt included); 0 is the whole context", low=0),
    }

    def apply(self, logits, state):
        if self.penalty == 0:
            return logits
        context, counts = recent_context(logits, state, self.window)
        return logits.scatter_add_(1, context, counts.to(logits.dtype).mul_(-self.penalty))


class PresencePenalty(Sampler):
    """Subtract the penalty once from the logit of every token present in the recent context."""

    name = "presence_penalty"
    options = {
        "penalty": Option(0.5, "subtracted once per token present; negative encourages repetition"),
        "window": Option(64, "how many recent tokens count (prompt included); 0 is the whole context", low=0),
    }

    def apply(self, logits, state):
        if self.penalty == 0:
            return logits
        context, counts = recent_context(logits, state, self.window)
        seen = logits.gather(1, context)
        return logits.scatter_(1, context, seen - counts.to(logits.dtype).mul_(self.penalty))


BIAS_FORMAT = "ID:VALUE,ID:VALUE, e.g. 12:-5,40:+2.5 (-inf bans a token)"
MAX_BIAS = 1e6  # far beyond any real logit, so enough to force a token, and safe from float32 overflow


def parse_bias(text: str) -> dict[int, float]:
    """Parse ``ID:VALUE,...`` into {token id: bias}; a QuillError for anything malformed."""
    biases: dict[int, float] = {}
    if not text.strip():
        return biases
    for entry in (part.strip() for part in text.split(",")):
        token, sep, value = entry.partition(":")
        try:
            if not sep:
                raise ValueError
            token_id, bias = int(token.strip()), float(value.strip())
        except ValueError:
            raise QuillError(f"logit_bias.bias: {entry!r} in {text!r} is not ID:VALUE", hint=f"write {BIAS_FORMAT}") from None
        if token_id < 0:
            raise QuillError(f"logit_bias.bias: token id {token_id} in {text!r} is negative", hint=f"write {BIAS_FORMAT}")
        if bias != NEG_INF and not abs(bias) <= MAX_BIAS:  # also NaN; a huge bias would overflow float32 logits
            raise QuillError(f"logit_bias.bias: {entry!r} in {text!r} has no usable value",
                             hint=f"use a number from {-MAX_BIAS:g} to {MAX_BIAS:g}, or -inf to ban the token")
        if token_id in biases:
            raise QuillError(f"logit_bias.bias: token {token_id} appears twice in {text!r}")
        biases[token_id] = bias
    return biases


class LogitBias(Sampler):
    """Add a fixed amount to the logits of chosen tokens; -inf bans a token.

    Written as ID:VALUE pairs, e.g. ``12:-5,40:+2.5,0:-inf``.
    """

    name = "logit_bias"
    options = {"bias": Option("", f"token biases as {BIAS_FORMAT}")}

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self.biases = parse_bias(self.bias)
        self.bans = any(v == NEG_INF for v in self.biases.values())
        self.largest_id = max(self.biases, default=-1)
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def apply(self, logits, state):
        import torch

        if not self.biases:
            return logits
        vocab = logits.shape[-1]
        if self.largest_id >= vocab:
            raise QuillError(f"token id {self.largest_id} in logit_bias.bias is outside the model's vocabulary (ids 0 to {vocab - 1})",
                             hint=f"drop {self.largest_id} from logit_bias.bias; `quill tokenizer encode` shows a text's token ids")
        if self._tensors is None or self._tensors[0].device != logits.device:
            ids = torch.tensor(list(self.biases), dtype=torch.long, device=logits.device)
            values = torch.tensor(list(self.biases.values()), dtype=logits.dtype, device=logits.device)
            self._tensors = ids, values
        ids, values = self._tensors
        logits[:, ids] += values  # ids are unique, so no update is lost
        if self.bans and bool(torch.isneginf(logits).all(dim=-1).any()):
            raise QuillError(f"logit_bias.bias {self.bias!r} bans every token still allowed", hint="ban fewer tokens, or put logit_bias earlier in the chain")
        return logits


DRY_BREAKERS = '["\\n", ":", "\\"", "*"]'  # llama.cpp's defaults: newline, colon, quote, asterisk


def parse_texts(text: str, where: str) -> tuple[str, ...]:
    """Parse a JSON list of non-empty strings; a QuillError naming `where` for anything else."""
    import json

    try:
        texts = json.loads(text) if text.strip() else []
    except ValueError:
        texts = None
    if not isinstance(texts, list) or not all(isinstance(t, str) and t for t in texts):
        raise QuillError(f"{where}: {text!r} is not a JSON list of non-empty strings", hint='write e.g. ["\\n", ":"]')
    return tuple(texts)


def parse_ids(text: str, where: str) -> frozenset[int]:
    """Parse ``ID,ID,...`` into a set of token ids; a QuillError naming `where` for anything malformed."""
    ids: set[int] = set()
    for entry in (part.strip() for part in text.split(",") if part.strip()):
        try:
            token_id = int(entry)
        except ValueError:
            raise QuillError(f"{where}: {entry!r} in {text!r} is not a token id", hint="write ID,ID, e.g. 198,25") from None
        if token_id < 0:
            raise QuillError(f"{where}: token id {token_id} in {text!r} is negative", hint="write ID,ID, e.g. 198,25")
        ids.add(token_id)
    return frozenset(ids)


def suffix_matches(tokens: list[int]) -> list[int]:
    """For each position j, how many tokens just before j repeat the tokens at the end of `tokens`.

    ``matches[j]`` is the largest k with ``tokens[j-k:j] == tokens[-k:]`` (k <= j),
    so ``tokens[j]`` is the token that once followed a copy of the last k
    tokens. This is the Z-algorithm on the reversed list: one linear pass
    instead of comparing backwards from every position.
    """
    reverse = tokens[::-1]
    n = len(reverse)
    z = [0] * n  # z[i]: length of the common prefix of reverse and reverse[i:]
    left = right = 0  # reverse[left:right] is the rightmost window known to match a prefix
    for i in range(1, n):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < n and reverse[z[i]] == reverse[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    # tokens[j-k:j] reversed starts at index n - j of reverse.
    return [z[n - j] if j else 0 for j in range(n)]


class Dry(Sampler):
    """DRY ("don't repeat yourself"): penalise tokens that would continue a sequence already in the context.

    If the last n tokens also occur earlier, followed by token t, then t
    would extend a repeat of length n; for n >= allowed_length its logit
    drops by ``multiplier * base ** (n - allowed_length)`` (the longest such
    repeat counts). A sequence breaker token ends a repeat: no repeat spans
    one, and a breaker is never penalised. Breakers are given as text
    (`breakers`, a JSON list: every token whose text contains one of them is a
    breaker, llama.cpp's four by default) and as token ids (`breaker_ids`).
    """

    name = "dry"
    options = {
        "multiplier": Option(0.0, "the penalty for a repeat of allowed_length tokens; 0 is off", low=0),
        "base": Option(1.75, "how fast the penalty grows with each further repeated token", low=1),
        "allowed_length": Option(2, "repeats shorter than this are not penalised", low=1),
        "breakers": Option(DRY_BREAKERS, "texts that end a repeated sequence, as a JSON list: a token containing one is a breaker"),
        "breaker_ids": Option("", "more breakers, as token ids ID,ID,..."),
        "window": Option(1024, "how many recent tokens are searched (prompt included); 0 is the whole context", low=0),
    }

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self.breaker_texts = parse_texts(self.breakers, "dry.breakers")
        self.breaker_set = parse_ids(self.breaker_ids, "dry.breaker_ids")
        self._text_breakers: tuple[object, frozenset[int]] | None = None  # (the pieces, their breaker ids)

    def text_breakers(self, pieces) -> frozenset[int]:
        """The ids whose text contains a breaker text; worked out once per tokenizer (the
        pieces are held, not their id: another tokenizer's could reuse a freed one's id)."""
        if self._text_breakers is None or self._text_breakers[0] is not pieces:
            texts = [piece.decode("utf-8", errors="ignore") for piece in pieces]
            found = frozenset(i for i, text in enumerate(texts) if any(b in text for b in self.breaker_texts))
            self._text_breakers = (pieces, found)
        return self._text_breakers[1]

    def penalty(self, length: int) -> float:
        """What a token that extends a repeat of `length` tokens loses from its logit (0 below allowed_length)."""
        if length < self.allowed_length:
            return 0.0
        try:
            value = self.multiplier * self.base ** (length - self.allowed_length)
        except OverflowError:  # a huge base over a long repeat
            value = MAX_BIAS
        # Finite and bounded, so that a penalised token is unlikely but never removed.
        return min(value, MAX_BIAS)

    def apply(self, logits, state):
        import torch

        if self.multiplier == 0:
            return logits
        context = state.tokens if self.window == 0 else state.tokens[:, -self.window:]
        # Specials (padding, <bos>) are structure, not text: they break repeats as breakers do.
        breakers = self.breaker_set | self.text_breakers(state.pieces) | frozenset(state.special_ids)
        for row, tokens in enumerate(context.tolist()):
            lengths = self.repeat_lengths(tokens, breakers)
            if lengths:
                ids = torch.tensor(list(lengths), dtype=torch.long, device=logits.device)
                amounts = torch.tensor([self.penalty(n) for n in lengths.values()], dtype=logits.dtype, device=logits.device)
                logits[row, ids] -= amounts  # -inf stays -inf; ids are unique
        return logits

    def repeat_lengths(self, tokens: list[int], breakers: frozenset[int]) -> dict[int, int]:
        """{token id: the longest repeat it would extend}, for repeats of at least allowed_length."""
        # Only the part after the last breaker can be repeated: a repeat never spans a breaker.
        start = max((i + 1 for i, t in enumerate(tokens) if t in breakers), default=0)
        tail = len(tokens) - start
        lengths: dict[int, int] = {}
        for j, matched in enumerate(suffix_matches(tokens)):
            length = min(matched, tail)
            follower = tokens[j]
            if length >= self.allowed_length and follower not in breakers:
                lengths[follower] = max(length, lengths.get(follower, 0))
        return lengths


class MirostatV2(Sampler):
    """Mirostat 2.0 (Basu et al., 2021): keep the surprise of the text near a target, tau.

    Each step removes the tokens whose surprise, ``-log2 p``, exceeds ``mu``;
    the engine then draws from the rest. Once the drawn token is known (at the
    next step), ``mu`` moves by ``eta * (tau - its surprise)``, the surprise
    measured on the kept tokens' renormalised probabilities. ``mu`` starts at
    ``2 * tau`` for every generation and is kept per row (under beam search,
    per beam slot: it does not follow beams as they are reordered). Put it
    last, after temperature: a sampler after it changes the draw it steers.
    """

    name = "mirostat_v2"
    options = {
        "tau": Option(5.0, "the target surprise, in bits per token; lower is more focused", low=0),
        "eta": Option(0.1, "how fast mu follows the observed surprise", low=0, high=1),
    }

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self.mu: torch.Tensor | None = None  # (batch, 1): the surprise ceiling of each row
        # The log2 probabilities mirostat left at its last step, to score the token drawn from them.
        self._kept: torch.Tensor | None = None
        self._step: int | None = None

    def apply(self, logits, state):
        import torch

        if self.mu is None:
            self.mu = torch.full((logits.shape[0], 1), 2 * self.tau, dtype=torch.float32, device=logits.device)
        # The draw happens after the chain, so the last step's token shows up only now.
        # Updating once per step (not per call) keeps a repeated call repeatable.
        if self._kept is not None and state.step != self._step:
            self.observe(state.tokens[:, -1:].to(device=logits.device, dtype=torch.long))
        surprise = -logits.log_softmax(dim=-1) / math.log(2)
        remove = surprise > self.mu
        remove.scatter_(1, logits.argmax(dim=-1, keepdim=True), False)  # the likeliest token always stays
        out = logits.masked_fill_(remove, NEG_INF)
        self._kept = out.log_softmax(dim=-1) / math.log(2)
        self._step = state.step
        return out

    def observe(self, drawn: torch.Tensor) -> None:
        """Move mu by the surprise of the (batch, 1) tokens drawn after the last step."""
        import torch

        observed = -self._kept.gather(1, drawn)
        # A token mirostat removed (a forced token, say) tells nothing about its distribution.
        seen = torch.isfinite(observed)
        self.mu = torch.where(seen, self.mu - self.eta * (observed - self.tau), self.mu)


SAMPLERS: tuple[type[Sampler], ...] = (
    Temperature, TopK, TopP, MinP, Typical,
    RepetitionPenalty, FrequencyPenalty, PresencePenalty, LogitBias, Dry,
    MirostatV2, Greedy, BeamSearch,
)


@hookimpl
def quill_register_samplers(register) -> None:
    for cls in SAMPLERS:
        register(cls.name, cls)
