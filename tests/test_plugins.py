"""The plugin host as plugin authors meet it.

The first half builds small third-party distributions under a temporary
directory, installs them with a real `pip install --target` (offline, one
command, nothing goes into the virtualenv) and runs the real `quill` CLI with
``PYTHONPATH`` pointing at them, so plugins are found through their entry points
exactly as after a `pip install`. The second half drives `gpt_runtime.plugins`
in-process for what a subprocess cannot see: caching, rollback, suggestions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpt_runtime import plugins as host_mod
from gpt_runtime.errors import QuillError, QuillWarning
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.registry import Registry
from gpt_runtime.tokenizer import Tokenizer
from helpers import SAMPLE_TEXT, pip_install_target, run_quill


def tok_class(kind: str) -> type[Tokenizer]:
    """A minimal tokenizer class of the given kind, for registration tests."""
    return type(f"Tok_{kind}", (Tokenizer,), {"kind": kind})

# --- the third-party distributions -------------------------------------------------

GOOD_SOURCE = '''
"""quill-lowbytes: one token per byte of the lower-cased UTF-8 text."""

from gpt_runtime.errors import QuillError
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.tokenizer import Tokenizer

EOS = 256


class LowBytesTokenizer(Tokenizer):
    kind = "lowbytes"

    def __init__(self, seen):
        self.seen = sorted(seen)  # the byte values of the corpus, kept in the file
        self.special_tokens = {"<eos>": EOS}
        self.pieces = [bytes([i]) for i in range(256)] + [b"<eos>"]

    @classmethod
    def train(cls, text, vocab_size=None, progress=None, **options):
        if options:
            raise QuillError("lowbytes takes no options")
        return cls(set(text.lower().encode("utf-8")))

    @classmethod
    def from_content(cls, content, special_tokens):
        if special_tokens != {"<eos>": EOS}:
            raise QuillError("lowbytes needs <eos> = 256")
        return cls(content["seen"])

    def content(self):
        return {"seen": self.seen}

    def encode_ordinary(self, text):
        return list(text.lower().encode("utf-8"))


def reverse(session, args):
    return args[::-1]


@hookimpl
def quill_register_tokenizers(register):
    register("lowbytes", LowBytesTokenizer)


@hookimpl
def quill_register_commands(register):
    register("/reverse", reverse, help="say it backwards")
'''

BROKEN_SOURCE = '''
raise RuntimeError("quill-broken needs a config file\\nsecond line of details")
'''

CLASH_SOURCE = '''
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.tokenizer import Tokenizer


class ImpostorChar(Tokenizer):
    kind = "char"

    @classmethod
    def train(cls, *args, **kwargs):
        raise RuntimeError("the impostor char tokenizer was used")


@hookimpl
def quill_register_tokenizers(register):
    register("char", ImpostorChar)
'''

TYPO_SOURCE = '''
from gpt_runtime.hookspecs import hookimpl


@hookimpl
def quill_register_tokenizer(register):  # the hook is quill_register_tokenizers
    register("typo", object)
'''

# dist name -> (version, entry-point name = plugin name, module, source)
DISTS = {
    "quill-lowbytes": ("0.3.1", "lowbytes", "quill_lowbytes", GOOD_SOURCE),
    "quill-broken": ("0.0.1", "broken", "quill_broken", BROKEN_SOURCE),
    "quill-clash": ("1.0.0", "clash", "quill_clash", CLASH_SOURCE),
    "quill-typo": ("2.0.0", "typo", "quill_typo", TYPO_SOURCE),
}
FAILING = ("broken", "clash", "typo")  # sorted, the order the host loads them in

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "a test plugin for quillgpt"

[project.entry-points.quill]
{plugin} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A directory holding the four test distributions, installed by pip."""
    root = tmp_path_factory.mktemp("quill_plugins")
    dirs = []
    for dist, (version, plugin, module, source) in DISTS.items():
        d = root / "src" / dist
        d.mkdir(parents=True)
        (d / "pyproject.toml").write_text(
            PYPROJECT.format(dist=dist, version=version, plugin=plugin, module=module), encoding="utf-8")
        (d / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        dirs.append(d)
    return pip_install_target(dirs, root / "site")


def quill(site: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """Run the real CLI with the test distributions importable."""
    out = run_quill(*args, env={"PYTHONPATH": str(site), **env})
    return out.returncode, out.stdout.decode("utf-8"), out.stderr.decode("utf-8")


@pytest.fixture(scope="session")
def listing(plugin_site) -> tuple[int, dict[str, dict], str]:
    """`quill plugins --json` with all four distributions installed."""
    code, out, err = quill(plugin_site, "plugins", "--json")
    return code, {p["name"]: p for p in json.loads(out)}, err


# --- real distributions, real CLI -----------------------------------------------------

def test_distributions_are_installed_outside_the_environment(plugin_site):
    found = {d.metadata["Name"]: d for d in metadata.distributions(path=[str(plugin_site)])}
    assert set(found) == set(DISTS)
    for dist, (version, plugin, module, _) in DISTS.items():
        assert found[dist].version == version
        assert [(ep.name, ep.value) for ep in found[dist].entry_points.select(group="quill")] == [(plugin, module)]
    # the test process (and the virtualenv) never sees them
    assert not {ep.name for ep in metadata.entry_points(group="quill")} & {v[1] for v in DISTS.values()}


def test_good_plugin_is_listed_with_what_it_registered(listing):
    code, plugins, _ = listing
    assert code == 0
    assert plugins["lowbytes"] == {
        "name": "lowbytes",
        "version": "0.3.1",
        "origin": "distribution quill-lowbytes",
        "registered": {"tokenizers": ["lowbytes"], "commands": ["/reverse"]},
        "error": None,
        "disabled": False,
    }
    for builtin in ("char", "bpe"):
        assert plugins[builtin]["origin"] == "built-in" and plugins[builtin]["error"] is None


def test_good_plugin_tokenizer_trains_encodes_and_decodes(plugin_site, corpus, tmp_path):
    tok = tmp_path / "low.json"
    code, out, err = quill(plugin_site, "tokenizer", "train", str(corpus), "--kind", "lowbytes", "--out", str(tok))
    assert code == 0, err
    assert "lowbytes tokenizer, vocab size 257" in out
    data = json.loads(tok.read_text(encoding="utf-8"))
    assert data["kind"] == "lowbytes"
    assert data["seen"] == sorted(set(SAMPLE_TEXT.lower().encode("utf-8")))

    code, out, err = quill(plugin_site, "tokenizer", "encode", "--tokenizer", str(tok), "Hello, World <eos>")
    assert code == 0, err
    assert json.loads(out) == list(b"hello, world <eos>")  # <eos> stays text unless allowed
    code, out, err = quill(plugin_site, "tokenizer", "encode", "--tokenizer", str(tok), "--allow-special", "Hi<eos>")
    assert (code, json.loads(out)) == (0, [104, 105, 256]), err
    code, out, err = quill(plugin_site, "tokenizer", "decode", "--tokenizer", str(tok), json.dumps(list(b"hello, world")))
    assert (code, out) == (0, "hello, world"), err

    # without the distribution on the path, the same file names the missing kind
    out = run_quill("tokenizer", "encode", "--tokenizer", str(tok), "hi")
    assert out.returncode == 1
    assert b"a 'lowbytes' tokenizer, a kind no installed plugin provides" in out.stderr


def test_misspelled_kind_suggests_the_plugin_kind(plugin_site, corpus, tmp_path):
    code, _, err = quill(plugin_site, "tokenizer", "train", str(corpus), "--kind", "lowbyte", "--out", str(tmp_path / "t.json"))
    assert code == 2  # a wrong --kind is a usage error
    assert "no tokenizer named 'lowbyte'" in err and "did you mean 'lowbytes'?" in err
    assert not (tmp_path / "t.json").exists()


def test_plugin_failing_on_import_is_reported_and_skipped(listing, plugin_site):
    code, plugins, err = listing
    assert code == 0
    assert plugins["broken"]["error"] == "RuntimeError: quill-broken needs a config file second line of details"
    assert plugins["broken"]["registered"] == {} and plugins["broken"]["disabled"] is False
    assert plugins["broken"]["origin"] == "distribution quill-broken"
    assert plugins["lowbytes"]["error"] is None  # the others still load

    # one one-line warning per failing plugin, and nothing else on stderr
    lines = err.splitlines()
    assert len(lines) == len(FAILING), err
    assert all(line.startswith("quill: warning: plugin ") for line in lines), err
    assert [l for l in lines if "'broken'" in l] == [
        "quill: warning: plugin 'broken' skipped: RuntimeError: quill-broken needs a config file second line of details (see `quill plugins`)"
    ]
    assert "Traceback" not in err

    code, out, err = quill(plugin_site, "plugins")
    assert code == 0 and "Traceback" not in err
    assert "broken 0.0.1  [distribution quill-broken]  ERROR\n    error: RuntimeError: quill-broken needs a config file second line of details\n" in out
    assert "lowbytes 0.3.1  [distribution quill-lowbytes]  ok\n    tokenizers: lowbytes\n    commands: /reverse\n" in out


@pytest.mark.parametrize(
    ("disabled", "expected"),
    [
        ("", ["plugin 'broken' (distribution quill-broken) failed: RuntimeError: quill-broken needs a config file"]),
        ("broken", ["plugin 'clash' (distribution quill-clash) failed:", "'char'", "'clash'"]),
        ("broken,clash", ["plugin 'typo' (distribution quill-typo) failed:", "did you mean 'quill_register_tokenizers'?"]),
        ("broken,clash,typo", None),
    ],
)
def test_strict_mode_turns_a_plugin_failure_into_an_error(plugin_site, disabled, expected):
    code, out, err = quill(plugin_site, "plugins", "--json", QUILL_STRICT_PLUGINS="1", QUILL_DISABLE_PLUGINS=disabled)
    assert "Traceback" not in err
    if expected is None:  # nothing broken left: strict mode is silent
        assert (code, err) == (0, "")
        assert {p["name"]: p["error"] for p in json.loads(out)}["lowbytes"] is None
        return
    assert (code, out) == (1, "")
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("quill: error: ")]
    assert len(errors) == 1 and lines[0] == errors[0], err
    assert all(part in errors[0] for part in expected), err
    assert lines[1:] == ["  hint: unset QUILL_STRICT_PLUGINS to skip broken plugins"]


def test_name_taken_by_a_builtin_names_both_and_builtin_keeps_working(listing, plugin_site, corpus, tmp_path):
    _, plugins, err = listing
    assert plugins["clash"]["error"].startswith(
        "tokenizer 'char' is registered by both plugin 'char' and plugin 'clash'")
    assert "QUILL_DISABLE_PLUGINS=clash" in plugins["clash"]["error"]
    assert plugins["clash"]["registered"] == {}
    assert plugins["char"]["error"] is None and plugins["char"]["registered"] == {"tokenizers": ["char"]}

    tok = tmp_path / "chars.json"
    code, out, err = quill(plugin_site, "tokenizer", "train", str(corpus), "--kind", "char", "--out", str(tok))
    assert code == 0, err  # the impostor's train() would have failed
    assert "char tokenizer" in out
    code, out, err = quill(plugin_site, "tokenizer", "encode", "--tokenizer", str(tok), "Speak")
    assert code == 0, err
    code, text, err = quill(plugin_site, "tokenizer", "decode", "--tokenizer", str(tok), out)
    assert (code, text) == (0, "Speak"), err


def test_misspelled_hook_is_an_error_suggesting_the_right_name(listing):
    _, plugins, _ = listing
    assert plugins["typo"]["error"] == (
        "implements unknown hook quill_register_tokenizer; did you mean 'quill_register_tokenizers'?")
    assert plugins["typo"]["registered"] == {}


def test_disabled_plugins_are_skipped_and_shown(plugin_site, corpus, tmp_path):
    env = {"QUILL_DISABLE_PLUGINS": " lowbytes, bpe ,broken"}
    code, out, err = quill(plugin_site, "plugins", "--json", **env)
    assert code == 0
    plugins = {p["name"]: p for p in json.loads(out)}
    for name in ("lowbytes", "bpe", "broken"):
        assert (plugins[name]["disabled"], plugins[name]["error"], plugins[name]["registered"]) == (True, None, {})
    assert plugins["char"]["disabled"] is False and plugins["char"]["registered"] == {"tokenizers": ["char"]}
    assert "'broken'" not in err  # a disabled plugin is not even imported
    assert "'clash'" in err and "'typo'" in err

    for kind in ("lowbytes", "bpe"):
        code, _, err = quill(plugin_site, "tokenizer", "train", str(corpus), "--kind", kind,
                             "--vocab-size", "300", "--out", str(tmp_path / f"{kind}.json"), **env)
        assert code == 2 and f"no tokenizer named {kind!r}" in err, err

    code, out, _ = quill(plugin_site, "plugins", **env)
    assert code == 0
    assert "lowbytes 0.3.1  [distribution quill-lowbytes]  disabled\n" in out
    assert "bpe 0.1.0  [built-in]  disabled\n" in out


# --- in-process: the host itself --------------------------------------------------------

@pytest.fixture
def fake_plugins(monkeypatch):
    """Make the host see exactly the given plugin objects (as built-ins), nothing else."""
    monkeypatch.setattr(host_mod, "metadata", SimpleNamespace(entry_points=lambda group: []))

    def install(**plugins: object) -> None:
        builtins = []
        for name, plugin in plugins.items():
            module = f"_quill_test_plugin_{name}"
            monkeypatch.setitem(sys.modules, module, plugin)
            builtins.append((name, module))
        monkeypatch.setattr(host_mod, "BUILTINS", tuple(builtins))
        host_mod.get_plugin_host.cache_clear()

    return install


def test_registry_is_built_once_and_cached(fake_plugins):
    from gpt_runtime.tokenizer import tokenizer_class

    calls = []

    class Counting:
        @hookimpl
        def quill_register_tokenizers(self, register):
            calls.append(1)
            register("counted", counted)

    counted = tok_class("counted")
    fake_plugins(counting=Counting())
    registry = host_mod.get_registry()
    for _ in range(100):
        assert host_mod.get_registry() is registry
        assert tokenizer_class("counted") is counted
    assert host_mod.get_plugin_host().registry is registry
    assert len(calls) == 1
    host_mod.get_plugin_host.cache_clear()  # only a new host registers again
    assert host_mod.get_registry() is not registry
    assert len(calls) == 2


def test_hook_raising_halfway_leaves_nothing_registered(fake_plugins):
    class HalfWay:
        @hookimpl
        def quill_register_tokenizers(self, register):
            register("half_tok", tok_class("half_tok"))

        @hookimpl
        def quill_register_samplers(self, register):
            register("half_sampler", dict)
            raise ValueError("sampler table exploded\nmore details")

    later_tok = tok_class("half_tok")

    class Later:
        @hookimpl
        def quill_register_tokenizers(self, register):
            register("half_tok", later_tok)

    fake_plugins(halfway=HalfWay(), later=Later())
    with pytest.warns(QuillWarning, match=r"plugin 'halfway' skipped: ValueError: sampler table exploded more details \(see"):
        host = host_mod.get_plugin_host()
    info = host.get("halfway")
    assert (info.error, info.registered) == ("ValueError: sampler table exploded more details", {})
    assert host.registry.names("samplers") == []
    assert host.registry.get("tokenizers", "half_tok").obj is later_tok  # the name stayed free
    assert host.get("later").registered == {"tokenizers": ["half_tok"]}
    assert not host.pm.has_plugin("halfway") and host.pm.has_plugin("later")


def test_conflict_in_a_later_kind_rolls_back_the_earlier_kinds(fake_plugins):
    class First:
        @hookimpl
        def quill_register_commands(self, register):
            register("/shared", print)

    class Second:
        @hookimpl
        def quill_register_tokenizers(self, register):
            register("second_tok", tok_class("second_tok"))  # fine on its own...

        @hookimpl
        def quill_register_commands(self, register):
            register("/shared", repr)  # ...but this one is taken

    fake_plugins(first=First(), second=Second())
    with pytest.warns(QuillWarning, match="plugin 'second' skipped"):
        host = host_mod.get_plugin_host()
    assert host.get("second").error.startswith("command '/shared' is registered by both plugin 'first' and plugin 'second'")
    assert host.registry.names("tokenizers") == []  # no half-registered plugin
    assert host.registry.get("commands", "/shared").obj is print


def test_unknown_hook_of_any_name_is_reported_and_strict_mode_raises(fake_plugins, monkeypatch):
    class Typo:
        @hookimpl
        def register_tokenizers(self, register):  # no quill_ prefix
            register("typo", tok_class("typo"))

    fake_plugins(typo=Typo())
    with pytest.warns(QuillWarning, match="plugin 'typo' skipped"):
        host = host_mod.get_plugin_host()
    assert host.get("typo").error == "implements unknown hook register_tokenizers; did you mean 'quill_register_tokenizers'?"
    assert not host.pm.has_plugin("typo")

    host_mod.get_plugin_host.cache_clear()
    monkeypatch.setenv("QUILL_STRICT_PLUGINS", "1")
    for _ in range(2):  # a failed load is not cached as a success
        with pytest.raises(QuillError, match=r"plugin 'typo' \(built-in\) failed: implements unknown hook"):
            host_mod.get_registry()


def test_hook_without_hookimpl_decorator_is_reported(fake_plugins):
    class Forgetful:
        def quill_register_tokenizers(self, register):  # no @hookimpl: pluggy would skip it
            register("forgotten", tok_class("forgotten"))

    fake_plugins(forgetful=Forgetful())
    with pytest.warns(QuillWarning, match="plugin 'forgetful' skipped"):
        host = host_mod.get_plugin_host()
    assert "quill_register_tokenizers is not decorated with @hookimpl" in host.get("forgetful").error
    assert "forgotten" not in host.registry.names("tokenizers")


def test_the_modules_owning_samplers_and_tokenizers_hand_the_registry_their_checks():
    import gpt_runtime.sampling  # noqa: F401  (as every sampler plugin does, to subclass Sampler)
    import gpt_runtime.tokenizer  # noqa: F401

    reg = Registry()
    register, staged = reg.stage("tokenizers", "p")
    register("lowbytes", dict)
    with pytest.raises(QuillError, match="tokenizer 'lowbytes' must be a subclass of gpt_runtime.tokenizer.Tokenizer"):
        reg.commit({"tokenizers": staged})
    register, staged = reg.stage("samplers", "p")
    register("mine", list)
    with pytest.raises(QuillError, match="sampler 'mine'"):
        reg.commit({"samplers": staged})
    assert reg.names("tokenizers") == reg.names("samplers") == []  # nothing half-committed


def test_a_sampler_or_tokenizer_registered_before_its_base_class_module_loads_is_refused():
    # With every built-in disabled nothing imports sampling or tokenizer, and so no
    # check is in place; what a plugin registers then cannot subclass their classes.
    code = textwrap.dedent("""
        import sys
        from gpt_runtime.errors import QuillError
        from gpt_runtime.registry import Registry
        for kind in ("tokenizers", "samplers"):
            reg = Registry()
            register, staged = reg.stage(kind, "p")
            register("mine", object)
            try:
                reg.commit({kind: staged})
            except QuillError as exc:
                print(exc)
        print("gpt_runtime.sampling" in sys.modules, "gpt_runtime.tokenizer" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "tokenizer 'mine' must be a subclass of gpt_runtime.tokenizer.Tokenizer, not <class 'object'>",
        "sampler 'mine' must be a subclass of gpt_runtime.sampling.Sampler, not <class 'object'>",
        "False False",
    ]


def test_registry_get_unknown_name_suggests_the_closest():
    reg = Registry()
    register, staged = reg.stage("backends", "p")  # backends: a kind no module hands a check to
    register("lowbytes", dict)
    register("char", list)
    reg.commit({"backends": staged})

    with pytest.raises(QuillError) as exc:
        reg.get("backends", "lowbyte")
    assert (exc.value.message, exc.value.hint) == ("no backend named 'lowbyte'", "did you mean 'lowbytes'?")
    with pytest.raises(QuillError) as exc:
        reg.get("backends", "zzzzzz")
    assert exc.value.hint == "registered backends: char, lowbytes"
    with pytest.raises(QuillError) as exc:
        reg.get("samplers", "top_k")
    assert exc.value.hint == "registered samplers: none"

    with pytest.raises(QuillError) as exc:  # and through the real host, with the built-ins
        host_mod.get_registry().get("tokenizers", "bpee")
    assert exc.value.hint == "did you mean 'bpe'?"


def test_register_rejects_bad_and_repeated_names():
    reg = Registry()
    register, staged = reg.stage("commands", "p")
    register("/a", print)
    with pytest.raises(QuillError, match="plugin 'p' registers the command '/a' twice"):
        register("/a", print)
    with pytest.raises(QuillError, match="invalid name"):
        register("", print)
    assert [e.name for e in staged] == ["/a"]
    assert reg.names("commands") == []  # nothing reaches the table before commit


def test_tokenizer_class_must_match_its_registered_kind(fake_plugins):
    class Mislabelled:
        @hookimpl
        def quill_register_tokenizers(self, register):
            register("lower", tok_class("char_copy"))

    class NotAClass:
        @hookimpl
        def quill_register_tokenizers(self, register):
            register("number", 42)

    fake_plugins(mislabelled=Mislabelled(), notaclass=NotAClass())
    with pytest.warns(QuillWarning):
        host = host_mod.get_plugin_host()
    assert host.get("mislabelled").error == "tokenizer 'lower' is registered with a class whose kind is 'char_copy' (set kind = 'lower' on Tok_char_copy)"
    assert "must be a subclass of gpt_runtime.tokenizer.Tokenizer" in host.get("notaclass").error
    assert host.registry.names("tokenizers") == []


def test_sampler_classes_are_checked_when_registered(fake_plugins, monkeypatch):
    from gpt_runtime.sampling import Option, Sampler

    def sampler_class(name: str, **options: Option) -> type[Sampler]:
        return type("Custom", (Sampler,), {"name": name, "options": options, "apply": lambda self, logits, state: logits})

    def plugin(name: str, obj: object, also: tuple[str, object] | None = None) -> object:
        class Plugin:
            @hookimpl
            def quill_register_tokenizers(self, register):
                if also:
                    register(*also)

            @hookimpl
            def quill_register_samplers(self, register):
                register(name, obj)
        return Plugin()

    good = sampler_class("fine", level=Option(2, low=0))
    fake_plugins(
        notaclass=plugin("plain", lambda logits, state: logits, also=("plain_tok", tok_class("plain_tok"))),
        unnamed=plugin("anon", sampler_class("")),
        mislabelled=plugin("mine", sampler_class("yours")),
        rawoption=plugin("raw", sampler_class("raw", t=0.5)),
        baddefault=plugin("hot", sampler_class("hot", t=Option(-1.0, low=0))),
        nonedefault=plugin("none", sampler_class("none", x=Option(None))),
        good=plugin("fine", good),
    )
    with pytest.warns(QuillWarning) as caught:
        host = host_mod.get_plugin_host()
    errors = {info.name: info.error for info in host.plugins}
    assert errors["notaclass"].startswith("sampler 'plain' must be a subclass of gpt_runtime.sampling.Sampler, not <function ")
    assert {name: error for name, error in errors.items() if name != "notaclass"} == {
        "unnamed": "sampler 'anon' is registered with a class that has no name (set name = 'anon' on Custom)",
        "mislabelled": "sampler 'mine' is registered with a class whose name is 'yours' (set name = 'mine' on Custom)",
        "rawoption": "sampler 'raw': option 't' must be a gpt_runtime.sampling.Option, not 0.5 (write 't': Option(default, help))",
        "baddefault": "sampler 'hot': the default of option 't' is invalid: hot.t = -1.0 is out of range (it needs 0 <= hot.t)",
        "nonedefault": ("sampler 'none': the default of option 'x' is invalid: none.x has a default of unsupported type NoneType "
                        "(None) (an option's default must be an int, float, bool or str; its type is the option's type)"),
        "good": None,
    }
    # each broken plugin is one warning naming it, and none of it is registered (its tokenizer neither)
    assert [str(w.message) for w in caught] == [
        f"plugin {name!r} skipped: {errors[name]} (see `quill plugins`)" for name in errors if name != "good"]
    assert host.registry.names("samplers") == ["fine"] and host.registry.get("samplers", "fine").obj is good
    assert host.registry.names("tokenizers") == []

    host_mod.get_plugin_host.cache_clear()
    monkeypatch.setenv("QUILL_STRICT_PLUGINS", "1")
    with pytest.raises(QuillError, match=r"plugin 'notaclass' \(built-in\) failed: sampler 'plain' must be a subclass"):
        host_mod.get_registry()


def test_plugin_calling_sys_exit_is_isolated(fake_plugins, monkeypatch):
    def exiting_import():
        raise SystemExit("plugin needs a config file")

    fake_plugins()
    monkeypatch.setattr(host_mod, "BUILTINS", (("exiter", "_quill_test_exiter"), ("char", "plugins.char_tokenizer")))
    monkeypatch.setattr(host_mod.importlib, "import_module", lambda name, _real=host_mod.importlib.import_module: exiting_import() if name == "_quill_test_exiter" else _real(name))
    with pytest.warns(QuillWarning, match="plugin 'exiter' skipped: SystemExit: plugin needs a config file"):
        host = host_mod.get_plugin_host()
    assert host.registry.names("tokenizers") == ["char"]


def test_two_plugins_with_one_name_are_both_named(fake_plugins, monkeypatch):
    class First:
        pass

    fake_plugins(same=First())
    # a third-party entry point that reuses the built-in's plugin name
    ep = SimpleNamespace(name="same", value="other_pkg", dist=SimpleNamespace(version="9.9", metadata={"Name": "other-dist"}), load=lambda: First())
    monkeypatch.setattr(host_mod, "metadata", SimpleNamespace(entry_points=lambda group: [ep]))
    with pytest.warns(QuillWarning):
        host = host_mod.get_plugin_host()
    second = [p for p in host.plugins if p.origin == "distribution other-dist"][0]
    assert second.error == "the plugin name 'same' is taken by built-in (rename the entry point)"


def test_disabling_an_unknown_plugin_warns_with_a_suggestion(fake_plugins, monkeypatch):
    fake_plugins(lowbytes=SimpleNamespace())
    monkeypatch.setenv("QUILL_DISABLE_PLUGINS", "lowbyte")
    with pytest.warns(QuillWarning, match="QUILL_DISABLE_PLUGINS names 'lowbyte', which is no plugin here; did you mean 'lowbytes'"):
        host_mod.get_plugin_host()
