"""Background jobs from the chat (/train, /eval, /jobs, /cancel): whole lives of real, tiny runs.

A module fixture prepares the data and trains a base model once. Each scenario (finished
runs, a cancelled run, failing runs, a noisy eval, jobs started and stopped directly, the
REPL's script mode) has a chat and a directory of its own, starts only its jobs, drives them
as a user would and records what happened. The scenarios run side by side, each in a thread
(every job pays for importing torch), and each test asks for the scenarios it looks at, so a
scenario that breaks fails only its own tests.
"""

from __future__ import annotations

import io
import json
import math
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import gpt_runtime.train as train_module
from gpt_runtime import commands
from gpt_runtime.checkpoint import load_checkpoint, load_resume_state
from gpt_runtime.config import TrainConfig
from gpt_runtime.data import DataDir, prepare
from gpt_runtime.errors import QuillError, UsageError
from gpt_runtime.evaluate import evaluate
from gpt_runtime.generate import Done
from gpt_runtime.jobs import Job, Jobs
from gpt_runtime.profiles import load_profile
from gpt_runtime.session import ChatSession, checkpoint_id
from gpt_runtime.train import train
from helpers import SAMPLE_TEXT
from plugins.char_tokenizer import CharTokenizer
from tui.repl import run_script

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # a 16-token context: the chat's prompts are cut, and the template's quotes are <unk> to a char model
    pytest.mark.filterwarnings("ignore::gpt_runtime.errors.QuillWarning"),
]

MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--warmup-steps", "2", "--eval-steps", "2", "--device", "cpu", "--dtype", "float32"]
LONG = 1_000_000  # steps the cancelled run would take
DEADLINE = 90  # seconds for a scenario's jobs (each takes a few on a busy 2-core machine)

BASE_PROFILE = r'''description = "tiny base model for the job tests"
checkpoint = "../base_run"

[sampler]
chain = "top_k,temperature"
top_k = { k = 5 }
temperature = { t = 0.7 }

[backend]
device = "cpu"
dtype = "float32"

[generation]
max_new_tokens = 8
seed = 3

[template]
system = "A \"quoted\" \\ system line\n"
user_prefix = "First Citizen:\n"
user_suffix = "\n\n"
model_prefix = "All:\n"
model_suffix = "\n\n"
stop = ["\n\n"]
'''

NOTICE_TRAINED = re.compile(r"job (\d+) finished training (.+); profile '([^']+)' is ready: /profile (\S+)")


class Tee(queue.Queue):
    """The jobs' event queue, also keeping every (job, event) put on it (job_notices empties the queue)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, dict]] = []

    def put(self, item, block=True, timeout=None) -> None:
        self.seen.append(item)
        super().put(item, block, timeout)


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: relative path -> (size, mtime)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def chat(session: ChatSession, message: str) -> Done:
    events = list(session.send(message))
    assert isinstance(events[-1], Done), events
    return events[-1]


def error_of(session: ChatSession, line: str) -> QuillError:
    """The error a command line raises."""
    with pytest.raises(QuillError) as e:
        commands.run(session, line)
    return e.value


def events_of(r: dict, job) -> list[dict]:
    return [event for j, event in r["tee"].seen if j is job]


def ended(job) -> bool:
    return job.status not in ("running", "cancelling")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Iterator[dict]:
    """What every scenario shares: prepared data (and two broken copies), the base run, and the
    profile directory (QUILL_PROFILES for the whole module) that holds its profile."""
    root = tmp_path_factory.mktemp("jobs")
    (root / "corpus.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    data = root / "data"
    prepare(root / "corpus.txt", CharTokenizer.train(SAMPLE_TEXT), data)
    not_prepared = root / "not_prepared"  # exists, but `quill prepare` never wrote it
    not_prepared.mkdir()
    (not_prepared / "notes.txt").write_text("just some notes\n")
    corrupt = root / "corrupt"  # a prepared directory whose train.bin lost its second half
    shutil.copytree(data, corrupt)
    train_bin = (corrupt / "train.bin").read_bytes()
    (corrupt / "train.bin").write_bytes(train_bin[: len(train_bin) // 2])
    profiles = root / "profiles"
    profiles.mkdir()
    (profiles / "base.toml").write_text(BASE_PROFILE, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_PROFILES", str(profiles))
        mp.setattr(train_module, "peak_flops", lambda backend, dtype: (1e12, "a stand-in"))  # in this process only
        train(TrainConfig(data=str(data), out=str(root / "base_run"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                          batch_size=4, max_steps=4, warmup_steps=1, eval_interval=2, eval_steps=2, device="cpu",
                          dtype="float32"))
        yield {"root": root, "data": data, "not_prepared": not_prepared, "corrupt": corrupt, "profiles": profiles,
               "base_toml": (profiles / "base.toml").read_bytes(), "before": listing(root)}


def drive(what: str, done: Callable[[], bool], step: Callable[[], None] = lambda: None) -> None:
    """Call `step` every 50 ms until `done`; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not end in {DEADLINE} s")
        step()
        time.sleep(0.05)


