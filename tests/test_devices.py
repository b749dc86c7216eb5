"""The device lanes: training, resuming, generating, chatting and the CLI on a GPU.

Every test takes the `device` fixture, whose parameters are the devices, each
carrying its pytest marker: `cuda` (`make test-gpu`, `pytest -m cuda`) and `mps`
(`make test-mps`). tests/conftest.py skips a marked test, saying why, where that
backend is not available, before any fixture is built; on a CPU-only machine
the whole file skips. The module fixtures get the device as an argument (they
see QUILL_DEVICE=cpu, which conftest sets per test), so nothing here relies on
`auto` inside them; CLI subprocesses are given `--device` too.

The models are tiny (1-2 layers, 16-32 wide): the whole file takes seconds on a
GPU, apart from the torch.compile test.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import threading

import pytest
import torch

from generation_helpers import ARCHITECTURES, BANNED, BLOCK, cancelled_after, greedy_without_eos, ids_of, tiny_gpt
from generation_helpers import run as run_generation
from gpt_runtime.backend import cuda_matmul_precision, cuda_uses_tf32, dtype_name, get_backend, resolve_dtype
from gpt_runtime.checkpoint import load_checkpoint
from gpt_runtime.config import TrainConfig, saved_config
from gpt_runtime.data import DataDir, prepare
from gpt_runtime.errors import QuillError
from gpt_runtime.evaluate import evaluate
from gpt_runtime.generate import Done, Token, generate_text
from gpt_runtime.calibrate import choose
from gpt_runtime.inference import int8_unavailable, prepare_model
from gpt_runtime.model import KVCache
from gpt_runtime.plugins import get_registry
from gpt_runtime.sampling import build_chain
from gpt_runtime.session import ChatSession
from gpt_runtime.train import train
from helpers import SAMPLE_TEXT, one_line_error, run_quill
from pilot import run as run_app
from pilot import say
from plugins.backends import cuda_has_bf16
from plugins.char_tokenizer import CharTokenizer
from tui.app import QuillApp

DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("mps", marks=pytest.mark.mps)]


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    """The device under test: every test here runs once per device, in that device's lane."""
    return request.param


def skip_on_mps(device: str, why: str) -> None:
    if device == "mps":
        pytest.skip(f"not on mps: {why}")


# --- shared data and models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared character-level data directory of SAMPLE_TEXT (a tiny, repetitive corpus)."""
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    prepare(d / "corpus.txt", CharTokenizer.train(SAMPLE_TEXT), d / "chars", val_fraction=0.1)
    return d / "chars"


def config(data, out, device: str, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                  max_steps=6, warmup_steps=2, eval_interval=3, eval_steps=2, log_interval=1, device=device,
                  dtype="float32")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def run_dir(device, data, tmp_path_factory):
    """A run trained on the device (float32), shared by the chat, eval and generate tests."""
    out = tmp_path_factory.mktemp(f"run-{device}") / "run"
    train(config(data, out, device, n_layer=2, n_embd=32, block_size=32, batch_size=8, max_steps=30,
                 warmup_steps=3, lr=1e-2, min_lr=1e-3, eval_interval=15))
    return out


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train(SAMPLE_TEXT)


@pytest.fixture(scope="module")
def model(tok):
    """An untrained tiny GPT on the CPU, float32, whose greedy text varies (see generation_helpers)."""
    return tiny_gpt(tok.vocab_size)


