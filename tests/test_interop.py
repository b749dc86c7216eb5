"""GPT-2 interoperability, checked against HuggingFace transformers.

`quill export --format hf` must write what `GPT2LMHeadModel` loads, `quill import`
must read what transformers writes, and both sides must compute the same numbers:
logits, greedy continuations and token ids. Every model and tokenizer is made
here with random weights or trained on a few lines; nothing is downloaded.

transformers comes with the `interop` extra, which `make test` installs; without
it these tests skip and say so.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import SAMPLE_TEXT, run_quill

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[interop]' (make test does)")
from tokenizers import ByteLevelBPETokenizer  # noqa: E402  (installed with transformers)
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PreTrainedTokenizerFast  # noqa: E402

from gpt_runtime import commands  # noqa: E402
from gpt_runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gpt_runtime.errors import QuillError  # noqa: E402
from gpt_runtime.generate import Done, Token, generate  # noqa: E402
from gpt_runtime.hf_model import import_hf  # noqa: E402
from gpt_runtime.hf_tokenizer import byte_alphabet, read_gpt2_tokenizer  # noqa: E402
from gpt_runtime.model import GPT, GPTConfig  # noqa: E402
from gpt_runtime.plugins import get_registry  # noqa: E402
from gpt_runtime.sampling import build_chain  # noqa: E402
from gpt_runtime.session import ChatSession  # noqa: E402
from gpt_runtime.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

# Prose, code, emoji (with joiners and flags), CJK, numbers, runs of whitespace.
VARIED = (
    "It was the best of times, it was the worst of times; it's what they'd call 'an age'.\n"
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # 100% fine\n\n"
    "Emoji: 😀🎉👩‍💻 and a flag 🇫🇷. CJK: 你好，世界。日本語のテキストと한국어.\n"
    "Numbers: 3.14159, 1,000,000, 2026-11-22, 0xFF, 1e-5 and ٣٤٥.\n"
    "Whitespace:\t\ttabs,   runs of spaces,\u00a0no-break,\r\n\n\n   trailing   \n"
)
CORPUS = SAMPLE_TEXT + VARIED * 3
EOT = "<|endoftext|>"


@contextmanager
def transformers_log():
    """Everything transformers logs or warns meanwhile."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(caught)
    finally:
        logger.removeHandler(handler)


def hf_trained_tokenizer(vocab_size: int = 500) -> ByteLevelBPETokenizer:
    """A byte-level BPE trained by HuggingFace's own library: its ids are not GPT-2's layout."""
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([CORPUS], vocab_size=vocab_size, min_frequency=1, special_tokens=[EOT], show_progress=False)
    return tok


def write_vocab_and_merges(directory: Path, vocab: dict[str, int], merges: list[str]) -> None:
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_gpt2_layout(directory: Path, pieces: list[bytes], merges: list[tuple[int, int]]) -> None:
    """GPT-2's files for a byte-level BPE, numbered as GPT-2 numbers its tokens: the
    bytes in the order of their printable stand-ins, each merge from 256 on, then <|endoftext|>."""
    alphabet = byte_alphabet()
    spelled = ["".join(alphabet[b] for b in piece) for piece in pieces]
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    lines = []
    for a, b in merges:
        lines.append(f"{spelled[a]} {spelled[b]}")
        vocab.setdefault(spelled[a] + spelled[b], len(vocab))
    vocab[EOT] = len(vocab)
    write_vocab_and_merges(directory, vocab, lines)


