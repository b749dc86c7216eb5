"""Make the README's screenshots with the app itself (SVG, 110x34).

    python examples/screenshots.py --corpus tinyshakespeare.txt [--out examples/screenshots]

It chats with the shipped shakespeare-char model (seed 3), trains a small model
in the background for the jobs panel, and opens the probability view of the
reply. Each picture is what `quill chat` shows at that moment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = (110, 34)


async def shoot(out: Path, data: Path, run: Path) -> None:
    from tui.app import QuillApp
    from tui.widgets import MessageView

    app = QuillApp("shakespeare-char")
    async with app.run_test(size=SIZE) as pilot:
        while app.profile_name is None:
            await pilot.pause(0.05)
        app.session.set("seed", "3")
        for message in ("Good morrow, fair lady. What news?", "Wilt thou love me?"):
            app.run_line(message)
            await pilot.pause(0.2)
            while app.streaming:
                await pilot.pause(0.05)
        await pilot.pause(0.5)
        app.save_screenshot("chat.svg", str(out))

        app.run_line(f"/train --data {data} --out {run} --n-layer 2 --n-head 4 --n-embd 128 --block-size 128 "
                     "--batch-size 16 --max-steps 300 --eval-interval 25 --log-interval 5")
        while not app.session.jobs.all() or app.session.jobs.all()[0].status == "running":
            await pilot.pause(0.25)
        await pilot.pause(1.0)
        app.save_screenshot("jobs.svg", str(out))
        app.action_toggle_jobs()

        reply = [v for v in app.query(MessageView) if v.role == "model"][-1]
        reply.focus()
        await pilot.press("p")
        await pilot.pause(0.2)
        for _ in range(6):
            await pilot.press("right")
        await pilot.pause(0.3)
        app.save_screenshot("probabilities.svg", str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="Tiny Shakespeare (quill data fetch tinyshakespeare)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "screenshots")
    args = parser.parse_args()
    from gpt_runtime.data import prepare
    from gpt_runtime.fileio import read_corpus
    from gpt_runtime.tokenizer import train_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(args.corpus, train_tokenizer("char", read_corpus(args.corpus)), Path(tmp) / "data", val_fraction=0.1)
        asyncio.run(shoot(args.out, Path(tmp) / "data", Path(tmp) / "run"))
    print(f"wrote chat.svg, jobs.svg and probabilities.svg in {args.out}")


if __name__ == "__main__":
    main()
