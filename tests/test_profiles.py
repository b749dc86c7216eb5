"""Profiles: loading and checking TOML profiles, finding them, and `quill profiles` / `generate --profile`.

A module fixture writes a tiny checkpoint (a file and a run directory), its
tokenizer file and a few profiles; another starts every CLI command at once, two
at a time (a command that generates pays about 2 s for importing torch; the
others need no torch and cost little), and each CLI test waits only for its own
commands and works out in-process what they must print. Loading, discovery and
templates are tested in-process.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from gpt_runtime.checkpoint import read_metadata
from gpt_runtime.errors import QuillError
from gpt_runtime.profiles import ChatTemplate, find_profiles, get_profile, load_profile, user_profile_dir
from gpt_runtime.sampling import DEFAULT_CHAIN, build_chain
from helpers import SAMPLE_TEXT, one_line_error, quill_env, quill_later, side_by_side

PROMPT = "First"
CHAIN = "top_k,temperature"
OPTIONS = {"top_k": {"k": 5}, "temperature": {"t": 1.5}}
SEED = 7
MAX_NEW = 24
DESCRIPTION = "Tiny char model, for tests"
TEMPLATE = {"system": "A play.\n\n", "user_prefix": "ROMEO:\n", "user_suffix": "\n\n",
            "model_prefix": "JULIET:\n", "model_suffix": "\n\n", "stop": ["\n\n", "ROMEO:"]}

# The good profile: every table, paths relative to the profile file.
TINY = r'''
description = "Tiny char model, for tests"
checkpoint = "../models/tiny.safetensors"
tokenizer = "../models/chars.json"   # optional: must match the checkpoint's

[sampler]
chain = "top_k,temperature"
top_k = { k = 5 }
temperature = { t = 1.5 }

[backend]
device = "cpu"
dtype = "float32"
quantize = "none"

[generation]
max_new_tokens = 24
seed = 7

[template]
system = "A play.\n\n"
user_prefix = "ROMEO:\n"
user_suffix = "\n\n"
model_prefix = "JULIET:\n"
model_suffix = "\n\n"
stop = ["\n\n", "ROMEO:"]
'''
RUN = 'checkpoint = "../models/run"  # a run directory: its best.safetensors\n'
BROKEN = 'checkpoint = "../models/tiny.safetensors"\n[generation]\nmax_new_tokens = 0\n'
GARBLED = 'checkpoint = "../models/tiny.safetensors"\n[backend]\ndevice = cpu\n'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def raw_safetensors(path: Path, metadata: dict) -> Path:
    """A safetensors file with no tensors and the given metadata."""
    header = json.dumps({"__metadata__": metadata}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def ok(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0 and err == "", (out.returncode, err[-3000:])
    return out.stdout.decode("utf-8")


error = one_line_error  # exit code, one `quill: error:` line, at most a hint


@pytest.fixture(scope="module")
def disk(tmp_path_factory, one_torch_thread) -> dict:
    """The files: a tiny checkpoint (a file and a run directory), its tokenizer file, another
    tokenizer's, and the profiles tiny, run, broken and garbled in a user directory."""
    import torch

    from gpt_runtime.checkpoint import save_checkpoint
    from gpt_runtime.model import GPT, GPTConfig
    from plugins.char_tokenizer import CharTokenizer

    root = tmp_path_factory.mktemp("profiles").resolve()
    models, user = root / "models", root / "user"
    (models / "run").mkdir(parents=True)
    tok = CharTokenizer.train(SAMPLE_TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)  # untrained, but what it samples varies
    ckpt = models / "tiny.safetensors"
    save_checkpoint(ckpt, model, tok, step=1)
    save_checkpoint(models / "run" / "best.safetensors", model, tok, step=2)
    tok.save(models / "chars.json")
    other = CharTokenizer.train("abc")
    other.save(models / "other-chars.json")
    files = {"tiny": write(user / "tiny.toml", TINY), "run": write(user / "run.toml", RUN),
             "broken": write(user / "broken.toml", BROKEN), "garbled": write(user / "garbled.toml", GARBLED)}
    return {"root": root, "models": models, "user": user, "files": files, "ckpt": ckpt, "tok": tok, "other": other}


@pytest.fixture(scope="module")
def in_process(disk):
    """generate_text from PROMPT with the tiny checkpoint, as loaded in this process: what the CLI must print."""
    from gpt_runtime.checkpoint import load_checkpoint
    from gpt_runtime.generate import generate_text

    model = load_checkpoint(disk["ckpt"]).model

    def text(chain: str, options: dict | None = None, **kw) -> str:
        return generate_text(model, disk["tok"], PROMPT, chain=build_chain(chain, options), **kw)
    return text


