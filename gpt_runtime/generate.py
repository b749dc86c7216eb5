"""The generation engine: prefill once, decode against a KV cache, stream events.

    events = generate(model, tokenizer, "ROMEO:", chain=build_chain("top_k,temperature"), seed=1)
    for event in events:
        print(event.text, end="")  # every event's text, the final Done's included
        if isinstance(event, Done): print(f"\\n[{event.reason}, {event.tokens_per_second:.0f} tokens/s]")

`generate` yields one `Token` per new token, then one `Done`. A token's `text`
is what it makes printable: it can be empty while a multi-byte character is
incomplete or while the text might be the start of a stop string; `Done.text`
releases whatever was still held back. Generation ends on `max_new_tokens`, on
a stop string (never emitted), on <eos>, or when `cancel` is set from another
thread (checked before every token). When the context window fills, the oldest
quarter of it is dropped and the cache is rebuilt from the rest, so generation
can go on past `block_size`.

With ``beam`` in the chain, `generate` runs beam search instead and streams the
best sequence once the search is over. `generate_batch` samples several
continuations of one prompt together, one batch row each. All three decode
with a `Decoder`: the prompt runs once and its cache is copied to every row;
sampling is one row, a batch n rows, and beam search k rows that it reorders.
"""

from __future__ import annotations

import codecs
import secrets
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .decode import step_for
from .errors import QuillError, QuillWarning
from .model import GPT
from .sampling import DEFAULT_CHAIN, BeamSearch, Chain, SamplerState, build_chain, check_seed
from .tokenizer import Tokenizer, eos_id

# Never produced as text: padding, markers and the unknown-character token.
BANNED_SPECIALS = ("<pad>", "<bos>", "<unk>")


@dataclass
class Token:
    """One generated token.

    `text` is the text it releases (see the module docstring). With ``probs=N``,
    `prob` is the model's probability of this token (before the sampler chain)
    and `top` its N most likely tokens as (id, text, probability).
    """

    id: int
    text: str
    prob: float | None = None
    top: list[tuple[int, str, float]] | None = None


@dataclass
class Done:
    """The end of a generation: why it stopped, the held-back text, and timings."""

    reason: str  # "length", "stop", "eos" or "cancelled"
    text: str  # text still held back at the end: append it like a token's text
    seed: int  # the seed used (drawn at random when none was given): replays the run
    prompt_tokens: int  # prompt tokens the model saw
    new_tokens: int
    seconds: float  # from the start of the prefill to the end
    first_token_seconds: float | None  # time to first token
    prompt_dropped: int = 0  # tokens cut from the start of a prompt too long for the context
    stop: str | None = None  # the stop string that ended it

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed after the first token."""
        decode = self.seconds - (self.first_token_seconds or 0.0)
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0


@dataclass
class Batch:
    """What `generate_batch` returns: one text per row, and the seed used."""

    texts: list[str]
    seed: int


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Encode a prompt; an empty prompt starts from <bos> (or the end-of-text token, or id 0)."""
    ids = tokenizer.encode(prompt)
    if ids:
        return ids
    start = tokenizer.special_tokens.get("<bos>", eos_id(tokenizer))
    return [0 if start is None else start]


def fit_prompt(ids: Sequence[int], block_size: int) -> tuple[list[int], int]:
    """Keep the end of a prompt that is longer than the context: (kept ids, dropped count)."""
    dropped = max(0, len(ids) - block_size)
    return list(ids[dropped:]), dropped


