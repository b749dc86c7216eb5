"""Checkpoints: round trips, tokenizer checks, damaged files, resume state, and atomic writes under SIGKILL."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gpt_runtime.checkpoint import (
    load_checkpoint,
    load_resume_state,
    read_metadata,
    resolve_checkpoint_path,
    save_checkpoint,
    save_resume_state,
)
from gpt_runtime.errors import QuillError
from gpt_runtime.model import GPT, GPTConfig
from plugins.char_tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer(list("\n !,.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def make_model(tok, seed: int = 0, **overrides) -> GPT:
    values = dict(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    values.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**values)).eval()


def logits_of(model: GPT) -> torch.Tensor:
    x = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        return model(x)[0]


# --- round trip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": False, "position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": True},
    {"n_layer": 0},
])
def test_round_trip(tmp_path, tok, overrides):
    model = make_model(tok, seed=3, **overrides)
    args = {"lr": 0.003, "data": "data/x", "n_layer": model.config.n_layer}
    save_checkpoint(tmp_path / "c.safetensors", model, tok, step=42, val_loss=1.2345678901234567, train_args=args)
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert ckpt.path == tmp_path / "c.safetensors"
    assert ckpt.config == model.config
    assert ckpt.step == 42 and ckpt.val_loss == 1.2345678901234567 and ckpt.train_args == args
    assert ckpt.tokenizer.fingerprint == tok.fingerprint and ckpt.tokenizer.encode("Speak") == tok.encode("Speak")
    assert not ckpt.model.training
    assert torch.equal(logits_of(ckpt.model), logits_of(model))
    for name, p in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], p), name
    assert (ckpt.model.lm_head.weight is ckpt.model.wte.weight) == model.config.tie_embeddings


def test_tied_weights_are_stored_once(tmp_path, tok):
    from safetensors import safe_open

    for tie in (True, False):
        path = tmp_path / f"{tie}.safetensors"
        save_checkpoint(path, make_model(tok, tie_embeddings=tie), tok, step=1)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        assert "wte.weight" in keys
        assert ("lm_head.weight" in keys) == (not tie)
    tied, untied = (tmp_path / "True.safetensors").stat().st_size, (tmp_path / "False.safetensors").stat().st_size
    embedding_bytes = tok.vocab_size * 16 * 4
    assert untied - tied >= embedding_bytes  # the second copy is the whole difference (plus its header entry)
    assert untied - tied < embedding_bytes + 200


def test_val_loss_none_and_metadata(tmp_path, tok):
    save_checkpoint(tmp_path / "c.safetensors", make_model(tok), tok, step=0)
    assert load_checkpoint(tmp_path / "c.safetensors").val_loss is None
    meta = read_metadata(tmp_path / "c.safetensors")
    assert meta["format"] == "quill-checkpoint" and meta["tokenizer_fingerprint"] == tok.fingerprint
    assert json.loads(meta["config"])["n_embd"] == 16


def test_a_run_directory_means_its_best_checkpoint_else_its_last(tmp_path, tok):
    save_checkpoint(tmp_path / "last.safetensors", make_model(tok), tok, step=9)
    assert resolve_checkpoint_path(tmp_path) == tmp_path / "last.safetensors"
    assert load_checkpoint(tmp_path).step == 9
    save_checkpoint(tmp_path / "best.safetensors", make_model(tok), tok, step=5)
    assert load_checkpoint(tmp_path).step == 5


# --- tokenizer checks -----------------------------------------------------------------------------

def test_loading_with_the_matching_tokenizer(tmp_path, tok):
    save_checkpoint(tmp_path / "c.safetensors", make_model(tok), tok, step=1)
    tok.save(tmp_path / "tok.json")
    assert load_checkpoint(tmp_path / "c.safetensors", tokenizer=tmp_path / "tok.json").step == 1
    assert load_checkpoint(tmp_path / "c.safetensors", tokenizer=tok).step == 1


def test_loading_with_another_tokenizer_names_both_fingerprints(tmp_path, tok):
    save_checkpoint(tmp_path / "c.safetensors", make_model(tok), tok, step=1)
    other = CharTokenizer(list("abc"))
    other.save(tmp_path / "other.json")
    for given in (tmp_path / "other.json", other):
        with pytest.raises(QuillError) as info:
            load_checkpoint(tmp_path / "c.safetensors", tokenizer=given)
        message = str(info.value)
        assert tok.fingerprint in message and other.fingerprint in message
        assert "c.safetensors" in message
    with pytest.raises(QuillError, match=r"other\.json"):
        load_checkpoint(tmp_path / "c.safetensors", tokenizer=tmp_path / "other.json")


# --- damaged and foreign files ---------------------------------------------------------------------

@pytest.fixture
def good(tmp_path, tok) -> bytes:
    save_checkpoint(tmp_path / "good.safetensors", make_model(tok), tok, step=1)
    return (tmp_path / "good.safetensors").read_bytes()


@pytest.mark.parametrize("keep", [0, 4, 8, 100, 0.5, 0.99])
def test_truncated_checkpoint(tmp_path, good, keep):
    n = int(len(good) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good[:n])
    with pytest.raises(QuillError, match=r"cut\.safetensors") as info:
        load_checkpoint(path)
    assert any(word in str(info.value) for word in ("truncated", "corrupt"))


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(QuillError, match=r"noise\.safetensors' is truncated or not a safetensors file"):
        load_checkpoint(path)


def test_a_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n" * 10)
    with pytest.raises(QuillError, match=r"notes\.txt' is truncated or not a safetensors file"):
        load_checkpoint(path)


def test_a_safetensors_file_without_quill_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(QuillError, match=r"foreign\.safetensors' is a safetensors file but not a Quill checkpoint"):
        load_checkpoint(path)


def test_a_newer_format_version(tmp_path, good):
    from safetensors.torch import load, save

    meta = read_metadata(tmp_path / "good.safetensors")
    path = tmp_path / "future.safetensors"
    path.write_bytes(save(load(good), metadata={**meta, "version": "99"}))
    with pytest.raises(QuillError, match=r"future\.safetensors' has format version 99") as info:
        load_checkpoint(path)
    assert "upgrade" in info.value.hint


@pytest.mark.parametrize("change", [
    {"config": "{not json"},
    {"step": "many"},
    {"tokenizer": "{}"},
    {"config": json.dumps({"n_layers": 2})},  # unknown key
    {"config": json.dumps({"n_embd": 30, "n_head": 4})},  # impossible value
    {"config": json.dumps({"n_embd": "16"})},  # wrong type
])
def test_malformed_metadata(tmp_path, good, change):
    from safetensors.torch import load, save

    meta = read_metadata(tmp_path / "good.safetensors")
    path = tmp_path / "bad.safetensors"
    path.write_bytes(save(load(good), metadata={**meta, **change}))
    with pytest.raises(QuillError, match=r"bad\.safetensors"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config(tmp_path, tok, good):
    from safetensors.torch import load, save

    meta = read_metadata(tmp_path / "good.safetensors")
    config = {**json.loads(meta["config"]), "n_layer": 3}  # the file holds 2 blocks
    path = tmp_path / "mismatch.safetensors"
    path.write_bytes(save(load(good), metadata={**meta, "config": json.dumps(config)}))
    with pytest.raises(QuillError, match=r"mismatch\.safetensors' does not match its config \(missing \['blocks\.2\."):
        load_checkpoint(path)


def test_missing_file_and_empty_run_directory(tmp_path):
    with pytest.raises(QuillError, match=r"checkpoint '.*nothing\.safetensors' does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "run").mkdir()
    with pytest.raises(QuillError, match=r"run directory '.*run' has no checkpoint \(best\.safetensors or last\.safetensors\)"):
        load_checkpoint(tmp_path / "run")


# --- resume state ---------------------------------------------------------------------------------

def test_resume_state_round_trip(tmp_path, tok):
    model = make_model(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    state = {"config": {"lr": 1e-3, "out": "runs/x"}, "step": 7, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "data_rng": torch.Generator().manual_seed(3).get_state(), "torch_rng": torch.get_rng_state(),
             "best_val_loss": 2.5, "last_val_loss": None, "tokenizer_fingerprint": tok.fingerprint}
    save_resume_state(tmp_path / "last.state.pt", state)
    loaded = load_resume_state(tmp_path / "last.state.pt")
    assert loaded["step"] == 7 and loaded["best_val_loss"] == 2.5 and loaded["last_val_loss"] is None
    assert loaded["config"] == state["config"] and loaded["tokenizer_fingerprint"] == tok.fingerprint
    assert torch.equal(loaded["data_rng"], state["data_rng"]) and torch.equal(loaded["torch_rng"], state["torch_rng"])
    restored = torch.optim.AdamW(make_model(tok, seed=1).parameters(), lr=1e-3)
    restored.load_state_dict(loaded["optimizer"])
    exp_avg = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, restored.state_dict()["state"].values()))


class _Payload:
    """An object whose unpickling would run code: creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_state_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"step": 1, "payload": _Payload(str(marker))}, buffer)
    (tmp_path / "last.state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(QuillError, match=r"resume state '.*last\.state\.pt' is corrupt or not Quill's"):
        load_resume_state(tmp_path / "last.state.pt")
    assert not marker.exists()


def test_resume_state_damaged_or_missing(tmp_path):
    save_resume_state(tmp_path / "s.pt", {"step": 3, "w": torch.ones(1000)})
    raw = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QuillError, match=r"resume state '.*s\.pt' is corrupt"):
        load_resume_state(tmp_path / "s.pt")
    with pytest.raises(QuillError, match=r"no resume state at '.*nope\.pt'") as info:
        load_resume_state(tmp_path / "nope.pt")
    assert "--resume" in info.value.hint


