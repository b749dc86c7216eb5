import subprocess
import sys

from helpers import run_quill


def test_version_and_help():
    out = run_quill("--version")
    assert out.returncode == 0
    assert out.stdout.decode().startswith("quill ")
    out = run_quill("--help")
    assert out.returncode == 0 and b"tokenizer" in out.stdout


def test_the_engine_never_imports_the_interfaces():
    # Data flows one way: tui -> gpt_runtime <- plugins.
    code = (
        "import importlib, pkgutil, sys\n"
        "import gpt_runtime\n"
        "for m in pkgutil.iter_modules(gpt_runtime.__path__):\n"
        "    importlib.import_module('gpt_runtime.' + m.name)\n"
        "print(sorted(name for name in sys.modules if name == 'tui' or name.startswith('tui.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "[]"


def test_no_engine_module_mentions_an_interface_import():
    # Also imports inside functions, which importing the modules would not run.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "gpt_runtime"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n == "tui" or n.startswith("tui.")]
    assert offenders == []
