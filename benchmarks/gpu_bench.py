"""What a GPU gives Quill's training: peak products, MFU, and whether runs repeat. Prints JSON.

    python benchmarks/gpu_bench.py peak                   # timed products vs the datasheet
    python benchmarks/gpu_bench.py train [--steps 1000]   # nanoGPT's shakespeare-char run
    python benchmarks/gpu_bench.py repeat [--deterministic]
    python benchmarks/gpu_bench.py train --device cpu --steps 3 --eval-steps 1 --dtype float32   # smoke check

`peak` times bf16 and float32 products of 4096, 8192 and 16384 square (0.5 s
each) beside the datasheet rate `gpt_runtime.peak` uses as the MFU yardstick.
`train` runs nanoGPT's config/train_shakespeare_char.py through `quill train`'s
loop, setting for setting: 6 layers, 6 heads, 384 wide, block 256, batch 64,
dropout 0.2, no biases, tied embeddings, AdamW at lr 1e-3 (beta2 0.99, weight
decay 0.1) with 100 warmup steps and cosine decay to 1e-4, gradient clipping at
1.0, bf16 autocast, character-level Tiny Shakespeare split 90/10, logging every
10 steps; for --steps (1000) steps, the cosine over those steps. It reports the
median tokens/s over the logged intervals after the first, the ms per step that
gives, the validation loss at the end (over --eval-steps batches, 200 as
nanoGPT's eval_iters), whether the model was compiled (--compile, auto by
default: on CUDA for 500 steps and more) and the compile time. nanoGPT's own
figure is left null: it must be measured side by side, on the same machine.
`repeat` trains a tiny model with dropout twice straight and once stopped and
resumed, in float32 and bf16, and says whether the losses agree to the bit.
`--device` picks another backend (the script's own checks run on the CPU too).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

from gpt_runtime.backend import get_backend  # noqa: E402
from gpt_runtime.config import TrainConfig, saved_config  # noqa: E402
from gpt_runtime.data import prepare  # noqa: E402
from gpt_runtime.fileio import read_corpus  # noqa: E402
from gpt_runtime.peak import datasheet_peak_flops, timed_peak_flops  # noqa: E402
from gpt_runtime.tokenizer import train_tokenizer  # noqa: E402
from gpt_runtime.train import train  # noqa: E402

# nanoGPT's config/train_shakespeare_char.py in Quill's names; the architecture settings
# that are Quill's defaults anyway are spelled out so that a change of default cannot
# change the benchmark.
NANOGPT_CHAR = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, grad_accum=1, dropout=0.2,
                    bias=False, position="learned", norm="layernorm", mlp="gelu", tie_embeddings=True,
                    lr=1e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
NANOGPT_LOG_INTERVAL = 10
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8, dropout=0.1, max_steps=12, warmup_steps=2,
            eval_interval=5, eval_steps=2, log_interval=1)


def peak(device: str) -> dict:
    backend = get_backend(device)
    name = torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else device
    report = {"device_name": name}
    for dtype in (torch.bfloat16, torch.float32):
        label = str(dtype).removeprefix("torch.")
        sheet = datasheet_peak_flops(name, dtype)
        report[label] = {"datasheet_tflops": sheet / 1e12 if sheet else None, "timed_tflops": {
            n: round(timed_peak_flops(backend, dtype, n, seconds=0.5) / 1e12, 1) for n in (4096, 8192, 16384)}}
    return report


def prepared(tmp: Path, corpus: Path) -> Path:
    prepare(corpus, train_tokenizer("char", read_corpus(corpus)), tmp / "data", val_fraction=0.1)
    return tmp / "data"


def train_speed(data: Path, tmp: Path, device: str, steps: int, eval_steps: int, dtype: str, compile: bool | str) -> dict:
    """One nanoGPT shakespeare-char run of `steps` steps; its speed, its final validation loss."""
    # Ten steps a log line as nanoGPT, unless the run is too short for two intervals (a smoke check).
    log_interval = min(NANOGPT_LOG_INTERVAL, max(1, steps // 2))
    cfg = TrainConfig(data=str(data), out=str(tmp / "run"), device=device, dtype=dtype, compile=compile, max_steps=steps,
                      eval_interval=steps, eval_steps=eval_steps, log_interval=log_interval, **NANOGPT_CHAR)
    events: list[dict] = []
    result = train(cfg, on_event=events.append)
    start = events[0]
    # The first interval holds the warm-up (and, compiled, whatever the compiled first step left).
    timed = [r for r in result.history if r.get("tokens_per_s")][1:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed) if timed else None
    compiled = [e["seconds"] for e in events if e["event"] == "compiled"]
    return {
        "config": {**NANOGPT_CHAR, "max_steps": steps, "log_interval": log_interval, "eval_steps": eval_steps},
        "device": start["device"], "gpu": _gpu_name(start["device"]), "dtype": start["dtype"],
        "compile": start["compile"], "compile_s": compiled[0] if compiled else None,
        "tokens_per_step": start["tokens_per_step"],
        "tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
        "ms_per_step": round(1000 * start["tokens_per_step"] / tokens_per_s, 2) if tokens_per_s else None,
        "tokens_per_s_intervals": [round(r["tokens_per_s"]) for r in timed],
        "mfu": statistics.median(r["mfu"] for r in timed) if timed and timed[0]["mfu"] is not None else None,
        "yardstick": start["peak_source"],
        "val_loss": result.last_val_loss,
        "nanogpt_tokens_per_s": None,
        "nanogpt_note": "not measured here: run nanoGPT's train_shakespeare_char.py (with max_iters and "
                        "lr_decay_iters set to the same steps) side by side on the same machine and fill this in",
    }


def _gpu_name(device: str) -> str | None:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None


def repeats(data: Path, tmp: Path, device: str) -> dict:
    def losses(out: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp / out / "log.jsonl").read_text().splitlines()]

    def stop_at_6(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # train() saves and returns, as on Ctrl-C

    report = {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    for dtype in ("float32", "bfloat16"):
        cfg = dict(data=str(data), device=device, dtype=dtype, **TINY)
        for out in ("straight", "again"):
            train(TrainConfig(out=str(tmp / f"{out}_{dtype}"), **cfg))
        train(TrainConfig(out=str(tmp / f"resumed_{dtype}"), **cfg), on_event=stop_at_6)
        train(saved_config(tmp / f"resumed_{dtype}"), resume=True)
        straight = losses(f"straight_{dtype}")
        report[dtype] = {"rerun_bit_identical": losses(f"again_{dtype}") == straight,
                         "resume_bit_identical": losses(f"resumed_{dtype}") == straight}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["peak", "train", "repeat"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--steps", type=int, default=1000, help="train: optimizer steps (default: 1000)")
    ap.add_argument("--eval-steps", type=int, default=200, help="train: validation batches at the end (default: 200)")
    ap.add_argument("--dtype", default="bfloat16", help="train: compute dtype (default: bfloat16, as nanoGPT's run)")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="train: torch.compile the model (default: auto, on CUDA for 500 steps and more)")
    ap.add_argument("--deterministic", action="store_true",
                    help="repeat: with torch.use_deterministic_algorithms(True) (set CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    args = ap.parse_args()
    if args.what == "peak":
        report = peak(args.device)
    else:
        corpus = corpus_or_exit(args.corpus)
        torch.use_deterministic_algorithms(args.deterministic)
        with tempfile.TemporaryDirectory() as tmp:
            data = prepared(Path(tmp), corpus)
            if args.what == "train":
                compile = {"auto": "auto", "true": True, "false": False}[args.compile]
                run = train_speed(data, Path(tmp), args.device, args.steps, args.eval_steps, args.dtype, compile)
            else:
                run = repeats(data, Path(tmp), args.device)
        report = {"corpus": str(corpus), **run}
    print(json.dumps({"benchmark": f"gpu_{args.what}", **report, "machine": machine_info()}, indent=1))


if __name__ == "__main__":
    main()
