"""What each generation path costs in accuracy, on the shipped models. Prints JSON.

    python benchmarks/quality_bench.py [--corpus FILE] [--windows 16]

For each shipped profile, the validation loss (the last 10% of the corpus,
`--windows` windows of the model's context spread evenly over it) computed
through the decoding step itself: the window's first token is the prompt, and
every later token is fed one at a time, as generation feeds them, so each
path's own decoding kernels (bf16 products, fbgemm's int8 products) make the
predictions. Paths: float32, bfloat16 and int8, and the one `calibrate.choose`
picks on this machine (`auto`), with each one's difference from float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpt_runtime.backend import get_backend  # noqa: E402
from gpt_runtime.calibrate import choose  # noqa: E402
from gpt_runtime.checkpoint import load_checkpoint  # noqa: E402
from gpt_runtime.decode import step_for  # noqa: E402
from gpt_runtime.fileio import read_corpus  # noqa: E402
from gpt_runtime.inference import prepare_model  # noqa: E402
from gpt_runtime.profiles import get_profile  # noqa: E402
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

PROFILES = ("shakespeare-char", "shakespeare-bpe")
PATHS = {"float32": (torch.float32, "none"), "bfloat16": (torch.bfloat16, "none"), "int8": (torch.float32, "int8")}


@torch.inference_mode()
def stepped_loss(model, windows: list[torch.Tensor]) -> float:
    """Mean next-token loss over `windows`, every prediction made by one decoding step."""
    total, count = 0.0, 0
    for window in windows:
        step = step_for(model)
        cache = step.new_cache()
        logits = model(window[None, :1], cache=cache)[0][:, -1].float()
        for position in range(1, window.numel()):
            target = window[position:position + 1]
            total += float(F.cross_entropy(logits, target, reduction="sum"))
            count += 1
            if position + 1 < window.numel():
                logits = step(target, cache)
    return total / count


def measure(name: str, corpus: Path, n_windows: int) -> dict:
    profile = get_profile(name)
    ckpt = load_checkpoint(profile.checkpoint)
    block = ckpt.model.config.block_size
    text = read_corpus(corpus)
    val = torch.tensor(ckpt.tokenizer.encode(text[int(len(text) * 0.9):]), dtype=torch.long)
    stride = (val.numel() - block) // max(1, n_windows - 1)
    windows = [val[i * stride:i * stride + block] for i in range(n_windows)]
    backend = get_backend("cpu")
    losses = {}
    for path, (dtype, quantize) in PATHS.items():
        model = prepare_model(copy.deepcopy(ckpt.model), backend, dtype, quantize)
        losses[path] = round(stepped_loss(model, windows), 4)
    auto = choose(ckpt.model, backend).path.name
    return {"windows": n_windows, "tokens": n_windows * (block - 1), "val_loss": losses, "auto": auto,
            "auto_minus_float32": round(losses[auto] - losses["float32"], 4),
            "minus_float32": {p: round(v - losses["float32"], 4) for p, v in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    corpus = corpus_or_exit(args.corpus)
    results = {"machine": machine_info(), "torch": torch.__version__, "bound": 0.01,
               "profiles": {name: measure(name, corpus, args.windows) for name in PROFILES}}
    results["within_bound"] = all(abs(p["auto_minus_float32"]) <= 0.01 for p in results["profiles"].values())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