def on_device(model, device: str, dtype: torch.dtype = torch.float32):
    """A copy of `model` prepared for generation on `device`, as `quill generate` prepares one."""
    return prepare_model(copy.deepcopy(model), get_backend(device), dtype)


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0].float().cpu()


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --- training ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_on_the_device_lowers_the_loss(device, dtype, data, tmp_path):
    if dtype == "bfloat16":
        skip_on_mps(device, "bf16 autocast on MPS depends on the macOS version; the mps lane trains in float32")
    events = []
    cfg = config(data, tmp_path / "run", device, dtype=dtype, n_layer=2, n_embd=32, block_size=32, batch_size=8,
                 max_steps=25, warmup_steps=3, lr=1e-2, min_lr=1e-3, eval_interval=25)
    result = train(cfg, on_event=events.append)
    start = events[0]
    assert (start["event"], start["device"], start["dtype"]) == ("start", device, dtype)
    assert events[-1]["event"] == "done" and result.step == 25 and result.stopped is None
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 25 and all(math.isfinite(loss) for loss in losses), losses
    vocab = DataDir.open(data).tokenizer.vocab_size
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.5)  # an untrained model guesses evenly
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses  # the corpus repeats itself: easy to learn a little of it
    assert math.isfinite(result.last_val_loss) and result.last_val_loss < losses[0]
    ckpt = load_checkpoint(tmp_path / "run" / "last.safetensors")  # written from the device, read on the CPU
    assert ckpt.train_args["dtype"] == dtype and ckpt.train_args["device"] == device
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_compiled_training_follows_the_eager_losses(device, data, tmp_path):
    """`quill train --compile` (torch.compile): the slow test here, a few seconds to a minute of
    compiling. It says when compiling starts and how long the first step took, once."""
    settings = dict(max_steps=4, eval_interval=4)
    eager = train(config(data, tmp_path / "eager", device, **settings))  # auto: 4 steps are too few to compile
    cfg = config(data, tmp_path / "compiled", device, **settings)
    out = run_quill("train", *_flags(cfg), "--compile")
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, err[-3000:]
    assert err.count("compiling the model (torch.compile)") == 1, err
    seconds = re.findall(r"compiled: the first step took (\d+\.\d) s", err)
    assert len(seconds) == 1 and float(seconds[0]) > 0, err
    assert load_checkpoint(tmp_path / "compiled").train_args["compile"] is True
    losses = [r["loss"] for r in log_of(tmp_path / "compiled")]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx([r["loss"] for r in eager.history], abs=1e-3)  # fused kernels round differently
    assert log_of(tmp_path / "compiled")[-1]["val_loss"] == pytest.approx(eager.last_val_loss, abs=1e-3)


def _flags(cfg: TrainConfig) -> list[str]:
    """`quill train` flags for every setting of `cfg` that differs from the default."""
    default, args = TrainConfig(), []
    for name, value in vars(cfg).items():
        flag = "--" + name.replace("_", "-")
        if value == getattr(default, name):
            continue
        args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return args


def test_float32_products_run_in_tf32_while_training_on_cuda_only(device, data, tmp_path):
    before, events, tf32 = cuda_matmul_precision(), [], []

    def on_event(event):
        events.append(event)
        tf32.append(cuda_uses_tf32())

    train(config(data, tmp_path / "run", device, max_steps=3, eval_interval=3), on_event=on_event)
    assert set(tf32) == {device == "cuda"}  # float32 runs; bf16 autocast products are bf16 anyway
    assert cuda_matmul_precision() == before and not cuda_uses_tf32()  # put back for the rest of the process
    source = events[0]["peak_source"]
    if device == "cuda" and "datasheet" in source:
        assert source.endswith("dense tf32")  # MFU against the rate the products run at


