"""``mha2mla heal``: a short fine-tune of a converted checkpoint with accelerate, optionally distilling from its source.
The loop (:mod:`.loop`), its memory-lean losses (:mod:`.losses`), its files (:mod:`.files`) and recipes
(:mod:`.recipe`)."""

import importlib

__all__ = ["heal"]
_WHERE = {'heal': 'mha2mla.heal.loop'}


def __getattr__(name: str):
    # lazy: importing one module of the package (e.g. from the CLI) does not import them all
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
