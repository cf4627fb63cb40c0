"""``mha2mla eval``: a converted model against its source on lm-eval tasks (:mod:`.tasks`), perplexity
(:mod:`.perplexity`) and long-context checks (:mod:`.long_context`), side by side (:mod:`.compare`,
:mod:`.report`)."""

import importlib

__all__ = ["evaluate"]
_WHERE = {'evaluate': 'mha2mla.eval.compare'}


def __getattr__(name: str):
    # lazy: importing one module of the package (e.g. from the CLI) does not import them all
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
