"""The training loop: one process, or data-parallel under torchrun.

    quill train --data DIR --out RUN [--config FILE.toml] [flags]
    torchrun --nproc_per_node N -m gpt_runtime.torchrun --data DIR --out RUN ...

Both run `train(config)`. Under torchrun every rank draws the same global batch
and trains on its own slice (DDP averages the gradients), so N ranks with batch B
follow the same loss curve as one process with batch N*B. Only rank 0 logs and
writes checkpoints.

A run directory holds::

    best.safetensors   lowest validation loss so far      (enough to generate)
    last.safetensors   the latest evaluation step         (enough to generate)
    last.state.pt      optimizer, RNG and data position   (for --resume)
    log.jsonl          one JSON object per logged step
    config.json        the TrainConfig of the run

Resuming restores the model, optimizer, step, RNG states and data position, so
an interrupted run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from .backend import Backend, dtype_name, get_backend, resolve_dtype
from .checkpoint import check_tokenizer_match, load_resume_state, save_checkpoint, save_resume_state
from .config import COMPILE_AUTO_MIN_STEPS, TrainConfig
from .data import BatchSampler, DataDir
from .errors import QuillError, QuillWarning
from .fileio import atomic_write_bytes
from .init_from import start_from
from .model import GPT
from .peak import peak_flops

# What a resumed run may change; anything else would make it a different run.
# `out` too: a run directory may be moved, or named by another path.
RESUME_MAY_CHANGE = {"out", "data", "max_steps", "eval_interval", "eval_steps", "log_interval", "max_seconds", "device", "compile"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def resolve_compile(setting: bool | str, device: torch.device, steps: int) -> bool:
    """Whether to torch.compile the model for a run of `steps` steps on `device`.

    True and False are what the user chose. "auto" compiles on CUDA only, and only when
    at least COMPILE_AUTO_MIN_STEPS steps are left: the compile costs tens of seconds to
    minutes once per invocation, and the faster steps must pay that back. Never on CPUs
    (it added 3% there for a 40-second compile, README, Performance) or MPS. It also needs
    Triton, which writes the GPU kernels; without it compiling would fail at the first step.
    """
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and steps >= COMPILE_AUTO_MIN_STEPS and importlib.util.find_spec("triton") is not None


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel is fastest where it exists
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@dataclass
class TrainResult:
    """Where a run got to: its directory, last step, losses and logged history."""

    out: Path
    step: int
    best_val_loss: float | None
    last_val_loss: float | None
    stopped: str | None = None  # why training ended early: "SIGINT", "SIGTERM", "time limit"
    history: list[dict] = field(default_factory=list)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals only reach the main thread; the caller stops us another way
            return
        previous = {s: signal.signal(s, self.set) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class _Run:
    """One run of `train`: what setup built, and where the loop has got to."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    backend: Backend
    device: torch.device
    dtype: torch.dtype
    autocast: AbstractContextManager  # computes in `dtype` inside, for the steps and evaluation
    data: DataDir
    train_batches: BatchSampler
    val_tokens: torch.Tensor
    val_mask: torch.Tensor | None  # chat data: where the validation loss counts
    model: GPT
    runner: torch.nn.Module  # what the steps call: the model, compiled and/or wrapped by DDP
    optimizer: torch.optim.Optimizer
    step: int
    best_val: float | None
    last_val: float | None
    flops_per_token: float
    peak: float  # FLOP/s of all ranks together, for MFU; 0 where unknown (and off rank 0)
    peak_source: str
    compiled: bool = False  # `runner` is torch.compile's: the first step waits for the compiler
    defer_loss: bool = False  # each step's loss stays on the device until it is needed (_defers_loss)
    history: list[dict] = field(default_factory=list)
    first_step: int = 0  # where this invocation began, for the ETA
    train_seconds: float = 0.0  # time in training steps; evaluation is not counted
    window_start: float = 0.0  # tokens/s is over the steps since the last log line
    window_tokens: int = 0
    compile_seconds: float = 0.0  # the first compiled step's time, left out of tokens/s and the ETA
    init_from: dict | None = None  # where the weights started (init_from.start_from), for the checkpoints

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum * self.world


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


