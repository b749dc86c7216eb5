"""Generation speed at batch 1 on the CPU, beside HuggingFace transformers. Prints JSON.

    python benchmarks/generate_bench.py [--quantize int8] [--dtype float32] [--repeats 5]

For each shape (4 layers x 128 wide, and 6 layers x 384 wide with 6 heads, both
block 256), a GPT-2-style model with random weights (learned positions,
LayerNorm, GELU, biases, tied embeddings; the 65-token vocabulary of
character-level Shakespeare) generates 255 new tokens greedily after a
one-token prompt: tokens/s is the best of `--repeats` runs, counted from the
start of the call to its end. Time to first token is the median over
`--repeats` runs of prefilling a 200-token prompt and choosing one token.

When transformers is installed, its GPT-2 of the same shape runs the same
measurements in the same process (`generate` with its KV cache, greedy), and
the ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

import torch  # noqa: E402

from gpt_runtime.backend import dtype_name, get_backend  # noqa: E402
from gpt_runtime.generate import generate  # noqa: E402
from gpt_runtime.inference import generation_dtype, prepare_model  # noqa: E402
from gpt_runtime.model import GPT, GPTConfig  # noqa: E402
from gpt_runtime.sampling import build_chain  # noqa: E402
from gpt_runtime.tokenizer import train_tokenizer  # noqa: E402

SHAPES = {"4x128": dict(n_layer=4, n_head=4, n_embd=128), "6x384": dict(n_layer=6, n_head=6, n_embd=384)}
TARGET_RATIO = 3.0  # the target: at least 3x transformers at both shapes
VOCAB, BLOCK, NEW_TOKENS, PROMPT_TOKENS = 65, 256, 255, 200


def quill_run(shape: dict, dtype: str, quantize: str, repeats: int) -> dict:
    tokenizer = train_tokenizer("char", "".join(chr(33 + i) for i in range(VOCAB - 4)))  # 61 chars + 4 specials
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, position="learned", norm="layernorm", mlp="gelu",
                          bias=True, tie_embeddings=True, **shape))
    backend = get_backend("cpu")
    chosen = generation_dtype(backend, model, dtype)
    model = prepare_model(model, backend, chosen, quantize)
    chain = build_chain("greedy")
    speeds = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        done = list(generate(model, tokenizer, [5], chain=chain, max_new_tokens=NEW_TOKENS))[-1]
        speeds.append(done.new_tokens / (time.perf_counter() - start))
        assert done.new_tokens == NEW_TOKENS, done  # the greedy path must not stop early on <eos>
    prompt = [4 + i % (VOCAB - 4) for i in range(PROMPT_TOKENS)]
    firsts = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        next(iter(generate(model, tokenizer, prompt, chain=chain, max_new_tokens=1)))
        firsts.append(time.perf_counter() - start)
    return {"tokens_per_s": round(max(speeds[1:]), 1), "first_token_ms": round(1000 * statistics.median(firsts[1:]), 2),
            "dtype": dtype_name(chosen), "quantize": quantize}


def transformers_run(shape: dict, repeats: int) -> dict | None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging
    except ImportError:
        return None
    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"])
    model = GPT2LMHeadModel(config).eval()
    options = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    speeds, firsts = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = model.generate(torch.tensor([[5]]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)
            speeds.append((out.shape[1] - 1) / (time.perf_counter() - start))
        prompt = torch.tensor([[4 + i % (VOCAB - 4) for i in range(PROMPT_TOKENS)]])
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, **options)
            firsts.append(time.perf_counter() - start)
    import transformers

    return {"tokens_per_s": round(max(speeds[1:]), 1), "first_token_ms": round(1000 * statistics.median(firsts[1:]), 2),
            "version": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto", help="Quill's generation dtype (default: auto)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-transformers", action="store_true", help="skip the side-by-side run")
    args = parser.parse_args()
    results = {"machine": machine_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "new_tokens": NEW_TOKENS, "prompt_tokens_for_first_token": PROMPT_TOKENS, "vocab_size": VOCAB, "shapes": {}}
    for name, shape in SHAPES.items():
        row = {"quill": quill_run(shape, args.dtype, args.quantize, args.repeats)}
        reference = None if args.no_transformers else transformers_run(shape, args.repeats)
        if reference:
            row["transformers"] = reference
            row["speedup"] = round(row["quill"]["tokens_per_s"] / reference["tokens_per_s"], 2)
            row["meets_3x"] = row["speedup"] >= TARGET_RATIO
        results["shapes"][name] = row
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
