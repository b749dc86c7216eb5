"""Background jobs: training and evaluation in a separate process.

The chat starts `/train`, `/finetune` and `/eval` here. Each job is a child process
(``python -m gpt_runtime.jobs train|finetune|eval ...``, taking the arguments of
`quill train` / `quill finetune` / `quill eval`) that prints one JSON event per line on stdout:
``start``, ``step`` (step, loss, val loss, tokens/s, ETA), ``progress``,
``done`` or ``error``. A thread per job reads them into `Job.last` and the
`Jobs.events` queue, so the interface never waits on a job. The child runs one
torch thread at lower priority: the chat keeps a core and stays responsive.
Cancelling sends SIGINT, on which training saves its last checkpoint and stops.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import QuillError, UsageError
from .finetune_command import add_finetune_command
from .progress import describe_step
from .train_command import command_parser, train_config

KINDS = ("train", "finetune", "eval")
TRAINING = ("train", "finetune")  # the kinds that train a run, save checkpoints and become profiles


@dataclass
class Job:
    """One background job and the latest it reported."""

    id: int
    kind: str  # "train", "finetune" or "eval"
    argv: list[str]
    process: subprocess.Popen
    status: str = "running"  # running, cancelling, finished, cancelled, failed
    last: dict[str, Any] = field(default_factory=dict)  # the latest progress event
    history: list[dict[str, Any]] = field(default_factory=list)  # every "step" event, for plots
    result: dict[str, Any] | None = None  # the "done" event
    error: str | None = None
    profile: str | None = None  # the profile a finished training run became

    def describe(self) -> str:
        """One line for `/jobs`."""
        what = f"job {self.id}: {self.kind} {' '.join(self.argv)} [{self.status}]"
        if self.error:
            return f"{what} {self.error}"
        if self.result is not None:
            if self.kind in TRAINING:
                best = self.result.get("best_val_loss")
                best = "none" if best is None else f"{best:.4f}"
                return f"{what} {self.result.get('steps', '?')} steps, best val loss {best}, in {self.result.get('out')}"
            return f"{what} loss {self.result['loss']:.4f}, bits/byte {self.result['bits_per_byte']:.4f}"
        if self.last.get("event") == "step":
            return f"{what} {describe_step(self.last)}"
        if self.last.get("event") == "progress":
            return f"{what} {self.last['done']}/{self.last['total']} batches"
        if self.last.get("event") == "preparing":
            return f"{what} preparing the data: {self.last['done'] / max(1, self.last['total']):.0%}"
        return what


def check_arguments(kind: str, argv: list[str]) -> argparse.Namespace:
    """Parse a job's arguments as `quill train` / `quill eval` would, so a mistake is
    a `UsageError` at once rather than a job that fails; returns them parsed."""
    if kind not in KINDS:
        raise QuillError(f"there is no job kind {kind!r}", hint=f"jobs: {', '.join(KINDS)}")
    # (argparse also takes abbreviations: --he is --help, which would print and exit)
    if any(flag == "-h" or (len(flag) >= 3 and "--help".startswith(flag)) for flag in argv):
        raise UsageError(f"/{kind} takes the flags of `quill {kind}`", hint=f"run `quill {kind} --help` to see them")
    try:
        return command_parser(add_finetune_command).parse_args([kind, *argv])
    except UsageError as exc:
        message = exc.message.removeprefix(f"quill {kind}: ").removeprefix("quill: ")
        raise UsageError(f"/{kind}: {message}", hint=f"run `quill {kind} --help` to see its flags") from None


class Jobs:
    """The jobs of one session. `events` receives (job, event) as they arrive."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._threads: list[threading.Thread] = []
        self.events: queue.Queue[tuple[Job, dict[str, Any]]] = queue.Queue()

    def start(self, kind: str, argv: list[str]) -> Job:
        """Start a `train`, `finetune` or `eval` job with command-line arguments `argv` (checked first)."""
        check_arguments(kind, argv)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # A session of its own: Ctrl-C at the terminal (which stops a reply) goes to the
        # chat's process group and must not stop the jobs; only `cancel` does.
        process = subprocess.Popen([sys.executable, "-m", "gpt_runtime.jobs", kind, *argv], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, encoding="utf-8", errors="replace", start_new_session=True)
        job = Job(len(self._jobs) + 1, kind, list(argv), process)
        self._jobs[job.id] = job
        thread = threading.Thread(target=self._follow, args=(job,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return job

    def _follow(self, job: Job) -> None:
        # stderr is read alongside stdout: a child that fills the stderr pipe would
        # otherwise block, and never end. Only its last lines are kept, for the error.
        stderr: collections.deque[str] = collections.deque(maxlen=50)
        drain = threading.Thread(target=stderr.extend, args=(job.process.stderr,), daemon=True)
        drain.start()
        for line in job.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not ours: a library printing to stdout
            if event.get("event") == "done":
                job.result = event
            elif event.get("event") == "error":
                job.error = event.get("message", "failed")
            elif event.get("event") != "note":  # a note is news for the chat, not the job's state
                job.last = event
                if event.get("event") == "step":
                    job.history.append(event)
            self.events.put((job, event))
        drain.join()
        code = job.process.wait()
        if job.status == "cancelling":
            job.status = "cancelled"
        elif code == 0 and job.result is not None:
            job.status = "finished"
        else:
            job.status = "failed"
            if job.error is None:
                tail = [line.strip() for line in stderr if line.strip()]
                job.error = tail[-1] if tail else f"exited with code {code}"
        self.events.put((job, {"event": job.status}))

    def wait(self) -> None:
        """Wait until every job has ended and reported."""
        for job in self.all():
            job.process.wait()
        for thread in self._threads:
            thread.join()

    def stop_all(self, timeout: float = 60.0) -> None:
        """Cancel the running jobs and wait for them (training saves its last checkpoint);
        one still running after `timeout` seconds is killed."""
        for job in self.all():
            if job.status == "running":
                self.cancel(job.id)
        deadline = time.monotonic() + timeout
        for job in self.all():
            try:
                job.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.error = f"killed: it did not stop within {timeout:g} s of being cancelled"
                _kill(job.process)
        self.wait()

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def get(self, job_id: int) -> Job:
        if job_id not in self._jobs:
            ids = ", ".join(str(i) for i in self._jobs) or "none yet"
            raise QuillError(f"there is no job {job_id}", hint=f"jobs: {ids}")
        return self._jobs[job_id]

    def cancel(self, job_id: int) -> Job:
        """Ask a job to stop; a training job saves its last checkpoint first."""
        job = self.get(job_id)
        if job.status != "running":
            raise QuillError(f"job {job_id} is not running (it is {job.status})")
        job.status = "cancelling"
        job.process.send_signal(signal.SIGINT)
        return job


# --- the child process --------------------------------------------------------

def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event, default=str), flush=True)


