"""Will a DeepseekV3 checkpoint run unchanged in vLLM and SGLang? (pure: a config dict and tensor names, no I/O)

What their DeepSeek-V2/V3 loaders accept, read from their model code (see MLA-FORMAT.md): bias-free attention (stray
``.bias`` tensors are skipped silently), any rope type but the default rewritten to DeepSeek YaRN, the interleaved RoPE
layout hard-coded, ``rms_norm_eps`` used for the latent norm (transformers always uses 1e-6), MoE built for every layer
``>= first_k_dense_replace`` when ``n_routed_experts`` is set, and one KV head per query head.

>>> portability_blockers({"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 2,
...                       "rms_norm_eps": 1e-5}, ["model.layers.0.self_attn.kv_b_proj.weight"])  # doctest: +ELLIPSIS
['rms_norm_eps is 1e-05, not 1e-06: transformers normalises the latent with eps 1e-6 but vLLM and SGLang use ...']
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

__all__ = ["portability_blockers", "fast_kernel_notes", "rope_type"]

ENGINES = "vLLM and SGLang"
PORTABLE_EPS = 1e-6
FAST_KV_LORA_RANK, FAST_ROPE_DIM = 512, 64

_ATTN_BIAS = re.compile(r"\.self_attn\.[^.]+\.bias$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def rope_type(config: dict) -> str:
    """The rope type of a config dict: ``rope_parameters`` (transformers 5.x) first, then legacy ``rope_scaling``."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if isinstance(rope, dict):
            kind = rope.get("rope_type") or rope.get("type")
            if kind:
                return str(kind)
    return "default"


def portability_blockers(config: dict, weight_names: Iterable[str]) -> list[str]:
    """Why ``config`` + tensors would not run (or not run the same) in vLLM/SGLang's DeepSeek-V2/V3 code.

    Args:
        config: a DeepseekV3 ``config.json`` as a dict.
        weight_names: the checkpoint's tensor names (``model.layers.0.self_attn.o_proj.bias``, ...).

    Returns:
        One readable sentence per blocker; empty when the checkpoint is portable.
    """
    names = list(weight_names)
    blockers = []

    model_type = config.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        blockers.append(f"model_type is {model_type!r}, not 'deepseek_v3': this is not an MLA checkpoint "
                        f"(convert it with `mha2mla convert` first)")

    biases = sorted(n for n in names if _ATTN_BIAS.search(n))
    if biases:
        blockers.append(
            f"the attention has {len(biases)} bias tensor(s) (e.g. {biases[0]}); {ENGINES} build DeepSeek attention "
            f"without biases and skip them silently, so outputs there would differ (transformers only)"
        )
    elif config.get("attention_bias"):
        blockers.append(f"config.json sets attention_bias=true, so transformers adds bias parameters that the "
                        f"checkpoint lacks and {ENGINES} never build; set it to false")

    kind = rope_type(config)
    if kind != "default":
        blockers.append(f"rope_type is {kind!r}; {ENGINES} replace every non-default rope type with DeepSeek YaRN, "
                        f"so positions would be encoded differently than in transformers")

    if config.get("rope_interleave", True) is False:
        blockers.append(f"rope_interleave is false (rotate-half layout); {ENGINES} hard-code the interleaved layout, "
                        f"so the rope rows of q and k would be rotated in the wrong pairs")

    eps = config.get("rms_norm_eps", PORTABLE_EPS)
    if eps is None or not math.isclose(float(eps), PORTABLE_EPS, rel_tol=1e-6):
        blockers.append(f"rms_norm_eps is {eps}, not {PORTABLE_EPS}: transformers normalises the latent with eps "
                        f"1e-6 but {ENGINES} use rms_norm_eps, so the latent norm would differ")

    n_layers = config.get("num_hidden_layers")
    first_dense = config.get("first_k_dense_replace", 0) or 0
    if config.get("n_routed_experts") is not None and n_layers is not None and first_dense < n_layers:
        moe_layers = {int(m.group(1)) for n in names if ".mlp.experts." in n and (m := _LAYER.search(n))}
        missing = [i for i in range(first_dense, n_layers) if i not in moe_layers]
        if missing:
            blockers.append(
                f"first_k_dense_replace is {first_dense} < num_hidden_layers {n_layers}, so layers "
                f"{_span(missing)} are built as mixture-of-experts but the checkpoint has no expert weights for them; "
                f"set first_k_dense_replace to {n_layers}"
            )

    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if kv_heads is not None and heads is not None and kv_heads != heads:
        blockers.append(f"num_key_value_heads is {kv_heads} but num_attention_heads is {heads}; DeepSeek MLA expands "
                        f"the latent to one K/V head per query head, so they must be equal")
    return blockers


def fast_kernel_notes(config: dict) -> list[str]:
    """Shapes that run in vLLM/SGLang but miss the fast MLA kernels (not blockers)."""
    notes = []
    rank, rope = config.get("kv_lora_rank"), config.get("qk_rope_head_dim")
    if rank is not None and rank != FAST_KV_LORA_RANK:
        notes.append(f"kv_lora_rank is {rank}, not {FAST_KV_LORA_RANK}: FlashMLA and the other fast MLA kernels are "
                     f"built for {FAST_KV_LORA_RANK}+{FAST_ROPE_DIM}, so engines use a slower generic MLA backend")
    if rope is not None and rope != FAST_ROPE_DIM:
        notes.append(f"qk_rope_head_dim is {rope}, not {FAST_ROPE_DIM}: FlashMLA and the other fast MLA kernels are "
                     f"built for {FAST_KV_LORA_RANK}+{FAST_ROPE_DIM}, so engines use a slower generic MLA backend")
    return notes


def _span(layers: list[int]) -> str:
    if len(layers) == 1:
        return str(layers[0])
    if layers[-1] - layers[0] == len(layers) - 1:
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers[:6])) + (", ..." if len(layers) > 6 else "")
