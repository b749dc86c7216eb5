"""Choosing how to generate by timing the candidates on this machine.

Which weight format decodes fastest depends on the CPU's caches and
instructions, the model's size and the PyTorch build more than on any rule
about CPU flags: on a 2-core AVX2 EPYC a 6x384 model decodes about twice as
fast with bf16 or int8 weights as with float32 ones (its float32 weights do not
fit the 32 MB cache), while a 4x128 model runs fastest in float32. So when a
model shape first meets a machine, `choose` times every candidate path, a
prefill and a few dozen decoding steps each, taking turns in bursts of a few
steps so that a busy machine slows them all alike (each burst's first steps
only bring the weights back into the CPU's cache), and keeps the fastest whose predictions
stay close to float32's. The choice is cached in the user's cache directory,
keyed by the machine, PyTorch, the thread count and the model's shape, and
measured again when any of them changes.

Close to float32 means, on the float32 model's own sampled continuation (fed
to every candidate, token by token): a mean KL divergence of the next-token
distributions of at most `MAX_KL` nats, and the same most likely token at
`MIN_AGREEMENT` of the positions where float32 has a clear favourite. A
candidate whose prompt is more than `MAX_PREFILL_RATIO` times slower than
float32's is not chosen either: the first token stays fast whatever decodes
the rest. A lossy candidate must beat the fastest exact one by `MIN_GAIN` to be
chosen, so noise never trades exactness away.

`--dtype`, `--quantize` and a profile's `[backend]` narrow the candidates; the
environment variable `QUILL_GENERATION_PATH` names one outright.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .backend import Backend, dtype_name, resolve_dtype
from .cpu import cpu_flags, cpuinfo
from .decode import GraphStep, Step
from .errors import QuillError, QuillWarning
from .fileio import atomic_write_bytes
from .inference import fbgemm_unavailable, int8_unavailable, prepare_model
from .model import GPT

MAX_KL = 0.005
MIN_AGREEMENT = 0.9
CLEAR_LEAD = 0.1  # nats: a top token at least 10% likelier than the next is a clear favourite
MAX_PREFILL_RATIO = 2.0
MIN_GAIN = 0.10
BURST = 8  # steps a path runs before the next takes its turn
STEP_BUDGET = 0.5  # seconds of decoding steps, all paths together: a large model measures fewer
CACHE_ENTRIES = 64  # the cache file keeps the most recent measurements
PIN_VARIABLE = "QUILL_GENERATION_PATH"


@dataclass(frozen=True)
class GenerationPath:
    """How a model generates: the compute dtype, the weight format, and on CUDA a captured step."""

    dtype: str = "float32"
    quantize: str = "none"  # "none" or "int8"
    graph: bool = False  # the decoding step replayed from a CUDA graph

    @property
    def name(self) -> str:
        """What users see and type: float32, bfloat16, int8, "bfloat16 graph", ..."""
        return (self.quantize if self.quantize != "none" else self.dtype) + (" graph" if self.graph else "")


@dataclass
class Trial:
    """One candidate's measurement: times in ms, and how far its predictions are from float32's."""

    path: str
    decode_ms: float
    prefill_ms: float
    kl: float
    agreement: float
    refused: str = ""  # why it may not be chosen, or ""


@dataclass
class Choice:
    """The path to generate with, why, and (when measured) the trials behind it."""

    path: GenerationPath
    source: str  # "measured", "cached", "asked" (flags or profile), "pinned" (QUILL_GENERATION_PATH), "only"
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0  # spent measuring

    def summary(self) -> str:
        """One line: the path and, when measured, what the others took."""
        if not self.trials:
            return f"{self.path.name} ({self.source})"
        times = ", ".join(f"{t.path} {t.decode_ms:.2f}" + (f" [{t.refused}]" if t.refused else "") for t in self.trials)
        return f"{self.path.name} ({self.source}; ms per token: {times})"


def candidates(backend: Backend, dtype: str = "auto", quantize: str = "auto", num_params: int = 0) -> list[GenerationPath]:
    """The paths worth timing on `backend` for a model of `num_params`, narrowed by what the user asked for.

    An unknown or unsupported dtype, or int8 where it cannot run, is an error here.
    """
    if quantize == "int8":
        if why := int8_unavailable(backend):
            raise QuillError(f"cannot quantize to int8: {why}", hint="drop --quantize, or use --device cpu")
        return [GenerationPath("float32", "int8")]  # int8 runs on the CPU, under float32 activations
    if dtype != "auto":
        names = [dtype_name(resolve_dtype(backend, dtype))]
    elif backend.device.type in ("cpu", "cuda"):
        names = [dtype_name(d) for d in backend.supported_dtypes() if d in (torch.float32, torch.bfloat16)]
    else:  # another backend: its own preference, untimed
        names = [dtype_name(backend.generation_dtype(num_params))]
    if backend.device.type == "cuda":
        return [GenerationPath(name, graph=graph) for name in names for graph in (True, False)]
    paths = [GenerationPath(name) for name in names]
    if backend.device.type == "cpu" and (dtype, quantize) == ("auto", "auto") and fbgemm_unavailable() is None:
        paths.append(GenerationPath("float32", "int8"))
    return paths


def choose(model: GPT, backend: Backend, dtype: str = "auto", quantize: str = "auto",
           cache_file: Path | None = None) -> Choice:
    """The path `model` (float32, on the backend's device, not yet prepared) should generate with."""
    pinned = os.environ.get(PIN_VARIABLE, "").strip()
    if pinned and dtype == "auto" and quantize == "auto":
        return Choice(_parse(pinned, backend), "pinned")
    paths = candidates(backend, dtype, quantize, model.num_params(exclude_positions=False))
    if len(paths) == 1 or model.config.block_size < 16:  # a context too short to time steps in: the first
        return Choice(paths[0], "asked" if dtype != "auto" or quantize == "int8" else "only")
    cache_file = cache_file or default_cache_file()
    key = _key(model, backend, paths)
    cached = _read_cache(cache_file).get(json.dumps(key, sort_keys=True))
    if cached is not None:
        return Choice(GenerationPath(**cached["path"]), "cached", [Trial(**t) for t in cached["trials"]])
    start = time.perf_counter()
    trials = measure(model, backend, paths)
    chosen = _best(paths, trials)
    choice = Choice(chosen, "measured", trials, time.perf_counter() - start)
    _write_cache(cache_file, key, choice)
    return choice


def prepare(model: GPT, backend: Backend, dtype: str = "auto", quantize: str = "auto") -> tuple[GPT, Choice]:
    """`model` (as loaded) prepared on `backend` along the chosen path, and the choice."""
    choice = choose(model, backend, dtype, quantize)
    path = choice.path
    return prepare_model(model, backend, resolve_dtype(backend, path.dtype), path.quantize, graph=path.graph), choice


def _parse(name: str, backend: Backend) -> GenerationPath:
    """The path `QUILL_GENERATION_PATH` names, its dtype spelled as Quill records it."""
    words = name.split()
    graph = words[1:] == ["graph"]
    bad = not words or len(words) > 2 or (len(words) == 2 and not graph) or words[0] == "auto" \
        or (graph and (words[0] == "int8" or backend.device.type != "cuda"))
    if bad:
        raise QuillError(f"{PIN_VARIABLE}={name!r} is not a generation path here",
                         hint="use float32, bfloat16 or int8 (int8 on the CPU), with ' graph' after a dtype on CUDA")
    if words[0] == "int8":
        return candidates(backend, "auto", "int8")[0]
    try:
        return GenerationPath(dtype_name(resolve_dtype(backend, words[0])), graph=graph)
    except QuillError as exc:
        raise QuillError(f"{PIN_VARIABLE}={name!r}: {exc.message}", hint=exc.hint) from None


def _best(paths: list[GenerationPath], trials: list[Trial]) -> GenerationPath:
    """The fastest acceptable path; a lossy one only if it beats the fastest exact one by `MIN_GAIN`."""
    by_name = {p.name: p for p in paths}
    pool = [t for t in trials if t.path in by_name and not t.refused]
    # A dtype the user asked for is theirs to have, however far it is from float32.
    fastest = min(pool or [t for t in trials if t.path in by_name], key=lambda t: t.decode_ms)
    exact = [t for t in pool if by_name[t.path].dtype == "float32" and by_name[t.path].quantize == "none"]
    if exact:
        base = min(exact, key=lambda t: t.decode_ms)
        if fastest.decode_ms > base.decode_ms * (1 - MIN_GAIN):
            return by_name[base.path]
    return by_name[fastest.path]


# --- measuring -------------------------------------------------------------------------------------

class _Owner:
    """Holds a CUDA graph's cache during a measurement, as a window does while it decodes."""


def measure(model: GPT, backend: Backend, paths: list[GenerationPath], steps: int = 24) -> list[Trial]:
    """Time each path's prefill and decoding step and compare its predictions with float32's.

    The first trial is float32's (eager), whether or not it is among `paths`:
    its own sampled tokens are fed to every path, and its distributions are the
    reference. Paths take turns, `BURST` steps at a time. `model` itself (float32
    on the backend's device) is the reference; each other weight format is one
    prepared copy, which a CUDA graph and eager decoding share.
    """
    reference = GenerationPath("float32")
    order = [reference] + [p for p in paths if p != reference]
    models: dict[tuple[str, str], GPT] = {("float32", "none"): model.eval()}
    for p in order:
        if (p.dtype, p.quantize) not in models:
            models[p.dtype, p.quantize] = prepare_model(copy.deepcopy(model), backend, resolve_dtype(backend, p.dtype),
                                                        p.quantize, graph=backend.device.type == "cuda")
    prepared = [models[p.dtype, p.quantize] for p in order]
    config = model.config
    generator = torch.Generator().manual_seed(0)
    prompt_length = max(1, min(32, config.block_size // 2))
    steps = min(steps, config.block_size - prompt_length - 1)
    prompt = torch.randint(config.vocab_size, (1, prompt_length), generator=generator).to(backend.device)
    owner = _Owner()
    steps_of = [GraphStep(m) if p.graph else Step(m) for m, p in zip(prepared, order)]
    for step in steps_of:
        if isinstance(step, GraphStep):
            step.claim(owner)
    caches, prefill_ms, logits = [], [], []
    with torch.inference_mode():
        for m, step in zip(prepared, steps_of):
            m(prompt[:, :4], cache=step.new_cache())  # warm-up: the first calls set kernels up
            caches.append(step.new_cache())
            start = _now(backend)
            out, _ = m(prompt, cache=caches[-1])
            prefill_ms.append(1000 * (_now(backend) - start))
            logits.append([out[0, -1].float()])
        times: list[list[float]] = [[] for _ in prepared]
        started = time.perf_counter()
        for burst in range(0, steps, BURST):
            if burst and time.perf_counter() - started > STEP_BUDGET:
                break
            tokens = []
            for j, (step, cache) in enumerate(zip(steps_of, caches)):
                for i in range(min(BURST, steps - burst)):
                    if j == 0:  # float32 samples its own continuation; the others are fed it
                        tokens.append(torch.multinomial(torch.softmax(logits[0][-1], -1).cpu(), 1, generator=generator))
                    start = _now(backend)
                    out = step(tokens[i].to(backend.device), cache)
                    if i >= 2:  # the first steps of a burst bring the weights back into the CPU's cache
                        times[j].append(1000 * (_now(backend) - start))
                    logits[j].append(out[0].to(torch.float32, copy=True))  # a graph's output is reused
    reference_logp = torch.log_softmax(torch.stack(logits[0]), -1)
    trials = []
    for path, t, ms, lg in zip(order, times, prefill_ms, logits):
        logp = torch.log_softmax(torch.stack(lg), -1)
        kl = float((reference_logp.exp() * (reference_logp - logp)).sum(-1).mean())
        agreement = _agreement(reference_logp, logp)
        trials.append(Trial(path.name, round(statistics.median(t), 4), round(ms, 3), round(kl, 6),
                            round(agreement, 3)))
    for trial in trials[1:]:
        trial.refused = _refusal(trial, trials[0])
    return trials


def _agreement(reference: torch.Tensor, logp: torch.Tensor) -> float:
    """How often the most likely token is the same where float32 has a clear favourite.

    Positions where float32's top two tokens are within `CLEAR_LEAD` nats of each other
    are left out: there a rounding difference picks either, which says nothing about
    the path (an untrained model is all such positions). 1.0 when no position is clear.
    """
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > CLEAR_LEAD
    if not bool(clear.any()):
        return 1.0
    return float((logp.argmax(-1) == reference.argmax(-1))[clear].float().mean())


def _refusal(trial: Trial, base: Trial) -> str:
    if trial.kl > MAX_KL:
        return f"KL {trial.kl:.4f} > {MAX_KL}"
    if trial.agreement < MIN_AGREEMENT:
        return f"top-1 agreement {trial.agreement:.2f} < {MIN_AGREEMENT}"
    if trial.prefill_ms > MAX_PREFILL_RATIO * base.prefill_ms:
        return f"prefill {trial.prefill_ms:.1f} ms > {MAX_PREFILL_RATIO:g}x float32's"
    return ""


def _now(backend: Backend) -> float:
    backend.synchronize()
    return time.perf_counter()


# --- the cache ---------------------------------------------------------------------------------------

def default_cache_file() -> Path:
    """Where measurements are kept: the platform's user cache directory (XDG on Linux)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "quill" / "Cache"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "quill"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quill"
    return base / "generation-paths.json"


def _key(model: GPT, backend: Backend, paths: list[GenerationPath]) -> dict:
    shape = {k: v for k, v in model.config.to_dict().items() if k != "dropout"}
    return {"quill": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "backend": backend.name, "hardware": hardware_id(backend), "model": shape,
            "candidates": [p.name for p in paths]}


def hardware_id(backend: Backend) -> str:
    """The processor that runs `backend`: the GPU's name, or the CPU's model and instruction sets."""
    if backend.device.type == "cuda":
        return torch.cuda.get_device_name(backend.device)
    info = cpuinfo()
    flags = sorted(f for f in cpu_flags(info) or () if f.startswith(("avx", "amx", "fma", "sse4", "neon", "asimd", "sve")))
    return " ".join([info.get("model name") or platform.processor() or platform.machine(), *flags])


def _read_cache(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        return {json.dumps(e["key"], sort_keys=True): e for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring the generation path cache {path} ({type(exc).__name__}: {exc}); measuring again",
                      QuillWarning, stacklevel=3)
        return {}


def _write_cache(path: Path, key: dict, choice: Choice) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuillWarning)  # a corrupt file was reported when it was read
        entries = [e for k, e in _read_cache(path).items() if k != json.dumps(key, sort_keys=True)]
    entries.append({"key": key, "path": asdict(choice.path), "trials": [asdict(t) for t in choice.trials],
                    "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(choice.seconds, 2)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps({"entries": entries[-CACHE_ENTRIES:]}, indent=1) + "\n").encode())
    except OSError as exc:
        warnings.warn(f"cannot save the generation path cache {path} ({exc.strerror or exc}); "
                      "it will be measured again next time", QuillWarning, stacklevel=3)


def cached_choices(path: Path | None = None) -> list[dict]:
    """Every measurement in the cache file, oldest first (for `quill doctor`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuillWarning)
        return list(_read_cache(path or default_cache_file()).values())
