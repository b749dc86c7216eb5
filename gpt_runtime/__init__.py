"""Quill runtime: the engine behind the `quill` command, usable as a library."""

__version__ = "0.1.0"
