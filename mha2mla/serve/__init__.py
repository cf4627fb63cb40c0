"""Serving a converted model: exact zero-padding to the shapes vLLM's MLA kernels accept (:mod:`.pad`), weight-absorbed
decoding in plain transformers (:mod:`.absorbed`), and KV-cache sizes (:mod:`.kvcache`)."""

from mha2mla.lazy import lazy_attributes

_WHERE = {
    "absorb": "mha2mla.serve.absorbed",
    "pad_checkpoint": "mha2mla.serve.pad",
}
__all__ = list(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