class Window:
    """The model's view of a batch of sequences: a KV cache over their last tokens.

    The prompt is run once, at batch 1, and its cache copied to every row: rows
    that share a prompt cost one prefill, not one each. `tokens` holds every
    token so far (prompt and generated), `logits` the next-token logits for each
    row, float32 (batch, vocab). When the cache is full, the oldest quarter of
    the window is dropped and the rest re-run.
    """

    def __init__(self, model: GPT, ids: Sequence[int], rows: int = 1) -> None:
        self.model = model
        param = next(model.parameters())
        self.block = model.config.block_size
        self.tokens_buf = torch.empty(1, 2 * len(ids) + 64, dtype=torch.long, device=param.device)
        self.tokens_buf[:, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.length = len(ids)
        self.step = step_for(model, self if rows == 1 else None)  # one row may replay a CUDA graph
        self.cache = self.step.new_cache()
        self.logits = self._run(self.tokens_buf[:, : self.length])
        if rows > 1:
            self.reorder(torch.zeros(rows, dtype=torch.long, device=param.device))

    @property
    def tokens(self) -> torch.Tensor:
        return self.tokens_buf[:, : self.length]

    def _run(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(idx, cache=self.cache)
        return logits[:, -1].float()

    def append(self, next_ids: torch.Tensor) -> None:
        """Add one token per row (a (batch,) tensor) and compute the next logits."""
        if self.length == self.tokens_buf.size(1):  # grow by doubling: cheap, and no limit up front
            self.tokens_buf = torch.cat([self.tokens_buf, torch.empty_like(self.tokens_buf)], dim=1)
        self.tokens_buf.select(1, self.length).copy_(next_ids)  # cheaper than indexing with [:, i]
        self.length += 1
        if self.cache.length < self.block:
            self.logits = self.step(next_ids, self.cache)
        else:
            keep = max(1, self.block - self.block // 4)
            self.cache.length = 0
            self.logits = self._run(self.tokens[:, -keep:])

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows`, in that order, a row as often as it is named.

        Beam search follows its beams with it; a new window copies its one
        prefilled row to all of its rows with it.
        """
        self.tokens_buf = self.tokens_buf.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)
        self.cache.reorder(rows)


class TextStream:
    """Bytes of token pieces in, printable text out, with stop strings held back.

    Text that could be the beginning of a stop string is held until it is clearly
    not one, so a stop string split across tokens is still caught and never shown.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.matched: str | None = None

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; returns the text now safe to show."""
        self.pending += self.decoder.decode(piece)
        hits = [(self.pending.find(s), s) for s in self.stop if s in self.pending]
        if hits:
            at, self.matched = min(hits)
            out, self.pending = self.pending[:at], ""
            return out
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """Everything still held back (at the end of generation)."""
        if self.matched is not None:
            return ""
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


def _choose(logits: torch.Tensor, chain: Chain, state: SamplerState | None) -> torch.Tensor:
    """The next token of every row: (batch,)."""
    if state is None:
        return logits.argmax(dim=-1)  # the common fast path: nothing to filter
    logits = chain.apply(logits, state)
    if chain.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=state.generator).view(-1)


class Decoder:
    """Rows that continue one prompt together, and what each row has said so far.

    Sampling decodes one row, `generate_batch` n rows that each stop on their
    own, beam search k rows that it reorders to follow its best beams. All of
    them mask the never-produced ids and give samplers the same state.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, ids: Sequence[int], rows: int, chain: Chain,
                 generator: torch.Generator, stop: Sequence[str] = ()) -> None:
        vocab_size = model.config.vocab_size
        self.tokenizer, self.chain, self.generator = tokenizer, chain, generator
        self.prompt_length = len(ids)
        # Specials that are never text, and ids the tokenizer has no piece for (a
        # model vocabulary padded beyond the tokenizer's, e.g. to a multiple of 64).
        specials = [i for name, i in tokenizer.special_tokens.items() if name in BANNED_SPECIALS]
        self.banned = tuple(specials + list(range(len(tokenizer.pieces), vocab_size)))
        self.eos = eos_id(tokenizer)
        self.window = Window(model, ids, rows)
        # A mask, not a list of ids: one cheap masked_fill per step.
        self.ban = torch.zeros(vocab_size, dtype=torch.bool, device=self.window.tokens_buf.device)
        self.ban[list(self.banned)] = True
        self.streams = [TextStream(stop) for _ in range(rows)]
        self.ended: list[str | None] = [None] * rows  # "eos" or "stop" once a row is done
        self.cancelled = False
        self.plain_greedy = chain.greedy and len(chain.links) == 1

    def logits(self, step: int) -> tuple[torch.Tensor, SamplerState | None]:
        """This step's logits with the banned ids masked (in place), and the samplers' view of the
        rows (None for a chain that is just `greedy`, which reads nothing but the logits)."""
        logits = self.window.logits.masked_fill_(self.ban, float("-inf"))
        if self.plain_greedy:
            return logits, None
        return logits, SamplerState(self.window.tokens, self.prompt_length, step, self.generator, self.banned,
                                    self.tokenizer.pieces)

    def feed(self, tokens: list[int]) -> list[str | None]:
        """Each row's text from its new token; None for a row that has ended (at <eos>, now or before)."""
        texts: list[str | None] = []
        for row, token in enumerate(tokens):
            if self.ended[row] is None and token == self.eos:
                self.ended[row] = "eos"
            if self.ended[row] is not None:
                texts.append(None)
                continue
            texts.append(self.streams[row].feed(self.tokenizer.pieces[token]))
            if self.streams[row].matched is not None:
                self.ended[row] = "stop"
        return texts

    def sample(self, max_new_tokens: int, cancel: threading.Event | None,
               keep_logits: bool = False) -> Iterator[tuple[list[int], list[str | None], torch.Tensor | None]]:
        """Sample every row, a step at a time: (the tokens, each row's text, the logits before the chain).

        The logits are kept only with `keep_logits`. Stops after `max_new_tokens`,
        once every row has ended, or when `cancel` is set (checked before every
        step; `cancelled` says so afterwards).
        """
        for step in range(max_new_tokens):
            if cancel is not None and cancel.is_set():
                self.cancelled = True
                return
            logits, state = self.logits(step)
            before = logits.clone() if keep_logits else None  # samplers may change logits in place
            chosen = _choose(logits, self.chain, state)
            tokens = chosen.tolist()
            yield tokens, self.feed(tokens), before
            if all(self.ended):
                return
            if step + 1 < max_new_tokens:
                self.window.append(chosen)


def _top(tokenizer: Tokenizer, logits: torch.Tensor, chosen: int, n: int) -> tuple[float, list[tuple[int, str, float]]]:
    probs = torch.softmax(logits, dim=-1)
    values, ids = probs.topk(min(n, probs.numel()))
    # Lists first: iterating tensors makes a tensor per element, microseconds each, every token
    top = [(i, tokenizer.decode([i]), p) for i, p in zip(ids.tolist(), values.tolist())]
    return probs[chosen].item(), top


def _start(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int], chain: Chain | None, seed: int | None,
           max_new_tokens: int):
    if max_new_tokens < 0:
        raise QuillError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
    if seed is not None:
        check_seed(seed)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise QuillError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's "
                         f"({tokenizer.vocab_size}): they do not belong together")
    # Samplers may keep state across steps: every generation gets its own.
    chain = build_chain(DEFAULT_CHAIN) if chain is None else chain.fresh()
    ids = prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise QuillError("the prompt has no tokens")
    if max(ids) >= model.config.vocab_size or min(ids) < 0:
        raise QuillError(f"the prompt has token ids outside the model's vocabulary (0..{model.config.vocab_size - 1})")
    ids, dropped = fit_prompt(ids, model.config.block_size)
    if dropped:
        warnings.warn(f"the prompt is {len(ids) + dropped} tokens, longer than the context window "
                      f"({model.config.block_size}); its first {dropped} tokens were dropped", QuillWarning, stacklevel=3)
    seed = secrets.randbits(63) if seed is None else seed
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    return chain, ids, dropped, seed, generator


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    chain: Chain | None = None,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    seed: int | None = None,
    cancel: threading.Event | None = None,
    probs: int = 0,
) -> Iterator[Token | Done]:
    """Stream a continuation of `prompt` (text, or token ids) as events.

    `chain` defaults to `DEFAULT_CHAIN` with default options; `stop` is a string
    or a list of them. `probs=N` adds each token's probability and its N most
    likely alternatives to the events (the model's own, before the chain, with
    the tokens that are never produced removed). The model is put in eval mode.
    Bad arguments raise `QuillError` at once; errors while generating (a failing
    sampler plugin included) are raised as `QuillError` from the iterator.
    """
    if isinstance(probs, bool) or not isinstance(probs, int) or probs < 0:
        raise QuillError(f"probs must be a whole number, 0 or more, not {probs!r}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    chain, ids, dropped, seed, generator = _start(model, tokenizer, prompt, chain, seed, max_new_tokens)
    if chain.beam is not None:
        if probs:
            raise QuillError("token probabilities (probs) are not available with beam search")
        return _beam_events(model, tokenizer, ids, dropped, chain, chain.beam, max_new_tokens, stop, seed, generator, cancel)
    return _sample_events(model, tokenizer, ids, dropped, chain, max_new_tokens, stop, seed, generator, cancel, probs)


@torch.inference_mode()
def _sample_events(model, tokenizer, ids, dropped, chain, max_new_tokens, stop, seed, generator, cancel, probs):
    t0 = time.perf_counter()
    first, n = None, 0
    decoder = Decoder(model, tokenizer, ids, 1, chain, generator, stop)
    for tokens, texts, before in decoder.sample(max_new_tokens, cancel, keep_logits=probs > 0):
        if first is None:
            first = time.perf_counter() - t0
        if texts[0] is None:  # <eos>: nothing to show
            continue
        n += 1
        event = Token(tokens[0], texts[0])
        if probs:
            event.prob, event.top = _top(tokenizer, before[0], tokens[0], probs)
        yield event
    reason = decoder.ended[0] or ("cancelled" if decoder.cancelled else "length")
    text = decoder.streams[0]
    yield Done(reason, text.flush(), seed, len(ids), n, time.perf_counter() - t0, first, dropped, text.matched)


@torch.inference_mode()
def generate_batch(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    n: int,
    *,
    chain: Chain | None = None,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    seed: int | None = None,
    cancel: threading.Event | None = None,
) -> Batch:
    """Sample `n` continuations of one prompt together, in one batch.

    Each row stops on its own at <eos> or a stop string; the batch ends when all
    rows have (or at `max_new_tokens`, or on `cancel`). The seed used is
    returned with the texts, so an unseeded batch can be replayed.
    """
    if n < 1:
        raise QuillError(f"the batch needs at least 1 sequence, not {n}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    chain, ids, _, seed, generator = _start(model, tokenizer, prompt, chain, seed, max_new_tokens)
    if chain.beam is not None:
        raise QuillError("generate_batch samples; for beam search use generate with `beam` in the chain")
    decoder = Decoder(model, tokenizer, ids, n, chain, generator, stop)
    outputs = [""] * n
    for _, texts, _ in decoder.sample(max_new_tokens, cancel):
        for row, text in enumerate(texts):
            if text is not None:
                outputs[row] += text
    return Batch([out + stream.flush() for out, stream in zip(outputs, decoder.streams)], seed)


@dataclass(order=True)
class _Hypothesis:
    score: float
    tokens: list[int] = field(compare=False)
    eos: bool = field(compare=False)


def _beam_search(
    model: GPT,
    tokenizer: Tokenizer,
    ids: list[int],
    chain: Chain,
    beam: BeamSearch,
    max_new_tokens: int,
    generator: torch.Generator,
    cancel: threading.Event | None = None,
) -> tuple[list[int], bool, bool]:
    """The best continuation of `ids` by beam search: (tokens, ended at <eos>, cancelled).

    Each step extends every running beam by its best tokens and keeps the
    `num_beams` highest cumulative log-probabilities. A sequence ends at <eos>;
    finished and unfinished sequences compete on
    ``sum(log p) / length ** length_penalty``. With `early_stopping` the search
    ends as soon as `num_beams` sequences have finished; without it, once the
    best running beam, scored at its current length, no longer beats the worst
    of them (a heuristic: with length_penalty > 0 a longer beam might still).
    """
    k = beam.num_beams
    decoder = Decoder(model, tokenizer, ids, k, chain, generator)
    window = decoder.window
    device = window.tokens_buf.device
    # Every row starts as the same prompt: only row 0 may expand at the first step.
    scores = [0.0] + [float("-inf")] * (k - 1)
    beams: list[list[int]] = [[] for _ in range(k)]
    finished: list[_Hypothesis] = []  # the best k, kept sorted best first

    def normalised(total: float, length: int) -> float:
        return total / max(1, length) ** beam.length_penalty

    def finish(hypothesis: _Hypothesis) -> None:
        finished.append(hypothesis)
        finished.sort(reverse=True)
        del finished[k:]

    for step in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            return beams[max(range(k), key=scores.__getitem__)], False, True
        logits = chain.apply(*decoder.logits(step))
        total = torch.tensor(scores, device=device)[:, None] + torch.log_softmax(logits, dim=-1)
        values, flat = total.view(-1).topk(min(2 * k, total.numel()))
        rows, new_scores, new_tokens = [], [], []
        for value, index in zip(values.tolist(), flat.tolist()):
            if value == float("-inf"):
                break
            row, token = divmod(index, logits.size(-1))
            if token == decoder.eos:
                finish(_Hypothesis(normalised(value, step + 1), beams[row][:], True))
            else:
                rows.append(row)
                new_scores.append(value)
                new_tokens.append(token)
                if len(rows) == k:
                    break
        if not rows or (len(finished) == k and (
                beam.early_stopping or normalised(new_scores[0], step + 1) <= finished[-1].score)):
            return finished[0].tokens, finished[0].eos, False
        while len(rows) < k:  # fewer live candidates than beams: pad with dead copies
            rows.append(rows[0])
            new_scores.append(float("-inf"))
            new_tokens.append(new_tokens[0])
        beams = [beams[r] + [t] for r, t in zip(rows, new_tokens)]
        scores = new_scores
        if step + 1 < max_new_tokens:
            window.reorder(torch.tensor(rows, device=device))
            window.append(torch.tensor(new_tokens, device=device))
    # Out of new tokens: the running beams compete with those that finished.
    for row in range(k):
        if scores[row] > float("-inf"):
            finish(_Hypothesis(normalised(scores[row], len(beams[row])), beams[row], False))
    return finished[0].tokens, finished[0].eos, False


@torch.inference_mode()
def _beam_events(model, tokenizer, ids, dropped, chain, beam, max_new_tokens, stop, seed, generator, cancel):
    t0 = time.perf_counter()
    tokens, at_eos, cancelled = _beam_search(model, tokenizer, ids, chain, beam, max_new_tokens, generator, cancel)
    first = None  # the search must end before the first token is known: no separate first-token time
    text = TextStream(stop)
    reason = "cancelled" if cancelled else ("eos" if at_eos else "length")
    n = 0
    for token in tokens:
        n += 1
        yield Token(token, text.feed(tokenizer.pieces[token]))
        if text.matched is not None:
            reason = "stop"
            break
    yield Done(reason, text.flush(), seed, len(ids), n, time.perf_counter() - t0, first, dropped, text.matched)


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int], **options) -> str:
    """The whole continuation as one string (`generate` with the events joined)."""
    parts = []
    for event in generate(model, tokenizer, prompt, **options):
        parts.append(event.text)
    return "".join(parts)