def finish(r: dict, notices: list) -> None:
    """Wait for the chat's jobs to end, then record its notices and what /jobs shows."""
    session = r["session"]
    drive("the jobs", lambda: all(ended(job) for job in session.jobs.all()),
          lambda: notices.extend(session.job_notices()))
    session.jobs.wait()
    notices += session.job_notices()
    r["notices"] = [n.text for n in notices]
    r["jobs_at_end"] = commands.run(session, "/jobs")


def trained_runs(r: dict) -> None:
    """Two /train runs to the end, the second in another directory of the same name."""
    session, flags, data = r["session"], " ".join(MODEL), r["data"]
    r["tiny"], r["tiny_again"] = r["home"] / "runs" / "tiny", r["home"] / "more" / "tiny"
    r["replies"] = [
        commands.run(session, f"/train --data {data} --out {r['tiny']} {flags} --max-steps 30 --eval-interval 10 "
                              "--log-interval 5"),
        commands.run(session, f"/train --data {data} --out {r['tiny_again']} {flags} --max-steps 20 --eval-interval 10"),
    ]
    r["job"] = dict(zip(["tiny", "tiny_again"], session.jobs.all()))
    finish(r, [])


def cancelled_run(r: dict) -> None:
    """A long /train cancelled after its first step (/jobs is asked just before), an /eval beside it."""
    session, flags = r["session"], " ".join(MODEL)
    r["long"] = r["home"] / "runs" / "long"
    r["replies"] = [
        commands.run(session, f"/train --data {r['data']} --out {r['long']} {flags} --max-steps {LONG} "
                              "--eval-interval 5 --log-interval 1"),
        commands.run(session, f"/eval {r['data']}"),
    ]
    r["job"] = dict(zip(["long", "eval"], session.jobs.all()))
    long_job, notices = r["job"]["long"], []
    drive("the long run's first step", lambda: any(e["event"] == "step" for e in events_of(r, long_job)),
          lambda: notices.extend(session.job_notices()))
    r["jobs_while_running"] = commands.run(session, "/jobs")
    r["cancel"] = commands.run(session, f"/cancel {long_job.id}")
    finish(r, notices)


def failing_runs(r: dict) -> None:
    """Two /train runs that fail (data never prepared, data cut short), and a chat after them."""
    session, flags = r["session"], " ".join(MODEL)
    r["bad"], r["broken"] = r["home"] / "runs" / "bad", r["home"] / "runs" / "broken"
    for key, data in (("bad", r["not_prepared"]), ("broken", r["corrupt"])):
        commands.run(session, f"/train --data {data} --out {r[key]} {flags} --max-steps 5")
    r["job"] = dict(zip(["bad", "broken"], session.jobs.all()))
    notices = []
    drive("the failing jobs", lambda: all(ended(job) for job in session.jobs.all()),
          lambda: notices.extend(session.job_notices()))
    r["chat_after_failure"] = chat(session, "Speak")  # while the other scenarios' jobs still run
    finish(r, notices)


def chatty_eval(r: dict, started: threading.Event) -> None:
    """An eval job whose stderr is far more than a pipe holds (PYTHONVERBOSE: every import of torch).

    Jobs inherit this process's environment: no other job may start while PYTHONVERBOSE is set,
    so the others wait for `started`.
    """
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONVERBOSE", "1")
            jobs = Jobs()
            r["jobs"].append(jobs)
            r["chatty_job"] = jobs.start("eval", [str(r["root"] / "base_run"), "--data", str(r["data"]), "--device", "cpu"])
    finally:
        started.set()
    try:
        r["chatty_job"].process.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:  # stuck writing to a full stderr pipe
        r["chatty_job"].process.kill()
    jobs.wait()


