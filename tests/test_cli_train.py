"""tokenizer train -> prepare -> train -> check -> eval -> generate, through the real CLI in subprocesses.

The read-only commands run side by side (each pays for importing torch), then the tests
look at their results.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt_runtime.checkpoint import load_checkpoint, load_resume_state
from gpt_runtime.tokenizer import load_tokenizer
from helpers import SAMPLE_TEXT, quill_env, run_quill

ENV = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread each is fastest
MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--warmup-steps", "2", "--eval-steps", "2", "--device", "cpu", "--dtype", "float32"]
STEPS = 6
LATIN1 = b"All:\nSpeak, speak.\nCaf\xe9\n"  # 'Caf\xe9' is latin-1, not UTF-8


def _env() -> dict[str, str]:
    return quill_env(ENV)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tui.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())


def run_all(commands: dict[str, list[str]], at_once: int = 3) -> dict[str, subprocess.CompletedProcess]:
    """Run CLI commands side by side (a new one starts as soon as one ends); results by name."""
    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tui.cli", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, env=_env(), timeout=120)

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def ok(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "error" not in err, err[-3000:]
    return out.stdout.decode("utf-8")


def fails(out: subprocess.CompletedProcess, code: int = 1) -> str:
    """The failure shape: exit code, one `quill: error:` line (plus a hint), no traceback; returns that line."""
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == code, (out.returncode, err[-3000:])
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    assert lines and lines[0].startswith("quill: error:"), err
    assert all(line.startswith("  hint:") for line in lines[1:]), err
    assert out.stdout == b""
    return lines[0]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict:
    """A workspace: tokenizers, data directories, a trained run, and the read-only commands' results."""
    d = tmp_path_factory.mktemp("cli")
    corpus, other_corpus = d / "corpus.txt", d / "other.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    other_corpus.write_text(SAMPLE_TEXT.upper(), encoding="utf-8")
    (d / "latin1.txt").write_bytes(LATIN1)
    w = {"dir": d, "tok": d / "chars.json", "other_tok": d / "other.json", "data": d / "data", "other_data": d / "other_data",
         "run": d / "run"}
    steps = run_all({
        "tok": ["tokenizer", "train", str(corpus), "--kind", "char", "--out", str(w["tok"])],
        "other_tok": ["tokenizer", "train", str(other_corpus), "--kind", "char", "--out", str(w["other_tok"])],
    })
    steps.update(run_all({
        "prepare": ["prepare", str(corpus), "--tokenizer", str(w["tok"]), "--out", str(w["data"])],
        "other_prepare": ["prepare", str(corpus), "--tokenizer", str(w["other_tok"]), "--out", str(w["other_data"]),
                          "--val-fraction", "0.2"],
    }))
    steps["train"] = run_quill("train", "--data", str(w["data"]), "--out", str(w["run"]), *MODEL, "--max-steps", str(STEPS),
                               "--eval-interval", "3", "--log-interval", "2", env=ENV)
    ok(steps["train"])
    run, tok, other_tok = str(w["run"]), str(w["tok"]), str(w["other_tok"])
    steps.update(run_all({
        "check": ["check", run, "--tokenizer", tok],
        "check_other": ["check", run, "--tokenizer", other_tok],
        "eval": ["eval", run, "--data", str(w["data"]), "--device", "cpu"],
        "eval_json": ["eval", run, "--data", str(w["data"]), "--device", "cpu", "--json"],
        "eval_other": ["eval", run, "--data", str(w["other_data"])],
        "gen_a": ["generate", run, "--prompt", "All:", "--max-new-tokens", "40", "--seed", "7", "--device", "cpu"],
        "gen_b": ["generate", run, "--prompt", "All:", "--max-new-tokens", "40", "--seed", "7", "--device", "cpu"],
        "gen_c": ["generate", run, "--prompt", "All:", "--max-new-tokens", "40", "--seed", "8", "--device", "cpu"],
        "gen_greedy": ["generate", run, "--prompt", "", "--max-new-tokens", "25", "--sampler", "greedy", "--device", "cpu"],
        "err_prepare": ["prepare", str(d / "latin1.txt"), "--tokenizer", tok, "--out", str(d / "bad_data")],
    }))
    w["out"] = steps
    return w


def test_tokenizer_train_and_prepare(w):
    tok = load_tokenizer(w["tok"])
    assert f"fingerprint {tok.fingerprint}" in ok(w["out"]["tok"])
    meta = json.loads((w["data"] / "meta.json").read_text())
    stdout = ok(w["out"]["prepare"])
    assert stdout.startswith(f"wrote {w['data']}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens (uint16)")
    assert f"tokenizer {tok.fingerprint}" in stdout
    assert meta["train_tokens"] + meta["val_tokens"] == len(SAMPLE_TEXT)


