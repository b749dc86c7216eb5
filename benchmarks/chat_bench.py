"""Chat responsiveness. Prints JSON.

    python benchmarks/chat_bench.py [--profile NAME] [--corpus FILE]

- `first_char_ms`: from sending a message to the first streamed character
  (median of 10 messages), through `ChatSession.send`, as both interfaces do;
- `ready_s`: from launching ``quill chat --plain`` on a pseudo-terminal to its
  prompt appearing, the model loaded (median of 5);
- `reply_tokens_per_s` without and with a `/train` job running (the job
  trains the classic 6x384 shape on the corpus), and their ratio.

Without --profile, a profile is made in a temporary directory for a model of
the size of the shipped one (4 layers, 128 wide, block 256, character
vocabulary) with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

PROFILE = '''checkpoint = "model.safetensors"
[sampler]
chain = "top_k,top_p,temperature"
[generation]
max_new_tokens = 120
[template]
user_prefix = "A:\\n"
user_suffix = "\\n\\n"
model_prefix = "B:\\n"
model_suffix = "\\n\\n"
stop = ["\\n\\n\\n\\n"]
'''


def make_profile(directory: Path, corpus: Path) -> str:
    import torch

    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.fileio import read_corpus
    from gpt_runtime.model import GPT, GPTConfig
    from gpt_runtime.tokenizer import train_tokenizer

    tok = train_tokenizer("char", read_corpus(corpus))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128,
                          position="rope", norm="rmsnorm", mlp="swiglu"))
    save_checkpoint(directory / "model.safetensors", model, tok, step=0)
    (directory / "bench.toml").write_text(PROFILE, encoding="utf-8")
    return "bench"


def time_to_prompt(profile: str) -> float:
    """Seconds from launching the interactive plain chat to its "> " prompt."""
    import pty
    import select

    main_fd, child_fd = pty.openpty()
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tui.cli", "chat", "--plain", "--profile", profile],
                             stdin=child_fd, stdout=child_fd, stderr=child_fd, close_fds=True)
    os.close(child_fd)
    seen = b""
    try:
        while b">" not in seen.partition(b"Chatting with")[2]:  # the greeting, then the prompt drawn
            ready, _, _ = select.select([main_fd], [], [], 30)
            if not ready:
                raise SystemExit(f"no prompt after 30 s; the chat said: {seen.decode(errors='replace')}")
            seen += os.read(main_fd, 4096)
        elapsed = time.perf_counter() - start
        os.write(main_fd, b"/quit\r")
        child.wait(30)
        return elapsed
    finally:
        if child.poll() is None:
            child.kill()
        os.close(main_fd)


def first_char_ms(session, n: int = 10) -> float:
    from gpt_runtime.generate import Token

    times = []
    for i in range(n):
        start = time.perf_counter()
        first = None
        for event in session.send(f"Tell me of the king, {'good ' * i}sir."):
            if first is None and isinstance(event, Token) and event.text:
                first = time.perf_counter() - start
        times.append(first)
    return round(1000 * statistics.median(t for t in times if t is not None), 1)


def reply_speed(session, n: int = 4) -> float:
    from gpt_runtime.generate import Done

    speeds = []
    for i in range(n):
        session.clear()
        for event in session.send("Speak of " + "love " * (i + 1)):
            if isinstance(event, Done):
                speeds.append(event.tokens_per_second)
    return round(statistics.median(speeds), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="profile to measure (default: a random-weights stand-in)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    corpus = corpus_or_exit(args.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.profile is None:
            os.environ["QUILL_PROFILES"] = str(tmp)
            profile = make_profile(tmp, corpus)
        else:
            profile = args.profile
        ready = [time_to_prompt(profile) for _ in range(5)]

        from gpt_runtime.data import prepare
        from gpt_runtime.session import ChatSession
        from gpt_runtime.tokenizer import train_tokenizer
        from gpt_runtime.fileio import read_corpus

        session = ChatSession(profile)
        results = {"machine": machine_info(), "profile": profile, "ready_s": round(statistics.median(ready), 2),
                   "first_char_ms": first_char_ms(session)}
        alone = reply_speed(session)
        prepare(corpus, train_tokenizer("char", read_corpus(corpus)), tmp / "data", val_fraction=0.1)
        job = session.start_job("train", ["--data", str(tmp / "data"), "--out", str(tmp / "run"), "--max-steps", "100000",
                                          "--n-layer", "6", "--n-head", "6", "--n-embd", "384", "--block-size", "256",
                                          "--batch-size", "16", "--eval-interval", "100000"])
        while job.last.get("event") != "step" and job.status == "running":
            time.sleep(0.2)  # measure once the job is really training
        busy = reply_speed(session)
        if job.status != "running":  # else "while training" would be a speed measured alone
            sys.exit(f"the training job ended before the measurement did: {job.describe()}")
        session.jobs.stop_all()
        results.update({"reply_tokens_per_s_alone": alone, "reply_tokens_per_s_while_training": busy,
                        "ratio_while_training": round(busy / alone, 2) if alone else None,
                        "training_job": job.describe()})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
