"""Tokenizer speed: BPE training, encoding and decoding a whole corpus. Prints JSON.

    python benchmarks/tokenizer_bench.py [--corpus FILE] [--vocab-size 4096] [--repeats 3]

Each figure is the median of `--repeats` runs in this one process. Encoding is
measured cold: a tokenizer freshly loaded from its file, so no chunk is cached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

from gpt_runtime.fileio import read_corpus  # noqa: E402
from gpt_runtime.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    text = read_corpus(corpus_or_exit(args.corpus))
    n_bytes = len(text.encode("utf-8"))
    train_s, encode_s, decode_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        for _ in range(args.repeats):
            seconds, tok = timed(lambda: train_tokenizer("bpe", text, args.vocab_size))
            train_s.append(seconds)
        tok.save(path)
        for _ in range(args.repeats):
            fresh = load_tokenizer(path)
            seconds, ids = timed(lambda: fresh.encode(text))
            encode_s.append(seconds)
            seconds, back = timed(lambda: fresh.decode(ids))
            decode_s.append(seconds)
            assert back == text, "round trip failed"

    median = statistics.median
    print(json.dumps({
        "benchmark": "tokenizer",
        "corpus": str(args.corpus),
        "corpus_bytes": n_bytes,
        "vocab_size": tok.vocab_size,
        "tokens": len(ids),
        "bytes_per_token": round(n_bytes / len(ids), 3),
        "bpe_train_s": round(median(train_s), 3),
        "encode_mb_per_s": round(n_bytes / median(encode_s) / 1e6, 2),
        "decode_mb_per_s": round(n_bytes / median(decode_s) / 1e6, 2),
        "targets": {"bpe_train_s": "<= 2", "encode_mb_per_s": ">= 3", "decode_mb_per_s": ">= 20"},
        "repeats": args.repeats,
        "machine": machine_info(),
    }, indent=1))


if __name__ == "__main__":
    main()