def commands(disk: dict) -> dict[str, list[str]]:
    """Every CLI command the tests run, by name: the ones that generate first, as they take longest."""
    ckpt, files = disk["ckpt"], disk["files"]
    return {
        # generating: about 2 s each
        "gen_profile": ["generate", "--profile", "tiny", "--prompt", PROMPT],
        "gen_explicit": ["generate", str(ckpt), "--prompt", PROMPT, "--sampler", CHAIN, "--set", "top_k.k=5",
                         "--set", "temperature.t=1.5", "--seed", str(SEED), "--max-new-tokens", str(MAX_NEW)],
        "gen_greedy": ["generate", "--profile", "tiny", "--prompt", PROMPT, "--sampler", "greedy"],
        "gen_short": ["generate", "--profile", "tiny", "--prompt", PROMPT, "--max-new-tokens", "6", "--seed", "8"],
        # no torch: quick
        "list": ["profiles", "list"],
        "list_json": ["profiles", "list", "--json"],
        "show": ["profiles", "show", "tiny"],
        "show_json": ["profiles", "show", "tiny", "--json"],
        "show_run_path": ["profiles", "show", str(files["run"]), "--json"],
        "show_broken": ["profiles", "show", "broken"],
        "show_unknown": ["profiles", "show", "tinny"],
        "validate_ok": ["profiles", "validate", str(files["tiny"])],
        "validate_bad": ["profiles", "validate", str(files["broken"])],
        "validate_garbled": ["profiles", "validate", str(files["garbled"])],
        "gen_both": ["generate", str(ckpt), "--profile", "tiny", "--prompt", PROMPT],
        "gen_neither": ["generate", "--prompt", PROMPT],
        "gen_unknown": ["generate", "--profile", "tinny", "--prompt", PROMPT],
        "gen_broken": ["generate", "--profile", "broken", "--prompt", PROMPT],
    }


@pytest.fixture(scope="module")
def out(disk) -> Iterator[dict[str, Future[subprocess.CompletedProcess]]]:
    """Every CLI command, and a probe that loads profiles in plain Python, started two at a time
    with QUILL_PROFILES at the user directory: futures by name."""
    env = {"QUILL_PROFILES": str(disk["user"]), "OMP_NUM_THREADS": "1"}
    jobs = {name: quill_later(*args, env=env) for name, args in commands(disk).items()}
    probe = ("import sys; from gpt_runtime.profiles import find_profiles, load_profile; "
             "load_profile(sys.argv[1]); find_profiles(); print('torch' in sys.modules)")
    probe_args, probe_env, cwd = [sys.executable, "-c", probe, str(disk["files"]["tiny"])], quill_env(env), Path.cwd()
    jobs["no_torch"] = lambda: subprocess.run(probe_args, stdin=subprocess.DEVNULL, capture_output=True, env=probe_env,
                                              cwd=cwd, timeout=120)
    with side_by_side(jobs) as futures:
        yield futures


# ---- a good profile ----------------------------------------------------------------------------------------------

