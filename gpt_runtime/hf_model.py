"""HuggingFace GPT-2 directories: export a Quill model to one, import one into Quill.

GPT-2 is Quill's GPT with learned positions, LayerNorm, a GELU MLP and biases,
so the weights map one to one. Only the names differ, and one layout: GPT-2's
linear layers (`Conv1D`) store their weights as (in, out), the transpose of
`nn.Linear`'s. A Quill model without biases exports with zero biases, which
compute the same thing. Reading a `pytorch_model.bin` never runs its pickle:
`torch.load(weights_only=True)` refuses anything but tensors and plain data.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QuillError
from .fileio import atomic_write_bytes
from .hf_tokenizer import read_gpt2_tokenizer, read_json_object
from .tokenizer import END_OF_TEXT, Tokenizer

if TYPE_CHECKING:
    import torch

    from .model import GPT, GPTConfig

# Quill's MLP kinds as GPT-2's activation_function, and back.
EXPORT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
IMPORT_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# Per block: Quill's name -> (GPT-2's name, stored transposed).
_BLOCK_NAMES = {
    "norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
    "mlp.up.weight": ("mlp.c_fc.weight", True), "mlp.up.bias": ("mlp.c_fc.bias", False),
    "mlp.down.weight": ("mlp.c_proj.weight", True), "mlp.down.bias": ("mlp.c_proj.bias", False),
}
# What a HuggingFace model directory may hold: export clears them first.
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "merges.txt")
# GPT-2's defaults, for keys a config.json leaves out (as transformers does).
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}


def _names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Every GPT-2 weight, keyed by the Quill weight it comes from (biases included)."""
    names = {"wte.weight": ("wte.weight", False), "norm_f.weight": ("ln_f.weight", False), "norm_f.bias": ("ln_f.bias", False)}
    if config.n_layer > 0:  # Quill's bigram model (no layers) has no positions
        names["wpe.weight"] = ("wpe.weight", False)
    for i in range(config.n_layer):
        names.update({f"blocks.{i}.{q}": (f"h.{i}.{h}", t) for q, (h, t) in _BLOCK_NAMES.items()})
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", False)
    return names


def gpt2_obstacles(config: GPTConfig) -> list[str]:
    """What in `config` GPT-2 cannot express (empty if it can be exported)."""
    obstacles = []
    if config.position != "learned":
        obstacles.append(f"position = {config.position} (GPT-2 learns its positions)")
    if config.norm != "layernorm":
        obstacles.append(f"norm = {config.norm} (GPT-2 uses LayerNorm)")
    if config.mlp not in EXPORT_ACTIVATION:
        obstacles.append(f"mlp = {config.mlp} (GPT-2's MLP is GELU)")
    return obstacles


# --- export ----------------------------------------------------------------------
def export_hf(model: GPT, tokenizer: Tokenizer, out: Path, dtype: torch.dtype) -> list[str]:
    """Write `model` and `tokenizer` as a HuggingFace GPT-2 directory; returns notes
    for the user (what could not be written). Refuses a model GPT-2 cannot express."""
    import torch
    from safetensors.torch import save

    config = model.config
    obstacles = gpt2_obstacles(config)
    if obstacles:
        raise QuillError(f"GPT-2 cannot express this model: {'; '.join(obstacles)}",
                         hint="models trained with --position learned --norm layernorm --mlp gelu export to GPT-2")
    state = model.state_dict()
    tensors = {}
    for quill, (name, transposed) in _names(config).items():
        t = state.get(quill)
        if t is None:  # a model without biases: zero biases compute the same
            t = torch.zeros(state[quill.replace(".bias", ".weight")].shape[0])
        t = t.t() if transposed else t
        key = name if name == "lm_head.weight" else f"transformer.{name}"
        tensors[key] = t.detach().to(dtype=dtype, device="cpu").contiguous()
    if config.n_layer == 0:  # GPT-2 always adds positions: zero ones add nothing
        tensors["transformer.wpe.weight"] = torch.zeros(config.block_size, config.n_embd, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    for stale in HF_FILES:  # from an earlier export (--force): they would be read with this model's
        (out / stale).unlink(missing_ok=True)
    atomic_write_bytes(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    eos = _special(tokenizer, *END_OF_TEXT)
    bos = _special(tokenizer, "<bos>", *END_OF_TEXT)
    _write_json(out / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": EXPORT_ACTIVATION[config.mlp], "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": bos[1], "eos_token_id": eos[1],
        "dtype": str(dtype).removeprefix("torch."),
    })
    try:
        tokenizer_json = tokenizer.hf_tokenizer_json()
    except QuillError as exc:
        return [f"no tokenizer written: {exc.message}"]
    _write_json(out / "tokenizer.json", tokenizer_json)
    specials = {"bos_token": bos[0], "eos_token": eos[0], "unk_token": _special(tokenizer, "<unk>")[0],
                "pad_token": _special(tokenizer, "<pad>")[0]}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
        "clean_up_tokenization_spaces": False, **{k: v for k, v in specials.items() if v is not None}})
    return []


