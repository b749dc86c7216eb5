"""quill-xtc: the XTC ("exclude top choices") sampler as a Quill plugin.

XTC makes text less predictable without making it less coherent. Most samplers
cut the unlikely tail of the distribution; XTC sometimes cuts the *head*
instead. When several tokens are each likely enough (probability >= threshold),
any of them would do, so XTC removes all of them except the least likely one,
steering the model away from its most obvious choice. When only one token is
that likely, it is left alone: that token is probably the only sensible one.
XTC does this at a step with chance `probability`, so plenty of ordinary steps
remain. The idea comes from text-generation-webui and llama.cpp.

Use it after the filters that cut the tail and before temperature::

    quill generate RUN --sampler top_k,xtc,temperature --set xtc.threshold=0.1

or, in the chat, ``/xtc on``. This file is a complete plugin: a `Sampler`
subclass and a slash command, and the hooks that register them. The entry
point in pyproject.toml tells Quill to load this module.
"""

from __future__ import annotations

# Only light imports at the top: Quill loads every plugin for every command,
# including ones that never touch a model, so torch is imported inside `apply`.
from gpt_runtime.hookspecs import hookimpl
from gpt_runtime.sampling import Option, Sampler


class ExcludeTopChoices(Sampler):
    """XTC: sometimes remove the likeliest tokens, keeping the least likely of those above a threshold.

    At each step and for each row of the batch, with chance `probability`:
    find the tokens whose probability is at least `threshold`; if there are two
    or more, remove all of them but the least likely one (on a tie, the one
    with the lowest id stays). Tokens below the threshold are never touched.
    Probabilities are those of the logits as they reach XTC, so samplers
    earlier in the chain (top_k, min_p, ...) have already had their say.
    """

    # The first line of the docstring above is what `quill samplers` shows.
    name = "xtc"
    # Each Option becomes an attribute (self.threshold, self.probability) once the
    # sampler is built; its type is the type of the default, and Quill checks the
    # range of values a user gives with --set, before the model is loaded.
    options = {
        "threshold": Option(0.1, "a token this likely or more is a top choice", low=0, high=0.5),
        "probability": Option(0.5, "the chance, per step, of removing the top choices", low=0, high=1),
    }

    def apply(self, logits, state):
        """Remove the top choices from the rows where the draw says so.

        `logits` is float32 (batch, vocab) and may be changed in place; tokens
        at -inf were removed earlier and stay removed. Random draws come from
        `state.generator`, so the same --seed gives the same text.
        """
        import torch

        if self.probability == 0:
            return logits  # nothing to do, and no random number drawn
        rows = logits.shape[0]
        if self.probability < 1:
            draws = torch.rand(rows, generator=state.generator, device=state.generator.device)
            active = (draws < self.probability).to(logits.device)
        else:
            active = torch.ones(rows, dtype=torch.bool, device=logits.device)

        probs = logits.softmax(dim=-1)
        # A removed token (-inf) has probability 0; it is never a top choice,
        # not even with threshold 0.
        top = (probs >= self.threshold) & ~logits.isneginf()
        active &= top.sum(dim=-1) >= 2  # a single top choice is kept
        if not bool(active.any()):
            return logits
        # The least likely top choice of each row survives (argmin: lowest id on a tie).
        survivor = torch.where(top, probs, torch.full_like(probs, float("inf"))).argmin(dim=-1, keepdim=True)
        remove = top & active[:, None]
        remove.scatter_(1, survivor, False)
        return logits.masked_fill_(remove, float("-inf"))


@hookimpl
def quill_register_samplers(register):
    """Called once per process by Quill's plugin host: name -> sampler class."""
    register("xtc", ExcludeTopChoices)


def xtc_command(session, args: str) -> str:
    """/xtc on|off: put XTC into the chat's sampler chain (before temperature) or take it out."""
    from gpt_runtime.errors import UsageError

    chain = [name for name in session.chain.split(",") if name != "xtc"]
    if args == "on":
        at = chain.index("temperature") if "temperature" in chain else len(chain)
        chain.insert(at, "xtc")
    elif args != "off":
        raise UsageError("/xtc takes on or off")
    session.set_chain(",".join(chain))
    return f"sampler chain: {session.chain}"


@hookimpl
def quill_register_commands(register):
    """Plugins can add slash commands too: they appear in /help and in completion."""
    register("/xtc", xtc_command, help="put the XTC sampler into the chain, or take it out", usage="/xtc on|off",
             complete=lambda session, partial: [w for w in ("on", "off") if w.startswith(partial)])
