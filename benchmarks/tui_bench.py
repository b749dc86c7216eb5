"""The full-screen chat's responsiveness. Prints JSON.

    python benchmarks/tui_bench.py [--profile NAME] [--corpus FILE]

- `first_frame_s`: from launching ``quill chat`` on a pseudo-terminal to its
  first screen (the "Loading the model" line) (median of 5);
- `ready_s`: from launch to the profile's greeting, the model loaded (median of 5);
- `max_loop_lag_ms`: the longest a 10 ms timer on the app's event loop was
  late while a 1,000-token reply streamed and a `/train` job trained the classic
  6x384 shape (headless app, in-process);
- `streamed_tokens_per_s` against `engine_tokens_per_s`: the reply's speed in
  the app, and the same reply generated with no interface;
- `status_line_tokens_per_s`: what the status line shows after a reply with no
  job running (median of 8 replies at the profile's sampler, seed 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import DEFAULT_CORPUS, corpus_or_exit, machine_info  # noqa: E402

ESCAPES = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


def launch_times(profile: str) -> tuple[float, float]:
    """(first frame, ready) in seconds for one launch on a pseudo-terminal."""
    import pty
    import select

    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tui.cli", "chat", "--profile", profile], stdin=child_fd,
                             stdout=child_fd, stderr=child_fd, close_fds=True, env=env, start_new_session=True)
    os.close(child_fd)
    seen, first = b"", None
    try:
        while True:
            ready, _, _ = select.select([main_fd], [], [], 30)
            if not ready:
                raise SystemExit(f"no greeting after 30 s; the screen said: {ESCAPES.sub(b'', seen)[-500:]!r}")
            seen += os.read(main_fd, 65536)
            text = ESCAPES.sub(b"", seen)
            if first is None and b"Loading" in text:
                first = time.perf_counter() - start
            if b"Profile" in text and b"F1 the keys" in text:
                return first, time.perf_counter() - start
    finally:
        child.kill()
        child.wait()
        os.close(main_fd)


async def lag_while_busy(profile: str, data: Path, run_dir: Path) -> dict:
    from tui.app import QuillApp

    app = QuillApp(profile)
    lags: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.profile_name is None:
            await pilot.pause(0.05)
        session = app.session
        session.set("max_new_tokens", "1000")
        session.set("seed", "7")
        session.template = session.template.__class__(**{**session.template.__dict__, "stop": []})  # run to 1,000
        app.run_line(f"/train --data {data} --out {run_dir} --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 "
                     "--batch-size 16 --max-steps 100000 --eval-interval 100000")
        job = None
        while job is None or job.last.get("event") != "step":
            await pilot.pause(0.2)
            job = (session.jobs.all() or [None])[0]
            if job is not None and job.status != "running":
                raise SystemExit(f"the training job ended: {job.error}")

        expected = [time.perf_counter()]

        def beat() -> None:
            now = time.perf_counter()
            lags.append(max(0.0, now - expected[0]))
            expected[0] = now + 0.01

        timer = app.set_interval(0.01, beat)
        app.run_line("Tell me a long tale of the king.")
        await pilot.pause(0.1)
        while app.streaming:
            await pilot.pause(0.05)
        timer.stop()
        done = session.turns[-1].provenance
        session.jobs.stop_all()
    p99 = sorted(lags)[int(len(lags) * 0.99)]
    return {"max_loop_lag_ms": round(1000 * max(lags), 1), "p99_loop_lag_ms": round(1000 * p99, 1),
            "streamed_tokens": done.new_tokens, "streamed_tokens_per_s": done.tokens_per_second}


MESSAGES = ["Good morrow, fair lady.", "What news from the court?", "Wilt thou love me?", "Where is the king?"]


async def status_speed(profile: str, replies: int = 8) -> float:
    """The speed the status line shows after a reply (no job running): median over `replies`."""
    from tui.app import QuillApp

    app = QuillApp(profile)
    speeds = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.profile_name is None:
            await pilot.pause(0.05)
        app.session.set("seed", "1")
        for i in range(replies):
            app.run_line(MESSAGES[i % len(MESSAGES)])
            await pilot.pause(0.1)
            while app.streaming:
                await pilot.pause(0.05)
            speeds.append(app.session.turns[-1].provenance.tokens_per_second)
    return round(statistics.median(speeds), 1)


def engine_speed(profile: str) -> float:
    from gpt_runtime.generate import Done, generate
    from gpt_runtime.sampling import build_chain
    from gpt_runtime.session import ChatSession

    s = ChatSession(profile)
    text = s.template.render([], "Tell me a long tale of the king.")
    for event in generate(s.loaded.model, s.loaded.tokenizer, text, chain=build_chain(s.chain, s.options),
                          max_new_tokens=1000, seed=7):
        if isinstance(event, Done):
            return round(event.tokens_per_second, 1)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="shakespeare-char")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    corpus = corpus_or_exit(args.corpus)
    status = asyncio.run(status_speed(args.profile))
    times = [launch_times(args.profile) for _ in range(5)]
    results = {"machine": machine_info(), "profile": args.profile,
               "first_frame_s": round(statistics.median(t[0] for t in times), 2),
               "ready_s": round(statistics.median(t[1] for t in times), 2), "status_line_tokens_per_s": status}
    from gpt_runtime.data import prepare
    from gpt_runtime.fileio import read_corpus
    from gpt_runtime.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        prepare(corpus, train_tokenizer("char", read_corpus(corpus)), Path(tmp) / "data", val_fraction=0.1)
        results.update(asyncio.run(lag_while_busy(args.profile, Path(tmp) / "data", Path(tmp) / "run")))
    results["engine_tokens_per_s"] = engine_speed(args.profile)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