def direct_failures(r: dict) -> None:
    """Through Jobs directly: a bad flag, and a job killed outright."""
    r["killed"] = r["home"] / "runs" / "killed"
    jobs = r["direct"] = Jobs()
    r["jobs"].append(jobs)
    with pytest.raises(UsageError) as r["bogus"]:
        jobs.start("train", ["--data", str(r["data"]), "--bogus-flag"])
    r["killed_job"] = jobs.start("train", ["--data", str(r["data"]), "--out", str(r["killed"]), *MODEL])
    r["killed_job"].process.kill()
    jobs.wait()


def stopped_run(r: dict) -> None:
    """A long run through Jobs directly, stopped by stop_all after its first step."""
    r["stopped"] = r["home"] / "runs" / "stopped"
    jobs = Jobs()
    r["jobs"].append(jobs)
    r["stop_all_job"] = job = jobs.start("train", ["--data", str(r["data"]), "--out", str(r["stopped"]), *MODEL,
                                                   "--max-steps", str(LONG), "--eval-interval", "5", "--log-interval", "1"])
    r["pgid"] = os.getpgid(job.process.pid)
    events = r["direct_events"] = []

    def take_events() -> None:
        while not jobs.events.empty():
            events.append(jobs.events.get_nowait())

    drive("the run's first step", lambda: any(j is job and e["event"] == "step" for j, e in events), take_events)
    jobs.stop_all()
    take_events()


def script_run(r: dict) -> None:
    """The REPL's script mode: a /train and a /jobs, then the script's end (it waits for its job)."""
    r["script_run"] = r["home"] / "runs" / "script_run"
    text = f"/train --data {r['data']} --out {r['script_run']} {' '.join(MODEL)} --max-steps 10 --eval-interval 5\n/jobs\n"
    r["script_out"], r["script_err"] = io.StringIO(), io.StringIO()
    run_script(r["session"], io.StringIO(text), r["script_out"], r["script_err"])


SCENARIOS = {"trained": trained_runs, "cancelled": cancelled_run, "failing": failing_runs, "direct": direct_failures,
             "stopped": stopped_run, "script": script_run}


def scenario_record(base: dict, name: str) -> dict:
    """What a scenario starts from: the shared inputs, a home directory for its runs, and a chat
    on the base profile whose events are all kept."""
    session = ChatSession("base")
    home = base["root"] / name
    home.mkdir()
    tee = session.jobs.events = Tee()
    return {**base, "name": name, "home": home, "session": session, "tee": tee, "jobs": [session.jobs]}


@pytest.fixture(scope="module")
def running(base) -> Iterator[dict[str, Future]]:
    """Every scenario, as it runs: all at once, since each job pays for importing torch, each in a
    thread of its own so that one that fails or hangs fails only the tests that ask for it."""
    records = {name: scenario_record(base, name) for name in ["chatty", *SCENARIOS]}

    def run(scenario: Callable[..., None], r: dict, *args) -> dict:
        scenario(r, *args)
        r["after"] = listing(base["root"])
        return r

    started = threading.Event()
    with ThreadPoolExecutor(max_workers=len(records)) as pool:
        futures = {"chatty": pool.submit(run, chatty_eval, records["chatty"], started)}
        started.wait(DEADLINE)
        futures |= {name: pool.submit(run, scenario, records[name]) for name, scenario in SCENARIOS.items()}
        try:
            yield futures
        finally:  # a scenario that failed midway leaves no million-step run going on alone
            for r in records.values():
                for jobs in r["jobs"]:
                    for job in jobs.all():
                        if job.process.poll() is None:
                            job.process.kill()


def outcome(running: dict[str, Future], name: str) -> dict:
    """A scenario's record once it has ended; what went wrong in it, else."""
    try:
        return running[name].result(timeout=2 * DEADLINE)
    except TimeoutError:
        pytest.fail(f"scenario {name} did not end in {2 * DEADLINE} s")


@pytest.fixture(scope="module")
def trained(running) -> dict:
    return outcome(running, "trained")