def tiny_hf_model(vocab_size: int, eot: int, seed: int = 0, **config) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    shape = dict(n_positions=128, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, bos_token_id=eot, eos_token_id=eot, **{**shape, **config})).eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A small GPT-2 directory as transformers and tokenizers write it."""
    directory = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    directory.mkdir()
    tok = hf_trained_tokenizer()
    tok.save_model(str(directory))
    tiny_hf_model(tok.get_vocab_size(), tok.token_to_id(EOT)).save_pretrained(directory)
    return directory


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0])[0].float()


# --- export ------------------------------------------------------------------------------------

EXPORTS = {
    "bpe, tied, no biases, exact GELU": ("bpe", {}, dict(bias=False, tie_embeddings=True, mlp="gelu")),
    "bpe gpt4 split, untied, biases, tanh GELU": ("bpe", {"pattern": "gpt4"}, dict(bias=True, tie_embeddings=False, mlp="gelu_tanh")),
    "char, tied, biases": ("char", {}, dict(bias=True, tie_embeddings=True, mlp="gelu")),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_an_exported_model_loads_in_transformers_cleanly_and_computes_the_same(tmp_path, case):
    kind, options, arch = EXPORTS[case]
    tok = train_tokenizer(kind, CORPUS, vocab_size=400 if kind == "bpe" else None, **options)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_embd=32, **arch)).eval()
    save_checkpoint(tmp_path / "model.safetensors", model, tok, step=3)
    out = tmp_path / "hf"
    result = run_quill("export", str(tmp_path / "model.safetensors"), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert b"GPT2LMHeadModel.from_pretrained" in result.stdout

    with transformers_log() as log:
        hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not [r for r in log if getattr(r, "levelno", logging.WARNING) >= logging.WARNING], log
    c = hf.config
    assert (c.vocab_size, c.n_positions, c.n_layer, c.n_head, c.n_embd) == (tok.vocab_size, 96, 2, 4, 32)
    assert c.tie_word_embeddings == arch["tie_embeddings"]
    assert c.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[arch["mlp"]]

    ids = tok.encode(VARIED)[:96]
    assert (logits_of(hf.eval(), ids) - logits_of(model, ids)).abs().max().item() <= 1e-4

    hf_tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert hf_tok.encode(VARIED) == tok.encode(VARIED)
    assert hf_tok.decode(tok.encode(VARIED)) == VARIED
    unseen = "Quixotic zebras ☃ vex — ΨΩ; 42 ½\n"  # characters the training text never had
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the char tokenizer warns of its <unk>s
        assert hf_tok.encode(unseen) == tok.encode(unseen)
    if kind == "char":
        assert tok.special_tokens["<unk>"] in hf_tok.encode(unseen)


def test_an_architecture_gpt2_cannot_express_is_refused_naming_each_obstacle(tmp_path):
    tok = train_tokenizer("char", CORPUS)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          position="rope", norm="rmsnorm", mlp="swiglu"))
    save_checkpoint(tmp_path / "rope.safetensors", model, tok, step=1)
    result = run_quill("export", str(tmp_path / "rope.safetensors"), "--format", "hf", "--out", str(tmp_path / "hf"))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert "GPT-2 cannot express this model" in err
    assert "position = rope" in err and "norm = rmsnorm" in err and "mlp = swiglu" in err
    assert not (tmp_path / "hf").exists()


# --- import ------------------------------------------------------------------------------------

def test_a_gpt2_of_gpt2_small_width_imports_with_the_same_logits_and_greedy_continuation(tmp_path):
    directory = tmp_path / "gpt2-small"
    torch.manual_seed(1234)
    # GPT-2 small's width, heads, context and vocabulary, with 2 of its 12 layers: every layer is
    # imported by the same code, and the 10 more cost this test 20 s of the suite's 5 minutes.
    hf = GPT2LMHeadModel(GPT2Config(bos_token_id=50256, eos_token_id=50256, n_layer=2)).eval()
    hf.save_pretrained(directory)
    # A tokenizer of GPT-2's size and layout: 256 bytes, 50,000 merges (here, of two bytes each), <|endoftext|>.
    alphabet = sorted(byte_alphabet())
    pairs = [a + " " + b for a in alphabet for b in alphabet][:50_000]
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {p.replace(" ", ""): 256 + r for r, p in enumerate(pairs)}
    write_vocab_and_merges(directory, vocab | {EOT: 50256}, pairs)

    result = run_quill("import", str(directory), "--out", str(tmp_path / "small.safetensors"), "--no-profile")
    assert result.returncode == 0, result.stderr.decode()
    assert b"53,561,088 parameters" in result.stdout  # GPT-2 small's 124,439,808 less 10 layers of 7,087,872
    ckpt = load_checkpoint(tmp_path / "small.safetensors")
    assert ckpt.tokenizer.vocab_size == 50257 and ckpt.tokenizer.special_tokens == {EOT: 50256}

    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    assert (logits_of(hf, ids) - logits_of(ckpt.model, ids)).abs().max().item() <= 1e-4

    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, pad_token_id=50256)[0, len(ids):].tolist()
    events = list(generate(ckpt.model, ckpt.tokenizer, ids, chain=build_chain("greedy"), max_new_tokens=12, seed=0))
    ours = [e.id for e in events if isinstance(e, Token)]
    assert ours == theirs and len(ours) == 12


def hf_layout_files(directory: Path) -> GPT2TokenizerFast:
    hf_trained_tokenizer().save_model(str(directory))
    return GPT2TokenizerFast.from_pretrained(directory)


def hf_tokenizer_json(directory: Path) -> PreTrainedTokenizerFast:
    hf_trained_tokenizer().save(str(directory / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))


def gpt2_layout_files(directory: Path) -> GPT2TokenizerFast:
    tok = train_tokenizer("bpe", CORPUS, vocab_size=600)
    write_gpt2_layout(directory, tok.pieces, tok.merges)
    return GPT2TokenizerFast.from_pretrained(directory)


TOKENIZER_FILES = {
    "GPT-2's layout, vocab.json + merges.txt": gpt2_layout_files,
    "trained by HF tokenizers, vocab.json + merges.txt": hf_layout_files,
    "trained by HF tokenizers, tokenizer.json only": hf_tokenizer_json,
}


@pytest.mark.parametrize("files", list(TOKENIZER_FILES))
def test_an_imported_tokenizer_gives_transformers_ids(tmp_path, files):
    theirs = TOKENIZER_FILES[files](tmp_path)
    ours = read_gpt2_tokenizer(tmp_path)
    texts = [VARIED, *VARIED.splitlines(keepends=True), "", " leading", "trailing ", "ünïcödé naïveté", "a" * 300]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(theirs.encode(text)) == text
    eot = theirs.convert_tokens_to_ids(EOT)
    assert ours.special_tokens == {EOT: eot}
    assert ours.encode(f"one{EOT}two", allowed_special="all") == theirs.encode(f"one{EOT}two")


def test_a_pytorch_bin_of_tensors_imports_with_its_old_mask_buffers_ignored(gpt2_dir, tmp_path):
    directory = copy_of(gpt2_dir, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 128, 128)  # what GPT-2 files of 2019 carry
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    model, tok = import_hf(directory)
    ids = tok.encode(VARIED)[:100]
    assert (logits_of(hf, ids) - logits_of(model, ids)).abs().max().item() <= 1e-4


def test_sharded_safetensors_and_a_config_that_leaves_gpt2_defaults_out_import(gpt2_dir, tmp_path, monkeypatch):
    import socket

    from safetensors.torch import load_file, save_file

    directory = copy_of(gpt2_dir, tmp_path)
    weights = load_file(directory / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, directory / shard, metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    keep = ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")  # GELU, 1e-5, tied: GPT-2's defaults
    (directory / "config.json").write_text(json.dumps({k: config[k] for k in keep}))

    def no_network(*args, **kwargs):
        raise AssertionError("import tried to use the network")

    with monkeypatch.context() as patch:
        patch.setattr(socket, "socket", no_network)
        patch.setattr(socket, "create_connection", no_network)
        model, tok = import_hf(directory)
    assert (model.config.mlp, model.config.tie_embeddings) == ("gelu_tanh", True)
    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ids = tok.encode(VARIED)[:100]
    assert (logits_of(hf, ids) - logits_of(model, ids)).abs().max().item() <= 1e-4


def test_a_model_with_no_layers_goes_out_with_zero_positions_and_comes_back(tmp_path):
    tok = train_tokenizer("bpe", CORPUS, vocab_size=300)
    torch.manual_seed(0)
    bigram = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=0, n_head=1, n_embd=16)).eval()
    save_checkpoint(tmp_path / "bigram.safetensors", bigram, tok, step=1)
    result = run_quill("export", str(tmp_path / "bigram.safetensors"), "--format", "hf", "--out", str(tmp_path / "hf"),
                       "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr.decode()
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and hf.dtype == torch.bfloat16
    back, back_tok = import_hf(tmp_path / "hf")
    assert back.config.n_layer == 0 and back_tok.encode(VARIED) == tok.encode(VARIED)
    ids = tok.encode(VARIED)[:32]
    assert (logits_of(back, ids) - logits_of(bigram, ids)).abs().max().item() <= 0.05  # bfloat16 weights
    weights = {k: v.float() for k, v in hf.state_dict().items()}
    weights["transformer.wpe.weight"] += 1.0  # positions a bigram model cannot have
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}, tmp_path / "hf" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(QuillError, match="a GPT-2 with no layers that adds position embeddings"):
        import_hf(tmp_path / "hf")


class _RunsCode:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pytorch_bin_that_would_run_code_is_refused_unopened(gpt2_dir, tmp_path):
    directory = copy_of(gpt2_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, directory / "pytorch_model.bin")
    result = run_quill("import", str(directory), "--out", str(tmp_path / "x.safetensors"), "--no-profile")
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert f"refused to read {directory / 'pytorch_model.bin'}" in err
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def set_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BAD_DIRECTORIES = {
    "another architecture": (lambda d: (d / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})),
        "describes a llama model (LlamaForCausalLM), not GPT-2"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "has no config.json: it is not a HuggingFace model directory"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(),
                   "has no weights: model.safetensors missing, and no pytorch_model.bin"),
    "no tokenizer": (lambda d: (d / "merges.txt").unlink(), "has no tokenizer: merges.txt missing, and no tokenizer.json"),
    "shapes that disagree with the config": (lambda d: set_config(d, n_embd=64),
                                              "wte.weight has shape [500, 32], but config.json (n_embd 64, "),
    "a variant Quill does not run": (lambda d: set_config(d, activation_function="relu"), "activation_function 'relu'"),
    "a wider MLP": (lambda d: set_config(d, n_inner=64), "n_inner 64 (Quill's MLP is 4 x n_embd wide)"),
    "unscaled attention": (lambda d: set_config(d, scale_attn_weights=False), "scale_attn_weights false"),
    "cross-attention": (lambda d: set_config(d, add_cross_attention=True), "add_cross_attention"),
    "a tokenizer larger than the model": (lambda d: set_config(d, vocab_size=100), "the tokenizer has 500 tokens but config.json's vocab_size is 100"),
    "a weight GPT-2 does not have": (lambda d: add_weight(d, "transformer.h.0.attn.q_attn.weight"),
                                     "has weights GPT-2 does not have: h.0.attn.q_attn.weight"),
    "no model_type": (lambda d: (d / "config.json").write_text("{}"), "describes a model with no model_type, not GPT-2"),
    "a value of the wrong type": (lambda d: set_config(d, layer_norm_epsilon="1e-5"),
                                  "layer_norm_epsilon must be a number, not '1e-5'"),
    "a token no merge makes": (lambda d: add_token(d, "Ġzzzz"), "'Ġzzzz' (id 500) is made by no merge"),
    "a tokenizer.json that is not byte-level": (lambda d: only_tokenizer_json(d, pre_tokenizer=None),
                                                "is not byte-level BPE (it has no pre-tokenizer)"),
    "a malformed tokenizer.json": (lambda d: only_tokenizer_json(d, added_tokens=[{"id": 3}]),
                                   "added_tokens must be a list of"),
}


def add_token(directory: Path, token: str) -> None:
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    (directory / "vocab.json").write_text(json.dumps({**vocab, token: len(vocab)}), encoding="utf-8")
    set_config(directory, vocab_size=len(vocab) + 1)


def only_tokenizer_json(directory: Path, **changes) -> None:
    (directory / "vocab.json").unlink()
    (directory / "merges.txt").unlink()
    data = json.loads(hf_trained_tokenizer().to_str())
    (directory / "tokenizer.json").write_text(json.dumps({**data, **changes}), encoding="utf-8")


def add_weight(directory: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    save_file({**weights, name: torch.zeros(1)}, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("bad", list(BAD_DIRECTORIES))
def test_a_directory_that_is_not_a_usable_gpt2_is_refused_with_the_reason(gpt2_dir, tmp_path, bad):
    spoil, message = BAD_DIRECTORIES[bad]
    directory = copy_of(gpt2_dir, tmp_path)
    spoil(directory)
    with pytest.raises(QuillError) as exc:
        import_hf(directory)
    assert message in exc.value.message


def test_import_and_export_errors_are_one_line_and_write_nothing(tmp_path):
    result = run_quill("import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors"))
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[0] == f"quill: error: {tmp_path / 'nowhere'} does not exist"
    assert not (tmp_path / "x.safetensors").exists()
    both = run_quill("import", str(tmp_path), "--out", str(tmp_path / "x.safetensors"), "--profile", "a", "--no-profile")
    assert both.returncode == 2 and "--profile and --no-profile contradict each other" in both.stderr.decode()
    (tmp_path / "file").write_text("")
    # --out is checked before the checkpoint is read: model.safetensors need not exist
    onto_file = run_quill("export", str(tmp_path / "model.safetensors"), "--format", "hf", "--out", str(tmp_path / "file"), "--force")
    assert onto_file.returncode == 1 and "is a file" in onto_file.stderr.decode()
    onto_dir = run_quill("export", str(tmp_path / "model.safetensors"), "--out", str(tmp_path), "--force")
    assert onto_dir.returncode == 1 and "is a directory" in onto_dir.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- in the chat -------------------------------------------------------------------------------

@pytest.fixture
def imported(gpt2_dir, tmp_path, monkeypatch) -> str:
    """`quill import` of the small GPT-2 as profile tiny-gpt2, beside a native profile to start from."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("QUILL_PROFILES", str(folder))
    result = run_quill("import", str(gpt2_dir), "--out", str(tmp_path / "tiny.safetensors"), "--profile", "tiny-gpt2",
                       env={"QUILL_PROFILES": str(folder)})
    assert result.returncode == 0, result.stderr.decode()
    assert b"profile 'tiny-gpt2' is ready: quill chat --profile tiny-gpt2" in result.stdout
    tok = train_tokenizer("char", SAMPLE_TEXT)
    torch.manual_seed(0)
    native = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(folder / "native.safetensors", native, tok, step=1)
    (folder / "native.toml").write_text('checkpoint = "native.safetensors"\n')
    return "tiny-gpt2"


