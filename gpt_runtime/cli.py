"""`quill ...`: the command line.

Only argparse and the standard library load on this path, so `quill --help`
answers instantly; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__

# `tui.cli` adds `quill chat` with `cli.subcommand`. `quill train` and the flags of
# `quill eval` live outside the CLI: the chat's jobs and torchrun ranks use them too.
from .cmdline import PROG, Parser, examples_epilog, run, subcommand
from .errors import QuillError, UsageError
from .train_command import add_eval_command, add_train_command, cmd_train


def build_parser(extend: Callable[[Any], None] | None = None) -> Parser:
    """The `quill` parser; `extend(subparsers)` adds commands from outside the engine
    (the chat, from `tui.cli`, which the engine never imports)."""
    parser = Parser(
        prog=PROG,
        description="Quill: train, evaluate and chat with small GPT models in the terminal.",
        epilog=examples_epilog(
            "quill tokenizer train corpus.txt --kind bpe --vocab-size 4096 --out tokenizer.json",
            "quill tokenizer inspect --tokenizer tokenizer.json 'To be, or not to be'",
            "quill plugins",
        )
        + "\n\nSet QUILL_DEBUG=1 to see tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(run=None, help_parser=parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    # quill tokenizer ...
    tok = subcommand(commands, "tokenizer", "train, inspect and run tokenizers", (
        "quill tokenizer train corpus.txt --kind char --out chars.json",
        "quill tokenizer encode --tokenizer chars.json 'hello'",
    ))
    tok.set_defaults(help_parser=tok)
    tok_cmds = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=Parser)

    p = subcommand(tok_cmds, "train", "train a tokenizer on a UTF-8 text file", (
        "quill tokenizer train corpus.txt --kind bpe --vocab-size 4096 --out tokenizer.json",
        "quill tokenizer train corpus.txt --kind bpe --vocab-size 1024 --pattern gpt4 --out t.json",
        "quill tokenizer train corpus.txt --kind char --out chars.json",
    ))
    p.add_argument("corpus", help="UTF-8 text file to learn from")
    p.add_argument("--kind", default="bpe", help="tokenizer kind: char, bpe, or one a plugin adds (default: bpe)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size, special tokens included (needed for bpe; optional for char)")
    p.add_argument("--pattern", help="bpe pre-split: gpt2 (default), gpt4, words, or a regular expression")
    p.add_argument("--out", default="tokenizer.json", help="file to write (default: tokenizer.json)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=cmd_tokenizer_train)

    p = subcommand(tok_cmds, "encode", "text to token ids (a JSON list)", (
        "quill tokenizer encode --tokenizer tokenizer.json 'To be, or not to be'",
        "cat notes.txt | quill tokenizer encode --tokenizer tokenizer.json -",
    ))
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("text", help="text to encode, or - to read standard input")
    p.add_argument("--allow-special", action="store_true", help="turn special-token strings such as <eos> in the text into their ids")
    p.set_defaults(run=cmd_tokenizer_encode)

    p = subcommand(tok_cmds, "decode", "token ids (a JSON list) to text", (
        "quill tokenizer decode --tokenizer tokenizer.json '[464, 3290, 11]'",
        "quill tokenizer encode --tokenizer t.json - < a.txt | quill tokenizer decode --tokenizer t.json -",
    ))
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("ids", help="a JSON list of ids, or - to read it from standard input")
    p.set_defaults(run=cmd_tokenizer_decode)

    p = subcommand(tok_cmds, "inspect", "show a tokenizer, and how it splits a text", (
        "quill tokenizer inspect --tokenizer tokenizer.json",
        "quill tokenizer inspect --tokenizer tokenizer.json 'Wherefore art thou?'",
    ))
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("text", nargs="?", help="text to split into pieces (- reads standard input)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_tokenizer_inspect)

    # quill data ...
    data = subcommand(commands, "data", "download public corpora (any local UTF-8 text file works as well)", (
        "quill data list",
        "quill data fetch tinyshakespeare --out data",
    ))
    data.set_defaults(help_parser=data)
    data_cmds = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    p = subcommand(data_cmds, "list", "the corpora `quill data fetch` knows", ("quill data list",))
    p.set_defaults(run=cmd_data_list)
    p = subcommand(data_cmds, "fetch", "download a corpus and check its SHA-256", (
        "quill data fetch tinyshakespeare --out data",
        "quill data fetch tinyshakespeare --out data --url https://mirror.example/input.txt",
    ))
    p.add_argument("name", help="corpus name (see `quill data list`)")
    p.add_argument("--out", default="data", help="directory to write it to (default: data)")
    p.add_argument("--url", help="download from here instead (a mirror); the checksum must still match")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default: 30)")
    p.set_defaults(run=cmd_data_fetch)

    # quill prepare
    p = subcommand(commands, "prepare", "tokenize a corpus into a data directory for training", (
        "quill prepare corpus.txt --tokenizer tokenizer.json --out data/shakespeare",
        "quill prepare corpus.txt --tokenizer chars.json --out data/chars --val-fraction 0.05",
    ))
    p.add_argument("corpus", help="UTF-8 text file")
    p.add_argument("--tokenizer", required=True, help="tokenizer file (from `quill tokenizer train`)")
    p.add_argument("--out", required=True, help="directory to write train.bin, val.bin, meta.json, tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the corpus kept for validation (default: 0.1)")
    p.set_defaults(run=cmd_prepare)

    # quill train, quill eval
    add_train_command(commands).set_defaults(run=cmd_train)
    add_eval_command(commands).set_defaults(run=cmd_eval)

    # quill export
    p = subcommand(commands, "export", "write a checkpoint in another form: smaller, or as a HuggingFace GPT-2 directory", (
        "quill export runs/small --out small.safetensors",
        "quill export runs/small/best.safetensors --out small-fp16.safetensors --dtype float16",
        "quill export runs/small --format hf --out small-hf   # then GPT2LMHeadModel.from_pretrained('small-hf')",
    ), description="Write a checkpoint in another form. --format quill (the default) writes a Quill checkpoint, "
                   "by default in bfloat16. --format hf writes a directory that HuggingFace transformers loads "
                   "as GPT-2 (config.json, model.safetensors, tokenizer.json), by default in float32; only models "
                   "with learned positions, LayerNorm and a GELU MLP can be written as GPT-2.")
    p.add_argument("checkpoint", help="checkpoint file, or a run directory (its best checkpoint)")
    p.add_argument("--out", required=True, help="file (quill) or directory (hf) to write")
    p.add_argument("--format", default="quill", choices=("quill", "hf"), help="quill or hf (default: quill)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="weights' dtype (default: bfloat16 for quill, float32 for hf)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=cmd_export)

    # quill import
    p = subcommand(commands, "import", "turn a HuggingFace GPT-2 directory on disk into a Quill checkpoint and profile", (
        "quill import ~/models/gpt2 --out gpt2.safetensors",
        "quill import ~/models/distilgpt2 --out distil.safetensors --profile distil && quill chat --profile distil",
    ), description="Read a local HuggingFace GPT-2 directory (config.json; model.safetensors or pytorch_model.bin; "
                   "vocab.json and merges.txt, or tokenizer.json) into a Quill checkpoint whose tokenizer gives "
                   "GPT-2's ids, and write a profile for it. Nothing is downloaded: point it at files on disk. "
                   "A pytorch_model.bin is read only if it holds nothing but tensors.")
    p.add_argument("directory", help="the HuggingFace model directory")
    p.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    p.add_argument("--profile", help="name of the profile to write (default: the directory's name)")
    p.add_argument("--no-profile", action="store_true", help="write only the checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=cmd_import)

    # quill check
    p = subcommand(commands, "check", "describe a checkpoint, and whether a tokenizer matches it", (
        "quill check runs/small/best.safetensors",
        "quill check runs/small --tokenizer tokenizer.json",
    ))
    p.add_argument("checkpoint", help="checkpoint file, or a run directory")
    p.add_argument("--tokenizer", help="tokenizer file to compare with the checkpoint's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_check)

    # quill generate
    p = subcommand(commands, "generate", "generate text from a checkpoint, streamed as it comes", (
        "quill generate runs/small --prompt 'ROMEO:'",
        "quill generate runs/small --prompt 'To be' --sampler top_k,top_p,temperature --set temperature=0.7 --seed 1",
        "quill generate runs/small --prompt 'To be' --sampler repetition_penalty,min_p,temperature --set min_p.p=0.1",
        "quill generate runs/small --prompt 'KING' --sampler greedy --show-probs",
        "quill generate runs/small --prompt 'KING' --num-beams 4 --stop '\\n\\n'",
    ), description="Generate text from a checkpoint. The next token is chosen by a sampler chain "
                   "(list them with `quill samplers`); --set changes a sampler's option.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint file, or a run directory (or give --profile)")
    p.add_argument("--profile", help="take the checkpoint, sampler chain, options and backend from this profile; "
                                     "other flags override it")
    p.add_argument("--prompt", default="", help="text to continue; '-' reads standard input (default: empty, start from <bos>)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default: 200)")
    p.add_argument("--sampler", default=None, metavar="CHAIN",
                   help="comma-separated sampler chain, applied in order (default: top_k,top_p,temperature)")
    p.add_argument("--set", action="append", default=[], metavar="NAME.OPTION=VALUE", dest="settings",
                   help="set a sampler option, e.g. top_p.p=0.9 or temperature=0.7 (repeatable)")
    p.add_argument("--seed", type=int, help="random seed, for reproducible output")
    p.add_argument("--num-beams", type=int,
                   help="beam search with N beams (adds `beam` to the chain; alone, the chain is just `beam`)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this text (repeatable; \\n and \\t are understood)")
    p.add_argument("--show-probs", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="print each token with its probability and the N most likely alternatives (default N: 3)")
    p.add_argument("--device", default=None,
                   help="backend: auto ($QUILL_DEVICE, else the best available), cpu, cuda, mps, or a plugin's")
    p.add_argument("--dtype", default=None, help="auto, float32 or bfloat16 (default: auto, the fastest for the model)")
    p.add_argument("--quantize", default=None, choices=("none", "int8"),
                   help="int8: weights in 8 bits, faster on the CPU, slightly less accurate (default: none)")
    p.set_defaults(run=cmd_generate)

    if extend is not None:
        extend(commands)

    # quill profiles ...
    prof = subcommand(commands, "profiles", "list, show and check chat profiles", (
        "quill profiles list",
        "quill profiles show shakespeare",
        "quill profiles validate my-profile.toml",
    ), description="Profiles are TOML files binding a checkpoint, a sampler chain, a backend and a chat "
                   "template. They are read from the shipped profiles/ directory and from the user's "
                   "profile directory (QUILL_PROFILES overrides it).")
    prof.set_defaults(help_parser=prof)
    prof_cmds = prof.add_subparsers(dest="profiles_command", metavar="ACTION", parser_class=Parser)
    p = subcommand(prof_cmds, "list", "list every profile found, and what is wrong with any bad one", (
        "quill profiles list",
        "QUILL_PROFILES=~/my-profiles quill profiles list --json",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_profiles_list)
    p = subcommand(prof_cmds, "show", "show a profile's settings, defaults filled in", (
        "quill profiles show shakespeare",
        "quill profiles show ./my-profile.toml --json",
    ))
    p.add_argument("name", help="profile name, or a path to a .toml file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_profiles_show)
    p = subcommand(prof_cmds, "validate", "check a profile file: keys, types, files and the tokenizer fingerprint", (
        "quill profiles validate my-profile.toml",
    ))
    p.add_argument("file", help="the profile's .toml file")
    p.set_defaults(run=cmd_profiles_validate)

    # quill samplers
    p = subcommand(commands, "samplers", "list samplers with their options and the plugin each came from", (
        "quill samplers",
        "quill samplers --json",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_samplers)

    # quill plugins
    p = subcommand(commands, "plugins", "list plugins: what each registered, and any error", (
        "quill plugins",
        "quill plugins --json",
        "QUILL_DISABLE_PLUGINS=my_plugin quill plugins",
    ))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_plugins)

    # quill doctor
    p = subcommand(commands, "doctor", "report this machine and what Quill will choose on it, for bug reports", (
        "quill doctor",
        "quill doctor --json > doctor.json",
        "QUILL_DEVICE=cpu quill doctor",
    ), description="Report the CPU, memory, GPUs, Python and PyTorch, every backend and whether it can run "
                   "here, and the dtypes and kernels Quill will use for training and generation, each with "
                   "its reason. Paste it into bug reports. Loads no model and times nothing.")
    p.add_argument("--json", action="store_true", help="print one JSON object with the same facts")
    p.set_defaults(run=cmd_doctor)
    return parser


# --- commands ---------------------------------------------------------------

def _read_arg(value: str, what: str) -> str:
    """The argument itself, or standard input when it is '-'; UTF-8 either way."""
    # Python turns undecodable argument bytes into lone surrogates; undo that to
    # report them as what they are.
    data = sys.stdin.buffer.read() if value == "-" else os.fsencode(value)
    where = "on standard input" if value == "-" else "given as an argument"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuillError(f"{what} {where} is not UTF-8 (invalid byte at offset {exc.start})") from None


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .fileio import read_corpus
    from .progress import progress_bar
    from .tokenizer import tokenizer_class, train_tokenizer

    if os.path.exists(args.out) and not args.force:
        raise QuillError(f"{args.out!r} already exists", hint="pass --force to overwrite it, or choose another --out")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UsageError(f"--vocab-size must be a positive number, not {args.vocab_size}")
    try:
        cls = tokenizer_class(args.kind)
    except QuillError as exc:
        raise UsageError(f"--kind: {exc.message}", hint=exc.hint) from None
    text = read_corpus(args.corpus)
    options = {"pattern": args.pattern} if args.pattern is not None else {}
    start = time.perf_counter()
    with progress_bar(f"training {args.kind} tokenizer", unit=cls.progress_unit) as progress:
        tok = train_tokenizer(args.kind, text, args.vocab_size, progress, **options)
    seconds = time.perf_counter() - start
    try:
        tok.save(args.out)
    except OSError as exc:  # e.g. --out is a directory, or not writable
        raise QuillError(f"cannot write {args.out!r}: {exc.strerror or exc}") from None
    note = ""
    if args.vocab_size and tok.vocab_size < args.vocab_size:
        note = f" (the corpus only supports {tok.vocab_size})"
    print(f"wrote {args.out}: {tok.kind} tokenizer, vocab size {tok.vocab_size}{note}, "
          f"fingerprint {tok.fingerprint}, trained in {seconds:.2f} s")


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = _read_arg(args.text, "text")
    ids = tok.encode(text, allowed_special="all" if args.allow_special else ())
    print(json.dumps(ids))


def cmd_tokenizer_decode(args: argparse.Namespace) -> None:
    from .tokenizer import check_ids, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    raw = _read_arg(args.ids, "ids")
    try:
        ids = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise QuillError(f"ids are not valid JSON ({exc.msg} at column {exc.colno})", hint="give a list such as [12, 7, 301]") from None
    except ValueError as exc:  # e.g. an integer too long to parse
        raise QuillError(f"ids are not valid: {exc}", hint="give a list such as [12, 7, 301]") from None
    data = tok.decode_bytes(check_ids(ids))
    out = sys.stdout.buffer
    out.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        out.write(b"\n")  # keep the prompt off the text, but only for people
    out.flush()


def _show_piece(piece: bytes) -> str:
    try:
        return json.dumps(piece.decode("utf-8"), ensure_ascii=False)
    except UnicodeDecodeError:  # part of a multi-byte character
        return 'b"' + "".join(f"\\x{b:02x}" for b in piece) + '"'


def cmd_tokenizer_inspect(args: argparse.Namespace) -> None:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    info = {
        "file": args.tokenizer,
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "special_tokens": tok.special_tokens,
    }
    extra = tok.describe()
    info.update(extra)
    if args.text is not None:
        text = _read_arg(args.text, "text")
        ids = tok.encode(text)
        n_bytes = len(text.encode("utf-8"))
        info["text_bytes"] = n_bytes
        info["tokens"] = len(ids)
        info["bytes_per_token"] = round(n_bytes / len(ids), 3) if ids else None
        info["pieces"] = [{"id": i, "text": tok.pieces[i].decode("utf-8", "replace"), "bytes": tok.pieces[i].hex()} for i in ids]
        info_pieces = [(i, tok.pieces[i]) for i in ids]
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return
    specials = " ".join(f"{name}={i}" for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    rows = [("file", args.tokenizer), ("kind", tok.kind), ("vocab size", str(tok.vocab_size)),
            ("fingerprint", tok.fingerprint), ("special tokens", specials)]
    rows.extend((key.replace("_", " "), value) for key, value in extra.items())
    if args.text is not None:
        bpt = f"{info['bytes_per_token']:.2f} bytes/token" if ids else "no tokens"
        rows.append(("text", f"{info['text_bytes']} bytes -> {len(ids)} tokens, {bpt}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.text is not None and ids:
        print("pieces:")
        id_width = len(str(max(ids)))
        for i, piece in info_pieces:
            print(f"  {i:>{id_width}}  {_show_piece(piece)}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare
    from .progress import progress_bar

    start = time.perf_counter()
    with progress_bar("tokenizing", unit="bytes") as progress:
        meta = prepare(args.corpus, args.tokenizer, args.out, args.val_fraction, progress)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}), tokenizer {meta['tokenizer_fingerprint']}, in {time.perf_counter() - start:.1f} s")


def cmd_data_list(args: argparse.Namespace) -> None:
    from .corpora import CORPORA

    for corpus in CORPORA.values():
        print(f"{corpus.name}  {corpus.about}\n  {corpus.url}\n  sha256 {corpus.sha256}")


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from .corpora import fetch
    from .progress import progress_bar

    with progress_bar(f"downloading {args.name}", unit="bytes") as progress:
        path, downloaded = fetch(args.name, args.out, url=args.url, timeout=args.timeout, progress=progress)
    size = path.stat().st_size
    print(f"{'downloaded' if downloaded else 'already there:'} {path} ({size:,} bytes, checksum ok)")


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.force and not (out.is_dir() and not any(out.iterdir())):
        raise QuillError(f"{str(out)!r} already exists", hint="pass --force to overwrite it")
    if args.format == "quill" and out.is_dir():
        raise QuillError(f"{str(out)!r} is a directory", hint="--format quill writes a file; --format hf a directory")
    if args.format == "hf" and out.is_file():
        raise QuillError(f"{str(out)!r} is a file", hint="--format hf writes a directory")
    import torch

    from .checkpoint import load_checkpoint, save_checkpoint

    dtype = args.dtype or ("float32" if args.format == "hf" else "bfloat16")
    ckpt = load_checkpoint(args.checkpoint)
    if args.format == "hf":
        from .hf_model import export_hf
        from .progress import status

        with status(f"writing {out}"):
            notes = export_hf(ckpt.model, ckpt.tokenizer, out, getattr(torch, dtype))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {out}/: GPT-2 with {ckpt.model.num_params():,} parameters in {dtype}, "
              f"step {ckpt.step}; load it with GPT2LMHeadModel.from_pretrained({str(out)!r})")
        return
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.step, ckpt.val_loss, ckpt.train_args,
                    dtype=getattr(torch, dtype))
    print(f"wrote {out}: {ckpt.model.num_params():,} parameters in {dtype}, step {ckpt.step}, "
          f"{out.stat().st_size / 1e6:.1f} MB")


def cmd_import(args: argparse.Namespace) -> None:
    from .checkpoint import save_checkpoint
    from .hf_model import import_hf
    from .profiles import ChatTemplate, free_profile_name, write_profile
    from .progress import status

    out, source = Path(args.out), Path(args.directory).expanduser()
    if out.exists() and not args.force:
        raise QuillError(f"{str(out)!r} already exists", hint="pass --force to overwrite it")
    if out.is_dir():
        raise QuillError(f"{str(out)!r} is a directory", hint="--out names the checkpoint file to write")
    if args.profile and args.no_profile:
        raise UsageError("--profile and --no-profile contradict each other")
    # Settled before the work, so a taken name costs nothing.
    name = None if args.no_profile else free_profile_name(args.profile or source.resolve().name, exact=bool(args.profile))
    with status(f"reading {source}"):
        model, tokenizer = import_hf(source)
    cfg, n_params = model.config, model.num_params(exclude_positions=False)  # GPT-2's sizes count them all
    print(f"read {source}: GPT-2, {cfg.n_layer} layers, {n_params:,} parameters, "
          f"{tokenizer.vocab_size:,} tokens, context {cfg.block_size}")
    with status(f"writing {out}"):
        save_checkpoint(out, model, tokenizer, step=0, train_args={"imported_from": str(source.resolve())})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if name is None:
        return
    write_profile(name, out, f"GPT-2 imported from {source.resolve()}: {n_params / 1e6:.1f}M parameters",
                  "top_k,temperature", {"top_k": {"k": 40}, "temperature": {"t": 0.8}}, 200, ChatTemplate())
    print(f"profile {name!r} is ready: quill chat --profile {name}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    from .progress import progress_bar

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
    with progress_bar("evaluating", unit="batches") as progress:
        result = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, device=args.device, progress=progress)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits/byte {result.bits_per_byte:.4f}  "
          f"({result.tokens:,} tokens, {result.bytes:,} bytes)")


def cmd_check(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .tokenizer import load_tokenizer

    ckpt = load_checkpoint(args.checkpoint)
    info = {
        "file": str(ckpt.path),
        "config": ckpt.config.to_dict(),
        "parameters": ckpt.model.num_params(),
        "step": ckpt.step,
        "val_loss": ckpt.val_loss,
        "tokenizer_kind": ckpt.tokenizer.kind,
        "tokenizer_vocab_size": ckpt.tokenizer.vocab_size,
        "tokenizer_fingerprint": ckpt.tokenizer.fingerprint,
    }
    if args.tokenizer:
        given = load_tokenizer(args.tokenizer)
        info["given_tokenizer_fingerprint"] = given.fingerprint
        info["tokenizer_matches"] = given.fingerprint == ckpt.tokenizer.fingerprint
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        c = info["config"]
        arch = f"{c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, block {c['block_size']}, " \
               f"{c['position']} positions, {c['norm']}, {c['mlp']}" + (", tied embeddings" if c["tie_embeddings"] else "")
        val = f"{ckpt.val_loss:.4f}" if ckpt.val_loss is not None else "n/a"
        rows = [("file", info["file"]), ("model", arch), ("parameters", f"{info['parameters']:,}"),
                ("step", str(ckpt.step)), ("val loss", val),
                ("tokenizer", f"{ckpt.tokenizer.kind}, vocab {ckpt.tokenizer.vocab_size}, fingerprint {ckpt.tokenizer.fingerprint}")]
        if args.tokenizer:
            verdict = "matches" if info["tokenizer_matches"] else f"DOES NOT MATCH (it is {info['given_tokenizer_fingerprint']})"
            rows.append(("given tokenizer", f"{args.tokenizer}: {verdict}"))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    return 0 if info.get("tokenizer_matches", True) else 1


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _apply_profile(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Fill unset generate flags from --profile; returns the profile's sampler options."""
    if (args.checkpoint is None) == (args.profile is None):
        raise UsageError("give a checkpoint or --profile NAME (one of them)",
                         hint="quill generate runs/small --prompt ... or quill generate --profile shakespeare --prompt ...")
    defaults = {"max_new_tokens": 200, "device": "auto", "dtype": "auto", "quantize": "none"}
    options: dict[str, dict[str, Any]] = {}
    if args.profile is not None:
        from .profiles import get_profile

        profile = get_profile(args.profile)
        args.checkpoint = str(profile.checkpoint)
        defaults = {"max_new_tokens": profile.max_new_tokens, "device": profile.device, "dtype": profile.dtype,
                    "quantize": profile.quantize}
        if args.sampler is None:  # another chain on the command line starts from its defaults
            args.sampler = profile.chain
            options = profile.options
        if args.seed is None:
            args.seed = profile.seed
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return options


