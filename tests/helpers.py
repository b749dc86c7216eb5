"""Helpers for tests: run the real CLI, sample text, the chat's two small models."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n"
) * 20


def quill_env(extra: dict | None = None) -> dict[str, str]:
    """The environment for a `quill` subprocess: this one without the user's QUILL_* settings.

    QUILL_SHIPPED_PROFILES stays (tests other than test_shipped hide the shipped
    profiles), and so do QUILL_DEVICE (the test's device) and QUILL_GENERATION_PATH
    (float32, unless a test says otherwise), both set in conftest.
    """
    kept = ("QUILL_SHIPPED_PROFILES", "QUILL_DEVICE", "QUILL_GENERATION_PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_") or k in kept}
    env.update(extra or {})
    return env


def run_quill(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `quill` CLI in a subprocess; returns bytes stdout/stderr."""
    return quill_later(*args, input=input, env=env, cwd=cwd)()


def quill_later(*args: str, input: bytes | None = None, env: dict | None = None,
                cwd: Path | None = None) -> Callable[[], subprocess.CompletedProcess]:
    """`run_quill` to call later, maybe on another thread, in the environment and working
    directory of now: the tests that run meanwhile change both."""
    full_env, cwd = quill_env(env), cwd or Path.cwd()
    return lambda: subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


@contextmanager
def side_by_side(jobs: dict[str, Callable[[], T]], at_once: int = 2) -> Iterator[dict[str, Future[T]]]:
    """Start every job, `at_once` at a time, and give their futures by name; on leaving, wait for them all.

    Each test waits for the result of its own job, so a job that fails fails only the tests
    that look at it, while the jobs (CLI subprocesses, each paying for its imports) still run
    side by side. Tests run meanwhile, so a job takes its environment when it is made
    (quill_later), not when it starts.
    """
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        yield {name: pool.submit(job) for name, job in jobs.items()}


def pip_install_target(sources: list[Path], site: Path) -> Path:
    """Install distribution source trees into `site` with a real, offline `pip install --target`.

    Put `site` on PYTHONPATH and the distributions' entry points are found, as
    after a `pip install`. Builds with the environment's setuptools (no isolation).
    """
    import importlib.util

    import pytest

    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("plugin tests build distributions offline with the environment's setuptools "
                    "(pip --no-build-isolation), and setuptools is not installed; run `make test`")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), *map(str, sources)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def one_line_error(out: subprocess.CompletedProcess, code: int = 1) -> tuple[str, str | None]:
    """Check a failed CLI run: exit `code`, nothing on stdout, one `quill: error:` line and at
    most a hint line. Returns (message, hint)."""
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == code, (out.returncode, err[-3000:])
    assert out.stdout == b""
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("quill: error: "), err
    if len(lines) == 2:
        assert lines[1].startswith("  hint: "), err
    return lines[0].removeprefix("quill: error: "), lines[1].removeprefix("  hint: ") if len(lines) == 2 else None


# --- the chat's two small models (test_session, test_repl, test_tui) ---------------------------------

CHAT_BLOCK = 64

ALPHA_TOML = r'''description = "alpha: short replies"
checkpoint = "../models/a.safetensors"

[sampler]
chain = "top_k,temperature"
top_k = { k = 20 }
temperature = { t = 0.9 }

[generation]
max_new_tokens = 10

[template]
system = ""
user_prefix = "A: "
user_suffix = "\n"
model_prefix = "F: "
model_suffix = "\n"
stop = ["\n", "A:"]
'''

BETA_TOML = r'''description = "beta: never stops by itself"
checkpoint = "../models/b.safetensors"

[sampler]
chain = "logit_bias,top_k,temperature"
logit_bias = { bias = "3:-inf" }  # <eos> never comes
top_k = { k = 30 }

[generation]
max_new_tokens = 20
seed = 42

[template]
user_prefix = "You: "
user_suffix = "\n"
model_prefix = "Bot: "
model_suffix = "\n"
stop = ["@"]  # not in the vocabulary: never matches
'''


def write_chat_models(root: Path) -> dict:
    """Two checkpoints in root/models, profiles alpha and beta in root/two, alpha alone in root/one."""
    import torch

    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.model import GPT, GPTConfig
    from plugins.char_tokenizer import CharTokenizer

    tok = CharTokenizer.train(SAMPLE_TEXT)
    (root / "models").mkdir()
    paths = {}
    for name, seed, step in (("a", 0, 7), ("b", 1, 9)):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=CHAT_BLOCK, n_layer=1, n_head=2, n_embd=32,
                              tie_embeddings=False))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)  # untrained, but its text varies
        paths[name] = root / "models" / f"{name}.safetensors"
        save_checkpoint(paths[name], model, tok, step=step)
    for folder, profiles in (("two", {"alpha": ALPHA_TOML, "beta": BETA_TOML}), ("one", {"alpha": ALPHA_TOML})):
        (root / folder).mkdir()
        for name, text in profiles.items():
            (root / folder / f"{name}.toml").write_text(text, encoding="utf-8")
    return {"root": root, "two": root / "two", "one": root / "one", "a": paths["a"].resolve(),
            "b": paths["b"].resolve(), "fingerprint": tok.fingerprint}


def add_builtin_plugin(monkeypatch, name: str, plugin: object) -> None:
    """Load `plugin` (an object with hook implementations) as one more built-in called
    `name`, for this test only: the next use of the registry sees it."""
    from gpt_runtime import plugins as host_mod

    module = f"_quill_test_{name}"
    monkeypatch.setitem(sys.modules, module, plugin)
    monkeypatch.setattr(host_mod, "BUILTINS", host_mod.BUILTINS + ((name, module),))
    host_mod.get_plugin_host.cache_clear()
