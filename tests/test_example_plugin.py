"""The example sampler plugin, examples/quill-xtc, as its users meet it.

`make test` installs it into the virtualenv as a real, non-editable
distribution (see the Makefile), so these tests find it the way Quill does:
through its entry point. They check its rules with `check_sampler`, its effect on
hand-made logits, and `quill samplers` / `quill generate` with it in real
subprocesses. The last part installs a small broken sampler plugin with
`pip install --target` (as tests/test_plugins.py does) and checks that its
failure in the middle of generation is one clear error naming it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest
import torch

from gpt_runtime.testing import check_sampler, make_state
from helpers import SAMPLE_TEXT, pip_install_target, run_quill

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quill-xtc"
NEG = float("-inf")
# Subprocesses run a tiny model: one thread each is faster and keeps the machine free.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def xtc():
    """The installed quill_xtc module; a failure telling what to do when it is not installed."""
    try:
        dist = metadata.distribution("quill-xtc")
    except metadata.PackageNotFoundError:
        pytest.fail("the example plugin quill-xtc is not installed in this environment; run `make test`, "
                    "which installs it (or: pip install --no-deps ./examples/quill-xtc)", pytrace=False)
    import quill_xtc

    installed = Path(quill_xtc.__file__).read_text(encoding="utf-8")
    if installed != (EXAMPLE / "quill_xtc.py").read_text(encoding="utf-8"):
        pytest.fail(f"the installed quill-xtc ({quill_xtc.__file__}) is not examples/quill-xtc/quill_xtc.py as it "
                    "is now; run `make test` to reinstall it", pytrace=False)
    assert dist.version == "0.1.0"
    return quill_xtc


def logits_of(*probs: float) -> torch.Tensor:
    """A (1, vocab) row of logits whose softmax is `probs` (0 means removed: -inf)."""
    return torch.tensor([[math.log(p) if p else NEG for p in probs]], dtype=torch.float32)


def kept(out: torch.Tensor) -> list[list[int]]:
    """The token ids left (not -inf) in each row."""
    return [torch.nonzero(~row.isneginf()).view(-1).tolist() for row in out]


# --- a real distribution ----------------------------------------------------------------------

def test_example_is_installed_as_a_real_distribution(xtc):
    dist = metadata.distribution("quill-xtc")
    assert [(ep.name, ep.value) for ep in dist.entry_points.select(group="quill")] == [("xtc", "quill_xtc")]
    assert any(req.startswith("quillgpt") for req in dist.requires or [])
    # installed, not run from the source tree (an editable install would point there)
    assert EXAMPLE not in Path(xtc.__file__).resolve().parents


def test_loading_the_plugin_does_not_import_torch(xtc):
    code = ("import sys; from gpt_runtime.plugins import get_registry; "
            "entry = get_registry().get('samplers', 'xtc'); "
            "assert entry.plugin == 'xtc', entry.plugin; entry.obj(threshold=0.2); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- the sampler on its own --------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"threshold": 0.05, "probability": 1.0},
    {"threshold": 0.0, "probability": 1.0},  # every token is "likely": still never removes them all
    {"threshold": 0.5, "probability": 0.3},
    {"probability": 0.0},
])
def test_check_sampler_passes(xtc, options):
    check_sampler(xtc.ExcludeTopChoices, options)
    check_sampler(xtc.ExcludeTopChoices, options, vocab_size=7, batch=6)  # few tokens: many above threshold


def test_removes_the_top_choices_but_the_least_likely_of_them(xtc):
    logits = logits_of(0.3, 0.06, 0.4, 0.04, 0.2)
    out = xtc.ExcludeTopChoices(threshold=0.1, probability=1.0).apply(logits.clone(), make_state(1, 5))
    assert kept(out) == [[1, 3, 4]]  # 0.4 and 0.3 go; 0.2 is the least likely top choice
    assert out[0, [1, 3, 4]].equal(logits[0, [1, 3, 4]])  # the rest untouched


def test_a_token_exactly_at_the_threshold_is_a_top_choice(xtc):
    logits = torch.tensor([[0.0, 0.0, -1e9, -1e9]])  # probabilities 0.5, 0.5, 0, 0
    out = xtc.ExcludeTopChoices(threshold=0.5, probability=1.0).apply(logits.clone(), make_state(1, 4))
    assert kept(out) == [[0, 2, 3]]  # a tie among top choices: the lowest id stays


def test_probability_zero_changes_nothing_and_draws_nothing(xtc):
    logits = logits_of(0.3, 0.06, 0.4, 0.04, 0.2)
    state = make_state(1, 5)
    before = state.generator.get_state()
    out = xtc.ExcludeTopChoices(threshold=0.1, probability=0.0).apply(logits.clone(), state)
    assert out.equal(logits)
    assert state.generator.get_state().equal(before)


def test_a_single_top_choice_is_left_alone(xtc):
    logits = logits_of(0.05, 0.7, 0.09, 0.08, 0.08)
    out = xtc.ExcludeTopChoices(threshold=0.1, probability=1.0).apply(logits.clone(), make_state(1, 5))
    assert out.equal(logits)


def test_removed_tokens_never_count_and_stay_removed(xtc):
    logits = logits_of(0.5, 0, 0.3, 0, 0.2)
    out = xtc.ExcludeTopChoices(threshold=0.0, probability=1.0).apply(logits.clone(), make_state(1, 5))
    assert kept(out) == [[4]]  # threshold 0: every remaining token is a top choice; the least likely stays


def test_each_row_draws_its_own_chance_from_the_generator(xtc):
    rows = 400
    logits = logits_of(0.3, 0.06, 0.4, 0.04, 0.2).repeat(rows, 1)
    sampler = xtc.ExcludeTopChoices(threshold=0.1, probability=0.5)
    first = sampler.apply(logits.clone(), make_state(rows, 5, seed=7))
    again = sampler.apply(logits.clone(), make_state(rows, 5, seed=7))
    other = sampler.apply(logits.clone(), make_state(rows, 5, seed=8))
    cut = first.isneginf().any(dim=-1)
    assert 0.4 < cut.float().mean() < 0.6
    assert first.equal(again) and not first.equal(other)
    assert all(row in ([1, 3, 4], [0, 1, 2, 3, 4]) for row in kept(first))


def test_rows_are_independent(xtc):
    logits = torch.cat([logits_of(0.3, 0.06, 0.4, 0.04, 0.2), logits_of(0.05, 0.7, 0.09, 0.08, 0.08),
                        logits_of(0.25, 0.25, 0.25, 0.25, 0)])
    out = xtc.ExcludeTopChoices(threshold=0.1, probability=1.0).apply(logits.clone(), make_state(3, 5))
    assert kept(out) == [[1, 3, 4], [0, 1, 2, 3, 4], [0]]  # a four-way tie at the top: the lowest id stays


# --- through the real CLI ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_torch_thread) -> Path:
    """A tiny char-level GPT, trained for a few steps so its next-token distributions are peaked."""
    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.model import GPT, GPTConfig
    from gpt_runtime.tokenizer import train_tokenizer

    tok = train_tokenizer("char", SAMPLE_TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    data = torch.tensor(tok.encode(SAMPLE_TEXT), dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        starts = torch.randint(len(data) - 65, (8,))
        x = torch.stack([data[s:s + 64] for s in starts])
        y = torch.stack([data[s + 1:s + 65] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("xtc_ckpt") / "tiny.safetensors"
    save_checkpoint(path, model.eval(), tok, step=20)
    return path


def quill(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    """Run the real CLI: (exit code, stdout, stderr)."""
    out = run_quill(*args, env={**ONE_THREAD, **(env or {})})
    return out.returncode, out.stdout.decode("utf-8"), out.stderr.decode("utf-8")


def test_quill_samplers_lists_xtc_with_its_plugin_and_options(xtc):
    code, out, err = quill("samplers")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    at = lines.index("xtc  [plugin xtc]  XTC: sometimes remove the likeliest tokens, keeping the least likely "
                     "of those above a threshold.")
    assert lines[at + 1:at + 3] == [
        "    xtc.threshold = 0.1  (float, 0 <= threshold <= 0.5)  a token this likely or more is a top choice",
        "    xtc.probability = 0.5  (float, 0 <= probability <= 1)  the chance, per step, of removing the top choices",
    ]
    code, out, err = quill("samplers", "--json")
    assert (code, err) == (0, "")
    (row,) = [row for row in json.loads(out) if row["name"] == "xtc"]
    assert row["plugin"] == "xtc"
    assert row["options"]["threshold"] == {"type": "float", "default": 0.1, "range": "0 <= value <= 0.5",
                                           "help": "a token this likely or more is a top choice"}
    assert list(row["options"]) == ["threshold", "probability"]


@pytest.fixture(scope="module")
def generated(xtc, checkpoint, shaky_site) -> dict[str, tuple[int, str, str]]:
    """Every `quill generate` these tests need, run two at a time (each one imports torch: ~2 s)."""
    xtc_chain = ("--sampler", "top_k,xtc,temperature", "--seed", "3")
    shaky = {"PYTHONPATH": str(shaky_site)}
    runs = {
        "xtc": (xtc_chain + ("--set", "xtc.threshold=0.05"), None),
        "xtc again": (xtc_chain + ("--set", "xtc.threshold=0.05"), None),
        "xtc 0.5": (xtc_chain + ("--set", "xtc.threshold=0.5"), None),
        "xtc 0.9": (xtc_chain + ("--set", "xtc.threshold=0.9"), None),
        "broken": (("--sampler", "top_k,broken,temperature", "--seed", "1"), shaky),
        "flaky": (("--sampler", "top_k,flaky,temperature", "--seed", "1"), shaky),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(quill, "generate", str(checkpoint), "--prompt", "All:", "--max-new-tokens", "40",
                              *args, env=env)
            for name, (args, env) in runs.items()
        }
    return {name: future.result() for name, future in futures.items()}


def test_generate_with_xtc_works_and_a_seed_reproduces_it(generated):
    code, text, err = generated["xtc"]
    assert (code, err) == (0, "")
    assert len(text) == 40  # one character per token
    assert generated["xtc again"] == (0, text, "")
    # threshold 0.5 makes the same random draws but (almost) never finds two top
    # choices: different text shows that xtc removed tokens at 0.05
    code, plain, err = generated["xtc 0.5"]
    assert (code, err) == (0, "") and len(plain) == 40 and plain != text


def test_generate_rejects_an_out_of_range_option(generated):
    code, out, err = generated["xtc 0.9"]
    assert (code, out) == (2, "")
    assert err.splitlines() == ["quill: error: xtc.threshold = 0.9 is out of range",
                                "  hint: it needs 0 <= xtc.threshold <= 0.5"]


# --- a broken sampler plugin ---------------------------------------------------------------------

SHAKY_SOURCE = '''
"""quill-shaky: two sampler plugins that fail, for Quill's tests."""