def test_a_gpu_reads_the_loss_at_log_lines_and_catches_a_nan_there(device, data, tmp_path):
    """On CUDA the loss stays on the GPU between log lines (no wait for the GPU each step)."""
    skip_on_mps(device, "MPS reads the loss at every step, as the CPU does")
    result = train(config(data, tmp_path / "run", device, max_steps=10, log_interval=4, eval_interval=5))
    assert [r["step"] for r in result.history] == [4, 5, 8, 10]
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert all(r["tokens_per_s"] > 0 for r in result.history if r["step"] % 4 == 0)
    # lr 1 with weight decay 100: the weights overflow within about 20 steps
    diverge = dict(lr=1.0, min_lr=1.0, warmup_steps=0, grad_clip=0.0, weight_decay=100.0, max_steps=30, eval_steps=1)
    with pytest.raises(QuillError) as info:
        train(config(data, tmp_path / "nan", device, log_interval=4, **{**diverge, "eval_interval": 100}))
    found = re.search(r"^the loss became (nan|inf|-inf) by step (\d+); stopped without saving it$", info.value.message)
    assert found and int(found.group(2)) in range(4, 30, 4), info.value.message


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_interrupted_run_resumes_exactly_on_the_device(device, dtype, data, tmp_path):
    """Run A: 12 steps straight. Run B: SIGINT at step 6 (it saves and stops), then resumed to 12.

    Dropout is on, and on a GPU it draws from the device's own generator: its state must be
    saved and restored with the run for the resumed losses to equal the uninterrupted ones.
    """
    if dtype == "bfloat16":
        skip_on_mps(device, "bf16 autocast on MPS depends on the macOS version; the mps lane trains in float32")
    settings = dict(max_steps=12, eval_interval=5, dropout=0.1, dtype=dtype)
    train(config(data, tmp_path / "A", device, **settings))

    def interrupt(event):
        if event["event"] == "step" and event["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    b1 = train(config(data, tmp_path / "B", device, **settings), on_event=interrupt)
    assert b1.stopped == "SIGINT" and 6 <= b1.step < 12
    b2 = train(saved_config(tmp_path / "B"), resume=True)
    assert (b2.step, b2.stopped) == (12, None)

    log_a, log_b = log_of(tmp_path / "A"), log_of(tmp_path / "B")
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a] == list(range(1, 13))
    for ra, rb in zip(log_a, log_b):
        assert rb["loss"] == ra["loss"], f"step {ra['step']}: resumed {rb['loss']} != uninterrupted {ra['loss']}"
    final_a, final_b = load_checkpoint(tmp_path / "A" / "last.safetensors"), load_checkpoint(tmp_path / "B" / "last.safetensors")
    for name, p in final_a.model.state_dict().items():
        assert torch.equal(final_b.model.state_dict()[name], p), name


# --- generating ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position,norm", ARCHITECTURES)
def test_greedy_with_the_cache_equals_recomputing_the_whole_context(device, tok, position, norm):
    model = on_device(tiny_gpt(tok.vocab_size, position=position, norm=norm), device)
    prompt = tok.encode("First Citizen")
    n = BLOCK - len(prompt) + 1  # the longest run that never needs to drop context
    tokens, done = run_generation(model, tok, prompt, chain=greedy_without_eos(tok), max_new_tokens=n)
    banned = [tok.special_tokens[name] for name in (*BANNED, "<eos>")]
    context, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([context[-BLOCK:]], device=device))[0][0, -1]
            logits[banned] = float("-inf")
            expected.append(int(logits.argmax()))
            context.append(expected[-1])
    assert ids_of(tokens) == expected
    assert done.reason == "length" and done.new_tokens == n
    assert len(set(expected)) > 3  # a varied sequence, not one token repeated