def cmd_generate(args: argparse.Namespace) -> None:
    from .sampling import DEFAULT_CHAIN, build_chain, settings_from_strings

    profile_options = _apply_profile(args)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be 0 or more, not {args.max_new_tokens}")
    if args.show_probs < 0:
        raise UsageError(f"--show-probs must be 0 or more, not {args.show_probs}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be from 0 to 2**64 - 1, not {args.seed}")
    if args.num_beams is not None and args.num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, not {args.num_beams}")
    # Beam search alone scores by the model's own probabilities; the sampling
    # default (top-k, top-p, temperature) would only distort them.
    spec = args.sampler if args.sampler is not None else ("beam" if args.num_beams is not None else DEFAULT_CHAIN)
    try:  # checked before the (slower) checkpoint load; a bad option is a usage error
        settings = {name: dict(values) for name, values in profile_options.items()}
        for name, values in settings_from_strings(args.settings).items():
            settings.setdefault(name, {}).update(values)
        if args.num_beams is not None:
            if "num_beams" in settings.get("beam", {}):
                raise UsageError("--num-beams and --set beam.num_beams both set the number of beams; give one")
            if "beam" not in [part.strip() for part in spec.split(",")]:
                spec += ",beam"
            settings.setdefault("beam", {})["num_beams"] = args.num_beams
        chain = build_chain(spec, settings)
    except QuillError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    if args.show_probs and chain.beam is not None:
        raise UsageError("--show-probs does not work with beam search", hint="drop --show-probs, or --num-beams and beam")
    # torch loads only now, so a usage error above is reported at once
    from .backend import get_backend
    from .checkpoint import load_checkpoint
    from .generate import Token, generate
    from .inference import generation_dtype, prepare_model

    prompt = _read_arg(args.prompt, "the prompt")
    backend = get_backend(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=backend.device)
    dtype = generation_dtype(backend, ckpt.model, args.dtype, args.quantize)
    model = prepare_model(ckpt.model, backend, dtype, args.quantize)
    out = sys.stdout
    events = generate(model, ckpt.tokenizer, prompt, chain=chain, max_new_tokens=args.max_new_tokens,
                      stop=[_unescape(s) for s in args.stop], seed=args.seed, probs=args.show_probs)
    for event in events:
        if args.show_probs and isinstance(event, Token):
            alternatives = ", ".join(f"{text!r} {p:.1%}" for _, text, p in event.top)
            piece = ckpt.tokenizer.pieces[event.id].decode("utf-8", "replace")
            out.write(f"{piece!r:<14} {event.prob:7.2%}   {alternatives}\n")
        elif not args.show_probs:
            out.write(event.text)
        out.flush()
    if not args.show_probs and out.isatty():
        out.write("\n")
    if sys.stderr.isatty():
        print(f"[{event.reason}: {event.new_tokens} tokens, {event.tokens_per_second:.0f} tokens/s, seed {event.seed}]",
              file=sys.stderr)