def _worker(argv: list[str]) -> int:
    if hasattr(os, "nice"):
        os.nice(5)  # the chat comes first
    signal.signal(signal.SIGINT, signal.default_int_handler)  # /cancel works even if SIGINT was ignored
    # A warning (validation falling back to training text, say) would go to stderr, which the chat
    # shows only when a job fails: it is sent as a note instead.
    warnings.showwarning = lambda message, *_: _emit({"event": "note", "text": str(message)})
    kind, rest = argv[0], argv[1:]
    try:
        args = command_parser(add_finetune_command).parse_args([kind, *rest])
        if kind in TRAINING:
            _train_job(kind, args)
        else:
            from .evaluate import evaluate  # imports torch: loaded when first used

            result = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, device=args.device,
                              progress=lambda done, total: _emit({"event": "progress", "done": done, "total": total}))
            _emit({"event": "done", **result.to_dict()})
        return 0
    except QuillError as exc:
        _emit({"event": "error", "message": exc.message + (f" ({exc.hint})" if exc.hint else "")})
    except SystemExit as exc:  # argparse already wrote the usage error to stderr
        return int(exc.code or 2)
    except Exception as exc:
        _emit({"event": "error", "message": f"internal error: {type(exc).__name__}: {exc}"})
    return 1


def _train_job(kind: str, args: argparse.Namespace) -> None:
    """Train as `quill train` or `quill finetune` would, reporting as events; a fine-tune's
    finished run becomes a profile here, and its "done" event names it."""
    from .finetune_command import adopt_finished, describe_data, setup_finetune
    from .train import train  # imports torch: loaded when first used

    def forward(event: dict[str, Any]) -> None:
        if event.get("event") != "done":  # ours below is the one "done", with the run directory
            _emit(event)

    if kind == "finetune":
        parent, cfg, meta = setup_finetune(args, lambda done, total: _emit({"event": "preparing", "done": done, "total": total}))
        for line in describe_data(meta):
            _emit({"event": "note", "text": line})
    else:
        parent, cfg = None, train_config(args)
    result = train(cfg, resume=args.resume, on_event=forward)
    profile = adopt_finished(result, parent, args.name) if parent is not None else None
    _emit({"event": "done", "out": str(result.out), "steps": result.step, "best_val_loss": result.best_val_loss,
           "stopped": result.stopped, **({"profile": profile} if parent is not None else {})})


def _kill(process: subprocess.Popen) -> None:
    """Kill a job and what it started (torchrun's workers): it leads a session of its own."""
    if hasattr(os, "killpg"):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    else:
        process.kill()


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