@torch.no_grad()
def estimate_loss(model: GPT, sampler: BatchSampler, steps: int, autocast, world: int, device: torch.device) -> float:
    """Mean loss per counted target over `steps` fixed batches (the same ones at every
    evaluation). Weighted by the targets each batch counts, so that with chat data a batch
    that is mostly (or all) masked does not pull the mean towards its few tokens (or 0)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device)  # loss sum and target count; on the device: NCCL reduces only GPU tensors
    for _ in range(steps):
        x, y = sampler.next()
        with autocast:
            _, loss = model(_to_device(x, device), _to_device(y, device))
        counted = (y >= 0).sum().to(device, torch.float32)  # y is on the CPU; the loss may be on a GPU
        total += torch.stack([loss.float() * counted, counted])
    model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def train(cfg: TrainConfig, resume: bool = False, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a GPT as `cfg` says; returns where it got to.

    With `resume`, continue the run in `cfg.out` exactly where it stopped; `cfg`
    must be the run's config (`config.saved_config(out)`) except for the fields in
    `RESUME_MAY_CHANGE`. `on_event` receives dicts for each logged step
    (``{"event": "step", ...}``), evaluation and the end of training; a compiled run also
    gets ``{"event": "compiling"}`` before its first step and ``{"event": "compiled",
    "seconds": ...}`` after it.
    """
    with ExitStack() as backend_settings:  # the backend's training settings, undone however training ends
        run = _setup(cfg, resume, backend_settings)
        emit = on_event if (on_event and run.rank == 0) else _ignore
        emit({"event": "start", "step": run.step, "max_steps": cfg.max_steps, "params": run.model.num_params(),
              "device": str(run.device), "dtype": dtype_name(run.dtype), "world_size": run.world,
              "tokens_per_step": run.tokens_per_step, "peak_flops": run.peak, "peak_source": run.peak_source,
              "compile": run.compiled})
        return _train_loop(run, emit)


def _ignore(event: dict) -> None:
    pass


def _train_loop(run: _Run, emit: Callable[[dict], None]) -> TrainResult:
    """Step until `max_steps` or a stop; log, evaluate and checkpoint on the way."""
    cfg = run.cfg
    stop = _StopFlag()
    log_file = open(run.out / "log.jsonl", "a") if run.rank == 0 else None
    run.window_start = time.perf_counter()
    run.model.train()
    try:
        with stop.installed():
            while run.step < cfg.max_steps:
                compiling = run.compiled and run.step == run.first_step
                if compiling:
                    emit({"event": "compiling", "step": run.step})
                step_start = time.perf_counter()
                lr = lr_at(run.step, cfg)
                loss = _train_step(run, lr)
                logging = run.step % cfg.log_interval == 0 or run.step == cfg.max_steps
                evaluating = run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps
                if logging or evaluating or compiling:
                    loss = _loss_value(run, loss)  # waits for a GPU to finish: the time below is the step's
                now = time.perf_counter()
                run.train_seconds += now - step_start
                run.window_tokens += run.tokens_per_step
                if compiling:
                    _compiled(run, now - step_start, now, emit)

                record = _throughput_record(run, loss, lr, now) if logging else None
                # Ranks agree on stopping by a collective; with a deferred loss only at the steps
                # that read it anyway, so as not to wait for the GPU every step.
                agree = not run.defer_loss or logging or evaluating
                stopping = _should_stop(stop, cfg, run.train_seconds, run.world, run.device, agree)
                if evaluating or stopping:
                    loss = _loss_value(run, loss)
                    eval_start = time.perf_counter()
                    val_loss = _evaluate_and_checkpoint(run)
                    record = record or {"step": run.step, "loss": loss, "lr": lr, "elapsed_s": round(run.train_seconds, 2)}
                    record["val_loss"] = val_loss
                    # Evaluation time is not training throughput. Shifted, not restarted: between
                    # log lines the window still counts the steps before the evaluation.
                    run.window_start += time.perf_counter() - eval_start
                if record is not None:
                    _log(run, record, log_file, emit)
                if stopping:
                    emit({"event": "stopped", "step": run.step, "reason": stopping})
                    return TrainResult(run.out, run.step, run.best_val, run.last_val, stopping, run.history)
    except RuntimeError as exc:
        if _is_oom(exc):
            raise QuillError(
                f"ran out of memory at batch size {cfg.batch_size}, block size {cfg.block_size}",
                hint="lower --batch-size (raising --grad-accum keeps the same batch), "
                     + ("" if cfg.init_from else "lower --block-size, ") + "or add --gradient-checkpointing",
            ) from None
        raise
    finally:
        if log_file:
            log_file.close()
        _leave_process_group(run.world, failed=sys.exc_info()[0] is not None)
    emit({"event": "done", "step": run.step, "best_val_loss": run.best_val, "val_loss": run.last_val})
    return TrainResult(run.out, run.step, run.best_val, run.last_val, None, run.history)