def _special(tokenizer: Tokenizer, *names: str) -> tuple[str | None, int | None]:
    """The first of `names` the tokenizer has, with its id."""
    return next(((n, tokenizer.special_tokens[n]) for n in names if n in tokenizer.special_tokens), (None, None))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# --- import ----------------------------------------------------------------------
def import_hf(directory: str | Path) -> tuple[GPT, Tokenizer]:
    """A Quill model (float32, eval mode) and tokenizer from a local HuggingFace GPT-2
    directory. Never touches the network; errors name the file and what is wrong."""
    import torch

    from .model import GPT  # imports torch: loaded when first used

    directory = Path(directory)
    if not directory.is_dir():
        raise QuillError(f"{directory} is not a directory" if directory.exists() else f"{directory} does not exist",
                         hint="point at a folder holding config.json, model.safetensors and the tokenizer files")
    config = gpt2_config(directory / "config.json")
    tokenizer = read_gpt2_tokenizer(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise QuillError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size "
                         f"is {config.vocab_size}: they do not belong together")
    source, weights = read_weights(directory)
    model = GPT(config, init=False)  # every weight is loaded next
    expected = model.state_dict()
    state = {}
    for quill, (name, transposed) in _names(config).items():
        if name not in weights:
            raise QuillError(f"{source} has no weight {name!r}, which config.json needs")
        t = weights.pop(name)
        shape = tuple(expected[quill].shape[::-1] if transposed else expected[quill].shape)
        if tuple(t.shape) != shape:
            raise QuillError(f"{source}: {name} has shape {list(t.shape)}, but config.json "
                             f"(n_embd {config.n_embd}, vocab_size {config.vocab_size}, n_positions {config.block_size}) "
                             f"needs {list(shape)}")
        state[quill] = t.t() if transposed else t
    weights.pop("lm_head.weight", None)  # tied: the same matrix as wte
    wpe = weights.pop("wpe.weight", None) if config.n_layer == 0 else None
    if wpe is not None and bool(wpe.any()):
        raise QuillError(f"{source}: a GPT-2 with no layers that adds position embeddings is not a model Quill runs",
                         hint="Quill's model with no layers (a bigram model) has no positions")
    if weights:
        raise QuillError(f"{source} has weights GPT-2 does not have: {', '.join(sorted(weights)[:5])}")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer


