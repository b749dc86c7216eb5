"""`quill export`, `quill import` and `quill check`: writing a checkpoint in another
form, reading one from HuggingFace, and describing one. Each command's flags, then
its handler.

Every `quill` command line imports this module, `quill --help` included, so each
handler imports the engine modules it uses when it runs (torch comes with most).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cmdline import subcommand
from .config import DTYPES
from .errors import QuillError, UsageError


def add_export_command(commands) -> None:
    """Add `export` to argparse subparsers `commands`."""
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
    p.add_argument("--dtype", choices=DTYPES,
                   help="weights' dtype (default: bfloat16 for quill, float32 for hf)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=cmd_export)


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
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.step, ckpt.val_loss, ckpt.train_args, init_from=ckpt.init_from,
                    dtype=getattr(torch, dtype))
    print(f"wrote {out}: {ckpt.model.num_params():,} parameters in {dtype}, step {ckpt.step}, "
          f"{out.stat().st_size / 1e6:.1f} MB")


def add_import_command(commands) -> None:
    """Add `import` to argparse subparsers `commands`."""
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


def add_check_command(commands) -> None:
    """Add `check` to argparse subparsers `commands`."""
    p = subcommand(commands, "check", "describe a checkpoint, and whether a tokenizer matches it", (
        "quill check runs/small/best.safetensors",
        "quill check runs/small --tokenizer tokenizer.json",
        "quill check runs/finetuned --tokenizer shakespeare-char   # the same tokenizer as a profile's model?",
    ))
    p.add_argument("checkpoint", help="checkpoint file, or a run directory")
    p.add_argument("--tokenizer", help="tokenizer to compare with the checkpoint's: a tokenizer file, or the "
                                         "tokenizer of another checkpoint, run directory or profile (by name)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .sources import tokenizer_source

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
        "init_from": ckpt.init_from,
    }
    if args.tokenizer:
        given = tokenizer_source(args.tokenizer)
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
        if ckpt.init_from:
            rows.append(("started from", _describe_origin(ckpt.init_from)))
        if args.tokenizer:
            verdict = "matches" if info["tokenizer_matches"] else f"DOES NOT MATCH (it is {info['given_tokenizer_fingerprint']})"
            rows.append(("given tokenizer", f"{args.tokenizer}: {verdict}"))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    return 0 if info.get("tokenizer_matches", True) else 1


def _describe_origin(origin: dict) -> str:
    """One line for where a fine-tuned checkpoint's weights started."""
    grown = f"; {origin['new_tokens']} new token(s) added" if origin.get("new_tokens") else ""
    return (f"{origin.get('source')} at step {origin.get('step')} (sha256 {str(origin.get('sha256'))[:16]}, "
            f"tokenizer {origin.get('tokenizer_fingerprint')}{grown})")