# --- setup -------------------------------------------------------------------------------------

def _setup(cfg: TrainConfig, resume: bool, backend_settings: ExitStack) -> _Run:
    """Check the run may start, then build its device, data, model and optimizer (restored
    from the run's last state with `resume`), and write its config. The backend's training
    settings are entered into `backend_settings` (before the MFU yardstick is measured:
    they decide how fast the products run)."""
    out = Path(cfg.out)
    state = None
    if resume:
        state = _state_to_resume(cfg, out)
    elif (out / "last.state.pt").exists():
        raise QuillError(f"{str(out)!r} already holds a run", hint="continue it with --resume, or choose another --out")
    cfg.validate()
    rank, world = _distributed()
    if state is not None and cfg.max_steps <= state["step"]:
        raise QuillError(f"the run in {str(out)!r} is already at step {state['step']}", hint=f"pass --max-steps above {state['step']} to train further")
    backend, device, dtype = _start_backend(cfg, world)
    backend_settings.enter_context(backend.training())
    data, train_batches, (val_tokens, val_mask) = _open_data(cfg, state, out, rank, world)

    torch.manual_seed(cfg.seed + rank)
    origin = None
    if cfg.init_from and state is None:
        model, origin = start_from(cfg, data.tokenizer, device)
    else:
        model = GPT(cfg.model_config(data.tokenizer.vocab_size)).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = make_optimizer(model, cfg)
    step, best_val, last_val = 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train_batches.load_state(state["data_rng"])
        _restore_rng(state, rank, device)
        step, best_val, last_val = state["step"], state["best_val_loss"], state["last_val_loss"]
        origin = json.loads(state["init_from"]) if state.get("init_from") else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", (json.dumps(asdict(cfg), indent=1) + "\n").encode())
        _trim_log(out / "log.jsonl", step)

    compiled = resolve_compile(cfg.compile, device, cfg.max_steps - step)
    runner = torch.compile(model) if compiled else model
    if world > 1:
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    # The throughput counted is all ranks', and each rank has a device of its own (on CPUs
    # under torchrun, a thread of its own), so the yardstick is rank 0's times the ranks.
    peak, peak_source = peak_flops(backend, dtype) if rank == 0 else (0.0, "")
    return _Run(cfg, out, rank, world, backend, device, dtype, backend.autocast(dtype), data, train_batches, val_tokens, val_mask,
                model, runner, optimizer, step, best_val, last_val, model.flops_per_token(), peak * world, peak_source,
                compiled=compiled, defer_loss=_defers_loss(device), first_step=step, init_from=origin)


def _defers_loss(device: torch.device) -> bool:
    """Whether steps on `device` leave their loss on it until it is needed: on CUDA, where
    reading it would stall the GPU each step. The CPU (its losses are numbers at once
    anyway) and MPS keep reading and checking it at every step."""
    return device.type == "cuda"