def cmd_profiles_list(args: argparse.Namespace) -> None:
    from .profiles import find_profiles, user_profile_dir

    entries = find_profiles()
    if args.json:
        print(json.dumps([{"name": e.name, "origin": e.origin, "path": str(e.path),
                           "error": str(e.error) if e.error else None,
                           "profile": e.profile.to_dict() if e.profile else None} for e in entries], indent=1))
        return
    if not entries:
        print(f"no profiles yet; put .toml files in {user_profile_dir()} (see `quill profiles --help`)")
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        what = e.profile.description if e.profile else f"ERROR: {e.error}"
        print(f"{e.name:<{width}}  [{e.origin}]  {what}")


def cmd_profiles_show(args: argparse.Namespace) -> None:
    from .profiles import get_profile

    profile = get_profile(args.name)
    data = profile.to_dict()
    if args.json:
        print(json.dumps(data, indent=1))
        return
    print(f"# profile {profile.name}: {profile.path}")
    print(f"# tokenizer fingerprint {profile.tokenizer_fingerprint}")
    for key in ("description", "checkpoint", "tokenizer"):
        if data[key]:
            print(f"{key} = {json.dumps(data[key], ensure_ascii=False)}")
    for table in ("sampler", "backend", "generation", "template"):
        print(f"\n[{table}]")
        for key, value in data[table].items():
            if value is None:
                continue
            if isinstance(value, dict):
                inline = ", ".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in value.items())
                print(f"{key} = {{ {inline} }}")
            else:
                print(f"{key} = {json.dumps(value, ensure_ascii=False)}")


