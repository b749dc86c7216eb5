"""The training loop: one process, or data-parallel under torchrun.

    quill train --data DIR --out RUN [--config FILE.toml] [flags]
    torchrun --nproc_per_node N -m gpt_runtime.train --data DIR --out RUN ...

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

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .backend import dtype_name, get_backend, resolve_dtype
from .checkpoint import check_tokenizer_match, load_resume_state, save_checkpoint, save_resume_state
from .config import TrainConfig
from .data import BatchSampler, DataDir
from .errors import QuillError, QuillWarning
from .fileio import atomic_write_bytes
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


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


@torch.no_grad()
def estimate_loss(model: GPT, sampler: BatchSampler, steps: int, autocast, world: int, device: torch.device) -> float:
    """Mean loss over `steps` fixed batches (the same ones at every evaluation)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(1, device=device)  # on the device: NCCL reduces only GPU tensors
    for _ in range(steps):
        x, y = sampler.next()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    model.train(was_training)
    total = total / steps
    if world > 1:
        torch.distributed.all_reduce(total)
        total /= world
    return total.item()


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def train(cfg: TrainConfig, resume: bool = False, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a GPT as `cfg` says; returns where it got to.

    With `resume`, continue the run in `cfg.out` exactly where it stopped; `cfg`
    must be the run's config (`config.saved_config(out)`) except for the fields in
    `RESUME_MAY_CHANGE`. `on_event` receives dicts for each logged step
    (``{"event": "step", ...}``), evaluation and the end of training.
    """
    out = Path(cfg.out)
    state = None
    if resume:
        state = load_resume_state(out / "last.state.pt")
        saved = TrainConfig.from_dict(state["config"], f"{out}/last.state.pt")
        for name in sorted(set(asdict(cfg)) - RESUME_MAY_CHANGE):
            if getattr(cfg, name) != getattr(saved, name):
                raise QuillError(
                    f"cannot resume {str(out)!r} with {name} = {getattr(cfg, name)!r}: the run used {getattr(saved, name)!r}",
                    hint=f"resuming may only change {', '.join(sorted(RESUME_MAY_CHANGE))}",
                )
    elif (out / "last.state.pt").exists():
        raise QuillError(f"{str(out)!r} already holds a run", hint="continue it with --resume, or choose another --out")
    cfg.validate()
    rank, world = _distributed()
    emit = on_event if (on_event and rank == 0) else (lambda event: None)

    if state is not None and cfg.max_steps <= state["step"]:
        raise QuillError(f"the run in {str(out)!r} is already at step {state['step']}", hint=f"pass --max-steps above {state['step']} to train further")
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

    data = DataDir.open(cfg.data)
    if state is not None:
        check_tokenizer_match(state["tokenizer_fingerprint"], data.tokenizer, f"run {str(out)!r}", f"data directory {cfg.data!r}")
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    train_batches = BatchSampler(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, rank, world)
    if len(val_tokens) <= cfg.block_size:
        warnings.warn(
            f"the validation split of {cfg.data!r} has {len(val_tokens)} tokens, less than one block; "
            "validation losses are measured on training data",
            QuillWarning,
            stacklevel=2,
        )
        val_tokens = train_tokens

    torch.manual_seed(cfg.seed + rank)
    model_cfg = cfg.model_config(data.tokenizer.vocab_size)
    model = GPT(model_cfg).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = make_optimizer(model, cfg)
    step, best_val, last_val = 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train_batches.load_state(state["data_rng"])
        _restore_rng(state, rank, device)
        step, best_val, last_val = state["step"], state["best_val_loss"], state["last_val_loss"]
    first_step = step
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", (json.dumps(asdict(cfg), indent=1) + "\n").encode())
        _trim_log(out / "log.jsonl", step)

    runner = model
    if cfg.compile:
        runner = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = backend.autocast(dtype)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    flops_per_token = model.flops_per_token()
    # The throughput counted is all ranks', and each rank has a device of its own (on CPUs
    # under torchrun, a thread of its own), so the yardstick is rank 0's times the ranks.
    peak, peak_source = peak_flops(backend, dtype) if rank == 0 else (0.0, "")
    peak *= world
    emit({"event": "start", "step": step, "max_steps": cfg.max_steps, "params": model.num_params(),
          "device": str(device), "dtype": dtype_name(dtype), "world_size": world, "tokens_per_step": tokens_per_step,
          "peak_flops": peak, "peak_source": peak_source})

    def evaluate_now() -> float:
        val_batches = BatchSampler(val_tokens, cfg.block_size, cfg.batch_size, cfg.seed + 1, rank, world)
        return estimate_loss(model, val_batches, cfg.eval_steps, autocast, world, device)

    def save(val_loss: float | None) -> None:
        rng_states = _rng_states(device, world)  # every rank takes part
        if rank != 0:
            return
        args = asdict(cfg)
        save_resume_state(out / "last.state.pt", {
            "config": args, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "data_rng": train_batches.state(), "rng_states": rng_states,
            "best_val_loss": best_val, "last_val_loss": val_loss,
            "tokenizer_fingerprint": data.tokenizer.fingerprint,
        })
        save_checkpoint(out / "last.safetensors", model, data.tokenizer, step, val_loss, args)

    stop = _StopFlag()
    history: list[dict] = []
    log_file = open(out / "log.jsonl", "a") if rank == 0 else None
    window_start, window_tokens, train_seconds = time.perf_counter(), 0, 0.0
    model.train()
    try:
        with stop.installed():
            while step < cfg.max_steps:
                step_start = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    x, y = train_batches.next()
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    sync = world == 1 or micro == cfg.grad_accum - 1
                    with (nullcontext() if sync else runner.no_sync()), autocast:
                        _, loss = runner(x, y)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                loss_value = loss_sum / cfg.grad_accum
                if world > 1:
                    torch.distributed.all_reduce(loss_value)
                    loss_value /= world
                loss_value = loss_value.item()
                if not math.isfinite(loss_value):
                    raise _diverged("loss", loss_value, step + 1, out)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                backend.synchronize()
                now = time.perf_counter()
                train_seconds += now - step_start
                window_tokens += tokens_per_step

                record = None
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    tps = window_tokens / (now - window_start)
                    record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": round(tps, 1),
                              "mfu": round(flops_per_token * tps / peak, 4) if peak else None,
                              "elapsed_s": round(train_seconds, 2)}
                    window_start, window_tokens = now, 0
                stopping = _should_stop(stop, cfg, train_seconds, world, device)
                if step % cfg.eval_interval == 0 or step == cfg.max_steps or stopping:
                    last_val = evaluate_now()
                    if not math.isfinite(last_val):  # weights that give this are not worth a checkpoint
                        raise _diverged("validation loss", last_val, step, out)
                    record = record or {"step": step, "loss": loss_value, "lr": lr, "elapsed_s": round(train_seconds, 2)}
                    record["val_loss"] = last_val
                    if best_val is None or last_val < best_val:
                        best_val = last_val
                        if rank == 0:
                            save_checkpoint(out / "best.safetensors", model, data.tokenizer, step, last_val, asdict(cfg))
                    save(last_val)
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if record is not None:
                    history.append(record)
                    if log_file:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    emit({"event": "step", "max_steps": cfg.max_steps,
                          "eta_s": (cfg.max_steps - step) * train_seconds / max(1, step - first_step), **record})
                if stopping:
                    emit({"event": "stopped", "step": step, "reason": stopping})
                    return TrainResult(out, step, best_val, last_val, stopping, history)
    except RuntimeError as exc:
        if _is_oom(exc):
            raise QuillError(
                f"ran out of memory at batch size {cfg.batch_size}, block size {cfg.block_size}",
                hint="lower --batch-size (raising --grad-accum keeps the same batch), lower --block-size, or add --gradient-checkpointing",
            ) from None
        raise
    finally:
        if log_file:
            log_file.close()
        if world > 1 and torch.distributed.is_initialized():
            if sys.exc_info()[0] is None:
                # Leave together: a rank that tore down its group while rank 0 was still
                # saving the last checkpoint was seen to abort ("terminate called ...").
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    emit({"event": "done", "step": step, "best_val_loss": best_val, "val_loss": last_val})
    return TrainResult(out, step, best_val, last_val, None, history)


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


def _should_stop(stop: _StopFlag, cfg: TrainConfig, train_seconds: float, world: int, device: torch.device) -> str | None:
    reason = stop.reason or ("time limit" if cfg.max_seconds and train_seconds >= cfg.max_seconds else None)
    if world > 1:  # every rank must stop at the same step, or the others would hang
        flag = torch.tensor([1.0 if reason else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not reason:
            reason = "another rank stopped"
    return reason


def _diverged(what: str, value: float, step: int, out: Path) -> QuillError:
    saved = _saved_step(out)
    kept = f"the last good checkpoint (step {saved}) is in {out}" if saved is not None else "no checkpoint was saved yet"
    return QuillError(
        f"the {what} became {value} at step {step}; stopped without saving it",
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
    # `torchrun ... -m gpt_runtime.train ARGS` (the documented form) runs this file:
    # each rank runs `quill train ARGS`, from a module of its own so that importing
    # the training loop never imports a command line.
    from .torchrun import main

    sys.exit(main(sys.argv[1:]))