def _state_to_resume(cfg: TrainConfig, out: Path) -> dict:
    """The run's saved state, once `cfg` is known to change only what a resume may."""
    state = load_resume_state(out / "last.state.pt")
    saved = TrainConfig.from_dict(state["config"], f"{out}/last.state.pt")
    for name in sorted(set(asdict(cfg)) - RESUME_MAY_CHANGE):
        if getattr(cfg, name) != getattr(saved, name):
            raise QuillError(
                f"cannot resume {str(out)!r} with {name} = {getattr(cfg, name)!r}: the run used {getattr(saved, name)!r}",
                hint=f"resuming may only change {', '.join(sorted(RESUME_MAY_CHANGE))}",
            )
    return state


def _start_backend(cfg: TrainConfig, world: int) -> tuple[Backend, torch.device, torch.dtype]:
    """The backend, this rank's device and the dtype to train in; joins the process group under torchrun."""
    backend = get_backend(cfg.device)
    device = backend.device
    dtype = resolve_dtype(backend, cfg.dtype)
    if dtype == torch.float16:
        raise QuillError("training in float16 needs a gradient scaler, which Quill does not have", hint="use --dtype bfloat16 or float32")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend.distributed_backend())
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    return backend, device, dtype


def _open_data(cfg: TrainConfig, state: dict | None, out: Path, rank: int, world: int
               ) -> tuple[DataDir, BatchSampler, tuple[torch.Tensor, torch.Tensor | None]]:
    """The data directory, this rank's training batches, and the validation tokens with their mask."""
    data = DataDir.open(cfg.data)
    if state is not None:
        check_tokenizer_match(state["tokenizer_fingerprint"], data.tokenizer, f"run {str(out)!r}", f"data directory {cfg.data!r}")
    train_tokens, val_tokens, train_mask = data.tokens("train"), data.tokens("val"), data.mask("train")
    try:
        train_batches = BatchSampler(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, rank, world, train_mask)
    except QuillError as exc:
        if not cfg.init_from:
            raise
        raise QuillError(exc.message, hint="give it more text: a run started from a model keeps the model's block size") from None
    if len(val_tokens) <= cfg.block_size:
        warnings.warn(
            f"the validation split of {cfg.data!r} has {len(val_tokens)} tokens, less than one block; "
            "validation losses are measured on training data",
            QuillWarning,
            stacklevel=4,  # the caller of train(), which called _setup, which called us
        )
        return data, train_batches, (train_tokens, train_batches.mask)
    return data, train_batches, (val_tokens, data.mask("val"))


# --- one step, evaluation, logging ---------------------------------------------------------------

def _train_step(run: _Run, lr: float) -> float | torch.Tensor:
    """One optimizer step at `lr` over `grad_accum` micro-batches; returns the loss, averaged
    over ranks: a number checked to be finite, or with `run.defer_loss` a tensor still on the
    device, for `_loss_value` to read and check when it is needed."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        x, y = run.train_batches.next()
        x, y = _to_device(x, run.device), _to_device(y, run.device)
        # DDP averages gradients on every backward; only the last micro-batch's need it.
        sync = run.world == 1 or micro == cfg.grad_accum - 1
        with (nullcontext() if sync else run.runner.no_sync()), run.autocast:
            _, loss = run.runner(x, y)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    mean = loss_sum / cfg.grad_accum
    if run.world > 1:
        torch.distributed.all_reduce(mean)
        mean /= run.world
    if run.defer_loss:
        # Nothing here waits for the GPU, so the host queues this step and goes on to sample
        # the next batch while the GPU computes. The price: a NaN or inf loss is caught at the
        # next log line or evaluation (_loss_value), not at its own step; still before any
        # checkpoint is written.
        _optimizer_step(run)
        return mean
    loss_value = mean.item()
    if not math.isfinite(loss_value):
        raise _diverged("loss", loss_value, run.step + 1, run.out)
    _optimizer_step(run)
    run.backend.synchronize()
    return loss_value


def _optimizer_step(run: _Run) -> None:
    """Clip the gradients, step the optimizer (its fused kernel where there is one) and free the gradients."""
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)  # freed, not zeroed: the next backward writes them afresh
    run.step += 1


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor, made on the CPU, on `device`."""
    if device.type != "cuda":
        return t.to(device, non_blocking=True)
    # From page-locked (pinned) memory the copy is queued on the GPU's stream and the host
    # goes straight on; from ordinary memory the host waits for it. `t` is a strided view of
    # the sampled rows, so it is gathered into a pinned buffer of its own first (a strided
    # source would be staged through ordinary memory). PyTorch keeps that buffer from being
    # reused until the copy has run. The values, and so the batches, are the CPU's.
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, non_blocking=True)