def test_an_imported_model_is_a_profile_every_sampler_works_and_decoding_uses_the_kv_cache(imported, gpt2_dir, monkeypatch):
    session = ChatSession("native")
    assert "tiny-gpt2" in commands.run(session, f"/profile {imported}")
    eot = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))[EOT]
    assert session.profile.name == imported and session.loaded.tokenizer.special_tokens == {EOT: eot}
    calls = []
    model = session.loaded.model
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, targets=None, cache=None: (
        calls.append((idx.shape[1], cache is not None)), forward(idx, targets, cache))[1])
    session.set("max_new_tokens", "6")
    session.set("seed", "3")
    samplers = get_registry().names("samplers")
    assert {"temperature", "top_k", "top_p", "min_p", "greedy", "beam"} <= set(samplers)
    for name in samplers:
        session.set_chain(name)
        calls.clear()
        done = list(session.send("Speak, speak."))[-1]
        assert isinstance(done, Done) and done.reason == "length" and done.new_tokens == 6, (name, done)
        # The prompt once, then one token at a time (a row per beam) from the cache.
        assert calls[0][0] > 1 and all(call == (1, True) for call in calls[1:]) and len(calls) >= 6, (name, calls)
    assert len(session.turns) == len(samplers)


def test_a_user_imports_a_gpt2_directory_and_chats_with_it_in_the_full_screen_chat(imported):
    from pilot import run, say, type_command, until

    from tui.app import QuillApp

    app = QuillApp("native")

    async def steps(pilot):
        await type_command(pilot, f"/profile {imported}")
        await until(pilot, lambda: app.profile_name == imported)
        await say(pilot, "Speak")
        assert app.session.turns[-1].provenance.profile == imported

    run(app, steps)


