"""`quill generate`: its flags, the --profile defaults, and the handler, which
checks every flag before it loads torch and the checkpoint.

Every `quill` command line imports this module, `quill --help` included, so each
handler imports the engine modules it uses when it runs (torch comes with most).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cmdline import read_arg, subcommand
from .config import QUANTIZE
from .errors import QuillError, UsageError


def add_generate_command(commands) -> None:
    """Add `generate` to argparse subparsers `commands`."""
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
    p.add_argument("--dtype", default=None,
                   help="auto, float32 or bfloat16 (default: auto, the fastest path measured on this machine "
                        "whose predictions stay close to float32's)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="int8: weights in 8 bits; none: never; auto (default): int8 when measured fastest here")
    p.set_defaults(run=cmd_generate)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _apply_profile(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Fill unset generate flags from --profile; returns the profile's sampler options."""
    if (args.checkpoint is None) == (args.profile is None):
        raise UsageError("give a checkpoint or --profile NAME (one of them)",
                         hint="quill generate runs/small --prompt ... or quill generate --profile shakespeare --prompt ...")
    defaults = {"max_new_tokens": 200, "device": "auto", "dtype": "auto", "quantize": "auto"}
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
    from .sampling import DEFAULT_CHAIN, build_chain, check_seed, settings_from_strings

    profile_options = _apply_profile(args)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be 0 or more, not {args.max_new_tokens}")
    if args.show_probs < 0:
        raise UsageError(f"--show-probs must be 0 or more, not {args.show_probs}")
    if args.seed is not None:
        check_seed(args.seed, "--seed", UsageError)
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
    from .calibrate import prepare
    from .checkpoint import load_checkpoint
    from .generate import Token, generate

    prompt = read_arg(args.prompt, "the prompt")
    backend = get_backend(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=backend.device)
    model, choice = prepare(ckpt.model, backend, args.dtype, args.quantize)
    if choice.source == "measured" and sys.stderr.isatty():
        print(f"[measured how to generate with this model here in {choice.seconds:.1f} s: {choice.summary()}]",
              file=sys.stderr)
    out = sys.stdout
    events = generate(model, ckpt.tokenizer, prompt, chain=chain, max_new_tokens=args.max_new_tokens,
                      stop=[_unescape(s) for s in args.stop], seed=args.seed, probs=args.show_probs)
    for event in events:
        if args.show_probs and isinstance(event, Token):
            alternatives = ", ".join(f"{text!r} {p:.1%}" for _, text, p in event.top)
            piece = ckpt.tokenizer.decode([event.id])
            out.write(f"{piece!r:<14} {event.prob:7.2%}   {alternatives}\n")
        elif not args.show_probs:
            out.write(event.text)
        out.flush()
    if not args.show_probs and out.isatty():
        out.write("\n")
    if sys.stderr.isatty():
        print(f"[{event.reason}: {event.new_tokens} tokens, {event.tokens_per_second:.0f} tokens/s, seed {event.seed}]",
              file=sys.stderr)
