"""mha2mla: convert pretrained MHA/GQA checkpoints into native DeepSeek-V3 Multi-Head Latent Attention checkpoints.

>>> import mha2mla
>>> mha2mla.convert(source="HuggingFaceTB/SmolLM2-135M", output="smollm2-mla", rank=96, rope_dim=32)  # doctest: +SKIP
"""

from mha2mla.errors import Mha2mlaError

__all__ = ["convert", "ConversionResult", "Mha2mlaError"]


def __getattr__(name: str):
    # Lazy, so `mha2mla --help` does not import torch.
    if name in ("convert", "ConversionResult"):
        from mha2mla import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module 'mha2mla' has no attribute {name!r}")