def _loss_value(run: _Run, loss: float | torch.Tensor) -> float:
    """The latest step's loss as a number, checked to be finite.

    A deferred loss is read once the device has finished all the work queued so far, so a
    time taken just after this is the steps' own (honest tokens/s), and a NaN or inf stops
    the run here, at the first step that reads it, before anything is saved."""
    if isinstance(loss, float):
        return loss  # read and checked at its own step
    run.backend.synchronize()
    value = loss.item()
    if not math.isfinite(value):
        raise _diverged("loss", value, run.step, run.out, deferred=True)
    return value


def _compiled(run: _Run, seconds: float, now: float, emit: Callable[[dict], None]) -> None:
    """After the first compiled step: say how long it took, and start tokens/s afresh after it."""
    run.compile_seconds = seconds
    run.window_start, run.window_tokens = now, 0
    emit({"event": "compiled", "step": run.step, "seconds": round(seconds, 2)})


def _evaluate_and_checkpoint(run: _Run) -> float:
    """Measure the validation loss; save the best checkpoint if it is one, then the last
    checkpoint and resume state. Every rank takes part; only rank 0 writes."""
    cfg = run.cfg
    val_batches = BatchSampler(run.val_tokens, cfg.block_size, cfg.batch_size, cfg.seed + 1, run.rank, run.world, run.val_mask)
    run.last_val = estimate_loss(run.model, val_batches, cfg.eval_steps, run.autocast, run.world, run.device)
    if not math.isfinite(run.last_val):  # weights that give this are not worth a checkpoint
        raise _diverged("validation loss", run.last_val, run.step, run.out)
    if run.best_val is None or run.last_val < run.best_val:
        run.best_val = run.last_val
        if run.rank == 0:
            save_checkpoint(run.out / "best.safetensors", run.model, run.data.tokenizer, run.step, run.last_val, asdict(cfg),
                            init_from=run.init_from)
    rng_states = _rng_states(run.device, run.world)  # every rank takes part
    if run.rank == 0:
        args = asdict(cfg)
        save_resume_state(run.out / "last.state.pt", {
            "config": args, "step": run.step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "data_rng": run.train_batches.state(), "rng_states": rng_states,
            "best_val_loss": run.best_val, "last_val_loss": run.last_val,
            "tokenizer_fingerprint": run.data.tokenizer.fingerprint,
            "init_from": json.dumps(run.init_from) if run.init_from else "",
        })
        save_checkpoint(run.out / "last.safetensors", run.model, run.data.tokenizer, run.step, run.last_val, args,
                        init_from=run.init_from)
    return run.last_val


def _throughput_record(run: _Run, loss: float, lr: float, now: float) -> dict:
    """A log line for this step, with the tokens/s and MFU since the last one (and a new window).
    Both are None when no step was timed since (only the compiled first one, which is not)."""
    tps = run.window_tokens / (now - run.window_start) if run.window_tokens else None
    record = {"step": run.step, "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1) if tps is not None else None,
              "mfu": round(run.flops_per_token * tps / run.peak, 4) if run.peak and tps is not None else None,
              "elapsed_s": round(run.train_seconds, 2)}
    run.window_start, run.window_tokens = now, 0
    return record


