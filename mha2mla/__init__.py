"""mha2mla: convert pretrained MHA/GQA checkpoints into native DeepSeek-V3 Multi-Head Latent Attention checkpoints.

Subpackages: :mod:`mha2mla.ops` (pure math), :mod:`mha2mla.conversion` (the conversion), :mod:`mha2mla.checkpoint`
(files), :mod:`mha2mla.serve`, :mod:`mha2mla.heal`, :mod:`mha2mla.eval`, :mod:`mha2mla.cli`, :mod:`mha2mla.demo`;
shared helpers: :mod:`mha2mla.errors`, :mod:`mha2mla.progress`, :mod:`mha2mla.data`, :mod:`mha2mla.loading`,
:mod:`mha2mla.allocator`, :mod:`mha2mla.lazy`.

>>> import mha2mla
>>> mha2mla.convert(source="HuggingFaceTB/SmolLM2-135M", output="smollm2-mla", rank=96, rope_dim=32)  # doctest: +SKIP
"""

from mha2mla.lazy import lazy_attributes

_WHERE = {
    "convert": "mha2mla.conversion.pipeline",
    "ConversionResult": "mha2mla.conversion.pipeline",
    "Method": "mha2mla.conversion.options",
    "Mha2mlaError": "mha2mla.errors",
    "absorb": "mha2mla.serve.absorbed",
    "pad_checkpoint": "mha2mla.serve.pad",
}
__all__ = list(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