@pytest.fixture(scope="module")
def cancelled(running) -> dict:
    return outcome(running, "cancelled")


@pytest.fixture(scope="module")
def failing(running) -> dict:
    return outcome(running, "failing")


@pytest.fixture(scope="module")
def chatty(running) -> dict:
    return outcome(running, "chatty")


@pytest.fixture(scope="module")
def direct(running) -> dict:
    return outcome(running, "direct")


@pytest.fixture(scope="module")
def stopped(running) -> dict:
    return outcome(running, "stopped")


@pytest.fixture(scope="module")
def script(running) -> dict:
    return outcome(running, "script")


# --- progress -------------------------------------------------------------------------------------

def test_progress_events_arrive_and_match_the_run_log(trained):
    w = trained
    job = w["job"]["tiny"]
    assert w["replies"][0] == (f"started job {job.id}: train --data {w['data']} --out {w['tiny']} {' '.join(MODEL)} "
                               f"--max-steps 30 --eval-interval 10 --log-interval 5 "
                               f"(/jobs shows its progress, /cancel {job.id} stops it)")
    events = events_of(w, job)
    kinds = [e["event"] for e in events]
    assert kinds == ["start"] + ["step"] * 6 + ["done", "finished"], kinds  # one "done": the job's, with the run dir
    start = events[0]
    best = load_checkpoint(w["tiny"] / "best.safetensors")
    assert (start["step"], start["max_steps"], start["device"], start["dtype"]) == (0, 30, "cpu", "float32")
    assert start["params"] == best.model.num_params() and start["tokens_per_step"] == 4 * 16

    steps = events[1:7]
    log = [json.loads(line) for line in (w["tiny"] / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps] == [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    vocab = DataDir.open(w["data"]).tokenizer.vocab_size
    for event, record in zip(steps, log):
        assert {k: event[k] for k in record} == record  # what the chat saw is what the run logged
        assert 0 < event["loss"] < math.log(vocab) + 0.5
        assert event["tokens_per_s"] > 0 and event["max_steps"] == 30 and event["eta_s"] >= 0
        assert ("val_loss" in event) == (event["step"] % 10 == 0)
    assert steps[-1]["eta_s"] == 0 and steps[0]["eta_s"] > 0
    done = events[7]
    assert done == {"event": "done", "out": str(w["tiny"]), "steps": 30, "stopped": None,
                    "best_val_loss": min(r["val_loss"] for r in log if "val_loss" in r)}
    assert best.val_loss == done["best_val_loss"]
    assert job.result == done and job.status == "finished" and job.process.returncode == 0
    assert job.history == steps  # every step kept, for a UI's loss plot


def test_jobs_lists_progress_while_running_and_results_at_the_end(cancelled, trained, failing):
    w, jobs = cancelled, cancelled["job"]
    running = {line.split(":", 1)[0]: line for line in w["jobs_while_running"].splitlines()}
    assert len(running) == 2
    long_line = running[f"job {jobs['long'].id}"]
    assert long_line.startswith(f"job {jobs['long'].id}: train --data {w['data']} --out {w['long']} ")
    m = re.search(rf"\[running\] step (\d+)/{LONG}  loss (\d+\.\d{{4}})  (?:val (\d+\.\d{{4}})  )?"
                  r"[\d,]+ tok/s  MFU [\d.]+%  ETA \S+$", long_line)
    assert m, long_line
    shown = [e for e in events_of(w, jobs["long"]) if e["event"] == "step" and e["step"] == int(m.group(1))]
    assert shown and f"{shown[0]['loss']:.4f}" == m.group(2)  # the latest step it had reported
    # its validation loss too, on evaluation steps (every 5th)
    assert m.group(3) == (f"{shown[0]['val_loss']:.4f}" if int(m.group(1)) % 5 == 0 else None)
    assert re.search(r"\[(running|finished)\]", running[f"job {jobs['eval'].id}"])  # still starting, or on its way

    at_end = {line.split(":", 1)[0]: line for line in w["jobs_at_end"].splitlines()}
    assert f"[cancelled] {jobs['long'].result['steps']} steps" in at_end[f"job {jobs['long'].id}"]
    ev = jobs["eval"].result
    assert at_end[f"job {jobs['eval'].id}"].endswith(
        f"[finished] loss {ev['loss']:.4f}, bits/byte {ev['bits_per_byte']:.4f}")
    tiny_job, bad = trained["job"]["tiny"], failing["job"]["bad"]
    trained_at_end = {line.split(":", 1)[0]: line for line in trained["jobs_at_end"].splitlines()}
    assert trained_at_end[f"job {tiny_job.id}"].endswith(
        f"[finished] 30 steps, best val loss {tiny_job.result['best_val_loss']:.4f}, in {trained['tiny']}")
    failing_at_end = {line.split(":", 1)[0]: line for line in failing["jobs_at_end"].splitlines()}
    assert failing_at_end[f"job {bad.id}"].endswith(f"[failed] {bad.error}")


# --- a finished run becomes a profile ---------------------------------------------------------------

def trained_notices(w) -> dict[str, tuple[int, str]]:
    """Run directory -> (job id, profile name), from the notices."""
    found = {}
    for text in w["notices"]:
        if m := NOTICE_TRAINED.fullmatch(text):
            assert m.group(3) == m.group(4)
            found[m.group(2)] = (int(m.group(1)), m.group(3))
    return found


def test_a_finished_run_is_written_as_a_profile_the_chat_can_switch_to(trained, monkeypatch):
    w = trained
    monkeypatch.setenv("QUILL_PROFILES", str(w["profiles"]))
    session = w["session"]
    adopted = trained_notices(w)
    assert set(adopted) == {str(w["tiny"]), str(w["tiny_again"])}
    job_id, name = adopted[str(w["tiny"])]
    assert job_id == w["job"]["tiny"].id and w["job"]["tiny"].profile == name
    path = w["profiles"] / f"{name}.toml"
    assert path.is_file()
    base, profile = load_profile(w["profiles"] / "base.toml"), load_profile(path)
    best = w["tiny"] / "best.safetensors"
    assert profile.checkpoint == best.resolve()
    assert profile.tokenizer_fingerprint == DataDir.open(w["data"]).tokenizer.fingerprint
    assert "base" in profile.description
    # the chat's sampler, options, length and template carry over, quotes and backslashes intact
    assert (profile.chain, profile.options, profile.max_new_tokens) == (base.chain, base.options, base.max_new_tokens)
    assert profile.template == base.template and profile.template.system == 'A "quoted" \\ system line\n'

    turns = len(session.turns)
    try:
        reply = commands.run(session, f"/profile {name}")
        assert reply == f"switched to profile {name} ({best.resolve()}); the conversation is kept"
        best_step = load_checkpoint(best).step
        assert session.profile.name == name and session.loaded.step == best_step and best_step in (10, 20, 30)
        done = chat(session, "Speak, speak.")
        assert done.reason in ("stop", "length", "eos") and done.new_tokens >= 1
        provenance = session.turns[-1].provenance
        assert len(session.turns) == turns + 1
        assert (provenance.profile, provenance.checkpoint, provenance.step) == (name, str(best.resolve()), best_step)
        assert provenance.checkpoint_sha256 == checkpoint_id(best)  # the reply came from the new model
    finally:
        session.use_profile("base")


def test_a_second_run_with_the_same_directory_name_gets_its_own_profile(trained):
    w = trained
    adopted = trained_notices(w)
    names = {adopted[str(w["tiny"])][1], adopted[str(w["tiny_again"])][1]}
    assert names == {"tiny", "tiny-2"}
    for run in (w["tiny"], w["tiny_again"]):
        assert load_profile(w["profiles"] / f"{adopted[str(run)][1]}.toml").checkpoint == (run / "best.safetensors").resolve()
    assert (w["profiles"] / "base.toml").read_bytes() == w["base_toml"]


def test_only_finished_runs_become_profiles(base, trained, cancelled, failing, chatty, direct, stopped, script):
    assert sorted(p.name for p in base["profiles"].iterdir()) == ["base.toml", "script_run.toml", "tiny-2.toml", "tiny.toml"]


# --- cancel -----------------------------------------------------------------------------------------

def test_a_cancelled_run_saves_its_last_checkpoint(cancelled):
    w = cancelled
    job = w["job"]["long"]
    assert w["cancel"] == f"cancelling job {job.id} (it saves its last checkpoint first)"
    assert job.status == "cancelled" and job.error is None
    steps = job.result["steps"]
    assert job.result["out"] == str(w["long"]) and job.result["stopped"] == "SIGINT"
    first_step = next(e["step"] for e in events_of(w, job) if e["event"] == "step")
    assert 1 <= first_step <= steps < LONG
    last = load_checkpoint(w["long"] / "last.safetensors")
    assert last.step == steps == load_resume_state(w["long"] / "last.state.pt")["step"]  # it can be resumed
    assert {"event": "stopped", "step": steps, "reason": "SIGINT"} in events_of(w, job)
    assert f"job {job.id} cancelled; its last checkpoint is in {w['long']}" in w["notices"]
    assert not (w["profiles"] / "long.toml").exists()  # a cancelled run is not adopted
    assert error_of(w["session"], f"/cancel {job.id}").message == f"job {job.id} is not running (it is cancelled)"


def test_stop_all_cancels_the_running_jobs_and_they_run_in_their_own_process_group(stopped):
    w = stopped
    job = w["stop_all_job"]
    assert job.status == "cancelled" and job.result["stopped"] == "SIGINT"
    assert load_checkpoint(w["stopped"] / "last.safetensors").step == job.result["steps"] >= 1
    # Ctrl-C at the terminal reaches the chat's process group, not the jobs
    assert w["pgid"] != os.getpgrp()
    assert [e["event"] for j, e in w["direct_events"] if j is job][-1] == "cancelled"


def test_stop_all_kills_a_job_that_does_not_stop_in_time(base, monkeypatch, tmp_path):
    jobs = Jobs()
    job = jobs.start("train", ["--data", str(base["data"]), "--out", str(tmp_path / "impatient"), *MODEL,
                               "--max-steps", str(LONG)])
    # a job deaf to being cancelled
    monkeypatch.setattr(jobs, "cancel", lambda job_id: setattr(jobs.get(job_id), "status", "cancelling"))
    jobs.stop_all(timeout=0.5)
    assert job.status == "cancelled" and job.process.returncode == -9
    assert job.error == "killed: it did not stop within 0.5 s of being cancelled"
    assert job.describe().endswith("[cancelled] killed: it did not stop within 0.5 s of being cancelled")


def test_cancel_errors(trained, failing):
    session, tiny, bad = failing["session"], trained["job"]["tiny"], failing["job"]["bad"]
    unknown = error_of(session, "/cancel 99")
    assert unknown.message == "there is no job 99"
    assert unknown.hint == "jobs: " + ", ".join(str(j.id) for j in session.jobs.all()) == "jobs: 1, 2"
    finished = error_of(trained["session"], f"/cancel {tiny.id}")
    assert finished.message == f"job {tiny.id} is not running (it is finished)"
    assert error_of(session, f"/cancel {bad.id}").message == f"job {bad.id} is not running (it is failed)"
    for line, message in (("/cancel x", "/cancel takes a job number, not 'x'"), ("/cancel", "/cancel needs a job number")):
        e = error_of(session, line)
        assert isinstance(e, UsageError) and (e.message, e.hint) == (message, "usage: /cancel ID")
    assert tiny.status == "finished"


# --- failures ---------------------------------------------------------------------------------------

def test_failed_jobs_report_one_line_and_the_chat_goes_on(failing):
    w = failing
    session, bad, broken = w["session"], w["job"]["bad"], w["job"]["broken"]
    assert bad.status == broken.status == "failed" and bad.result is None and broken.result is None
    assert bad.error == (f"{str(w['not_prepared'])!r} has no meta.json: not a prepared data directory "
                         "(make one with `quill prepare`)")
    n = DataDir.open(w["data"]).meta["train_tokens"]
    assert broken.error == (f"{str(w['corrupt'] / 'train.bin')!r} should hold {n} tokens ({2 * n} bytes) but has "
                            f"{n} bytes (run `quill prepare` again)")
    for job in (bad, broken):
        notice = f"job {job.id} failed: {job.error}"
        assert notice in w["notices"] and "\n" not in notice and "Traceback" not in notice
        assert [e["event"] for e in events_of(w, job)] == ["error", "failed"]
        assert job.process.returncode == 1
    # the chat went on after its jobs failed, and still does
    assert w["chat_after_failure"].new_tokens >= 1
    assert chat(session, "Resolved.").new_tokens >= 1 and session.profile.name == "base"


def test_direct_jobs_that_fail_before_training(direct):
    w = direct
    bogus, killed = w["bogus"].value, w["killed_job"]
    # a bad flag is refused before any process starts
    assert (bogus.message, bogus.hint) == ("/train: unrecognized arguments: --bogus-flag",
                                           "run `quill train --help` to see its flags")
    assert w["direct"].all()[0] is killed  # no job was made for it
    assert killed.status == "failed" and killed.error == "exited with code -9" and killed.result is None
    assert not w["killed"].exists()


def test_a_job_that_writes_much_to_stderr_still_ends(chatty, cancelled):
    job, eval_job = chatty["chatty_job"], cancelled["job"]["eval"]
    assert (job.status, job.error) == ("finished", None)
    # the same checkpoint and data as /eval
    assert (job.result["tokens"], job.result["bytes"]) == (eval_job.result["tokens"], eval_job.result["bytes"])
    assert job.result["loss"] == pytest.approx(eval_job.result["loss"], rel=1e-5)


def test_train_or_eval_on_missing_data_is_refused_at_once(base, monkeypatch):
    w = base
    monkeypatch.setenv("QUILL_PROFILES", str(w["profiles"]))
    session = ChatSession("base")
    count = len(session.jobs.all())
    missing = w["root"] / "missing"
    never = w["root"] / "runs" / "never"
    for line, message in (
        (f"/train --data {missing} --out {never} --max-steps 5", f"no data at {str(missing)!r}"),
        (f"/eval {missing}", f"no data at {str(missing)!r}"),
        ("/train", "/train needs --data DIR and --out RUN"),
        (f"/train --data {w['data']} --out {never} --bogus", "/train: unrecognized arguments: --bogus"),
        (f"/train --data {w['data']} --out {never} --n-layer many", "/train: argument --n-layer: invalid int value: 'many'"),
        (f"/train --data {w['data']} --out {never} --help", "/train takes the flags of `quill train`"),
        (f"/train --data {w['data']} --out {never} --he", "/train takes the flags of `quill train`"),
        ("/eval --split val", "/eval needs the data to evaluate on"),
    ):
        e = error_of(session, line)
        assert isinstance(e, UsageError) and e.message == message, (line, e)
    assert "quill prepare" in error_of(session, f"/train --data {missing} --out {never}").hint
    assert error_of(session, f"/train --data {w['data']}").message == "/train needs --data DIR and --out RUN"
    assert len(session.jobs.all()) == count  # no job was started
    assert not (w["root"] / "runs" / "never").exists()


def test_train_takes_its_flags_in_every_form_quill_train_does_and_refuses_nproc(base, monkeypatch, tmp_path):
    w = base
    # It wanted the literal tokens --data and --out, and took --nproc 2 only to train in one process
    monkeypatch.setenv("QUILL_PROFILES", str(w["profiles"]))
    session, started = ChatSession("base"), []
    monkeypatch.setattr(session.jobs, "start", lambda kind, argv: started.append(argv) or Job(len(started), kind, argv, None))
    run, config = tmp_path / "runs" / "forms", tmp_path / "forms.toml"
    config.write_text(f'data = "{w["data"]}"\nn_layer = 1\n', encoding="utf-8")
    for line in (f"/train --data={w['data']} --out={run} --max-steps 5", f"/train --out {run} --resume --max-steps 9",
                 f"/train --config {config} --out {run}"):
        commands.run(session, line)
    assert [argv[0] for argv in started] == [f"--data={w['data']}", "--out", "--config"]
    for line, message in ((f"/train --data {w['data']} --out {run} --nproc 2", "/train runs in one process, not --nproc 2"),
                          (f"/train --data {w['data']} --out {run} --nproc 0", "/train runs in one process, not --nproc 0"),
                          (f"/train --config {config}", "/train needs --data DIR and --out RUN"),
                          (f"/train --out {run}", "/train needs --data DIR and --out RUN")):
        assert error_of(session, line).message == message
    assert "quill train --nproc N" in error_of(session, f"/train --data {w['data']} --out {run} --nproc 2").hint
    assert len(started) == 3


# --- eval -------------------------------------------------------------------------------------------

def test_an_eval_job_reports_loss_and_bits_per_byte(cancelled):
    w = cancelled
    job, checkpoint = w["job"]["eval"], w["session"].profile.checkpoint
    assert w["replies"][1] == f"started job {job.id}: eval of base on {w['data']}"
    assert job.argv == [str(checkpoint), "--data", str(w["data"])] and job.status == "finished"
    expected = evaluate(checkpoint, w["data"], device="cpu")
    result = job.result
    assert result["tokens"] == expected.tokens and result["bytes"] == expected.bytes
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert f"job {job.id}: eval {checkpoint} --data {w['data']} [finished] loss {result['loss']:.4f}, " \
           f"bits/byte {result['bits_per_byte']:.4f}" in w["notices"]
    progress = [e for e in events_of(w, job) if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] >= 1


# --- the files --------------------------------------------------------------------------------------

# scenario -> the run directories it trains (profiles are the test above's)
RUN_DIRS = {"trained": ["tiny", "tiny_again"], "cancelled": ["long"], "failing": [], "chatty": [], "direct": [],
            "stopped": ["stopped"], "script": ["script_run"]}


@pytest.mark.parametrize("name", RUN_DIRS)
def test_jobs_write_only_in_their_run_directories(request, name):
    w = request.getfixturevalue(name)
    root, before, after = w["root"], w["before"], w["after"]
    assert all(after.get(path) == stat for path, stat in before.items())  # nothing changed or removed
    run_dirs = [w[k].relative_to(root) for k in RUN_DIRS[name]]
    others = [Path(other) for other in RUN_DIRS if other != name] + [Path("profiles")]  # the other scenarios' homes
    new = {path for path in set(after) - set(before) if not any(Path(path).is_relative_to(d) for d in others)}
    outside = {path for path in new if not any(Path(path).is_relative_to(d) for d in run_dirs)}
    assert outside == set()
    for d in run_dirs:
        assert {"best.safetensors", "last.safetensors", "last.state.pt", "log.jsonl", "config.json"} <= \
            {Path(p).name for p in new if Path(p).parent == d}


# --- the REPL's script mode -------------------------------------------------------------------------

def test_a_script_waits_for_its_jobs_before_it_ends(script):
    w = script
    session, out = w["session"], w["script_out"].getvalue()
    job, = session.jobs.all()
    assert job.status == "finished" and job.process.returncode == 0 and job.result["steps"] == 10
    assert w["script_err"].getvalue() == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"> /train --data {w['data']} --out {w['script_run']}")
    assert lines[1].startswith(f"started job {job.id}: train --data")
    assert lines[2] == "> /jobs"
    assert lines[3].startswith(f"job {job.id}: train --data {w['data']}") and "[running]" in lines[3]
    # the transcript ends with the job's result, after waiting for it
    assert lines[-1] == (f"[job {job.id} finished training {w['script_run']}; profile 'script_run' is ready: "
                         "/profile script_run]")
    assert load_profile(w["profiles"] / "script_run.toml").checkpoint == (w["script_run"] / "best.safetensors").resolve()


# --- the engine's layers ----------------------------------------------------------------------------

def _engine_imports() -> dict[str, set[str]]:
    """Each gpt_runtime module's imports of other gpt_runtime modules, those inside functions included."""
    import ast

    root = Path(__file__).resolve().parents[1] / "gpt_runtime"
    graph = {}
    for path in sorted(root.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.removeprefix("gpt_runtime.") for a in node.names if a.name.startswith("gpt_runtime.")}
            elif isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "gpt_runtime"
                                                       or (node.module or "").startswith("gpt_runtime.")):
                module = (node.module or "").removeprefix("gpt_runtime").lstrip(".")
                # `from . import cli` names the module in the names; `from .cli import main` in the module
                found |= {module} if module else {a.name for a in node.names}
        graph[path.stem] = found
    return graph


def test_no_engine_module_but_the_cli_imports_the_cli():
    # Jobs check /train's flags, and torchrun ranks train, through the shared train_command
    # and torchrun modules: the engine works without its command line.
    graph = _engine_imports()
    assert {"cli", "jobs", "train", "session"} <= set(graph)  # the walk found the engine
    assert sorted(name for name, imports in graph.items() if "cli" in imports and name != "cli") == []
