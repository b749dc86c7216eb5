"""Built-in plugin `commands`: the chat's slash commands.

Each handler gets the `ChatSession` and the text after the command name (see
`gpt_runtime.commands`). Nothing here imports torch until a command needs it.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from gpt_runtime.commands import (QUIT, CommandHelp, Comparison, Found, JobsChanged, Reply, Resumed, TokenView,
                                  TurnsChanged, commands, find)
from gpt_runtime.errors import UsageError
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.plugins import get_registry
from gpt_runtime.profiles import find_profiles

FINETUNE_USAGE = "/finetune FILE|DIR... [FLAGS]"


def _profile_names(session, partial: str) -> list[str]:
    return [e.name for e in find_profiles() if e.name.startswith(partial)]


def _sampler_names(session, partial: str) -> list[str]:
    """Completions of the word being typed (after the last space, as the REPL replaces it):
    the sampler name after its last comma, or after the | of /compare."""
    word = partial.rpartition(" ")[2]
    cut = max(word.rfind(","), word.rfind("|")) + 1
    prefix, last = word[:cut], word[cut:]
    return [prefix + name for name in get_registry().names("samplers") if name.startswith(last)]


def _option_names(session, partial: str) -> list[str]:
    return sorted(n for n in session.setting_names() if n.startswith(partial))


def help_(session, args: str) -> str:
    if args:
        entry = find(args if args.startswith("/") else f"/{args}")
        return f"{entry.meta.get('usage', entry.name)}\n  {entry.meta.get('help', '')}"
    width = max(len(e.meta.get("usage", e.name)) for e in commands())
    lines = [f"{e.meta.get('usage', e.name):<{width}}  {e.meta.get('help', '')}" for e in commands()]
    return CommandHelp("\n".join(lines + ["", "Anything else you type is sent to the model."]))


def profile(session, args: str) -> str:
    if not args:
        p = session.profile
        if p is None:  # the full-screen chat before any model loaded
            return "no profile is loaded: /profile NAME loads one (/profiles lists them)"
        return f"profile {p.name}: {p.description or p.path}"
    session.use_profile(args)
    return f"switched to profile {session.profile.name} ({session.profile.checkpoint}); the conversation is kept"


def profiles(session, args: str) -> str:
    if args:
        raise UsageError("/profiles takes no arguments")
    lines = []
    current = session.profile.path if session.profile is not None else None
    for e in find_profiles():
        mark = "*" if e.profile is not None and e.profile.path == current else " "
        lines.append(f"{mark} {e.name}  [{e.origin}]  " + (e.profile.description if e.profile else f"ERROR: {e.error}"))
    return "\n".join(lines) or "no profiles"


def sampler(session, args: str) -> str:
    if args:
        session.set_chain(args.replace(" ", ""))
    return f"sampler chain: {session.chain}"


SET_HELP = "set a sampler option, max_new_tokens, seed, or the speakers' names (user_name, model_name)"


def set_(session, args: str) -> str:
    name, _, value = args.partition(" ")
    if not name or not value.strip():
        raise UsageError("/set needs a name and a value", hint="for example /set temperature 0.7 or /set top_p.p 0.9")
    return session.set(name, value.strip())


def show(session, args: str) -> str:
    d = session.describe()
    options = "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                        for name, values in d["options"].items() if values)
    seed = "random for each reply" if d["seed"] is None else d["seed"]
    return (f"profile     {d['profile']} ({d['checkpoint']}, step {d['step']})\n"
            f"sampler     {d['chain']}\n"
            f"options     {options or 'none'}\n"
            f"generation  max_new_tokens {d['max_new_tokens']}, seed {seed}\n"
            f"device      {d['device']}, {d['path']}" + (f" ({d['dtype']} activations)" if d["quantize"] != "none" else "")
            + (f"\nspeakers    you are {d['user_name']}, the model is {d['model_name']}" if "user_name" in d else ""))


def regen(session, args: str) -> Reply:
    return Reply(session.regenerate())


def edit(session, args: str) -> Reply:
    number, _, text = args.strip().partition(" ")
    if not number:
        raise UsageError("/edit needs a message number and its new text")
    try:
        n = int(number)
    except ValueError:
        raise UsageError(f"/edit takes a message number first, not {number!r}") from None
    return Reply(session.edit(n, text), kept=n - 1)


def _preview(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"


def branch(session, args: str) -> str:
    forks = session.forks()
    choices = [(fork, k) for fork in forks for k in range(len(fork.versions))]
    if not args.strip():
        if not forks:
            return "no message has other versions yet (/edit N TEXT and /regen make them)"
        lines, n = [], 0
        for fork in forks:
            what = "message" if fork.role == "user" else "reply"
            lines.append(f"{what} {fork.index + 1}: {len(fork.versions)} versions")
            for k, turn in enumerate(fork.versions):
                n += 1
                text = turn.user if fork.role == "user" else turn.reply
                lines.append(f"  {n}. {_preview(text)}" + ("  (current)" if k == fork.current else ""))
        return "\n".join(lines + ["/branch N switches to version N"])
    try:
        n = int(args)
    except ValueError:
        raise UsageError(f"/branch takes a version number, not {args.strip()!r}") from None
    if not 1 <= n <= len(choices):
        raise UsageError(f"there is no version {n}" + (f": /branch lists 1 to {len(choices)}" if choices else
                                                       ": no message has other versions yet"))
    fork, k = choices[n - 1]
    session.switch(fork.index, fork.role, k)
    return TurnsChanged(f"switched to version {k + 1} of {len(fork.versions)} of "
                        f"{'message' if fork.role == 'user' else 'reply'} {fork.index + 1}", kept=fork.index)


def system(session, args: str) -> str:
    if not args.strip():
        text = session.template.system.strip()
        whose = "this chat's" if session.system is not None else "the profile's"
        return f"system text: {text!r} ({whose})" if text else f"system text: none ({whose})"
    if args.strip() == "--reset":
        return session.set_system(None)
    return session.set_system(args.strip())


def find_(session, args: str) -> Found:
    from gpt_runtime.store import hit_line

    if not args.strip():
        raise UsageError("/find needs the words to look for")
    hits = session.search(args)
    if not hits:
        return Found(f"no saved message holds {args.strip()!r}", [])
    example = f"/resume {hits[0].session}:{hits[0].message}"
    return Found("\n".join([hit_line(hit) for hit in hits] + [f"/resume SESSION:MESSAGE carries on there, e.g. {example}"]),
                 hits)


def undo(session, args: str) -> TurnsChanged:
    turn = session.undo()
    return TurnsChanged(f"forgot: {turn.user[:60]!r}", kept=len(session.turns))


def clear(session, args: str) -> TurnsChanged:
    session.clear()
    return TurnsChanged("the conversation is cleared (settings are kept)", kept=0)


def save(session, args: str) -> str:
    path = args or time.strftime("quill-chat-%Y%m%d-%H%M%S.md")
    return f"saved {len(session.turns)} turns to {session.save(path)}"


def load(session, args: str) -> TurnsChanged:
    if not args:
        raise UsageError("/load needs the transcript file")
    return TurnsChanged(f"loaded {session.load(args)} turns from {args}", kept=0)


def sessions(session, args: str) -> str:
    from gpt_runtime.store import when

    if args:
        raise UsageError("/sessions takes no arguments")
    rows = session.sessions()
    if not rows:
        return "no saved sessions yet" + ("" if session.saving else " (this chat is not saved)")
    lines = [f"{'id':>5}  {'last used':16}  {'messages':>8}  {'profile':16}  title"]
    for info in rows:
        mark = "*" if info.id == session.saved_id else " "
        lines.append(f"{info.id:>4}{mark}  {when(info.updated):16}  {info.messages:>8}  {info.profile:16}  "
                     f"{info.title or '(untitled)'}")
    return "\n".join(lines + ["/resume ID carries on with one"])


def resume(session, args: str) -> Resumed:
    if not args.strip():
        raise UsageError("/resume needs a saved session's id, last, or SESSION:MESSAGE", hint="/sessions lists them")
    number, said = session.resume(args.strip())
    return Resumed.saying(session, number, said)


def rename(session, args: str) -> str:
    if not args.strip():
        raise UsageError("/rename needs the new title")
    return session.rename(args)


def replay(session, args: str) -> str:
    try:
        n = int(args) if args else len(session.turns)
    except ValueError:
        raise UsageError(f"/replay takes a reply number, not {args!r}") from None
    before, now = session.replay(n)
    verdict = "identical" if before == now else "DIFFERENT"
    return f"reply {n} replayed: {verdict}" + ("" if before == now else f"\nthen: {before}\nnow:  {now}")


def compare(session, args: str) -> Comparison:
    left, bar, right = args.partition("|")
    if not bar or not left.strip() or not right.strip():
        raise UsageError("/compare needs two sampler chains (or profile:NAME) separated by |")
    return Comparison(session.compare(left.replace(" ", ""), right.replace(" ", "")))


def tokens(session, args: str) -> TokenView:
    if not args:
        raise UsageError("/tokens needs some text")
    return TokenView(session.loaded.tokenizer, args)


def train(session, args: str) -> JobsChanged:
    job = session.start_job("train", shlex.split(args))
    return JobsChanged(f"started job {job.id}: train {args} (/jobs shows its progress, /cancel {job.id} stops it)")


def finetune(session, args: str) -> JobsChanged:
    argv = shlex.split(args)
    resume = "--resume" in argv
    if not resume and (not argv or argv[0].startswith("-")):
        raise UsageError("/finetune needs the files or directories to fine-tune on", hint=FINETUNE_USAGE)
    new_dir = None
    if not any(arg == "--out" or arg.startswith("--out=") for arg in argv):
        if resume:
            raise UsageError("/finetune --resume needs the --out RUN to continue", hint="/jobs shows where each run is")
        new_dir = _free_run_dir(f"runs/{session.profile.name}-finetune")
        argv += ["--out", str(new_dir)]
    job = session.start_job("finetune", [str(session.profile.path), *argv])
    if new_dir is not None:  # made now, not when the job gets to it: a second /finetune must not choose it too
        new_dir.mkdir(parents=True, exist_ok=True)
    what = "resuming the fine-tune of" if resume else "fine-tuning"
    return JobsChanged(f"started job {job.id}: {what} {session.profile.name} (/jobs shows its progress, /cancel {job.id} stops it)")


def _free_run_dir(base: str) -> Path:
    """`base`, or base-2, base-3, ...: the first that does not exist yet."""
    n = 1
    while Path(base if n == 1 else f"{base}-{n}").exists():
        n += 1
    return Path(base if n == 1 else f"{base}-{n}")


def eval_(session, args: str) -> JobsChanged:
    argv = shlex.split(args)
    if not argv or argv[0].startswith("-"):
        raise UsageError("/eval needs the data to evaluate on")
    job = session.start_job("eval", [str(session.profile.checkpoint), "--data", *argv])
    return JobsChanged(f"started job {job.id}: eval of {session.profile.name} on {argv[0]}")


def jobs(session, args: str) -> JobsChanged:
    return JobsChanged("\n".join(job.describe() for job in session.jobs.all()) or "no jobs yet")


def cancel(session, args: str) -> JobsChanged:
    try:
        job_id = int(args)
    except ValueError:
        raise UsageError(f"/cancel takes a job number, not {args!r}" if args else "/cancel needs a job number") from None
    job = session.jobs.cancel(job_id)
    return JobsChanged(f"cancelling job {job.id}" + (" (it saves its last checkpoint first)" if job.kind != "eval" else ""))


def quit_(session, args: str):
    return QUIT


@hookimpl
def quill_register_commands(register) -> None:
    register("/help", help_, help="list the commands, or explain one", usage="/help [COMMAND]",
             complete=lambda session, partial: [e.name for e in commands() if e.name.startswith("/" + partial.lstrip("/"))])
    register("/profile", profile, help="show the profile, or switch to another (the conversation stays)",
             usage="/profile [NAME]", complete=_profile_names)
    register("/profiles", profiles, help="list the profiles", usage="/profiles")
    register("/sampler", sampler, help="show the sampler chain, or set another", usage="/sampler [CHAIN]",
             complete=_sampler_names)
    register("/set", set_, help=SET_HELP, usage="/set NAME VALUE", complete=_option_names)
    register("/show", show, help="show the profile, chain, options, device and dtype", usage="/show")
    register("/regen", regen, help="a new reply to the last message (the old one stays: /branch)", usage="/regen")
    register("/edit", edit, help="ask message N again, changed: the conversation forks there (the old branch stays)",
             usage="/edit N TEXT")
    register("/branch", branch, help="list the messages with other versions, or switch to version N", usage="/branch [N]")
    register("/system", system, help="show or set the system text for this chat (--reset: the profile's)",
             usage="/system [TEXT|--reset]")
    register("/find", find_, help="search every saved chat for messages holding these words", usage="/find WORDS")
    register("/undo", undo, help="forget the last exchange", usage="/undo")
    register("/clear", clear, help="forget the conversation", usage="/clear")
    register("/save", save, help="save the transcript: Markdown of this branch with provenance, or JSON of every "
                                 "branch for FILE.json", usage="/save [FILE]")
    register("/load", load, help="load a transcript saved as JSON (or a session exported as JSON), every branch",
             usage="/load FILE")
    register("/sessions", sessions, help="the saved sessions, the latest used first", usage="/sessions")
    register("/resume", resume, help="carry on with a saved session (its turns replace the conversation)",
             usage="/resume ID|last|SESSION:MESSAGE")
    register("/rename", rename, help="title the saved session of this chat", usage="/rename TITLE")
    register("/replay", replay, help="redo reply N from its provenance and check it is the same",
             usage="/replay [N]")
    register("/compare", compare, help="the last message through two sampler chains or profiles, with the same seed",
             usage="/compare CHAIN_A | CHAIN_B  or  /compare profile:A | profile:B", complete=_sampler_names)
    register("/tokens", tokens, help="how the tokenizer splits some text", usage="/tokens TEXT")
    register("/train", train, help="train a model in the background (the flags of `quill train`)",
             usage="/train --data DIR --out RUN [FLAGS]")
    register("/finetune", finetune, help="fine-tune this profile's model on files in the background (flags of quill finetune)",
             usage=FINETUNE_USAGE)
    register("/eval", eval_, help="evaluate this profile's model in the background", usage="/eval DATA [--split val]")
    register("/jobs", jobs, help="the background jobs and their progress", usage="/jobs")
    register("/cancel", cancel, help="stop a background job (training saves its last checkpoint)", usage="/cancel ID",
             complete=lambda session, partial: [str(j.id) for j in session.jobs.all() if j.status == "running"
                                                and str(j.id).startswith(partial)])
    register("/quit", quit_, help="leave the chat", usage="/quit")