def test_a_good_profile_with_relative_paths_and_every_table(disk, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths are relative to the profile file, not to the working directory
    p = load_profile(disk["files"]["tiny"])
    models = disk["models"]
    assert (p.name, p.path, p.description) == ("tiny", disk["files"]["tiny"], DESCRIPTION)
    assert p.checkpoint == models / "tiny.safetensors" and p.tokenizer == models / "chars.json"
    assert p.tokenizer_fingerprint == disk["tok"].fingerprint
    assert p.chain == CHAIN and p.options == OPTIONS
    assert (p.device, p.dtype, p.quantize, p.max_new_tokens, p.seed) == ("cpu", "float32", "none", MAX_NEW, SEED)
    assert p.template == ChatTemplate(**TEMPLATE)
    assert p.to_dict() == {
        "name": "tiny", "path": str(disk["files"]["tiny"]), "description": DESCRIPTION,
        "checkpoint": str(models / "tiny.safetensors"), "tokenizer": str(models / "chars.json"),
        "tokenizer_fingerprint": disk["tok"].fingerprint,
        "sampler": {"chain": CHAIN, "top_k": {"k": 5}, "temperature": {"t": 1.5}},
        "backend": {"device": "cpu", "dtype": "float32", "quantize": "none"},
        "generation": {"max_new_tokens": MAX_NEW, "seed": SEED},
        "template": TEMPLATE,
        "session": {"save": True},
    }
    # a relative path to the profile itself is from the working directory
    monkeypatch.chdir(disk["root"])
    assert load_profile(Path("user") / "tiny.toml").to_dict() == p.to_dict()


def test_a_minimal_profile_gets_every_default(disk):
    p = load_profile(disk["files"]["run"])
    assert p.checkpoint == disk["models"] / "run" / "best.safetensors"  # a run directory: its best checkpoint
    assert (p.description, p.tokenizer, p.tokenizer_fingerprint) == ("", None, disk["tok"].fingerprint)
    assert p.chain == DEFAULT_CHAIN == "top_k,top_p,temperature"
    assert p.options == build_chain(DEFAULT_CHAIN).settings() == {
        "top_k": {"k": 40}, "top_p": {"p": 0.95, "min_keep": 1}, "temperature": {"t": 0.8}}
    assert (p.device, p.dtype, p.quantize, p.max_new_tokens, p.seed) == ("auto", "auto", "auto", 200, None)
    assert p.template == ChatTemplate() and p.template.stop == ["\nUser:"]
    data = p.to_dict()
    assert data["tokenizer"] is None and data["generation"] == {"max_new_tokens": 200, "seed": None}
    assert data["sampler"] == {"chain": DEFAULT_CHAIN, **p.options}


def test_options_for_some_samplers_keep_the_others_defaults(disk, tmp_path):
    path = write(tmp_path / "partial.toml", f'checkpoint = "{disk["ckpt"]}"\n[sampler]\ntop_p = {{ p = 0.5 }}\n')
    p = load_profile(path)
    assert p.chain == DEFAULT_CHAIN
    assert p.options == {"top_k": {"k": 40}, "top_p": {"p": 0.5, "min_keep": 1}, "temperature": {"t": 0.8}}
    write(path, f'checkpoint = "{disk["ckpt"]}"\n[sampler]\nchain = "min_p, greedy"\nmin_p = {{ p = 0.1 }}\n')
    p = load_profile(path)
    assert p.chain == "min_p, greedy" and p.options == {"min_p": {"p": 0.1}, "greedy": {}}


# ---- every validation error names the file, the key and what was expected -------------------------------------------

CKPT_LINE = 'checkpoint = "@CKPT@"\n'
ANY = object()
ERRORS = [
    # (id, profile text, message after "profile '<file>'", hint)
    ("unknown_top_key", CKPT_LINE + 'chekpoint = "x"\n', ": unknown key chekpoint", "did you mean 'checkpoint'?"),
    ("unknown_table", CKPT_LINE + '[backnd]\ndevice = "cpu"\n', ": unknown key backnd", "did you mean 'backend'?"),
    ("unknown_far_key", CKPT_LINE + 'colour = "red"\n', ": unknown key colour",
     "known keys here: description, checkpoint, tokenizer, sampler, backend, generation, template, session"),
    ("session_save_not_bool", CKPT_LINE + '[session]\nsave = "no"\n', ": [session] save must be true or false, not 'no'", None),
    ("unknown_session_key", CKPT_LINE + '[session]\nsav = false\n', ": unknown key [session] sav", "did you mean 'save'?"),
    ("unknown_backend_key", CKPT_LINE + '[backend]\ndevise = "cpu"\n', ": unknown key [backend] devise",
     "did you mean 'device'?"),
    ("unknown_generation_key", CKPT_LINE + '[generation]\nmax_tokens = 5\n', ": unknown key [generation] max_tokens",
     "did you mean 'max_new_tokens'?"),
    ("unknown_template_key", CKPT_LINE + '[template]\nuser_prefx = "A: "\n', ": unknown key [template] user_prefx",
     "did you mean 'user_prefix'?"),
    ("string_for_int", CKPT_LINE + '[generation]\nmax_new_tokens = "50"\n',
     ": [generation] max_new_tokens must be a whole number, not '50'", None),
    ("bool_for_int", CKPT_LINE + '[generation]\nseed = true\n', ": [generation] seed must be a whole number, not True", None),
    ("float_for_int", CKPT_LINE + '[generation]\nmax_new_tokens = 5.0\n',
     ": [generation] max_new_tokens must be a whole number, not 5.0", None),
    ("int_for_string", CKPT_LINE + '[backend]\ndevice = 1\n', ": [backend] device must be a backend name, not 1", None),
    ("int_for_text", CKPT_LINE + 'description = 3\n', ": description must be text, not 3", None),
    ("stop_not_a_list", CKPT_LINE + '[template]\nstop = "\\n"\n', ": [template] stop must be a list of strings, not '\\n'",
     None),
    ("stop_empty_string", CKPT_LINE + '[template]\nstop = ["x", ""]\n', ": [template] stop must be a list of non-empty strings",
     None),
    ("stop_not_strings", CKPT_LINE + '[template]\nstop = [1]\n', ": [template] stop must be a list of non-empty strings", None),
    ("two_line_name", CKPT_LINE + '[template]\nuser_name = "A\\nB"\n',
     ": [template] user_name must be one line of text, not 'A\\nB'", None),
    ("blank_name", CKPT_LINE + '[template]\nmodel_name = " "\n', ": [template] model_name must be one line of text, not ' '",
     None),
    ("table_as_value", CKPT_LINE + 'backend = "cpu"\n', ": backend must be a table ([backend]), not 'cpu'", None),
    ("sampler_as_value", CKPT_LINE + 'sampler = "greedy"\n', ": sampler must be a table ([sampler]), not 'greedy'", None),
    ("value_as_table", '[checkpoint]\npath = "x"\n', ": checkpoint must be a path, not {'path': 'x'}", None),
    ("subtable_as_value", CKPT_LINE + '[backend.device]\nname = "cpu"\n',
     ": [backend] device must be a backend name, not {'name': 'cpu'}", None),
    ("no_checkpoint", 'description = "no model"\n', " has no checkpoint",
     'add a line like: checkpoint = "models/my-model.safetensors"'),
    ("checkpoint_missing", 'checkpoint = "nope.safetensors"\n',
     ", key checkpoint: checkpoint '@DIR@/nope.safetensors' does not exist", None),
    ("run_dir_empty", 'checkpoint = "emptyrun"\n',
     ", key checkpoint: run directory '@DIR@/emptyrun' has no checkpoint (best.safetensors or last.safetensors)", None),
    ("checkpoint_not_quill", 'checkpoint = "plain.safetensors"\n',
     ", key checkpoint: '@DIR@/plain.safetensors' is a safetensors file but not a Quill checkpoint (no Quill metadata)",
     None),
    ("checkpoint_truncated", 'checkpoint = "cut.safetensors"\n',
     ", key checkpoint: checkpoint '@DIR@/cut.safetensors' is truncated or not a safetensors file",
     "use a best.safetensors or last.safetensors written by `quill train`"),
    ("checkpoint_not_safetensors", 'checkpoint = "@MODELS@/chars.json"\n',
     ", key checkpoint: checkpoint '@MODELS@/chars.json' is truncated or not a safetensors file",
     "use a best.safetensors or last.safetensors written by `quill train`"),
    ("checkpoint_without_fingerprint", 'checkpoint = "nofp.safetensors"\n',
     ", key checkpoint: checkpoint '@DIR@/nofp.safetensors' has no tokenizer fingerprint in its metadata",
     "use a best.safetensors or last.safetensors written by `quill train`"),
    ("tokenizer_missing", CKPT_LINE + 'tokenizer = "nope.json"\n',
     ", key tokenizer: tokenizer file '@DIR@/nope.json' does not exist", None),
    ("tokenizer_mismatch", CKPT_LINE + 'tokenizer = "@MODELS@/other-chars.json"\n',
     ": tokenizer '@MODELS@/other-chars.json' has fingerprint @OTHER@, but checkpoint '@CKPT@' was trained with "
     "tokenizer @FP@",
     "point `tokenizer` at the tokenizer the model was trained with, or remove the key (the checkpoint carries its own)"),
    ("unknown_sampler", CKPT_LINE + '[sampler]\nchain = "top_k,tempurature"\n',
     ", [sampler]: no sampler named 'tempurature'", "did you mean 'temperature'?"),
    ("chain_not_a_string", CKPT_LINE + '[sampler]\nchain = ["greedy"]\n',
     ": [sampler] chain must be a string like 'top_k,top_p,temperature', not ['greedy']", None),
    ("chain_empty", CKPT_LINE + '[sampler]\nchain = ""\n',
     ", [sampler]: sampler chain '' is not a comma-separated list of sampler names", "for example top_k,top_p,temperature"),
    ("option_out_of_range", CKPT_LINE + '[sampler]\nchain = "top_p"\ntop_p = { p = 1.5 }\n',
     ", [sampler]: top_p.p = 1.5 is out of range", "it needs 0 < top_p.p <= 1"),
    ("option_negative", CKPT_LINE + '[sampler]\ntemperature = { t = -1 }\n',
     ", [sampler]: temperature.t = -1.0 is out of range", "it needs 0 <= temperature.t"),
    ("option_unknown", CKPT_LINE + '[sampler]\nchain = "top_p"\ntop_p = { pp = 0.5 }\n',
     ", [sampler]: sampler 'top_p' has no option 'pp'", "did you mean 'p'?"),
    ("option_wrong_type", CKPT_LINE + '[sampler]\nchain = "top_k"\ntop_k = { k = "many" }\n',
     ", [sampler]: top_k.k must be a whole number, not 'many'", None),
    ("options_outside_chain", CKPT_LINE + '[sampler]\nchain = "top_p"\nmin_p = { p = 0.1 }\n',
     ", [sampler]: 'min_p' is not in the sampler chain top_p", ANY),
    ("options_for_unknown_sampler", CKPT_LINE + '[sampler]\nchain = "top_p"\ntop_kk = { k = 1 }\n',
     ": [sampler] top_kk: no sampler named 'top_kk'", "did you mean 'top_k'?"),
    ("chain_misspelled", CKPT_LINE + '[sampler]\nchian = "greedy"\n',
     ": [sampler] chian = 'greedy' is neither `chain` nor a sampler's options", "did you mean 'chain'?"),
    ("options_not_a_table", CKPT_LINE + '[sampler]\nchain = "top_k"\ntop_k = 40\n',
     ": [sampler] top_k = 40 is neither `chain` nor a sampler's options", "write options as top_k = { option = value }"),
    ("bad_dtype", CKPT_LINE + '[backend]\ndtype = "float64"\n', ": [backend] dtype 'float64' is not auto, float32 or bfloat16",
     None),
    ("bad_quantize", CKPT_LINE + '[backend]\nquantize = "int4"\n', ": [backend] quantize 'int4' is not auto, none or int8", None),
    ("max_new_tokens_0", CKPT_LINE + '[generation]\nmax_new_tokens = 0\n',
     ": [generation] max_new_tokens must be at least 1, not 0", None),
    ("seed_negative", CKPT_LINE + '[generation]\nseed = -1\n', ": [generation] seed must be from 0 to 2**64 - 1, not -1", None),
    ("seed_too_big", CKPT_LINE + f'[generation]\nseed = {2**64}\n',
     f": [generation] seed must be from 0 to 2**64 - 1, not {2**64}", None),
]


@pytest.mark.parametrize(("text", "message", "hint"), [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_each_mistake_is_one_clear_error_naming_the_file(disk, tmp_path, text, message, hint):
    here = tmp_path.resolve()
    (here / "emptyrun").mkdir()
    raw_safetensors(here / "plain.safetensors", {"format": "something-else"})
    raw_safetensors(here / "nofp.safetensors", {"format": "quill-checkpoint", "version": "1"})
    (here / "cut.safetensors").write_bytes(disk["ckpt"].read_bytes()[:100])

    def fill(s: str) -> str:
        for key, value in {"@CKPT@": str(disk["ckpt"]), "@MODELS@": str(disk["models"]), "@DIR@": str(here),
                           "@FP@": disk["tok"].fingerprint, "@OTHER@": disk["other"].fingerprint}.items():
            s = s.replace(key, value)
        return s

    path = write(here / "case.toml", fill(text))
    with pytest.raises(QuillError) as info:
        load_profile(path)
    assert info.value.message == f"profile {str(path)!r}" + fill(message)
    if hint is not ANY:
        assert info.value.hint == hint
    assert "\n" not in info.value.message


def test_a_toml_syntax_error_names_the_line_and_column(disk, tmp_path):
    path = write(tmp_path / "bad.toml", CKPT_LINE.replace("@CKPT@", str(disk["ckpt"])) + "[backend]\ndevice = cpu\n").resolve()
    with pytest.raises(QuillError) as info:
        load_profile(path)
    message = info.value.message
    assert message.startswith(f"profile {str(path)!r} is not valid TOML: ") and "\n" not in message
    assert "(at line 3, column 10)" in message


def test_a_missing_profile_file_is_named(tmp_path):
    path = (tmp_path / "absent.toml").resolve()
    with pytest.raises(QuillError) as info:
        load_profile(path)
    assert info.value.message == f"profile {str(path)!r} does not exist"


def test_the_error_for_a_mismatched_tokenizer_names_both_files_and_fingerprints(disk, tmp_path):
    path = write(tmp_path / "mismatch.toml", f'checkpoint = "{disk["ckpt"]}"\ntokenizer = "{disk["models"]}/other-chars.json"\n')
    with pytest.raises(QuillError) as info:
        load_profile(path)
    message = info.value.message
    for part in (str(disk["ckpt"]), str(disk["models"] / "other-chars.json"), disk["tok"].fingerprint, disk["other"].fingerprint):
        assert part in message
    assert disk["tok"].fingerprint != disk["other"].fingerprint


# ---- checkpoint metadata without torch -----------------------------------------------------------------------------

def test_read_metadata_gives_the_quill_metadata(disk):
    meta = read_metadata(disk["ckpt"])
    assert meta["format"] == "quill-checkpoint" and meta["version"] == "1" and meta["step"] == "1"
    assert meta["tokenizer_fingerprint"] == disk["tok"].fingerprint
    assert read_metadata(disk["models"] / "run")["step"] == "2"  # a run directory: its best checkpoint


@pytest.mark.parametrize("content", [b"", b"\x05\x00", "truncated", b"hello, this is plain text\n" * 4, b"\x10" + b"\0" * 7 + b"[1, 2"])
def test_read_metadata_on_a_truncated_or_foreign_file_is_a_clear_error(disk, tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(disk["ckpt"].read_bytes()[:200] if content == "truncated" else content)
    with pytest.raises(QuillError) as info:
        read_metadata(path)
    assert info.value.message == f"checkpoint {str(path)!r} is truncated or not a safetensors file"
    assert info.value.hint == "use a best.safetensors or last.safetensors written by `quill train`"


def test_read_metadata_on_a_foreign_safetensors_file(tmp_path):
    path = raw_safetensors(tmp_path / "other.safetensors", {"format": "pt"})
    with pytest.raises(QuillError) as info:
        read_metadata(path)
    assert info.value.message == f"{str(path)!r} is a safetensors file but not a Quill checkpoint (no Quill metadata)"


def test_read_metadata_on_a_checkpoint_cut_in_its_tensor_data(disk, tmp_path):
    data = disk["ckpt"].read_bytes()
    assert 8 + int.from_bytes(data[:8], "little") < len(data) - 100  # the header is whole
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-100])
    with pytest.raises(QuillError, match="truncated"):
        read_metadata(path)
    data = bytearray(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    header["__metadata__"]["version"] = "x"
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(data[8 + int.from_bytes(data[:8], "little"):]))
    with pytest.raises(QuillError, match="has a malformed format version 'x'"):
        read_metadata(path)


def test_loading_a_profile_does_not_import_torch(out):
    probe = out["no_torch"].result()
    assert probe.returncode == 0, probe.stderr.decode()[-3000:]
    assert probe.stdout.decode() == "False\n"


# ---- finding profiles ----------------------------------------------------------------------------------------------

def profile_text(disk, description: str) -> str:
    return f'description = "{description}"\ncheckpoint = "{disk["ckpt"]}"\n'


@pytest.fixture
def dirs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(shipped, user): empty profile directories, the shipped one standing in for Quill's own."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    monkeypatch.setenv("QUILL_SHIPPED_PROFILES", str(shipped))
    monkeypatch.setenv("QUILL_PROFILES", str(user))
    return shipped, user


def test_quill_profiles_names_the_user_directory(disk, dirs):
    shipped, user = dirs
    assert user_profile_dir() == user
    write(user / "mine.toml", profile_text(disk, "mine"))
    write(user / "notes.txt", "not a profile")
    write(shipped / "README.md", "# not a profile")
    [entry] = find_profiles()
    assert (entry.name, entry.origin, entry.path, entry.error) == ("mine", "user", user / "mine.toml", None)
    assert entry.profile.description == "mine" and entry.profile.checkpoint == disk["ckpt"]


def test_xdg_config_home_on_linux_when_quill_profiles_is_unset(disk, dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in (lambda: monkeypatch.delenv("QUILL_PROFILES"), lambda: monkeypatch.setenv("QUILL_PROFILES", "")):
        unset()
        assert user_profile_dir() == tmp_path / "xdg" / "quill" / "profiles"
    write(tmp_path / "xdg" / "quill" / "profiles" / "xdg.toml", profile_text(disk, "from xdg"))
    assert [(e.name, e.origin, e.profile.description) for e in find_profiles()] == [("xdg", "user", "from xdg")]
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert user_profile_dir() == tmp_path / "home" / ".config" / "quill" / "profiles"
    monkeypatch.setenv("QUILL_PROFILES", "~/mine")
    assert user_profile_dir() == tmp_path / "home" / "mine"


def test_other_platforms_use_their_usual_place(tmp_path, monkeypatch):
    monkeypatch.delenv("QUILL_PROFILES", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # only for linux and the like
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert user_profile_dir() == tmp_path / "home" / "Library" / "Application Support" / "quill" / "profiles"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("APPDATA", str(tmp_path / "appdata"))
    assert user_profile_dir() == tmp_path / "appdata" / "quill" / "profiles"


def test_a_user_profile_hides_a_shipped_one_of_the_same_name(disk, dirs):
    shipped, user = dirs
    write(shipped / "shared.toml", profile_text(disk, "shipped copy"))
    write(shipped / "only_shipped.toml", profile_text(disk, "shipped only"))
    write(user / "shared.toml", profile_text(disk, "user copy"))
    rows = [(e.name, e.origin, e.path, e.profile.description) for e in find_profiles()]
    assert rows == [("only_shipped", "shipped", shipped / "only_shipped.toml", "shipped only"),
                    ("shared", "user", user / "shared.toml", "user copy")]
    assert get_profile("shared").description == "user copy"
    assert get_profile("only_shipped").path == (shipped / "only_shipped.toml").resolve()


def test_bad_profiles_are_listed_with_their_error_and_hide_no_good_one(disk, dirs):
    shipped, user = dirs
    write(shipped / "b_shipped.toml", profile_text(disk, "good shipped"))
    write(user / "a_good.toml", profile_text(disk, "good a"))
    write(user / "broken.toml", profile_text(disk, "broken") + "[generation]\nmax_new_tokens = 0\n")
    write(user / "garbled.toml", "checkpoint = \n")
    write(user / "z_good.toml", profile_text(disk, "good z"))
    entries = {e.name: e for e in find_profiles()}
    assert list(entries) == ["a_good", "b_shipped", "broken", "garbled", "z_good"]
    for name, description in {"a_good": "good a", "b_shipped": "good shipped", "z_good": "good z"}.items():
        assert entries[name].error is None and entries[name].profile.description == description
        assert get_profile(name).description == description
    broken, garbled = entries["broken"], entries["garbled"]
    assert broken.profile is None and broken.origin == "user"
    assert broken.error.message == (f"profile {str((user / 'broken.toml').resolve())!r}: "
                                    "[generation] max_new_tokens must be at least 1, not 0")
    assert garbled.profile is None and garbled.error.message.startswith(
        f"profile {str((user / 'garbled.toml').resolve())!r} is not valid TOML: ") and "line 1" in garbled.error.message
    with pytest.raises(QuillError) as info:
        get_profile("broken")
    assert info.value.message == broken.error.message  # its own error, not "no profile named"


def test_a_bad_user_profile_is_not_replaced_by_a_good_shipped_one(disk, dirs):
    shipped, user = dirs
    write(shipped / "shared.toml", profile_text(disk, "shipped copy"))
    write(user / "shared.toml", 'checkpoint = "nope.safetensors"\n')
    [entry] = find_profiles()
    assert entry.origin == "user" and entry.profile is None and "nope.safetensors" in entry.error.message
    with pytest.raises(QuillError, match="nope.safetensors"):
        get_profile("shared")


def test_get_profile_by_name_or_path_and_unknown_names(disk, dirs, tmp_path, monkeypatch):
    shipped, user = dirs
    write(user / "shakespeare.toml", profile_text(disk, "by name"))
    elsewhere = write(tmp_path / "elsewhere" / "loose.toml", profile_text(disk, "by path"))
    assert get_profile("shakespeare").description == "by name"
    assert get_profile(str(elsewhere)).description == "by path"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert get_profile("loose.toml").path == elsewhere.resolve()  # a relative .toml path is a file, not a name
    with pytest.raises(QuillError) as info:
        get_profile("shakespear")
    assert (info.value.message, info.value.hint) == ("no profile named 'shakespear'", "did you mean 'shakespeare'?")
    write(user / "tiny.toml", profile_text(disk, "tiny"))
    with pytest.raises(QuillError) as info:
        get_profile("xyz")
    assert (info.value.message, info.value.hint) == ("no profile named 'xyz'", "profiles: shakespeare, tiny")
    for path in user.iterdir():
        path.unlink()
    with pytest.raises(QuillError) as info:
        get_profile("shakespeare")
    assert info.value.hint == f"put profiles in {user}"


# ---- chat template -------------------------------------------------------------------------------------------------

def test_chat_template_lays_out_the_turns():
    template = ChatTemplate(system="<sys>", user_prefix="U[", user_suffix="]u ", model_prefix="M[", model_suffix="]m ")
    turns = [("hi", "hello"), ("how are you?", "fine"), ("", "silence")]
    assert template.render(turns, "bye") == \
        "<sys>U[hi]u M[hello]m U[how are you?]u M[fine]m U[]u M[silence]m U[bye]u M["
    assert template.render([], "hi") == "<sys>U[hi]u M["
    assert ChatTemplate().render([("a", "b")], "c") == "User: a\nQuill: b\nUser: c\nQuill: "


def test_a_profile_template_from_toml_escapes(disk):
    template = load_profile(disk["files"]["tiny"]).template
    assert template.render([("Hi", "Hello")], "Bye") == "A play.\n\nROMEO:\nHi\n\nJULIET:\nHello\n\nROMEO:\nBye\n\nJULIET:\n"
    assert template.stop == ["\n\n", "ROMEO:"]


# ---- the CLI -------------------------------------------------------------------------------------------------------

def test_profiles_list_shows_good_and_bad_profiles(disk, out):
    rows = {}
    for line in ok(out["list"].result()).splitlines():
        match = re.fullmatch(r"(\S+) +\[(shipped|user)\]  (.*)", line)
        assert match, line
        rows[match[1]] = (match[2], match[3])
    files = disk["files"]
    assert rows["tiny"] == ("user", DESCRIPTION)
    assert rows["run"] == ("user", "")
    assert rows["broken"] == ("user", f"ERROR: profile {str(files['broken'])!r}: "
                                      "[generation] max_new_tokens must be at least 1, not 0")
    assert rows["garbled"][1].startswith(f"ERROR: profile {str(files['garbled'])!r} is not valid TOML: ")
    assert "(at line 3, column 10)" in rows["garbled"][1]


def test_profiles_list_json(disk, out):
    rows = {row["name"]: row for row in json.loads(ok(out["list_json"].result())) if row["origin"] == "user"}
    assert list(rows) == ["broken", "garbled", "run", "tiny"]
    files = disk["files"]
    for name in ("tiny", "run"):
        assert rows[name]["error"] is None and rows[name]["path"] == str(files[name])
        assert rows[name]["profile"] == json.loads(json.dumps(load_profile(files[name]).to_dict()))
    assert rows["broken"]["profile"] is None and rows["broken"]["path"] == str(files["broken"])
    assert rows["broken"]["error"] == (f"profile {str(files['broken'])!r}: "
                                       "[generation] max_new_tokens must be at least 1, not 0")
    assert rows["garbled"]["profile"] is None and "is not valid TOML" in rows["garbled"]["error"]


def test_profiles_show_prints_every_setting(disk, out):
    models = disk["models"]
    assert ok(out["show"].result()) == "\n".join([
        f"# profile tiny: {disk['files']['tiny']}",
        f"# tokenizer fingerprint {disk['tok'].fingerprint}",
        f'description = "{DESCRIPTION}"',
        f'checkpoint = "{models / "tiny.safetensors"}"',
        f'tokenizer = "{models / "chars.json"}"',
        "", "[sampler]",
        'chain = "top_k,temperature"',
        "top_k = { k = 5 }",
        "temperature = { t = 1.5 }",
        "", "[backend]",
        'device = "cpu"', 'dtype = "float32"', 'quantize = "none"',
        "", "[generation]",
        "max_new_tokens = 24", "seed = 7",
        "", "[template]",
        r'system = "A play.\n\n"', r'user_prefix = "ROMEO:\n"', r'user_suffix = "\n\n"',
        r'model_prefix = "JULIET:\n"', r'model_suffix = "\n\n"', r'stop = ["\n\n", "ROMEO:"]',
    ]) + "\n"


def test_profiles_show_json_and_by_path(disk, out):
    files = disk["files"]
    assert json.loads(ok(out["show_json"].result())) == json.loads(json.dumps(load_profile(files["tiny"]).to_dict()))
    run = json.loads(ok(out["show_run_path"].result()))
    assert run["checkpoint"] == str(disk["models"] / "run" / "best.safetensors") and run["tokenizer"] is None
    assert run["sampler"] == {"chain": DEFAULT_CHAIN, "top_k": {"k": 40}, "top_p": {"p": 0.95, "min_keep": 1},
                              "temperature": {"t": 0.8}}
    assert run["generation"] == {"max_new_tokens": 200, "seed": None}


def test_profiles_show_and_validate_errors(disk, out):
    files = disk["files"]
    broken = f"profile {str(files['broken'])!r}: [generation] max_new_tokens must be at least 1, not 0"
    assert error(out["show_broken"].result()) == (broken, None)
    assert error(out["validate_bad"].result()) == (broken, None)
    assert error(out["show_unknown"].result()) == ("no profile named 'tinny'", "did you mean 'tiny'?")
    message, hint = error(out["validate_garbled"].result())
    assert message.startswith(f"profile {str(files['garbled'])!r} is not valid TOML: ")
    assert "(at line 3, column 10)" in message and hint is None


def test_profiles_validate_ok(disk, out):
    assert ok(out["validate_ok"].result()) == (
        f"ok: profile 'tiny': checkpoint {disk['models'] / 'tiny.safetensors'} (tokenizer {disk['tok'].fingerprint}), "
        f"sampler chain {CHAIN}\n")


def test_generate_with_a_profile_is_generate_with_its_settings(out, in_process):
    expected = in_process(CHAIN, OPTIONS, max_new_tokens=MAX_NEW, seed=SEED)
    defaults = in_process(CHAIN, max_new_tokens=MAX_NEW, seed=SEED)  # the profile's chain, default options
    assert len(expected) == MAX_NEW and expected != defaults, "the options must matter"
    text = ok(out["gen_profile"].result())
    assert text == expected  # the profile's chain, options, seed and max_new_tokens
    assert ok(out["gen_explicit"].result()) == text


def test_command_line_flags_override_the_profile(out, in_process):
    greedy, short = in_process("greedy", max_new_tokens=MAX_NEW), in_process(CHAIN, OPTIONS, max_new_tokens=6, seed=8)
    assert greedy != in_process(CHAIN, OPTIONS, max_new_tokens=MAX_NEW, seed=SEED) and len(short) == 6
    assert ok(out["gen_greedy"].result()) == greedy  # another chain: the profile's options are dropped
    assert ok(out["gen_short"].result()) == short


def test_generate_needs_a_checkpoint_or_a_profile(disk, out):
    usage = ("give a checkpoint or --profile NAME (one of them)",
             "quill generate runs/small --prompt ... or quill generate --profile shakespeare --prompt ...")
    assert error(out["gen_both"].result(), code=2) == usage
    assert error(out["gen_neither"].result(), code=2) == usage
    assert error(out["gen_unknown"].result()) == ("no profile named 'tinny'", "did you mean 'tiny'?")
    assert error(out["gen_broken"].result()) == (
        f"profile {str(disk['files']['broken'])!r}: [generation] max_new_tokens must be at least 1, not 0", None)


def test_a_profile_quill_writes_loads_back_whatever_the_characters(disk, tmp_path, monkeypatch):
    # Characters beyond U+FFFF (an emoji speaker's name) were written as JSON surrogate escapes,
    # which TOML refuses, so the profile a finished /train or `quill import` wrote did not load.
    from gpt_runtime.profiles import write_profile

    monkeypatch.setenv("QUILL_PROFILES", str(tmp_path))
    template = ChatTemplate(system="Act\x7f I", user_name="🦜 POLLY", model_name="QUILL 𝔔", stop=["\n🦜", "\t"])
    write_profile("odd", disk["ckpt"], "made by 🐍 for 𝔔", "top_k,temperature", {"top_k": {"k": 5}}, 40, template)
    profile = load_profile(tmp_path / "odd.toml")
    assert profile.template == template and profile.description == "made by 🐍 for 𝔔"