def test_a_taken_profile_name_is_refused_before_any_work_and_the_default_name_steps_aside(imported, gpt2_dir, tmp_path):
    env = {"QUILL_PROFILES": str(tmp_path / "profiles")}
    again = run_quill("import", str(gpt2_dir), "--out", str(tmp_path / "again.safetensors"), "--profile", imported, env=env)
    assert again.returncode == 1 and f"there is already a profile named '{imported}'" in again.stderr.decode()
    assert not (tmp_path / "again.safetensors").exists()
    default = run_quill("import", str(gpt2_dir), "--out", str(tmp_path / "again.safetensors"), env=env)
    assert default.returncode == 0, default.stderr.decode()
    assert f"profile '{gpt2_dir.name}-2' is ready".encode() in default.stdout
    assert (tmp_path / "profiles" / f"{gpt2_dir.name}-2.toml").is_file()


class _Opaque(Tokenizer):
    """Bytes, from a plugin that gives no HuggingFace form (no hf_tokenizer_json)."""

    kind = "opaque"

    def __init__(self) -> None:
        self.special_tokens = {"<eos>": 256}
        self.pieces = [bytes([i]) for i in range(256)] + [b"<eos>"]


def test_a_tokenizer_without_a_huggingface_form_leaves_the_model_and_says_so(tmp_path):
    from gpt_runtime.hf_model import export_hf

    tok = _Opaque()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # left by an earlier export
    notes = export_hf(model, tok, tmp_path / "hf", torch.float32)
    assert notes == ["no tokenizer written: the 'opaque' tokenizer has no HuggingFace form"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.vocab_size == tok.vocab_size
