"""Training speed and quality on Tiny Shakespeare, character level. Prints JSON.

    python benchmarks/train_bench.py throughput [--steps 30]
    python benchmarks/train_bench.py quality [--seconds 120]

`throughput` trains the classic character-level shape (6 layers, 6 heads, 384
wide, block 256, batch 16) through `gpt_runtime.train.train`, once in float32
with the default attention kernel (what a from-scratch reference implementation
does) and once with Quill's defaults (the backend's dtype), and reports the
median tokens/s of the logged intervals after the first.

`quality` trains for a fixed wall-clock budget (`max_seconds`, training time only,
evaluation excluded) and then evaluates on the whole validation split: once with
the small CPU configuration the reference suggests (4 layers, 4 heads, 128 wide,
block 64, batch 12, float32), once with Quill's tuned configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

from gpt_runtime.config import TrainConfig  # noqa: E402
from gpt_runtime.data import prepare  # noqa: E402
from gpt_runtime.evaluate import evaluate  # noqa: E402
from gpt_runtime.fileio import read_corpus  # noqa: E402
from gpt_runtime.tokenizer import train_tokenizer  # noqa: E402
from gpt_runtime.train import train  # noqa: E402

CLASSIC = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16)
# The reference's suggested CPU run for a quick result.
REFERENCE_SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dtype="float32",
                       lr=1e-3, min_lr=1e-4, warmup_steps=100, dropout=0.0, max_steps=2000)
# Quill's best settings found for 120 s on this machine (see README).
# The best of 22 runs of 120 s over width (128-192), depth (4, 6), block (128,
# 256), batch (16-32), lr (1e-3 to 6e-3), positions, MLP kind and tying.
TUNED = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=24, dtype="auto",
             lr=1.5e-3, min_lr=1.5e-4, warmup_steps=30, dropout=0.0, max_steps=760,
             position="rope", norm="rmsnorm", mlp="swiglu")


def prepared(tmp: Path, corpus: Path) -> Path:
    tok = train_tokenizer("char", read_corpus(corpus))
    prepare(corpus, tok, tmp / "data", val_fraction=0.1)
    return tmp / "data"


def throughput(data: Path, tmp: Path, steps: int) -> dict:
    results = {}
    for name, extra in {"reference_fp32": {"dtype": "float32"}, "quill_default": {}}.items():
        cfg = TrainConfig(data=str(data), out=str(tmp / name), max_steps=steps, eval_interval=10**6, eval_steps=1,
                          log_interval=5, warmup_steps=10, **CLASSIC, **extra)
        history = train(cfg).history
        rates = [h["tokens_per_s"] for h in history[1:] if "tokens_per_s" in h]
        results[name] = {"tokens_per_s": round(statistics.median(rates)), "dtype": cfg.dtype, "intervals": len(rates)}
    results["speedup"] = round(results["quill_default"]["tokens_per_s"] / results["reference_fp32"]["tokens_per_s"], 2)
    return {"config": CLASSIC, **results}


def quality(data: Path, tmp: Path, seconds: float) -> dict:
    results = {}
    for name, settings in {"reference_small": REFERENCE_SMALL, "quill_tuned": TUNED}.items():
        cfg = TrainConfig(data=str(data), out=str(tmp / name), max_seconds=seconds, eval_interval=10**6, eval_steps=1,
                          log_interval=50, **settings)
        result = train(cfg)
        final = evaluate(tmp / name / "last.safetensors", data, split="val", batch_size=32)
        results[name] = {"settings": settings, "steps": result.step, "train_seconds": result.history[-1]["elapsed_s"],
                         "val_loss": round(final.loss, 4), "val_bits_per_byte": round(final.bits_per_byte, 4)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "quality"])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--steps", type=int, default=30, help="throughput: steps per configuration")
    ap.add_argument("--seconds", type=float, default=120.0, help="quality: training seconds per configuration")
    args = ap.parse_args()
    corpus = corpus_or_exit(args.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepared(tmp, corpus)
        if args.what == "throughput":
            report = throughput(data, tmp, args.steps)
        else:
            report = quality(data, tmp, args.seconds)
    print(json.dumps({"benchmark": f"train_{args.what}", "corpus": str(corpus), **report, "machine": machine_info()}, indent=1))


if __name__ == "__main__":
    main()
