"""Choosing the generation path by measurement (calibrate.py): the choice, its cache, and who sees it.

conftest pins QUILL_GENERATION_PATH=float32 for the suite; these tests unpin it
and give each test a cache file of its own.
"""

from __future__ import annotations

import json

import pytest
import torch

from generation_helpers import tiny_gpt
from gpt_runtime import calibrate
from gpt_runtime.calibrate import Choice, GenerationPath, Trial, candidates, choose, prepare
from gpt_runtime.checkpoint import save_checkpoint
from gpt_runtime.errors import QuillError, QuillWarning
from gpt_runtime.inference import Bf16Linear, Int8Linear, fbgemm_unavailable
from helpers import SAMPLE_TEXT, run_quill
from plugins.backends import CpuBackend
from plugins.char_tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # steady timings on a busy 2-core machine
CPU = CpuBackend()
ALL = ["float32", "bfloat16"] + (["int8"] if fbgemm_unavailable() is None else [])


@pytest.fixture(autouse=True)
def unpinned(monkeypatch, tmp_path):
    monkeypatch.delenv("QUILL_GENERATION_PATH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "quill" / "generation-paths.json"


@pytest.fixture(scope="module")
def model():
    return tiny_gpt(40, block_size=64)


def test_the_first_use_measures_every_candidate_and_caches_the_choice(model, unpinned):
    choice = choose(model, CPU)
    assert choice.source == "measured" and 0 < choice.seconds < 30
    assert [t.path for t in choice.trials] == ALL
    reference = choice.trials[0]
    assert (reference.kl, reference.agreement, reference.refused) == (0.0, 1.0, "")
    assert all(t.decode_ms > 0 and t.prefill_ms > 0 and t.kl >= 0 and 0 <= t.agreement <= 1 for t in choice.trials)
    # How close bf16 and int8 come depends on the CPU's kernels: only the rule is the same everywhere
    assert all(bool(t.refused) == bool(calibrate._refusal(t, reference)) for t in choice.trials[1:])
    chosen, = [t for t in choice.trials if t.path == choice.path.name]
    assert not chosen.refused
    entries = json.loads(unpinned.read_text())["entries"]
    assert len(entries) == 1 and entries[0]["path"]["dtype"] == choice.path.dtype
    assert entries[0]["key"]["torch"] == torch.__version__ and entries[0]["key"]["model"]["n_embd"] == 32


def test_the_next_use_reads_the_cache_without_measuring(model, monkeypatch):
    first = choose(model, CPU)
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured again"))
    again = choose(model, CPU)
    assert again.source == "cached" and again.path == first.path and again.trials == first.trials


@pytest.mark.parametrize("change", ["torch", "hardware", "threads", "shape"])
def test_a_new_torch_machine_thread_count_or_shape_is_measured_again(model, monkeypatch, change):
    choose(model, CPU)
    other = model
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "hardware":
        monkeypatch.setattr(calibrate, "hardware_id", lambda backend: "another CPU avx512f")
    elif change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    else:
        other = tiny_gpt(40, block_size=64, n_embd=48)
    assert choose(other, CPU).source == "measured"


def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(model, unpinned):
    unpinned.parent.mkdir(parents=True)
    unpinned.write_text("{not json")
    with pytest.warns(QuillWarning, match=f"ignoring the generation path cache {unpinned}"):
        choice = choose(model, CPU)
    assert choice.source == "measured"
    assert len(json.loads(unpinned.read_text())["entries"]) == 1


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(model, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.warns(QuillWarning, match="cannot save the generation path cache"):
        choice = choose(model, CPU, cache_file=blocked / "paths.json")
    assert choice.source == "measured"


def test_the_rule_takes_the_fastest_acceptable_path_that_beats_float32_clearly():
    paths = [GenerationPath("float32"), GenerationPath("bfloat16"), GenerationPath("float32", "int8")]

    def trials(bf16_ms, int8_ms, int8_refused=""):
        return [Trial("float32", 4.0, 10, 0, 1), Trial("bfloat16", bf16_ms, 10, 1e-5, 1),
                Trial("int8", int8_ms, 8, 1e-3, 1, int8_refused)]

    assert calibrate._best(paths, trials(2.6, 2.4)).name == "int8"
    assert calibrate._best(paths, trials(2.6, 2.4, "KL 0.02 > 0.005")).name == "bfloat16"
    assert calibrate._best(paths, trials(3.9, 3.95)).name == "float32"  # under MIN_GAIN: exactness wins
    cuda = [GenerationPath("float32", graph=True), GenerationPath("float32"), GenerationPath("bfloat16", graph=True)]
    timed = [Trial("float32", 4.0, 10, 0, 1), Trial("float32 graph", 1.0, 10, 0, 1), Trial("bfloat16 graph", 0.95, 8, 1e-4, 1)]
    assert calibrate._best(cuda, timed).name == "float32 graph"  # lossy must beat the fastest exact path
    asked = [GenerationPath("bfloat16")]  # a dtype the user asked for is theirs even when refused
    refused = [Trial("float32", 4.0, 10, 0, 1), Trial("bfloat16", 5.0, 10, 0.1, 0.5, "KL 0.1 > 0.005")]
    assert calibrate._best(asked, refused).name == "bfloat16"


def test_a_path_far_from_float32_is_refused_with_the_reason(model, monkeypatch):
    monkeypatch.setattr(calibrate, "MAX_KL", -1.0)  # nothing but float32 itself can be this close
    choice = choose(model, CPU)
    assert choice.path.name == "float32"
    assert all(t.refused.startswith("KL ") for t in choice.trials[1:])


def test_asking_for_a_dtype_or_int8_narrows_the_candidates_without_measuring(model, monkeypatch):
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured"))
    assert choose(model, CPU, "float32") == Choice(GenerationPath("float32"), "asked")
    assert choose(model, CPU, "bf16").path == GenerationPath("bfloat16")
    assert choose(model, CPU, "auto", "int8").path == GenerationPath("float32", "int8")
    assert [p.name for p in candidates(CPU, "auto", "none")] == ["float32", "bfloat16"]
    with pytest.raises(QuillError, match="unknown dtype 'float8'"):
        choose(model, CPU, "float8")


def test_the_environment_pins_a_path(model, monkeypatch):
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setenv("QUILL_GENERATION_PATH", "int8")
    assert choose(model, CPU) == Choice(GenerationPath("float32", "int8"), "pinned")
    assert choose(model, CPU, "float32").path.name == "float32"  # flags still win
    monkeypatch.setenv("QUILL_GENERATION_PATH", "bf16")  # spelled as provenance records it, so replays match
    assert choose(model, CPU).path == GenerationPath("bfloat16")
    for name in ("fast please", "auto", "float32 graph", "int8 graph"):  # graphs are CUDA's, and int8 the CPU's
        monkeypatch.setenv("QUILL_GENERATION_PATH", name)
        with pytest.raises(QuillError, match=f"QUILL_GENERATION_PATH={name!r} is not a generation path here"):
            choose(model, CPU)


@pytest.mark.parametrize("name, layer", [("bfloat16", Bf16Linear), ("int8", Int8Linear)])
def test_prepare_follows_the_choice(model, monkeypatch, name, layer):
    import copy

    monkeypatch.setenv("QUILL_GENERATION_PATH", name)
    prepared, choice = prepare(copy.deepcopy(model), CPU)
    assert choice.path.name == name and isinstance(prepared.lm_head, layer)


# --- who sees the choice -----------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path, model):
    tok = CharTokenizer.train(SAMPLE_TEXT)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tiny_gpt(tok.vocab_size, block_size=64), tok, step=3)
    return path


def test_quill_generate_measures_once_and_doctor_shows_the_measurement(checkpoint, tmp_path):
    env = {"QUILL_GENERATION_PATH": ""}
    first = run_quill("generate", str(checkpoint), "--prompt", "First", "--max-new-tokens", "5", env=env)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    cache = tmp_path / "cache" / "quill" / "generation-paths.json"
    entry, = json.loads(cache.read_text())["entries"]
    stamp = cache.stat().st_mtime_ns
    again = run_quill("generate", str(checkpoint), "--prompt", "First", "--max-new-tokens", "5", env=env)
    assert again.returncode == 0 and cache.stat().st_mtime_ns == stamp  # read, not measured again
    report = json.loads(run_quill("doctor", "--json", env=env).stdout)
    row, = report["choices"]["generation"]["measured"]
    name = entry["path"]["quantize"] if entry["path"]["quantize"] != "none" else entry["path"]["dtype"]
    assert row["path"] == name and row["model"].startswith("2x32, vocab 38 (learned, layernorm, gelu")
    assert [t["path"] for t in row["trials"]] == ALL
    text = run_quill("doctor", env=env).stdout.decode()
    assert "\n  generation 2x32, vocab 38 " in text and "ms per token: float32 " in text


def test_a_chat_reply_records_its_path_and_replay_refuses_another(checkpoint, tmp_path, monkeypatch):
    from gpt_runtime.session import ChatSession

    monkeypatch.setenv("QUILL_PROFILES", str(tmp_path / "profiles"))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.toml").write_text(f'checkpoint = "{checkpoint}"\n[generation]\nmax_new_tokens = 5\n'
                                                 '[template]\nuser_prefix = "A: "\nmodel_prefix = "F: "\n')
    monkeypatch.setenv("QUILL_GENERATION_PATH", "bfloat16")
    s = ChatSession("p")
    list(s.send("First"))
    assert s.turns[0].provenance.path == "bfloat16" and s.describe()["path"] == "bfloat16"
    assert s.replay(1)[0] == s.replay(1)[1]
    monkeypatch.setenv("QUILL_GENERATION_PATH", "float32")
    s.use_profile("p")  # loads it again: along float32 now
    with pytest.raises(QuillError, match="reply 1 was generated along the bfloat16 path") as info:
        s.replay(1)
    assert "QUILL_GENERATION_PATH='bfloat16'" in info.value.hint


def test_agreement_counts_only_positions_where_float32_has_a_clear_favourite():
    # Three positions: a clear favourite kept, a clear favourite lost, a near-tie swapped (not counted)
    reference = torch.log_softmax(torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.02, 0.0]]), -1)
    other = torch.log_softmax(torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.02, 1.0, 0.0]]), -1)
    assert calibrate._agreement(reference, other) == 0.5
    flat = torch.log_softmax(torch.zeros(4, 5), -1)  # an untrained model: nothing is clear
    assert calibrate._agreement(flat, torch.log_softmax(torch.randn(4, 5), -1)) == 1.0
