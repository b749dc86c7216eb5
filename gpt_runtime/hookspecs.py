"""The plugin contract: the hooks a Quill plugin may implement.

A plugin is a module (or any object) with functions named after these hooks and
decorated with `gpt_runtime.hookspecs.hookimpl`. Built-in plugins in `plugins/` use exactly
these hooks; a third-party plugin declares its module in its own pyproject::

    [project.entry-points.quill]
    my_plugin = "my_package.my_module"

Each hook receives a `register` callable. Call it once per thing you provide;
registration happens once per process, never per token. A name that two plugins
register is an error naming both.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("quill")
hookimpl = pluggy.HookimplMarker("quill")


@hookspec
def quill_register_tokenizers(register) -> None:
    """Register tokenizer kinds: ``register(name, cls)``.

    `cls` is a subclass of `gpt_runtime.tokenizer.Tokenizer` (its docstring lists
    what to implement) whose ``kind`` attribute equals `name`: the kind stored in
    tokenizer files and given to ``quill tokenizer train --kind``.
    """


@hookspec
def quill_register_samplers(register) -> None:
    """Register samplers: ``register(name, cls)``.

    `cls` is a subclass of `gpt_runtime.sampling.Sampler` (its docstring is the
    whole protocol): ``cls(**options)`` makes a fresh sampler for each
    generation, and its `options` are listed by ``quill samplers``. Check it with
    `gpt_runtime.testing.check_sampler`.
    """


@hookspec
def quill_register_backends(register) -> None:
    """Register hardware backends: ``register(name, factory)``.

    `factory()` returns a `gpt_runtime.backend.Backend` (device, dtypes,
    availability, autocast, memory, synchronisation); ``--device NAME`` picks it.
    """


@hookspec
def quill_register_commands(register) -> None:
    """Register chat slash commands: ``register("/name", handler, help="...", usage="...", complete=fn)``.

    `handler(session, args: str)` runs the command with the `ChatSession` and the
    text after the name; it returns text, an iterator of reply events, `QUIT`,
    None, or a result type of `gpt_runtime.commands` (`TurnsChanged`,
    `JobsChanged`, `TokenView`, `Comparison`, `CommandHelp`, `Reply`) that tells
    the interfaces what changed. Before any model has loaded, `session` may be
    a stand-in whose `profile` is None (see `gpt_runtime.commands`). `help` is the line ``/help`` shows, `usage`
    the synopsis shown with a `UsageError`, and ``complete(session, partial)``
    returns tab completions for the argument.
    """