def test_train_output_and_files(w):
    out = w["out"]["train"]
    stdout, stderr = ok(out), out.stderr.decode()
    log = [json.loads(line) for line in (w["run"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 6]
    best = min(r["val_loss"] for r in log if "val_loss" in r)
    assert stdout == f"finished {STEPS} steps; best val loss {best:.4f}; checkpoints in {w['run']}\n"
    assert "on cpu (float32) from step 0" in stderr.splitlines()[0]
    assert f"step {STEPS}/{STEPS}  loss {log[-1]['loss']:.4f}  val {log[-1]['val_loss']:.4f}" in stderr
    assert {"best.safetensors", "last.safetensors", "last.state.pt", "log.jsonl", "config.json"} <= {p.name for p in w["run"].iterdir()}


def test_check_with_the_matching_and_another_tokenizer(w):
    tok, other = load_tokenizer(w["tok"]), load_tokenizer(w["other_tok"])
    stdout = ok(w["out"]["check"])
    assert f"given tokenizer  {w['tok']}: matches" in stdout
    assert f"fingerprint {tok.fingerprint}" in stdout and "1 layers, 2 heads, 16 wide, block 16" in stdout
    out = w["out"]["check_other"]
    assert out.returncode == 1
    assert "Traceback" not in out.stderr.decode()
    assert f"{w['other_tok']}: DOES NOT MATCH (it is {other.fingerprint})" in out.stdout.decode()


def test_eval_text_and_json(w):
    result = json.loads(ok(w["out"]["eval_json"]))
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "masked"}
    assert result["masked"] is False  # plain text: every token counts
    meta = json.loads((w["data"] / "meta.json").read_text())
    assert result["tokens"] == meta["val_tokens"] - 1  # every val token but the first is predicted once
    assert result["bytes"] == result["tokens"]  # char tokenizer, ASCII text
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)
    best = load_checkpoint(w["run"])  # a run directory means its best checkpoint
    assert 0 < result["loss"] < math.log(best.tokenizer.vocab_size) + 0.5
    assert ok(w["out"]["eval"]) == (
        f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}  "
        f"({result['tokens']:,} tokens, {result['bytes']:,} bytes)\n")


def test_eval_on_data_from_another_tokenizer(w):
    line = fails(w["out"]["eval_other"])
    assert load_tokenizer(w["tok"]).fingerprint in line and load_tokenizer(w["other_tok"]).fingerprint in line


def test_generate(w):
    out = w["out"]
    a, b, c = ok(out["gen_a"]), ok(out["gen_b"]), ok(out["gen_c"])
    assert a == b, "the same --seed must give the same text"
    assert a != c, "another --seed should give another text"
    tok = load_tokenizer(w["tok"])
    for text in (a, c):
        assert len(tok.encode(text)) <= 40  # sampling may end early, at <eos>
        assert set(text) <= set(tok.chars)
    greedy = ok(out["gen_greedy"])  # empty prompt, greedy: exactly the tokens asked for
    assert len(tok.encode(greedy)) == 25 and set(greedy) <= set(tok.chars)


def test_errors_are_one_line(w):
    assert f"is not UTF-8 text (invalid byte 0xe9 at offset {LATIN1.index(0xE9)})" in fails(w["out"]["err_prepare"])


# --- runs: refuse, resume, interrupt --------------------------------------------------------------

def test_training_again_into_a_run_is_refused(w):
    out = run_quill("train", "--data", str(w["data"]), "--out", str(w["run"]), *MODEL, env=ENV)
    assert f"'{w['run']}' already holds a run" in fails(out)
    assert "hint: continue it with --resume" in out.stderr.decode()
    assert load_resume_state(w["run"] / "last.state.pt")["step"] == STEPS  # untouched


def test_train_usage_and_config_errors(w, tmp_path):
    (tmp_path / "bad.toml").write_text("n_layers = 2\n")
    (tmp_path / "typed.toml").write_text('batch_size = "big"\n')
    results = run_all({
        "no_run": ["train", "--out", str(tmp_path / "nothing"), "--resume"],
        "resume_config": ["train", "--out", str(w["run"]), "--resume", "--config", str(tmp_path / "bad.toml")],
        "unknown_key": ["train", "--data", str(w["data"]), "--out", str(tmp_path / "r1"), "--config", str(tmp_path / "bad.toml")],
        "typed": ["train", "--data", str(w["data"]), "--out", str(tmp_path / "r2"), "--config", str(tmp_path / "typed.toml")],
        "bad_flag": ["train", "--data", str(w["data"]), "--n-layer", "two"],
        "nproc": ["train", "--data", str(w["data"]), "--out", str(tmp_path / "r3"), "--nproc", "0"],
        "no_data": ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r4"), *MODEL],
    })
    assert "no run to resume in" in fails(results["no_run"])
    assert "takes no --config" in fails(results["resume_config"], code=2)
    assert "unknown key 'n_layers'" in fails(results["unknown_key"])
    assert "did you mean 'n_layer'?" in results["unknown_key"].stderr.decode()
    assert "batch_size should be int, not 'big'" in fails(results["typed"])
    assert "--n-layer: invalid int value: 'two'" in fails(results["bad_flag"], code=2)
    assert "--nproc must be at least 1, not 0" in fails(results["nproc"], code=2)
    assert "nowhere' does not exist" in fails(results["no_data"])
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r4" / "last.state.pt").exists()


