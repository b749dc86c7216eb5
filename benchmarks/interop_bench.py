"""A GPT-2 of GPT-2 small's shape, imported into Quill, beside transformers. Prints JSON.

    python benchmarks/interop_bench.py [--repeats 3] [--new-tokens 128]

transformers makes a GPT-2 small (124M parameters, random weights) and saves it
with a tokenizer of GPT-2's size (50,257 tokens) in a temporary directory. Then:

- `import_s`: wall time of `quill import DIR --out ...` as a user runs it (a new
  process: Python, torch, reading 500 MB and writing the checkpoint);
- `load_s`: loading for generation, Quill's checkpoint (`load_checkpoint`, then
  preparing it along its generation path, measured on the first run of a machine
  and cached after) against `GPT2LMHeadModel.from_pretrained`;
- decoding at batch 1: greedy, `--new-tokens` after a 16-token prompt, both with
  their KV caches: Quill along its automatic path, transformers in float32 (its
  default) and in bfloat16. They take turns, run by run, so that each meets the
  same machine; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

import torch  # noqa: E402

from gpt_runtime.backend import get_backend  # noqa: E402
from gpt_runtime.checkpoint import load_checkpoint  # noqa: E402
from gpt_runtime.generate import generate  # noqa: E402
from gpt_runtime.hf_tokenizer import byte_alphabet  # noqa: E402
from gpt_runtime.calibrate import prepare  # noqa: E402
from gpt_runtime.sampling import build_chain  # noqa: E402

EOT = 50256


def make_gpt2_small(directory: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=EOT, eos_token_id=EOT)).save_pretrained(directory)
    alphabet = sorted(byte_alphabet())  # GPT-2's byte order; 50,000 two-byte merges stand in for its own
    merges = [a + " " + b for a in alphabet for b in alphabet][:50_000]
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {m.replace(" ", ""): 256 + r for r, m in enumerate(merges)}
    (directory / "vocab.json").write_text(json.dumps(vocab | {"<|endoftext|>": EOT}, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    import transformers
    from transformers import GPT2LMHeadModel

    transformers.utils.logging.set_verbosity_error()
    prompt = list(range(1000, 1016))
    with tempfile.TemporaryDirectory() as tmp:
        source, checkpoint = Path(tmp) / "gpt2-small", Path(tmp) / "gpt2-small.safetensors"
        make_gpt2_small(source)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tui.cli", "import", str(source), "--out", str(checkpoint), "--no-profile"],
                       check=True, capture_output=True)
        import_s = time.perf_counter() - start

        start = time.perf_counter()
        ckpt = load_checkpoint(checkpoint)
        backend = get_backend("cpu")
        quill, choice = prepare(ckpt.model, backend)  # measured on first use, then cached
        quill_load = time.perf_counter() - start
        start = time.perf_counter()
        theirs = GPT2LMHeadModel.from_pretrained(source).eval()
        theirs_load = time.perf_counter() - start
        theirs_bf16 = GPT2LMHeadModel.from_pretrained(source, dtype=torch.bfloat16).eval()

        chain = build_chain("greedy")

        def run_quill() -> float:
            start = time.perf_counter()
            done = list(generate(quill, ckpt.tokenizer, prompt, chain=chain, max_new_tokens=args.new_tokens, seed=0))[-1]
            return done.new_tokens / (time.perf_counter() - start)

        def hf_runner(model):
            @torch.inference_mode()
            def run() -> float:
                start = time.perf_counter()
                out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=EOT)
                return (out.shape[1] - len(prompt)) / (time.perf_counter() - start)
            return run

        runners = {"quill": run_quill, "transformers_float32": hf_runner(theirs), "transformers_bfloat16": hf_runner(theirs_bf16)}
        speeds: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(args.repeats + 1):  # the first round warms up
            for name, run in runners.items():
                speed = run()
                if i:
                    speeds[name].append(speed)
    medians = {name: round(statistics.median(values), 1) for name, values in speeds.items()}
    print(json.dumps({
        "machine": machine_info(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "model": "GPT-2 small shape, random weights, 124,439,808 parameters",
        "import_s": round(import_s, 2),
        "load_s": {"quill": round(quill_load, 2), "transformers": round(theirs_load, 2)},
        "quill_path": choice.path.name, "quill_path_source": choice.source, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
        "decode_tokens_per_s_median": medians,
        "speedup_vs_transformers_float32": round(medians["quill"] / medians["transformers_float32"], 2),
        "speedup_vs_transformers_bfloat16": round(medians["quill"] / medians["transformers_bfloat16"], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
