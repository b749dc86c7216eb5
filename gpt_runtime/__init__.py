"""Quill runtime: the engine behind the `quill` command, usable as a library."""

import warnings as _warnings

__version__ = "0.1.0"

# torch warns on some imports when NumPy is absent; Quill does not use NumPy.
_warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
