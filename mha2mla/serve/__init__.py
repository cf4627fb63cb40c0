"""Serving a converted model: exact zero-padding to the shapes vLLM's MLA kernels accept (:mod:`.pad`), weight-absorbed
decoding in plain transformers (:mod:`.absorbed`), and KV-cache sizes (:mod:`.kvcache`)."""

import importlib

__all__ = ["absorb", "pad_checkpoint"]
_WHERE = {'absorb': 'mha2mla.serve.absorbed', 'pad_checkpoint': 'mha2mla.serve.pad'}


def __getattr__(name: str):
    # lazy: importing one module of the package (e.g. from the CLI) does not import them all
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
