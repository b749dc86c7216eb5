"""Generation speed at batch 1 on the CPU, beside HuggingFace transformers. Prints JSON.

    python benchmarks/generate_bench.py [--quantize int8|none] [--dtype float32|bfloat16] [--repeats 5]

For each shape (4 layers x 128 wide, and 6 layers x 384 wide with 6 heads, both
block 256), a GPT-2-style model with random weights (learned positions,
LayerNorm, GPT-2's tanh GELU, biases, tied embeddings; the 65-token vocabulary of
character-level Shakespeare) generates 255 new tokens greedily after a
one-token prompt, along the path Quill chooses by default (measured on this
machine, calibrate.py; `--dtype` and `--quantize` narrow it as they do for
`quill generate`; the JSON shows the measurements behind the choice): tokens/s is counted from the start of the call to its end
(best and median of `--repeats` runs). Time to first token is the median over
`--repeats` runs of prefilling a 200-token prompt and choosing one token.

When transformers is installed, its GPT-2 of the same shape runs the same
measurements in the same process (`generate` with its KV cache, greedy), and
the ratios are printed. The two take turns run by run, so that both meet the
same machine: on a shared 2-core VM, speeds drift by tens of percent within a
minute, and `speedup_median` is the median of the run-by-run ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

import torch  # noqa: E402

from gpt_runtime.backend import get_backend  # noqa: E402
from gpt_runtime.generate import generate  # noqa: E402
from gpt_runtime.calibrate import prepare  # noqa: E402
from gpt_runtime.model import GPT, GPTConfig  # noqa: E402
from gpt_runtime.sampling import build_chain  # noqa: E402
from gpt_runtime.tokenizer import train_tokenizer  # noqa: E402

SHAPES = {"4x128": dict(n_layer=4, n_head=4, n_embd=128), "6x384": dict(n_layer=6, n_head=6, n_embd=384)}
TARGET_RATIO = 3.0  # the target: at least 3x transformers at both shapes
VOCAB, BLOCK, NEW_TOKENS, PROMPT_TOKENS = 65, 256, 255, 200


def quill_runner(shape: dict, dtype: str, quantize: str):
    """(one 255-token greedy run -> tokens/s, one prefill of 200 tokens -> seconds, info)."""
    tokenizer = train_tokenizer("char", "".join(chr(33 + i) for i in range(VOCAB - 4)))  # 61 chars + 4 specials
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, position="learned", norm="layernorm", mlp="gelu_tanh",
                          bias=True, tie_embeddings=True, **shape))
    backend = get_backend("cpu")
    model, choice = prepare(model, backend, dtype, quantize)
    chain = build_chain("greedy")
    prompt = [4 + i % (VOCAB - 4) for i in range(PROMPT_TOKENS)]

    def decode() -> float:
        start = time.perf_counter()
        done = list(generate(model, tokenizer, [5], chain=chain, max_new_tokens=NEW_TOKENS))[-1]
        assert done.new_tokens == NEW_TOKENS, done  # the greedy path must not stop early on <eos>
        return done.new_tokens / (time.perf_counter() - start)

    def first_token() -> float:
        start = time.perf_counter()
        next(iter(generate(model, tokenizer, prompt, chain=chain, max_new_tokens=1)))
        return time.perf_counter() - start

    return decode, first_token, {"path": choice.path.name, "chosen": choice.source,
                                 "calibration": [asdict(t) for t in choice.trials]}


def transformers_runner(shape: dict):
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"])
    model = GPT2LMHeadModel(config).eval()
    options = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    prompt = torch.tensor([[4 + i % (VOCAB - 4) for i in range(PROMPT_TOKENS)]])

    @torch.inference_mode()
    def decode() -> float:
        start = time.perf_counter()
        out = model.generate(torch.tensor([[5]]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)
        return (out.shape[1] - 1) / (time.perf_counter() - start)

    @torch.inference_mode()
    def first_token() -> float:
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, **options)
        return time.perf_counter() - start

    return decode, first_token, {"version": transformers.__version__}


def measure(shape: dict, args) -> dict:
    """Quill and transformers take turns, run by run, so both see the same machine."""
    runners = {"quill": quill_runner(shape, args.dtype, args.quantize)}
    reference = None if args.no_transformers else transformers_runner(shape)
    if reference:
        runners["transformers"] = reference
    speeds = {name: [] for name in runners}
    firsts = {name: [] for name in runners}
    for i in range(args.repeats + 1):  # the first round warms up
        for name, (decode, first_token, _) in runners.items():
            speed, first = decode(), first_token()
            if i:
                speeds[name].append(speed)
                firsts[name].append(first)
    row = {name: {"tokens_per_s": round(max(speeds[name]), 1),
                  "tokens_per_s_median": round(statistics.median(speeds[name]), 1),
                  "first_token_ms": round(1000 * statistics.median(firsts[name]), 2), **info}
           for name, (_, _, info) in runners.items()}
    if reference:
        ratios = [q / t for q, t in zip(speeds["quill"], speeds["transformers"])]
        row["speedup_median"] = round(statistics.median(ratios), 2)  # of the run-by-run ratios
        row["meets_3x"] = row["speedup_median"] >= TARGET_RATIO
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto", help="Quill's generation dtype (default: auto)")
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-transformers", action="store_true", help="skip the side-by-side run")
    args = parser.parse_args()
    results = {"machine": machine_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "new_tokens": NEW_TOKENS, "prompt_tokens_for_first_token": PROMPT_TOKENS, "vocab_size": VOCAB, "shapes": {}}
    for name, shape in SHAPES.items():
        results["shapes"][name] = measure(shape, args)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
