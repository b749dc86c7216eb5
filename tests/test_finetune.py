"""`quill finetune` and `/finetune`: prepare, train from a profile's weights, and a new profile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gpt_runtime import commands
from gpt_runtime.checkpoint import load_checkpoint
from gpt_runtime.data import DataDir
from gpt_runtime.finetune import is_chat_file
from gpt_runtime.profiles import load_profile
from gpt_runtime.session import ChatSession
from helpers import SAMPLE_TEXT, one_line_error, quill_env, run_quill

TINY = ["--max-steps", "4", "--eval-interval", "2", "--eval-steps", "1", "--batch-size", "2", "--device", "cpu"]


def env(profiles: Path) -> dict:
    return quill_env({"QUILL_PROFILES": str(profiles)})


def notes(root: Path) -> Path:
    (root / "notes" / "more").mkdir(parents=True)
    (root / "notes" / "one.txt").write_text(SAMPLE_TEXT * 2, encoding="utf-8")
    (root / "notes" / "more" / "two.md").write_text(SAMPLE_TEXT[::-1] * 2, encoding="utf-8")
    return root / "notes"


def conversations(path: Path, n: int = 12) -> Path:
    lines = [{"messages": [{"role": "user", "content": f"Speak {i}"}, {"role": "assistant", "content": "I will, my lord."}]}
             for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_cli_fine_tunes_a_profile_on_a_folder_into_a_new_profile(chat_profiles, tmp_path):
    out = tmp_path / "runs" / "mine"
    done = run_quill("finetune", "alpha", str(notes(tmp_path)), "--out", str(out), *TINY, env=env(chat_profiles))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "profile 'mine' is ready: quill chat --profile mine" in done.stdout.decode()
    assert "prepared" in done.stderr.decode()
    data = DataDir.open(out / "data")
    assert data.meta["files"] == 2 and data.meta["mask"] is False
    child, parent = load_profile(chat_profiles / "mine.toml"), load_profile(chat_profiles / "alpha.toml")
    assert (child.chain, child.options, child.template) == (parent.chain, parent.options, parent.template)
    ckpt = load_checkpoint(child.checkpoint)
    assert ckpt.init_from["source"] == str(parent.checkpoint) and ckpt.config.n_embd == 32  # alpha's shape
    assert ckpt.train_args["lr"] == 3e-4  # the fine-tuning defaults, not training's
    # The new profile chats.
    session = ChatSession("mine")
    assert session.profile.checkpoint == child.checkpoint
    # Resuming takes the run further, and keeps the profile it has.
    again = run_quill("finetune", "alpha", "--out", str(out), "--resume", "--max-steps", "6", "--name", "mine",
                      env=env(chat_profiles))
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert load_checkpoint(out / "last.safetensors").step == 6 and "profile 'mine' is ready" in again.stdout.decode()
    assert sorted(p.name for p in chat_profiles.iterdir()) == ["alpha.toml", "beta.toml", "mine.toml"]


def test_conversations_are_fine_tuned_on_as_masked_chat_data(chat_profiles, tmp_path):
    out = tmp_path / "chat"
    done = run_quill("finetune", "alpha", str(conversations(tmp_path / "chats.jsonl")), "--out", str(out), "--name", "polite",
                     *TINY, env=env(chat_profiles))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    data = DataDir.open(out / "data")
    assert data.meta["mask"] is True and data.meta["profile"] == "alpha"
    assert (chat_profiles / "polite.toml").is_file()


def test_bad_fine_tunes_are_refused_before_any_work(chat_profiles, tmp_path):
    folder, chats = notes(tmp_path), conversations(tmp_path / "chats.jsonl")
    cases = [
        (["alpha", str(folder), str(chats), "--out", str(tmp_path / "a")], "cannot be fine-tuned on together"),
        (["alpha", str(folder), "--out", str(tmp_path / "b"), "--n-layer", "3"], "n_layer = 3 (it has 1)"),
        (["nobody", str(folder), "--out", str(tmp_path / "c")], "no profile named 'nobody'"),
        (["alpha", str(folder), "--out", str(tmp_path / "d"), "--name", "beta"], "already a profile named 'beta'"),
    ]
    (tmp_path / "bad.toml").write_text("bogus = 1\n")
    (tmp_path / "fixed.toml").write_text('data = "elsewhere"\n')
    cases += [(["alpha", str(folder), "--out", str(tmp_path / "g"), "--config", str(tmp_path / "bad.toml")], "unknown key 'bogus'"),
              (["alpha", str(folder), "--out", str(tmp_path / "h"), "--config", str(tmp_path / "fixed.toml")],
               "data cannot be set for a fine-tune")]
    for argv, words in cases:
        message, _ = one_line_error(run_quill("finetune", *argv, env=env(chat_profiles)))
        assert words in message, (argv, message)
        assert not Path(argv[argv.index("--out") + 1]).exists()
    message, hint = one_line_error(run_quill("finetune", "alpha", "--out", str(tmp_path / "e"), env=env(chat_profiles)), code=2)
    assert "give the files or directories" in message
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "last.state.pt").write_text("a run's resume state")
    message, hint = one_line_error(run_quill("finetune", "alpha", str(folder), "--out", str(tmp_path / "f"), env=env(chat_profiles)))
    assert "already holds a run" in message and "--resume" in hint


def test_a_fine_tune_that_failed_before_training_can_be_prepared_again(chat_profiles, tmp_path):
    (tmp_path / "short.txt").write_text("Too short.", encoding="utf-8")
    out = tmp_path / "run"
    failed = run_quill("finetune", "alpha", str(tmp_path / "short.txt"), "--out", str(out), "--val-fraction", "0", *TINY,
                       env=env(chat_profiles))
    assert failed.returncode == 1
    error, hint = failed.stderr.decode().splitlines()[-2:]  # after what was prepared
    assert "not enough for one block of 64" in error and "keeps the model's block size" in hint
    # A run that diverges before its first checkpoint (its config.json written, no resume state) too.
    folder = notes(tmp_path)
    diverged = run_quill("finetune", "alpha", str(folder), "--out", str(out), *TINY, "--lr", "1e6", "--min-lr", "0",
                         env=env(chat_profiles))
    assert diverged.returncode == 1 and b"no checkpoint was saved yet" in diverged.stderr
    assert (out / "config.json").is_file() and not (out / "last.state.pt").exists()
    done = run_quill("finetune", "alpha", str(folder), "--out", str(out), *TINY, env=env(chat_profiles))
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_chat_files_are_told_from_text(tmp_path):
    assert is_chat_file(conversations(tmp_path / "c.jsonl"))
    (tmp_path / "t.jsonl").write_text('{"text": "plain"}\n')
    (tmp_path / "s.json").write_text('{"format": "quill-transcript", "version": 1}')
    (tmp_path / "o.json").write_text('{"other": 1}')
    assert not is_chat_file(tmp_path / "t.jsonl") and is_chat_file(tmp_path / "s.json")
    assert not is_chat_file(tmp_path / "o.json") and not is_chat_file(tmp_path)


def test_finetune_in_the_chat_is_a_background_job_whose_run_becomes_a_profile(chat_profiles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = notes(tmp_path)
    session = ChatSession("alpha")
    with pytest.raises(Exception, match="needs the files or directories"):
        commands.run(session, "/finetune --max-steps 2")
    with pytest.raises(Exception, match="nothing at 'missing'"):
        commands.run(session, "/finetune missing")
    started = commands.run(session, f"/finetune {folder} {' '.join(TINY)}")
    assert "fine-tuning alpha" in started
    deadline = time.monotonic() + 120
    notices = []
    while time.monotonic() < deadline and not any("is ready" in n.text for n in notices):
        time.sleep(0.2)
        notices += session.job_notices()
    job = session.jobs.all()[0]
    assert job.status == "finished" and job.profile == "alpha-finetune", (job.status, job.error, notices)
    assert (tmp_path / "runs" / "alpha-finetune" / "best.safetensors").is_file()
    assert "finetune" in job.describe() and "best val loss" in job.describe()
    assert any("job 1: prepared" in n.text for n in notices)  # what was prepared reaches the chat
    # A second one started at once gets a directory of its own; --resume continues one.
    second = commands.run(session, f"/finetune {folder} {' '.join(TINY)}")
    assert "started job 2" in second and (tmp_path / "runs" / "alpha-finetune-2").is_dir()
    session.jobs.cancel(2)
    resumed = commands.run(session, "/finetune --out runs/alpha-finetune --resume --max-steps 6")
    assert "resuming the fine-tune of alpha" in resumed
    with pytest.raises(Exception, match="needs the --out RUN"):
        commands.run(session, "/finetune --resume")
    session.jobs.wait()
    session.job_notices()
    assert session.jobs.get(3).status == "finished" and session.jobs.get(3).profile == "alpha-finetune"
    commands.run(session, f"/profile {job.profile}")
    assert session.profile.name == "alpha-finetune" and session.loaded.step == 6
    assert session.template == load_profile(chat_profiles / "alpha.toml").template
