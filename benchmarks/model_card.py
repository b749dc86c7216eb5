"""The figures of a shipped model's card. Prints JSON.

    python benchmarks/model_card.py shakespeare-char [--corpus FILE] [--replies 40]

- `val_loss` and `bits_per_byte`: over the whole validation split (the last
  10% of the corpus), as `quill eval` computes them, on the shipped weights;
- `word_validity`: the share of words in chat replies (at the profile's own
  sampler settings, seeds 0, 1, ...) that occur in the corpus;
- `sample`: the first of those exchanges, as the chat shows it;
- parameters, file size and the weights' dtype.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

MESSAGES = ["Good morrow, fair lady.", "What news from the court?", "Wilt thou love me?", "Where is the king?",
            "I am sick at heart.", "Speak, what says the duke?", "Come, let us away.", "Who goes there?"]
WORD = re.compile(r"[A-Za-z']+")


def words_of(text: str) -> list[str]:
    return [w for w in (m.strip("'").lower() for m in WORD.findall(text)) if w]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--replies", type=int, default=40, help="replies to judge word validity on (default: 40)")
    args = parser.parse_args()
    corpus = corpus_or_exit(args.corpus)

    from safetensors import safe_open

    from gpt_runtime.checkpoint import load_checkpoint
    from gpt_runtime.data import prepare
    from gpt_runtime.evaluate import evaluate
    from gpt_runtime.session import ChatSession

    session = ChatSession(args.profile)
    profile, loaded = session.profile, session.loaded
    with safe_open(str(profile.checkpoint), "pt") as f:
        dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
    with tempfile.TemporaryDirectory() as tmp:
        prepare(corpus, loaded.tokenizer, Path(tmp) / "data", val_fraction=0.1)
        result = evaluate(profile.checkpoint, Path(tmp) / "data")

    vocabulary = set(words_of(corpus.read_text(encoding="utf-8")))
    total = valid = 0
    sample = ""
    for i in range(args.replies):
        session.clear()
        session.set("seed", str(i))
        for _ in session.send(MESSAGES[i % len(MESSAGES)]):
            pass
        reply = session.turns[-1].reply
        words = words_of(reply)
        total += len(words)
        valid += sum(w in vocabulary for w in words)
        if i == 0:
            sample = session.profile.template.render([], MESSAGES[0]) + reply
    print(json.dumps({
        "machine": machine_info(), "profile": profile.name, "checkpoint": str(profile.checkpoint),
        # counted on the checkpoint: the session's model has packed linears, not parameters
        "parameters": load_checkpoint(profile.checkpoint).model.num_params(), "file_mb": round(profile.checkpoint.stat().st_size / 1e6, 2),
        "weights_dtype": dtypes, "tokenizer": f"{loaded.tokenizer.kind}, {loaded.tokenizer.vocab_size} tokens",
        "val_loss": round(result.loss, 4), "bits_per_byte": round(result.bits_per_byte, 4),
        "val_tokens": result.tokens, "val_bytes": result.bytes,
        "chain": session.chain, "options": session.options,
        "word_validity": round(valid / max(total, 1), 4), "words_judged": total, "replies": args.replies,
        "sample": sample,
    }, indent=1))


if __name__ == "__main__":
    main()