def _log(run: _Run, record: dict, log_file, emit: Callable[[dict], None]) -> None:
    """Keep `record` in the history, the log file (rank 0) and a step event."""
    run.history.append(record)
    if log_file:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    emit({"event": "step", "max_steps": run.cfg.max_steps, "eta_s": _eta(run), **record})


def _eta(run: _Run) -> float | None:
    """Seconds to `max_steps` at the pace of this invocation's steps so far; the compiled first
    step does not count (it is mostly compiling). None when no other step has run yet."""
    timed = run.step - run.first_step - (1 if run.compile_seconds else 0)
    if timed < 1:
        return None
    return (run.cfg.max_steps - run.step) * (run.train_seconds - run.compile_seconds) / timed


def _leave_process_group(world: int, failed: bool) -> None:
    if world > 1 and torch.distributed.is_initialized():
        if not failed:
            # Leave together: a rank that tore down its group while rank 0 was still
            # saving the last checkpoint was seen to abort ("terminate called ...").
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _rng_states(device: torch.device, world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's random state (dropout draws from it): the CPU's, and its GPU's."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        mine["mps"] = torch.mps.get_rng_state()
    if world == 1:
        return [mine]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def _restore_rng(state: dict, rank: int, device: torch.device) -> None:
    """Put back this rank's random state as it was saved (as far as the device allows)."""
    if "rng_states" not in state:  # a run saved before GPU state was kept: the CPU's alone
        torch.set_rng_state(state["torch_rng"])
        return
    states = state["rng_states"]
    mine = states[rank % len(states)]  # with another number of ranks the run differs anyway
    torch.set_rng_state(mine["cpu"])
    if device.type == "cuda" and "cuda" in mine:  # a run moved from CPU to GPU keeps its seed
        torch.cuda.set_rng_state(mine["cuda"], device)
    elif device.type == "mps" and "mps" in mine:
        torch.mps.set_rng_state(mine["mps"])


def _should_stop(stop: _StopFlag, cfg: TrainConfig, train_seconds: float, world: int, device: torch.device,
                 agree: bool = True) -> str | None:
    """Why to stop after this step, if at all. Several ranks stop only at a step where all of
    them `agree` to compare (a stop asked for meanwhile is kept for the next such step)."""
    if world > 1 and not agree:
        return None
    reason = stop.reason or ("time limit" if cfg.max_seconds and train_seconds >= cfg.max_seconds else None)
    if world > 1:  # every rank must stop at the same step, or the others would hang
        flag = torch.tensor([1.0 if reason else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not reason:
            reason = "another rank stopped"
    return reason


def _diverged(what: str, value: float, step: int, out: Path, deferred: bool = False) -> QuillError:
    """The error for a non-finite loss; `deferred`: seen at `step`, when it was read (on a GPU,
    at log lines and evaluations), so it may have turned a few steps before."""
    saved = _saved_step(out)
    kept = f"the last good checkpoint (step {saved}) is in {out}" if saved is not None else "no checkpoint was saved yet"
    return QuillError(
        f"the {what} became {value} {'by' if deferred else 'at'} step {step}; stopped without saving it",
        hint=f"{kept}; try a lower --lr or more --warmup-steps",
    )


def _saved_step(out: Path) -> int | None:
    try:
        return load_resume_state(out / "last.state.pt")["step"]
    except QuillError:
        return None


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the step we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            continue
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())



if __name__ == "__main__":
    # `torchrun ... -m gpt_runtime.train ARGS`, the entry older docs name, still works:
    # it runs the rank entry `gpt_runtime.torchrun` as a script. Through runpy, not an
    # import, so that the training loop never depends on a command line (which itself
    # loads the loop to train).
    import runpy

    runpy.run_module("gpt_runtime.torchrun", run_name="__main__")