def test_sigint_saves_and_resume_continues(w, tmp_path):
    run = tmp_path / "run"
    proc = start("train", "--data", str(w["data"]), "--out", str(run), *MODEL, "--max-steps", "100000",
                 "--eval-interval", "100000", "--log-interval", "1")
    try:
        deadline = time.monotonic() + 90
        while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no training step logged in 90 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = stderr.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and stdout == b""
    step = load_resume_state(run / "last.state.pt")["step"]
    assert step >= 2
    assert f"stopped by SIGINT at step {step}; saved {run}/last.safetensors (continue with: quill train --out {run} --resume)" in err
    assert load_checkpoint(run / "last.safetensors").step == step
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == step and "val_loss" in log[-1]  # it evaluated before saving

    # --resume continues it, from wherever the run directory now is
    moved = tmp_path / "moved" / "run"
    shutil.move(run, moved)
    out = run_quill("train", "--out", str(moved), "--resume", "--max-steps", str(step + 2), env=ENV)
    assert ok(out).startswith(f"finished {step + 2} steps")
    assert f"from step {step}" in out.stderr.decode().splitlines()[0]
    log = [json.loads(line) for line in (moved / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step + 3))
    assert load_checkpoint(moved / "last.safetensors").step == step + 2
    assert json.loads((moved / "config.json").read_text())["out"] == str(moved)


def test_compile_settings_old_and_new_and_a_resume_that_changes_compile(w, tmp_path):
    """A config from before `compile = "auto"` (true or false) still runs; resuming may change
    compile; and "auto", the default, never compiles on a CPU."""
    (tmp_path / "old.toml").write_text("compile = false\nmax_steps = 2\n")
    run = tmp_path / "run"
    ok(run_quill("train", "--config", str(tmp_path / "old.toml"), "--data", str(w["data"]), "--out", str(run), *MODEL,
                 "--eval-interval", "2", env=ENV))
    assert json.loads((run / "config.json").read_text())["compile"] is False
    out = run_quill("train", "--out", str(run), "--resume", "--compile=auto", "--max-steps", "4", env=ENV)
    assert ok(out).startswith("finished 4 steps")
    assert "compil" not in out.stderr.decode()
    assert json.loads((run / "config.json").read_text())["compile"] == "auto"
    assert "compil" not in w["out"]["train"].stderr.decode()  # the workspace's run: auto by default
    assert "argument --compile: expected auto, true or false, not 'maybe'" in fails(
        run_quill("train", "--out", str(run), "--resume", "--compile=maybe"), code=2)


def test_train_help_says_when_auto_compiles():
    text = " ".join(ok(run_quill("train", "--help")).split())
    assert "--compile [auto|true|false]" in text and "--no-compile" in text
    assert "auto (on CUDA when at least 500 steps are left to train; never on CPU or MPS) (default: auto)" in text


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "check", "generate"])
def test_help_shows_examples(command):
    out = run_quill(command, "--help")
    text = ok(out)
    assert "examples:" in text and f"quill {command}" in text.split("examples:")[1]


def test_eval_batch_size_must_be_positive(w):
    out = run_quill("eval", str(w["run"]), "--data", str(w["data"]), "--batch-size", "0", env=ENV)
    assert "--batch-size must be at least 1, not 0" in fails(out, code=2)


def test_devices_that_are_not_here_are_one_line_errors_listing_the_ones_that_are(w):
    from gpt_runtime.backend import available_backends

    here = available_backends()
    absent = next(name for name in ("mps", "cuda") if name not in here)  # no machine has both
    run, data = str(w["run"]), str(w["data"])
    out = run_all({
        "typo": ["eval", run, "--data", data, "--device", "cdua"],
        "absent": ["generate", run, "--prompt", "All:", "--device", absent],
        "train": ["train", "--data", data, "--out", str(w["dir"] / "never"), "--device", "tpu"],
    })
    assert fails(out["typo"]) == "quill: error: no backend named 'cdua'"
    assert out["typo"].stderr.decode().splitlines()[1].endswith(f"(available here: {', '.join(here)})")
    assert fails(out["absent"]) == f"quill: error: backend '{absent}' is not available on this machine"
    assert out["absent"].stderr.decode().splitlines()[1] == f"  hint: available: {', '.join(here)}"
    assert fails(out["train"]) == "quill: error: no backend named 'tpu'"
    assert not (w["dir"] / "never").exists()
    bad = run_quill("eval", run, "--data", data, env={**ENV, "QUILL_DEVICE": "gpu"})
    assert fails(bad) == "quill: error: QUILL_DEVICE names 'gpu', which is no backend here"
