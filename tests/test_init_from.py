"""`quill train --init-from SOURCE`: a new run that starts from a checkpoint's weights and shape."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import gpt_runtime.train as train_module
from gpt_runtime.checkpoint import load_checkpoint, read_metadata
from gpt_runtime.config import TrainConfig
from gpt_runtime.data import prepare
from gpt_runtime.errors import QuillError
from gpt_runtime.fileio import file_sha256
from gpt_runtime.init_from import grown_vocabulary, take_source_shape
from gpt_runtime.profiles import SHIPPED_DIR
from gpt_runtime.sources import checkpoint_source, tokenizer_source
from gpt_runtime.train import train
from helpers import SAMPLE_TEXT, one_line_error, quill_env, run_quill
from plugins.char_tokenizer import CharTokenizer

SHAPE = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, position="rope", norm="rmsnorm", mlp="swiglu")


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch):
    monkeypatch.setattr(train_module, "peak_flops", lambda backend, dtype: (1e12, "a stand-in"))


def settings(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), batch_size=4, max_steps=4, warmup_steps=1, eval_interval=2,
                  eval_steps=2, log_interval=1, device="cpu", dtype="float32", lr=3e-3)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> dict:
    """A small model trained from scratch, and its data."""
    root = tmp_path_factory.mktemp("parent")
    (root / "corpus.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    tok = CharTokenizer.train(SAMPLE_TEXT)
    prepare(root / "corpus.txt", tok, root / "data")
    train(settings(root / "data", root / "run", max_steps=6, **SHAPE))
    return {"root": root, "data": root / "data", "run": root / "run", "tok": tok}


def fine_tune(parent: dict, out: Path, source: str, **overrides) -> TrainConfig:
    cfg = take_source_shape(settings(parent["data"], out, init_from=source, **overrides), set(overrides))
    train(cfg)
    return cfg


@pytest.mark.parametrize("kind", ["file", "run directory", "profile"])
def test_a_run_starts_from_each_kind_of_source(parent, tmp_path, monkeypatch, kind):
    best = parent["run"] / "best.safetensors"
    source = {"file": str(best), "run directory": str(parent["run"]), "profile": "parent"}[kind]
    if kind == "profile":
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "parent.toml").write_text(f'checkpoint = {json.dumps(str(best))}\n')
        monkeypatch.setenv("QUILL_PROFILES", str(tmp_path / "profiles"))
    cfg = fine_tune(parent, tmp_path / "child", source, max_steps=1, eval_interval=1, lr=0.0, min_lr=0.0, warmup_steps=0)
    assert {name: getattr(cfg, name) for name in SHAPE} == SHAPE  # the shape came from the source
    child, original = load_checkpoint(tmp_path / "child" / "last.safetensors"), load_checkpoint(best)
    # With a learning rate of 0 the one step changes nothing: the weights are the source's.
    for (name, a), b in zip(child.model.state_dict().items(), original.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert child.init_from == {"source": str(best), "sha256": file_sha256(best), "step": original.step,
                               "tokenizer_fingerprint": parent["tok"].fingerprint, "new_tokens": 0}


def test_shape_settings_that_differ_are_refused_each_by_name(parent, tmp_path):
    cfg = settings(parent["data"], tmp_path / "x", init_from=str(parent["run"]), n_layer=3, n_embd=32, dropout=0.1)
    with pytest.raises(QuillError) as caught:
        take_source_shape(cfg, {"n_layer", "n_embd", "dropout"})
    assert "n_layer = 3 (it has 2)" in caught.value.message and "n_embd = 32 (it has 16)" in caught.value.message
    assert "--n-layer, --n-embd" in caught.value.hint
    # The same values are no change; dropout is free; untold shape settings are filled in.
    same = take_source_shape(replace(cfg, n_layer=2, n_embd=16), {"n_layer", "n_embd", "dropout"})
    assert same.dropout == 0.1 and same.mlp == "swiglu"
    # train() called directly with a shape the source does not have is refused too.
    with pytest.raises(QuillError, match="n_layer = 6, but the source has 2"):
        train(settings(parent["data"], tmp_path / "y", init_from=str(parent["run"])))


def test_data_from_another_tokenizer_is_refused_naming_both(parent, tmp_path):
    other = CharTokenizer.train(SAMPLE_TEXT + "ZQX")
    prepare(parent["root"] / "corpus.txt", other, tmp_path / "other")
    cfg = take_source_shape(settings(tmp_path / "other", tmp_path / "x", init_from=str(parent["run"])), set())
    with pytest.raises(QuillError) as caught:
        train(cfg)
    assert parent["tok"].fingerprint in caught.value.message and other.fingerprint in caught.value.message


def test_a_source_that_is_missing_or_not_a_checkpoint_is_named(parent, tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    for source, words in [(str(tmp_path / "nothing.safetensors"), "does not exist"),
                          ("no-such-profile", "neither a file, a run directory nor a profile"),
                          (str(tmp_path / "notes.safetensors"), "not a safetensors file")]:
        with pytest.raises(QuillError, match=words):
            take_source_shape(settings(parent["data"], tmp_path / "x", init_from=source), set())


def test_an_interrupted_fine_tune_resumes_exactly(parent, tmp_path):
    whole = fine_tune(parent, tmp_path / "whole", str(parent["run"]), max_steps=4, dropout=0.1)
    fine_tune(parent, tmp_path / "split", str(parent["run"]), max_steps=2, dropout=0.1)
    train(replace(whole, out=str(tmp_path / "split")), resume=True)
    a, b = (load_checkpoint(tmp_path / run / "last.safetensors") for run in ("whole", "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.init_from == b.init_from and b.init_from["step"] == load_checkpoint(parent["run"]).step


def test_an_extended_vocabulary_grows_the_model_keeping_every_old_row(parent, tmp_path):
    old = parent["tok"]
    extended = CharTokenizer([*old.chars, "é", "ß"])
    (tmp_path / "new.txt").write_text(SAMPLE_TEXT.replace("e", "é").replace("s", "ß"), encoding="utf-8")
    prepare(tmp_path / "new.txt", extended, tmp_path / "data")
    cfg = take_source_shape(settings(tmp_path / "data", tmp_path / "child", init_from=str(parent["run"]),
                                     max_steps=1, eval_interval=1, lr=0.0, min_lr=0.0, warmup_steps=0), set())
    train(cfg)
    child, source = load_checkpoint(tmp_path / "child" / "last.safetensors"), load_checkpoint(parent["run"])
    wte, before = child.model.wte.weight, source.model.wte.weight
    assert wte.shape[0] == old.vocab_size + 2 and child.model.lm_head.weight.shape[0] == old.vocab_size + 2
    assert torch.equal(wte[:old.vocab_size], before)
    assert torch.allclose(wte[old.vocab_size:], before.mean(0).expand(2, -1))
    assert child.init_from["new_tokens"] == 2 and child.tokenizer.fingerprint == extended.fingerprint


def test_untied_output_rows_grow_from_their_own_mean():
    weights = {"wte.weight": torch.randn(5, 3), "lm_head.weight": torch.randn(5, 3), "norm.weight": torch.ones(3)}
    grown = grown_vocabulary(weights, 7)
    for name in ("wte.weight", "lm_head.weight"):
        assert torch.equal(grown[name][:5], weights[name])
        assert torch.allclose(grown[name][5:], weights[name].mean(0).expand(2, -1))
    assert grown["norm.weight"] is weights["norm.weight"]


def test_the_cli_fine_tunes_a_shipped_profile_and_check_shows_where_it_started(tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_SHIPPED_PROFILES", str(SHIPPED_DIR))
    tok = tokenizer_source("shakespeare-char")
    (tmp_path / "corpus.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    prepare(tmp_path / "corpus.txt", tok, tmp_path / "data")
    out = tmp_path / "run"
    common = ["--data", str(tmp_path / "data"), "--out", str(out), "--device", "cpu", "--batch-size", "2",
              "--eval-steps", "1", "--eval-interval", "1"]
    refused = run_quill("train", "--init-from", "shakespeare-char", "--n-layer", "2", "--block-size", "64", *common,
                        env=quill_env())
    message, hint = one_line_error(refused)
    assert "n_layer = 2" in message and "block_size = 64" in message and "--n-layer, --block-size" in hint
    done = run_quill("train", "--init-from", "shakespeare-char", "--max-steps", "1", "--dropout", "0.1", *common,
                     env=quill_env())
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    shipped = read_metadata(checkpoint_source("shakespeare-char"))
    assert json.loads(read_metadata(out / "last.safetensors")["init_from"])["step"] == int(shipped["step"])
    check = run_quill("check", str(out), env=quill_env())
    assert check.returncode == 0
    assert "started from" in check.stdout.decode() and "model.safetensors at step" in check.stdout.decode()
    assert json.loads(run_quill("check", str(out), "--json", env=quill_env()).stdout)["init_from"]["sha256"]
