from helpers import run_quill


def test_version_and_help():
    out = run_quill("--version")
    assert out.returncode == 0
    assert out.stdout.decode().startswith("quill ")
    out = run_quill("--help")
    assert out.returncode == 0 and b"tokenizer" in out.stdout