def cmd_profiles_validate(args: argparse.Namespace) -> None:
    from .profiles import load_profile

    profile = load_profile(args.file)
    print(f"ok: profile {profile.name!r}: checkpoint {profile.checkpoint} (tokenizer {profile.tokenizer_fingerprint}), "
          f"sampler chain {profile.chain}")


def cmd_samplers(args: argparse.Namespace) -> None:
    from .plugins import get_registry

    rows = []
    for entry in get_registry().entries("samplers"):
        options = getattr(entry.obj, "options", {})
        doc = (entry.obj.__doc__ or "").strip().splitlines()
        rows.append({
            "name": entry.name,
            "plugin": entry.plugin,
            "description": doc[0] if doc else "",
            "options": {
                name: {"type": option.type.__name__, "default": option.default, "range": option.describe_range(), "help": option.help}
                for name, option in options.items()
            },
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print(f"{row['name']}  [plugin {row['plugin']}]  {row['description']}")
        for name, option in row["options"].items():
            limits = f", {option['range'].replace('value', name)}" if option["range"] else ""
            print(f"    {row['name']}.{name} = {option['default']!r}  ({option['type']}{limits})  {option['help']}")


def cmd_plugins(args: argparse.Namespace) -> None:
    from .plugins import get_plugin_host

    host = get_plugin_host()
    if args.json:
        print(json.dumps([p.to_json() for p in host.plugins], indent=1))
        return
    for p in host.plugins:
        status = "disabled" if p.disabled else ("ERROR" if p.error else "ok")
        print(f"{p.name} {p.version}  [{p.origin}]  {status}")
        for kind, names in p.registered.items():
            print(f"    {kind}: {', '.join(names)}")
        if p.error:
            print(f"    error: {p.error}")


def cmd_doctor(args: argparse.Namespace) -> None:
    from .doctor import collect, render

    report = collect()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(render(report), end="")


# --- entry point ----------------------------------------------------------------

def main(argv: list[str] | None = None, extend: Callable[[Any], None] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage error).

    `extend` adds subcommands (see `build_parser`); the installed `quill` is `tui.cli:main`.
    """
    return run(build_parser(extend), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
