"""Does fine-tuning pay, and what memory does it take? Printed as JSON.

    python benchmarks/finetune_bench.py [pretrain] [sft] [memory] [--text FILE] [--steps 200] [--sft-steps 600]

1. Continued pretraining. The shipped `shakespeare-bpe` model and the same
   architecture from scratch each train `--steps` steps on an English text
   neither has seen (The Adventures of Sherlock Holmes, public domain:
   `quill data fetch sherlock`), prepared with the shipped model's tokenizer.
   Reported: each one's validation loss on that text, at every evaluation. The
   run from scratch is tried at the fine-tune's learning rate and at the shipped
   recipe's, and the better one is compared.
2. Supervised fine-tuning. `shakespeare-char` learns a reply format from
   synthetic conversations: the user gives a name ("I am Kelvora."), the model
   must answer "Well met, Kelvora! What news?". 600 conversations to train on,
   then 100 names it never saw, asked through `ChatSession` (greedy) and its
   template; a reply counts when it is exactly the expected text. The same run
   without the loss mask (every token counted, the user's too) is beside it.
3. Memory. A model of GPT-2 small's shape (124M parameters, 50,257 tokens,
   random weights made by transformers and brought in with `quill import`)
   fine-tuned for 2 steps of 1,024-token windows, each setting in a process of
   its own: peak resident memory (the process's maximum RSS) and seconds per step,
   for a batch of 4, the same with gradient checkpointing, and a batch of 1 with
   4 accumulation steps (the same tokens per step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt_runtime.chat_data import prepare_chat  # noqa: E402
from gpt_runtime.config import TrainConfig  # noqa: E402
from gpt_runtime.data import prepare  # noqa: E402
from gpt_runtime.init_from import take_source_shape  # noqa: E402
from gpt_runtime.profiles import get_profile, write_profile  # noqa: E402
from gpt_runtime.session import ChatSession  # noqa: E402
from gpt_runtime.sources import tokenizer_source  # noqa: E402
from gpt_runtime.train import train  # noqa: E402
from machine import machine_info  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sherlock.txt"
SYLLABLES = ["ka", "lo", "ve", "ri", "ma", "tho", "sen", "dra", "qui", "bel", "nor", "ash", "ty", "gwe", "pel", "zar"]


def run(cfg: TrainConfig) -> dict:
    start = time.perf_counter()
    result = train(cfg)
    evals = [(r["step"], round(r["val_loss"], 4)) for r in result.history if "val_loss" in r]
    return {"val_loss": evals[-1][1], "curve": evals, "seconds": round(time.perf_counter() - start, 1)}


def continued_pretraining(text: Path, steps: int, work: Path) -> dict:
    prepare(text, tokenizer_source("shakespeare-bpe"), work / "text")
    common = dict(data=str(work / "text"), batch_size=16, max_steps=steps, warmup_steps=10, eval_interval=max(1, steps // 4),
                  eval_steps=20, log_interval=steps, device="cpu", dtype="auto", dropout=0.1, seed=1)
    tuned = take_source_shape(TrainConfig(out=str(work / "tuned"), init_from="shakespeare-bpe", lr=5e-4, min_lr=5e-5, **common),
                              set())
    shape = {name: getattr(tuned, name) for name in ("n_layer", "n_head", "n_embd", "block_size", "position", "norm", "mlp")}
    results = {"fine_tuned_lr_5e-4": run(tuned)}
    for lr in (5e-4, 2e-3):
        results[f"scratch_lr_{lr:g}"] = run(TrainConfig(out=str(work / f"scratch{lr:g}"), lr=lr, min_lr=lr / 10, **shape, **common))
    best_scratch = min(v["val_loss"] for k, v in results.items() if k.startswith("scratch"))
    return {"text": f"{text.name} ({text.stat().st_size:,} bytes)", "steps": steps, "batch": "16 x 128 tokens",
            **results, "fine_tuned_minus_best_scratch": round(results["fine_tuned_lr_5e-4"]["val_loss"] - best_scratch, 4)}


def names(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def reply_for(name: str) -> str:
    return f"Well met, {name}! What news?"


def conversations(path: Path, people: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for name in people:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"I am {name}."},
                                             {"role": "assistant", "content": reply_for(name)}]}) + "\n")
    return path


def exact_replies(run_dir: Path, held_out: list[str]) -> float:
    parent = get_profile("shakespeare-char")
    name = f"finetune-bench-{run_dir.name}"
    write_profile(name, run_dir / "best.safetensors", "finetune_bench", "greedy", {}, 40, parent.template)
    session = ChatSession(name)
    hits = 0
    for person in held_out:
        session.clear()
        for _ in session.send(f"I am {person}."):
            pass
        hits += session.turns[-1].reply.strip() == reply_for(person)
    return hits / len(held_out)


def supervised(steps: int, work: Path) -> dict:
    rng = random.Random(0)
    taken: set[str] = set()
    train_people, held_out = names(600, rng, taken), names(100, rng, taken)
    meta = prepare_chat([conversations(work / "chat.jsonl", train_people)], "shakespeare-char", work / "chat")
    unmasked = work / "chat-unmasked"
    shutil.copytree(work / "chat", unmasked)
    (unmasked / "train.mask").unlink()
    (unmasked / "val.mask").unlink()
    meta_unmasked = {**json.loads((unmasked / "meta.json").read_text()), "mask": False}
    (unmasked / "meta.json").write_text(json.dumps(meta_unmasked))
    results = {}
    for label, data in (("with_mask", work / "chat"), ("without_mask", unmasked)):
        cfg = take_source_shape(TrainConfig(data=str(data), out=str(work / label), init_from="shakespeare-char", batch_size=16,
                                            max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_interval=steps // 3,
                                            eval_steps=10, log_interval=steps, device="cpu", dtype="auto", dropout=0.0, seed=1),
                                set())
        results[label] = {**run(cfg), "exact_replies": exact_replies(work / label, held_out)}
    return {"task": "user: 'I am NAME.' -> model: 'Well met, NAME! What news?'", "train_conversations": 600,
            "held_out_names": len(held_out), "model_tokens_share": round(meta["loss_tokens"] / meta["train_tokens"], 3),
            "steps": steps, **results}


MEMORY_SETTINGS = {
    "batch 4": ["--batch-size", "4"],
    "batch 4, gradient checkpointing": ["--batch-size", "4", "--gradient-checkpointing"],
    "batch 1 x 4 accumulation": ["--batch-size", "1", "--grad-accum", "4"],
    "batch 1 x 4 accumulation, gradient checkpointing": ["--batch-size", "1", "--grad-accum", "4", "--gradient-checkpointing"],
}


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """Run `command` in a process of its own (through a Python that waits for it, so its
    children's maximum RSS is this command's alone); returns (peak MB, seconds)."""
    waiter = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
              "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", waiter, *command], check=True, capture_output=True, text=True)
    kib, seconds = done.stdout.split()
    return round(int(kib) / 1024, 1), float(seconds)


def memory(text: Path, work: Path) -> dict:
    from interop_bench import make_gpt2_small

    make_gpt2_small(work / "gpt2")
    quill = [sys.executable, "-m", "tui.cli"]
    subprocess.run([*quill, "import", str(work / "gpt2"), "--out", str(work / "gpt2.safetensors"), "--no-profile"], check=True,
                   capture_output=True)
    subprocess.run([*quill, "prepare", str(text), "--tokenizer", str(work / "gpt2.safetensors"), "--out", str(work / "gpt2-data")],
                   check=True, capture_output=True)
    results = {}
    for label, flags in MEMORY_SETTINGS.items():
        out = work / f"mem-{len(results)}"
        command = [*quill, "train", "--init-from", str(work / "gpt2.safetensors"), "--data", str(work / "gpt2-data"),
                   "--out", str(out), "--max-steps", "2", "--eval-interval", "100", "--eval-steps", "1", "--log-interval", "1",
                   "--device", "cpu", "--dtype", "float32", *flags]
        peak, seconds = peak_rss_mb(command)
        steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        results[label] = {"peak_rss_mb": peak, "tokens_per_s": steps[-1]["tokens_per_s"], "process_s": round(seconds, 1)}
    return {"model": "GPT-2 small's shape, 124M parameters, block 1024, float32, AdamW", "tokens_per_step": 4096, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help="pretrain, sft, memory: which to measure (default: all three)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="English text the models have not seen")
    parser.add_argument("--steps", type=int, default=200, help="steps of continued pretraining (default: 200)")
    parser.add_argument("--sft-steps", type=int, default=600, help="steps of supervised fine-tuning (default: 600)")
    args = parser.parse_args()
    unknown = set(args.parts) - {"pretrain", "sft", "memory"}
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from pretrain, sft, memory")
    if not args.text.is_file():
        sys.exit(f"benchmark: no text at {args.text}; `quill data fetch sherlock --out DIR` and pass --text DIR/sherlock.txt")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["QUILL_PROFILES"] = str(work / "profiles")  # the fine-tuned runs' profiles stay out of the user's
        parts = args.parts or ["pretrain", "sft", "memory"]
        report = {"machine": machine_info()}
        if "pretrain" in parts:
            report["continued_pretraining"] = continued_pretraining(args.text, args.steps, work)
        if "sft" in parts:
            report["sft"] = supervised(args.sft_steps, work)
        if "memory" in parts:
            report["memory"] = memory(args.text, work)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