# --- atomic writes under SIGKILL ------------------------------------------------------------------

# Imports torch once, then forks a writer per request: each writer saves checkpoints of
# alternating content (seed = step % 2) to the same path until it is killed.
WRITER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.model import GPT, GPTConfig
    from plugins.char_tokenizer import CharTokenizer

    path = sys.argv[1]
    tok = CharTokenizer(list("abcdefgh"))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=256)))
    save_checkpoint(path, models[0], tok, step=0)
    print("ready", flush=True)
    step = 1
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            while True:
                save_checkpoint(path, models[step % 2], tok, step=step)
                step += 1
        print(pid, flush=True)
        os.waitpid(pid, 0)
        step += 1_000_000  # the next writer's steps never repeat this one's
        print("reaped", flush=True)
""")


def test_a_killed_writer_never_leaves_a_partial_checkpoint(tmp_path):
    path = tmp_path / "last.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    expected = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=12, block_size=32, n_layer=2, n_head=4, n_embd=256))
        expected[seed] = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(1234)
    steps_seen = set()
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(8):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(pid, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "reaped"
            ckpt = load_checkpoint(path)  # complete: old or new content, never a mix or a stub
            steps_seen.add(ckpt.step)
            weights = ckpt.model.state_dict()
            for name, tensor in expected[ckpt.step % 2].items():
                assert torch.equal(weights[name], tensor), f"step {ckpt.step}: {name} is not the content saved at that step"
            others = {p.name for p in tmp_path.iterdir()} - {path.name}
            assert all(name.startswith(".last.safetensors.") and name.endswith(".tmp") for name in others), others
    finally:
        proc.kill()
        proc.wait()
    # Writers saved, and their saves replaced the file (a writer killed before its first save
    # leaves the previous one's; each has its own range of steps).
    assert len(steps_seen) >= 4, steps_seen


# --- quill export: compact weights for shipping ----------------------------------------------------

def test_export_writes_bfloat16_weights_that_load_back_as_the_model(tok, tmp_path):
    from safetensors import safe_open

    from helpers import one_line_error, run_quill

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64))
    save_checkpoint(tmp_path / "full.safetensors", model, tok, step=12, val_loss=2.5, train_args={"lr": 0.01})
    out = run_quill("export", str(tmp_path / "full.safetensors"), "--out", str(tmp_path / "small.safetensors"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith(f"wrote {tmp_path / 'small.safetensors'}: {model.num_params():,} parameters "
                                          "in bfloat16, step 12")
    with safe_open(str(tmp_path / "small.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    full, small = (tmp_path / "full.safetensors").stat().st_size, (tmp_path / "small.safetensors").stat().st_size
    assert small < 0.6 * full
    ckpt = load_checkpoint(tmp_path / "small.safetensors")
    assert (ckpt.step, ckpt.val_loss, ckpt.train_args) == (12, 2.5, {"lr": 0.01})
    assert next(ckpt.model.parameters()).dtype == torch.float32  # upcast on load
    for name, p in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], p.to(torch.bfloat16).float()), name
    idx = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.allclose(ckpt.model(idx)[0], model(idx)[0], atol=0.05)
    # an existing file is kept unless --force
    message, hint = one_line_error(run_quill("export", str(tmp_path / "full.safetensors"), "--out",
                                             str(tmp_path / "small.safetensors")))
    assert (message, hint) == (f"{str(tmp_path / 'small.safetensors')!r} already exists", "pass --force to overwrite it")
    out = run_quill("export", str(tmp_path / "full.safetensors"), "--out", str(tmp_path / "small.safetensors"),
                    "--dtype", "float16", "--force")
    assert out.returncode == 0
    with safe_open(str(tmp_path / "small.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
