"""What a GPU gives Quill's training: peak products, MFU, and whether runs repeat. Prints JSON.

    python benchmarks/gpu_bench.py peak                  # timed products vs the datasheet
    python benchmarks/gpu_bench.py train [--steps 200]   # nanoGPT's shakespeare-char shape
    python benchmarks/gpu_bench.py repeat [--deterministic]

`peak` times bf16 and float32 products of 4096, 8192 and 16384 square (0.5 s
each) beside the datasheet rate `gpt_runtime.peak` uses as the MFU yardstick.
`train` trains 6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2 on
Tiny Shakespeare (character level) in bf16 autocast and in float32, and reports
the logged tokens/s and MFU after the first interval. `repeat` trains a tiny
model with dropout twice straight and once stopped and resumed, in float32 and
bf16, and says whether the losses agree to the bit. `--device` picks another
backend (the script's own checks run on the CPU too).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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

NANOGPT_CHAR = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, lr=1e-3)
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


def train_speed(data: Path, tmp: Path, device: str, steps: int) -> dict:
    report = {"config": NANOGPT_CHAR}
    for dtype in ("bfloat16", "float32"):
        cfg = TrainConfig(data=str(data), out=str(tmp / dtype), device=device, dtype=dtype, max_steps=steps,
                          eval_interval=10**6, eval_steps=1, log_interval=max(1, steps // 8), **NANOGPT_CHAR)
        events = []
        history = train(cfg, on_event=events.append).history[1:]  # the first interval includes warm-up
        report[dtype] = {"tokens_per_s": [round(h["tokens_per_s"]) for h in history],
                         "mfu": [h["mfu"] for h in history], "yardstick": events[0]["peak_source"]}
    return report


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
    ap.add_argument("--steps", type=int, default=200, help="train: steps per dtype")
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
            run = train_speed(data, Path(tmp), args.device, args.steps) if args.what == "train" else \
                repeats(data, Path(tmp), args.device)
        report = {"corpus": str(corpus), **run}
    print(json.dumps({"benchmark": f"gpu_{args.what}", **report, "machine": machine_info()}, indent=1))


if __name__ == "__main__":
    main()