def gpt2_config(path: Path) -> GPTConfig:
    """The Quill config of a GPT-2 config.json; anything GPT-2-like Quill cannot run is named."""
    from .model import GPTConfig  # imports torch: loaded when first used

    if not path.is_file():
        raise QuillError(f"{path.parent} has no config.json: it is not a HuggingFace model directory")
    raw = read_json_object(path)
    kind = raw.get("model_type")
    if kind != "gpt2":
        names = raw.get("architectures")
        names = ", ".join(map(str, names)) if isinstance(names, list) else str(names or "")
        described = f"a {kind} model" if isinstance(kind, str) and kind else "a model with no model_type"
        raise QuillError(f"{path} describes {described}{f' ({names})' if names else ''}, not GPT-2",
                         hint="quill import reads GPT-2 models (model_type \"gpt2\")")
    c = {**GPT2_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
        if key in c and not (type(c[key]) is int and c[key] >= (0 if key == "n_layer" else 1)):
            raise QuillError(f"{path}: {key} must be a positive whole number, not {c[key]!r}")
    for key, kind, what in (("activation_function", str, "a name"), ("layer_norm_epsilon", (int, float), "a number"),
                            ("tie_word_embeddings", bool, "true or false"), ("scale_attn_weights", bool, "true or false"),
                            ("scale_attn_by_inverse_layer_idx", bool, "true or false"),
                            ("add_cross_attention", bool, "true or false")):
        if key in c and (not isinstance(c[key], kind) or (kind is not bool and isinstance(c[key], bool))):
            raise QuillError(f"{path}: {key} must be {what}, not {c[key]!r}")
    refusals = [
        (c["activation_function"] not in IMPORT_ACTIVATION, f"activation_function {c['activation_function']!r} "
                                                            f"(Quill runs {', '.join(IMPORT_ACTIVATION)})"),
        (c.get("n_inner") not in (None, 4 * c["n_embd"]), f"n_inner {c.get('n_inner')} (Quill's MLP is 4 x n_embd wide)"),
        (not math.isclose(c["layer_norm_epsilon"], 1e-5), f"layer_norm_epsilon {c['layer_norm_epsilon']} (Quill's is 1e-5)"),
        (c.get("scale_attn_weights") is False, "scale_attn_weights false"),
        (bool(c.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx"),
        (bool(c.get("add_cross_attention")), "add_cross_attention (an encoder-decoder GPT-2)"),
    ]
    unsupported = [what for bad, what in refusals if bad]
    if unsupported:
        raise QuillError(f"{path}: this GPT-2 variant has {'; '.join(unsupported)}, which Quill's model does not run")
    try:
        return GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"],
                         n_head=c["n_head"], n_embd=c["n_embd"], bias=True, position="learned", norm="layernorm",
                         mlp=IMPORT_ACTIVATION[c["activation_function"]], tie_embeddings=c["tie_word_embeddings"])
    except QuillError as exc:
        raise QuillError(f"{path}: {exc.message}", hint=exc.hint) from None


def read_weights(directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(the file read, GPT-2's weights by name): model.safetensors (or its shards),
    else pytorch_model.bin, unpickled with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = [directory / "model.safetensors"]
    if not files[0].is_file() and index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise QuillError(f"{index} is not a safetensors index (no weight_map)") from None
        files = [directory / name for name in shards]
    if all(f.is_file() for f in files):
        weights = {}
        for f in files:
            try:
                weights.update(load_file(f))
            except (SafetensorError, OSError) as exc:
                raise QuillError(f"{f} is not a readable safetensors file: {str(exc).splitlines()[0][:160]}") from None
        source = str(files[0]) if len(files) == 1 else f"{index}'s shards"
    elif (directory / "pytorch_model.bin").is_file():
        source, weights = str(directory / "pytorch_model.bin"), _read_bin(directory / "pytorch_model.bin")
    else:
        missing = ", ".join(f.name for f in files if not f.is_file())
        raise QuillError(f"{directory} has no weights: {missing} missing, and no pytorch_model.bin")
    return source, _gpt2_names(weights, source)


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise QuillError(f"refused to read {path}: unpickling it would need more than tensors "
                         f"({str(exc).strip().splitlines()[-1][:160]})",
                         hint="a PyTorch weights file holds only tensors; this one may run code, so it was not opened") from None
    except Exception as exc:  # truncated zips, not a torch file at all, ...
        raise QuillError(f"{path} is not a readable PyTorch weights file: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise QuillError(f"{path} does not hold a dictionary of named tensors")
    return data


def _gpt2_names(weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Weights by GPT-2's short names: without the `transformer.` prefix that
    GPT2LMHeadModel adds, and without the causal-mask buffers old files carry."""
    out = {}
    for name, t in weights.items():
        short = name.removeprefix("transformer.")
        if short.endswith((".attn.bias", ".attn.masked_bias")):  # not c_attn.bias: "_attn" there
            continue
        out[short] = t.float() if t.is_floating_point() else t
    return out