from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.sampling import Sampler


class Broken(Sampler):
    """Fails at once."""

    name = "broken"

    def apply(self, logits, state):
        raise RuntimeError("the broken sampler broke")


class Flaky(Sampler):
    """Works for three tokens, then fails."""

    name = "flaky"

    def apply(self, logits, state):
        if state.step == 3:
            raise RuntimeError(f"flaky gave up at step {state.step}")
        return logits


@hookimpl
def quill_register_samplers(register):
    register("broken", Broken)
    register("flaky", Flaky)
'''

SHAKY_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "quill-shaky"
version = "0.0.1"

[project.entry-points.quill]
shaky = "quill_shaky"

[tool.setuptools]
py-modules = ["quill_shaky"]
"""


@pytest.fixture(scope="module")
def shaky_site(tmp_path_factory) -> Path:
    """A directory holding the quill-shaky distribution, installed by pip."""
    root = tmp_path_factory.mktemp("shaky")
    src = root / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(SHAKY_PYPROJECT, encoding="utf-8")
    (src / "quill_shaky.py").write_text(textwrap.dedent(SHAKY_SOURCE), encoding="utf-8")
    return pip_install_target([src], root / "site")


@pytest.mark.parametrize(("sampler", "printed", "what"), [
    ("broken", 0, "raised RuntimeError: the broken sampler broke"),
    ("flaky", 3, "raised RuntimeError: flaky gave up at step 3"),
])
def test_a_failing_sampler_plugin_is_one_error_naming_it(generated, sampler, printed, what):
    code, text, err = generated[sampler]
    assert code == 1
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"quill: error: sampler {sampler!r} (plugin 'shaky') {what}; generation stopped",
        f"  hint: use a chain without {sampler!r}, or report it to the plugin's author",
    ]
    assert len(text) == printed  # what was generated before the failure was streamed out


def test_the_plugins_slash_command_works_in_the_chat(xtc, checkpoint, tmp_path):
    (tmp_path / "tiny.toml").write_text(f'checkpoint = "{checkpoint}"\n[sampler]\nchain = "top_k,temperature"\n'
                                        '[generation]\nmax_new_tokens = 5\n[template]\nuser_prefix = "A: "\n'
                                        'model_prefix = "B: "\n')
    script = "/help xtc\n/xtc on\n/set xtc.threshold 0.2\nhe\n/xtc off\n/xtc maybe\n/x\n"
    out = run_quill("chat", "--profile", "tiny", input=script.encode(),
                    env={**ONE_THREAD, "QUILL_PROFILES": str(tmp_path)})
    text, err = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 1  # the bad lines failed; the rest ran
    assert "> /help xtc\n/xtc on|off\n  put the XTC sampler into the chain, or take it out\n" in text
    assert "> /xtc on\nsampler chain: top_k,xtc,temperature\n> /set xtc.threshold 0.2\nxtc.threshold = 0.2\n" in text
    assert "> /xtc off\nsampler chain: top_k,temperature\n" in text
    assert err == ("error: /xtc takes on or off\n  hint: usage: /xtc on|off\n"
                   "error: unknown command /x\n  hint: did you mean '/xtc'?\n")