def test_a_cache_fed_in_chunks_gives_the_plain_forward_logits(device):
    model = on_device(tiny_gpt(40, seed=1, position="rope", mlp="swiglu"), device)
    idx = torch.randint(40, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    cache = KVCache(model.config, 2, torch.device(device), torch.float32)
    start = 0
    with torch.no_grad():
        for end in [5, 8, 11, 14, *range(15, 25)]:  # a prefill, chunks of 3, then one token at a time
            cached, _ = model(idx[:, start:end], cache=cache)
            plain, _ = model(idx[:, :end])
            assert cached.shape == (2, 1, 40) and cache.length == end
            torch.testing.assert_close(cached, plain[:, -1:], atol=1e-4, rtol=1e-4)
            start = end


# What makes each built-in sampler do something (a default may be a no-op on this vocabulary).
SAMPLER_SETTINGS = {
    "top_k": {"k": 5}, "top_p": {"p": 0.9}, "min_p": {"p": 0.1}, "typical": {"p": 0.9}, "temperature": {"t": 0.7},
    "repetition_penalty": {"penalty": 1.3}, "frequency_penalty": {"penalty": 0.5}, "presence_penalty": {"penalty": 0.5},
    "beam": {"num_beams": 3},
}


def test_every_registered_sampler_and_beam_search_run_on_the_device(device, tok, model):
    """Each sampler in the registry (the built-ins, and any plugin's, such as the example xtc),
    after a logit_bias that bans <eos> so that every run makes all its tokens."""
    model = on_device(model, device)
    eos = tok.special_tokens["<eos>"]
    names = get_registry().names("samplers")
    assert {"greedy", "beam", "top_k", "temperature", "logit_bias"} <= set(names)
    for name in names:
        settings = {name: SAMPLER_SETTINGS.get(name, {}), "logit_bias": {"bias": f"{eos}:-inf"}}
        if name == "logit_bias":
            settings = {"logit_bias": {"bias": f"{eos}:-inf,{tok.stoi['e']}:2.5"}}
        spec = name if name == "logit_bias" else f"logit_bias,{name}"
        runs = [run_generation(model, tok, "First", chain=build_chain(spec, settings), max_new_tokens=20, seed=5)
                for _ in range(2)]
        (tokens, done), (again, _) = runs
        assert len(tokens) == 20 and done.reason == "length", (name, done)
        assert all(0 <= i < tok.vocab_size and i not in tok.special_tokens.values() for i in ids_of(tokens)), name
        assert ids_of(again) == ids_of(tokens), f"{name}: the same seed gave another text"
        assert done.seed == 5


def test_stop_strings_end_generation_on_the_device(device, tok, model):
    model = on_device(model, device)
    full = generate_text(model, tok, "First", chain=build_chain("greedy"), max_new_tokens=30)
    assert len(full) == 30
    stop = full[10:13]
    at = full.find(stop)
    assert at >= 5
    tokens, done = run_generation(model, tok, "First", chain=build_chain("greedy"), max_new_tokens=30,
                             stop=["never said", stop])
    assert "".join(t.text for t in tokens) + done.text == full[:at]
    assert done.reason == "stop" and done.stop == stop
    assert ids_of(tokens) == tok.encode(full[:at + len(stop)])


def test_cancel_from_another_thread_stops_generation_on_the_device(device, tok, model):
    model = on_device(model, device)
    *tokens, done = cancelled_after(model, tok, 4)
    assert 4 <= len(tokens) <= 5
    assert done.reason == "cancelled" and done.new_tokens == len(tokens)
    cancel = threading.Event()
    cancel.set()
    # set before the start: nothing at all, sampling or beam search
    for chain in (build_chain("top_k"), build_chain("beam")):
        tokens, done = run_generation(model, tok, "First", chain=chain, max_new_tokens=10, cancel=cancel)
        assert tokens == [] and done.reason == "cancelled"


def test_every_dtype_the_device_offers_generates_close_to_float32(device, tok, model):
    backend = get_backend(device)
    names = [dtype_name(d) for d in backend.supported_dtypes()]
    assert names[:2] == ["float32", "bfloat16"]
    if device == "cuda":
        assert "float16" in names
    idx = torch.randint(tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = logits_of(model, idx)  # float32, on the CPU
    scale = expected.abs().max()
    for name in names:
        dtype = resolve_dtype(backend, name)
        prepared = on_device(model, device, dtype)
        weight = prepared.wte.weight
        assert (weight.device.type, weight.dtype) == (device, dtype), name
        error = (logits_of(prepared, idx.to(device)) - expected).abs().max()
        assert error < (1e-3 if dtype == torch.float32 else 0.05) * scale, f"{name}: {error} vs scale {scale}"
        tokens, done = run_generation(prepared, tok, "First", chain=greedy_without_eos(tok), max_new_tokens=10)
        assert len(tokens) == 10 and done.reason == "length", name


def test_int8_weights_are_refused_on_the_device_with_one_line(device, tok, model, run_dir):
    backend = get_backend(device)
    why = int8_unavailable(backend)
    assert why == f"int8 weights run on the CPU backend only, not {device}"
    with pytest.raises(QuillError, match="cannot quantize to int8") as info:
        prepare_model(copy.deepcopy(model), backend, torch.float32, quantize="int8")
    assert info.value.message == f"cannot quantize to int8: {why}"
    out = run_quill("generate", str(run_dir), "--device", device, "--quantize", "int8", "--prompt", "First",
                    "--max-new-tokens", "5")
    message, hint = one_line_error(out)
    assert message == f"cannot quantize to int8: {why}" and hint == "drop --quantize, or use --device cpu"


# --- the CLI ---------------------------------------------------------------------------------------------

def test_quill_generate_on_the_device(device, run_dir):
    ckpt = load_checkpoint(run_dir, device=device)
    model = prepare_model(ckpt.model, get_backend(device), torch.float32)
    expected = generate_text(model, ckpt.tokenizer, "First", chain=build_chain("greedy"), max_new_tokens=30)
    assert len(expected) == 30
    out = run_quill("generate", str(run_dir), "--device", device, "--dtype", "float32", "--sampler", "greedy",
                    "--prompt", "First", "--max-new-tokens", "30")
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")[-3000:]
    assert out.stdout.decode("utf-8") == expected


def test_quill_eval_on_the_device(device, run_dir, data):
    out = run_quill("eval", str(run_dir), "--data", str(data), "--device", device, "--json")
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")[-3000:]
    result = json.loads(out.stdout)
    here = evaluate(run_dir, data, device=device)
    assert result["tokens"] == here.tokens == DataDir.open(data).meta["val_tokens"] - 1
    assert result["loss"] == pytest.approx(here.loss, rel=1e-5)
    assert result["loss"] == pytest.approx(evaluate(run_dir, data, device="cpu").loss, rel=1e-3)  # the device agrees
    assert 0 < result["loss"] < math.log(load_checkpoint(run_dir).tokenizer.vocab_size)  # it did learn something


# --- the chat --------------------------------------------------------------------------------------------

def write_profile(folder, run_dir, device: str) -> str:
    """A profile `dev` in `folder` chatting with the run's best checkpoint on `device`; returns its name."""
    folder.mkdir(exist_ok=True)
    (folder / "dev.toml").write_text(f'''description = "the device lane"
checkpoint = {json.dumps(str(run_dir / "best.safetensors"))}

[sampler]
chain = "top_k,temperature"
top_k = {{ k = 20 }}
temperature = {{ t = 0.9 }}

[backend]
device = "{device}"
dtype = "auto"

[generation]
max_new_tokens = 10

[template]
system = ""
user_prefix = "A: "
user_suffix = "\\n"
model_prefix = "F: "
model_suffix = "\\n"
stop = ["\\n", "A:"]
''', encoding="utf-8")
    return "dev"


def expected_dtype(device: str, run_dir) -> str:
    """What `dtype = "auto"` means for this model on this device (float32: the tests pin the path)."""
    return choose(load_checkpoint(run_dir, device=device).model, get_backend(device)).path.dtype


def test_a_chat_session_on_the_device(device, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_PROFILES", str(tmp_path / "profiles"))
    s = ChatSession(write_profile(tmp_path / "profiles", run_dir, device))
    dtype = expected_dtype(device, run_dir)
    if device == "cuda" and cuda_has_bf16():
        assert dtype == "bfloat16"
    described = s.describe()
    assert (described["device"], described["dtype"]) == (device, dtype)
    weight = s.loaded.model.wte.weight
    assert (weight.device.type, dtype_name(weight.dtype)) == (device, dtype)
    events = list(s.send("Speak"))
    assert events and isinstance(events[-1], Done) and all(isinstance(e, Token) for e in events[:-1])
    done, (turn,) = events[-1], s.turns
    assert turn.reply == "".join(e.text for e in events).strip()
    assert turn.reply == generate_text(s.loaded.model, s.loaded.tokenizer, "A: Speak\nF: ",
                                       chain=build_chain("top_k,temperature", {"top_k": {"k": 20}, "temperature": {"t": 0.9}}),
                                       seed=done.seed, max_new_tokens=10, stop=["\n", "A:"]).strip()
    p = turn.provenance
    assert (p.profile, p.dtype, p.quantize, p.path, p.step) == ("dev", dtype, "none", dtype, load_checkpoint(run_dir).step)
    assert p.reason == done.reason and p.new_tokens == done.new_tokens
    assert s.replay(1) == (turn.reply, turn.reply)
    assert not s.busy


def test_the_full_screen_chat_status_line_names_the_device(device, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_PROFILES", str(tmp_path / "profiles"))
    app = QuillApp(write_profile(tmp_path / "profiles", run_dir, device))
    shown = f" │ {device} {expected_dtype(device, run_dir)} │ "  # e.g. "dev │ top_k,temperature │ cuda bfloat16 │ ..."

    async def steps(pilot):
        status = str(app.query_one("#status").render())
        assert status.startswith("dev │ top_k,temperature │ ") and shown in status, status
        await say(pilot, "Speak")
        turn, = app.session.turns
        assert turn.provenance.dtype == expected_dtype(device, run_dir)
        status = str(app.query_one("#status").render())
        assert shown in status and f"{turn.provenance.tokens_per_second:.0f} tok/s" in status, status

    run_app(app, steps)
