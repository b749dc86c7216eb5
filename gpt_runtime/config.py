"""`TrainConfig`: every setting of a training run, in one place.

Each field is a `quill train` flag (``n_layer`` is ``--n-layer``) and a key of
the TOML file given to ``--config``; flags override the file, the file overrides
the defaults. This module imports no torch, so the CLI can build its flags fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import QuillError, did_you_mean
from .fileio import read_user_file

# The names a compute dtype may be given by (flags, profiles, TrainConfig), and the
# weight formats `inference.prepare_model` offers: the one list each check uses.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
DTYPES = ("bfloat16", "float16", "float32")
QUANTIZE = ("auto", "none", "int8")  # auto: int8 when it is measured fastest and close enough

# The settings that make a model's shape: a run that starts from another model's weights
# (`init_from`) takes them from it, and may not change them.
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "position", "norm", "mlp", "tie_embeddings")

# What `quill finetune` starts from (its flags override them): a learning rate well below a
# from-scratch run's, so the weights move on from where they are rather than start over, and
# evaluations often enough to see whether the new text is helping.
FINETUNE_DEFAULTS = {"max_steps": 200, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 20, "eval_interval": 50,
                     "eval_steps": 10, "batch_size": 8, "log_interval": 5}

# `compile = "auto"` compiles only runs of at least this many steps (in one invocation):
# compiling takes tens of seconds to minutes, and a fused step saves milliseconds, so
# shorter runs would spend more time compiling than they save.
COMPILE_AUTO_MIN_STEPS = 500


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of a training run (see the module docstring)."""

    data: str = _opt("", "prepared data directory (from `quill prepare`)")
    out: str = _opt("runs/default", "run directory for checkpoints and the log")
    init_from: str = _opt("", "start from these weights, and their shape: a checkpoint, a run directory or a profile "
                              "(empty: from scratch)")
    # model
    n_layer: int = _opt(6, "transformer blocks (0 gives a bigram model)")
    n_head: int = _opt(6, "attention heads per block")
    n_embd: int = _opt(384, "embedding width")
    block_size: int = _opt(256, "context length in tokens")
    dropout: float = _opt(0.0, "dropout probability on embeddings and residual branches")
    bias: bool = _opt(False, "biases in linear and norm layers")
    position: str = _opt("learned", "position encoding: learned or rope")
    norm: str = _opt("layernorm", "normalisation: layernorm or rmsnorm")
    mlp: str = _opt("gelu", "feed-forward layer: gelu, gelu_tanh (GPT-2's), swiglu or relu2")
    tie_embeddings: bool = _opt(True, "share the input embedding and output head")
    # optimisation
    batch_size: int = _opt(16, "sequences per micro-batch, per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: int = _opt(2000, "optimizer steps to train for")
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr: float = _opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(100, "steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)")
    # evaluation and logging
    eval_interval: int = _opt(250, "evaluate and checkpoint every N steps")
    eval_steps: int = _opt(20, "batches per evaluation")
    log_interval: int = _opt(10, "log every N steps")
    # runtime
    seed: int = _opt(1337, "random seed")
    device: str = _opt("auto", "backend: auto ($QUILL_DEVICE, else the best available), cpu, cuda, mps, or a plugin's")
    dtype: str = _opt("auto", "compute dtype: auto (the backend's choice), float32, bfloat16, float16")
    compile: bool | str = _opt("auto", "compile the model with torch.compile: true, false, or auto (on CUDA when "
                                       f"at least {COMPILE_AUTO_MIN_STEPS} steps are left to train; never on CPU or MPS)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    max_seconds: float = _opt(0.0, "stop and save after this much training time (0: no limit)")

    def model_config(self, vocab_size: int):
        """The `GPTConfig` these settings describe."""
        from .model import GPTConfig  # imports torch: loaded when first used

        return GPTConfig(
            vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
            n_embd=self.n_embd, dropout=self.dropout, bias=self.bias, position=self.position,
            norm=self.norm, mlp=self.mlp, tie_embeddings=self.tie_embeddings,
        )

    def validate(self) -> None:
        """Raise a QuillError for values no run can use."""
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise QuillError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "max_seconds", "dropout", "beta1", "beta2"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise QuillError(f"{name} must be a finite number, 0 or more, not {value}")
        if self.min_lr > self.lr:
            raise QuillError(f"min_lr ({self.min_lr}) is above lr ({self.lr})", hint="the schedule decays from lr down to min_lr")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise QuillError(f"compile must be true, false or \"auto\", not {self.compile!r}")
        if not self.data:
            raise QuillError("no data directory given", hint="pass --data DIR (made by `quill prepare`)")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A config from a dict, naming any unknown key (and the closest known one)."""
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise QuillError(f"{source}: unknown key {key!r}", hint=did_you_mean(key, known) or f"known keys: {', '.join(known)}")
            kind = known[key].type  # a string: annotations are postponed
            if kind == "bool | str":  # a switch that may also be "auto" (compile)
                if not (isinstance(value, bool) or value == "auto"):
                    raise QuillError(f"{source}: {key} should be true, false or \"auto\", not {value!r}")
                continue
            ok = {"int": int, "float": (int, float), "str": str, "bool": bool}[kind]
            if not isinstance(value, ok) or (isinstance(value, bool) and kind != "bool"):
                raise QuillError(f"{source}: {key} should be {kind}, not {value!r}")
        return cls(**values)


def saved_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The config a run in `run_dir` was started with (from its config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise QuillError(f"no run to resume in {str(run_dir)!r} (no config.json)", hint="start it without --resume first")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise QuillError(f"{str(path)!r} is corrupt (not JSON)") from None
    cfg = TrainConfig.from_dict(values, str(path))
    cfg.out = str(run_dir)  # the run may have moved since
    cfg.max_seconds = 0.0  # a time budget is for one invocation, not the whole run
    return cfg


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file, with errors that name the file and the line."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    raw = read_user_file(path, "config file")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QuillError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
