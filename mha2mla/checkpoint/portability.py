"""Will a DeepseekV3 checkpoint run unchanged in vLLM and SGLang? (pure: a config dict and tensor names, no I/O)

What their DeepSeek-V2/V3 loaders accept, read from their model code: bias-free attention (stray ``.bias`` tensors are
skipped silently), any rope type but the default rewritten to DeepSeek YaRN, ``rms_norm_eps`` used for the latent norm
(transformers always uses 1e-6), MoE built for every layer ``>= first_k_dense_replace`` when ``n_routed_experts`` is
set, one KV head per query head; vLLM alone hard-codes the interleaved RoPE layout and never ties ``lm_head``. Read in
vLLM 0.32.0's ``vllm/model_executor/models/deepseek_v2.py`` (``kv_a_layernorm`` built with ``config.rms_norm_eps``; a
non-default ``rope_type`` rewritten to DeepSeek YaRN; ``get_rope(..., is_neox_style=False)``; every attention linear
``bias=False``; a separate ``ParallelLMHead``) and SGLang 0.5.23's ``sglang/srt/models/deepseek_v2.py`` (the same, but
``is_neox_style = not config.rope_interleave`` and ``lm_head`` tied to the embedding with one pipeline stage;
``models/deepseek_common/deepseek_weight_loader.py`` skips stray biases).

>>> portability_blockers({"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 2,
...                       "rms_norm_eps": 1e-5}, ["model.layers.0.self_attn.kv_b_proj.weight"])  # doctest: +ELLIPSIS
['rms_norm_eps is 1e-05, not 1e-06: transformers normalises the latent with eps 1e-6 but vLLM and SGLang use ...']
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

__all__ = ["portability_blockers", "fast_kernel_notes", "rope_type", "config_errors", "expected_shapes",
           "shape_errors", "EngineVerdict", "serving_verdicts", "is_portable"]

ENGINES = "vLLM and SGLang"
VLLM_ONLY = "vLLM"  # blockers SGLang (0.5.23) does not share
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
    return [sentence for sentence, _ in _blockers(config, list(weight_names))]


def _blockers(config: dict, names: list[str]) -> list[tuple[str, str]]:
    """``(sentence, which engines)`` per blocker: :data:`ENGINES` (both) or :data:`VLLM_ONLY`."""
    blockers = []

    model_type = config.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        blockers.append((f"model_type is {model_type!r}, not 'deepseek_v3': this is not an MLA checkpoint "
                         f"(convert it with `mha2mla convert` first)", ENGINES))

    biases = sorted(n for n in names if _ATTN_BIAS.search(n))
    if biases:
        blockers.append((
            f"the attention has {len(biases)} bias tensor(s) (e.g. {biases[0]}); {ENGINES} build DeepSeek attention "
            f"without biases and skip them silently, so outputs there would differ (transformers only)", ENGINES))
    elif config.get("attention_bias"):
        blockers.append((f"config.json sets attention_bias=true, so transformers adds bias parameters that the "
                         f"checkpoint lacks and {ENGINES} never build; set it to false", ENGINES))

    kind = rope_type(config)
    if kind != "default":
        blockers.append((f"rope_type is {kind!r}; {ENGINES} replace every non-default rope type with DeepSeek YaRN, "
                         f"so positions would be encoded differently than in transformers", ENGINES))

    if config.get("rope_interleave", True) is False:
        blockers.append((f"rope_interleave is false (rotate-half layout); {VLLM_ONLY} hard-codes the interleaved "
                         f"layout, so the rope rows of q and k would be rotated in the wrong pairs", VLLM_ONLY))

    eps = config.get("rms_norm_eps", PORTABLE_EPS)
    if eps is None or not math.isclose(float(eps), PORTABLE_EPS, rel_tol=1e-6):
        blockers.append((f"rms_norm_eps is {eps}, not {PORTABLE_EPS}: transformers normalises the latent with eps "
                         f"1e-6 but {ENGINES} use rms_norm_eps, so the latent norm would differ", ENGINES))

    n_layers = config.get("num_hidden_layers")
    first_dense = config.get("first_k_dense_replace", 0) or 0
    if config.get("n_routed_experts") is not None and n_layers is not None and first_dense < n_layers:
        moe_layers = {int(m.group(1)) for n in names if ".mlp.experts." in n and (m := _LAYER.search(n))}
        missing = [i for i in range(first_dense, n_layers) if i not in moe_layers]
        if missing:
            blockers.append((
                f"first_k_dense_replace is {first_dense} < num_hidden_layers {n_layers}, so layers "
                f"{_span(missing)} are built as mixture-of-experts but the checkpoint has no expert weights for them; "
                f"set first_k_dense_replace to {n_layers}", ENGINES))

    if config.get("tie_word_embeddings") and "lm_head.weight" not in names:
        blockers.append((f"tie_word_embeddings is true and there is no lm_head.weight; {VLLM_ONLY} builds DeepSeek's "
                         f"lm_head untied and would leave it unloaded (`mha2mla pad` writes it untied)", VLLM_ONLY))

    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if kv_heads is not None and heads is not None and kv_heads != heads:
        blockers.append((f"num_key_value_heads is {kv_heads} but num_attention_heads is {heads}; DeepSeek MLA "
                         f"expands the latent to one K/V head per query head, so they must be equal", ENGINES))
    return blockers


def fast_kernel_notes(config: dict) -> list[str]:
    """What the per-engine verdicts do not say: shapes that miss DeepSeek's own kernels, and engines not listed."""
    notes = []
    rank, rope = config.get("kv_lora_rank"), config.get("qk_rope_head_dim")
    if (rank, rope) != (FAST_KV_LORA_RANK, FAST_ROPE_DIM) and rank is not None and rope is not None:
        notes.append(f"kv_lora_rank + qk_rope_head_dim is {rank}+{rope}, not {FAST_KV_LORA_RANK}+{FAST_ROPE_DIM}: "
                     f"FlashMLA and vLLM's MLA kernels are built for DeepSeek's shape (`mha2mla pad` writes it exactly); "
                     f"SGLang's triton backend runs any shape")
    if rope_type(config) == "default":
        notes.append("SGLang on CPU is not listed: its CPU rope (get_rope_cpu in 0.5.23) builds DeepSeek YaRN only and "
                     "refuses a default rope")
    return notes


def _span(layers: list[int]) -> str:
    if len(layers) == 1:
        return str(layers[0])
    if layers[-1] - layers[0] == len(layers) - 1:
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers[:6])) + (", ..." if len(layers) > 6 else "")


# --- does the checkpoint load at all? (config values, tensor presence and shapes) -------------------------------------

_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def config_errors(config: dict) -> list[str]:
    """Config values with which no engine can build the model (missing, not a positive integer, odd rope dim)."""
    errors = []
    for key in _POSITIVE:
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            errors.append(f"config.json has {key}: {json.dumps(v)}, which must be a positive integer")
    q = config.get("q_lora_rank")
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q <= 0):
        errors.append(f"config.json has q_lora_rank: {json.dumps(q)}, which must be null or a positive integer")
    rope = config.get("qk_rope_head_dim")
    if isinstance(rope, int) and not isinstance(rope, bool) and rope > 0 and rope % 2:
        errors.append(f"config.json has qk_rope_head_dim: {rope}, which must be even (rotary pairs)")
    return errors


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a dense DeepseekV3 checkpoint with ``config`` must hold, with its shape.

    Layers ``>= first_k_dense_replace`` with ``n_routed_experts`` set are mixture-of-experts: only their attention and
    norms are listed (:func:`portability_blockers` reports missing experts). Call :func:`config_errors` first.
    """
    c = config
    hidden, heads, rank, rope = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, v, inter, q_rank = c["qk_nope_head_dim"], c["v_head_dim"], c["intermediate_size"], c.get("q_lora_rank")
    bias = bool(c.get("attention_bias"))
    first_dense = c.get("first_k_dense_replace", 0) or 0
    moe = c.get("n_routed_experts") is not None
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], hidden),
                                          "model.norm.weight": (hidden,)}
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (c["vocab_size"], hidden)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        if q_rank is None:
            shapes[a + "q_proj.weight"] = (heads * (nope + rope), hidden)
        else:
            shapes[a + "q_a_proj.weight"] = (q_rank, hidden)
            shapes[a + "q_a_layernorm.weight"] = (q_rank,)
            shapes[a + "q_b_proj.weight"] = (heads * (nope + rope), q_rank)
            if bias:
                shapes[a + "q_a_proj.bias"] = (q_rank,)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (rank + rope, hidden)
        shapes[a + "kv_a_layernorm.weight"] = (rank,)
        shapes[a + "kv_b_proj.weight"] = (heads * (nope + v), rank)
        shapes[a + "o_proj.weight"] = (hidden, heads * v)
        if bias:
            shapes[a + "kv_a_proj_with_mqa.bias"] = (rank + rope,)
            shapes[a + "o_proj.bias"] = (hidden,)
        if not (moe and i >= first_dense):
            shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    return shapes


def shape_errors(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Tensors that ``config`` needs and the checkpoint lacks or holds in another shape (empty: it loads).

    Args:
        config: the checkpoint's ``config.json`` as a dict.
        shapes: the checkpoint's tensors, name → shape (from the safetensors headers).

    Returns:
        One sentence per problem (missing tensors are summarised in one sentence).
    """
    errors = config_errors(config)
    if errors:
        return errors
    want = expected_shapes(config)
    missing = [n for n in want if n not in shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        errors.append(f"tensor {missing[0]}{more} missing from the checkpoint (config.json needs {len(want)} tensors)")
    for n, shape in want.items():
        if n in shapes and tuple(shapes[n]) != shape:
            errors.append(f"{n} has shape {list(shapes[n])}, but config.json implies {list(shape)}")
    return errors


# --- which engine serves it, with a compressed cache? ------------------------------------------------------------------

# Where each shape rule below is read (vLLM 0.32.0 as installed from PyPI by benchmarks/serve_vllm.py).
# kv_lora_rank + qk_rope_head_dim: MLACommonMetadata.__post_init__ checks MLACommonBackend.supports_head_size (320, 512,
# 576) on every backend. The CPU backend takes 576 and its decode kernel 512+64 only.
VLLM_GPU_SIZES = (320, 512, 576)
# (qk_nope_head_dim, qk_rope_head_dim, v_head_dim) of FlashAttnPrefillBackend.supports_mla_dimensions, the only MLA
# prefill backend on Hopper and older GPUs (the Blackwell ones take subsets of it).
VLLM_GPU_PREFILL_DIMS = ((128, 64, 128), (192, 64, 256), (64, 64, 128), (256, 0, 256))
PAD_FIX = "`mha2mla pad DIR --output DIR-vllm` (exact zero-padding to 512+64, nope = v = 128)"
UNCOMPRESSED_FIX = "VLLM_MLA_DISABLE=1 runs it, but with an uncompressed (per-head K/V) cache"


@dataclass(frozen=True)
class EngineVerdict:
    """Whether one engine serves a checkpoint with its compressed MLA cache and the outputs transformers gives.

    Attributes:
        engine: the engine and backend (``vLLM (CPU)``, ``SGLang (triton backend)``, ...).
        compressed: it serves the checkpoint, with the latent cache, giving transformers' outputs.
        why: why not (empty when ``compressed``).
        fix: what makes it serve (a command or flag; empty when nothing but a new conversion does).
        cites: the engine code the verdict is read from.
    """

    engine: str
    compressed: bool
    why: str = ""
    fix: str = ""
    cites: str = ""


def serving_verdicts(config: dict, weight_names: Iterable[str], *, as_dicts: bool = False) -> list:
    """Per engine (vLLM GPU and CPU, SGLang by backend, transformers): does it serve this checkpoint compressed?

    Args:
        config: a DeepseekV3 ``config.json`` as a dict (structurally valid: see :func:`shape_errors`).
        weight_names: the checkpoint's tensor names.
        as_dicts: return plain dicts (for the JSON record) instead of :class:`EngineVerdict`.

    Returns:
        One verdict per engine, transformers first.
    """
    names = list(weight_names)
    found = _blockers(config, names)
    rank, rope = config.get("kv_lora_rank"), config.get("qk_rope_head_dim")
    nope, v = config.get("qk_nope_head_dim"), config.get("v_head_dim")
    size = (rank or 0) + (rope or 0)
    out = []

    mla = config.get("model_type") in ("deepseek_v3", "deepseek_v2")
    out.append(EngineVerdict(
        "transformers", mla, "" if mla else "not an MLA checkpoint", "" if mla else "`mha2mla convert`",
        "models/deepseek_v3/modeling_deepseek_v3.py: the cache holds the normalised latent and the roped shared key"))

    def engine(name: str, shape_ok: bool, shape_why: str, shape_fix: str, cites: str) -> EngineVerdict:
        mine = [b for b, who in found if who == ENGINES or name.startswith(who)]
        if mine:
            refix = ("convert again without --rope-scaling keep (the target's rope is then `default`, of the "
                     "frequencies the llama3 scaling leaves unchanged)" if len(mine) == 1 and rope_type(config) == "llama3"
                     else "none: convert again with a portable source or options")
            return EngineVerdict(name, False, f"its outputs would differ from transformers': {'; '.join(mine)}", refix,
                                 cites)
        if not shape_ok:
            return EngineVerdict(name, False, shape_why, shape_fix, cites)
        return EngineVerdict(name, True, cites=cites)

    out.append(engine(
        "vLLM (GPU)", size in VLLM_GPU_SIZES and (nope, rope, v) in VLLM_GPU_PREFILL_DIMS,
        _vllm_gpu_why(size, rank, rope, nope, v), f"{PAD_FIX}; or {UNCOMPRESSED_FIX}",
        "vllm/model_executor/layers/attention/mla_attention.py (MLACommonMetadata checks MLACommonBackend."
        "get_supported_head_sizes: 320, 512, 576); vllm/v1/attention/backends/mla/prefill/flash_attn.py "
        "(FlashAttnPrefillBackend.supports_mla_dimensions; vllm/platforms/interface.py picks it alone on Hopper)"))
    out.append(engine(
        "vLLM (CPU)", (rank, rope) == (512, 64),
        f"kv_lora_rank + qk_rope_head_dim is {rank}+{rope}; vLLM's CPU MLA backend takes 576 only, and its decode "
        f"kernel 512+64 only",
        f"{PAD_FIX}; or {UNCOMPRESSED_FIX}",
        "vllm/v1/attention/backends/mla/cpu_mla.py (CPUMLABackend.get_supported_head_sizes: 576; the module "
        "docstring: the decode kernel supports head_dim 576 with v_head_dim (kv_lora_rank) 512 only)"))
    out.append(engine(
        "SGLang (triton backend)", True, "", "",
        "sglang/srt/layers/attention/triton_backend.py (0.5.23: no MLA size checks; its decode kernels pad the head "
        "widths to powers of two)"))
    fa3_why = _sglang_fa3_why(rank, rope, nope, v)
    out.append(engine(
        "SGLang (FA3 backend, Hopper default)", not fa3_why, fa3_why, f"`--attention-backend triton`; or {PAD_FIX}",
        "sglang/srt/layers/attention/flashattention_backend.py (0.5.23: no size checks of its own; the limits are the "
        "FA3 kernels' run-time checks in sglang-kernel 0.4.10, read, not run; arg_groups/model_override_base.py picks "
        "fa3 for MLA on Hopper)"))
    out.append(engine(
        "SGLang (FlashMLA backend)", rank == 512 and rope == 64,
        f"FlashMLA is built for kv_lora_rank 512 + qk_rope_head_dim 64, not {rank}+{rope}",
        f"`--attention-backend triton`; or {PAD_FIX}",
        "sglang/srt/layers/attention/flashmla_backend.py (0.5.23; the FlashMLA kernels of sglang-kernel 0.4.10 take "
        "a key width of 576 and a value width of 512 only)"))
    return [asdict(x) for x in out] if as_dicts else out


def _sglang_fa3_why(rank, rope, nope, v) -> str:
    """Why SGLang's FA3 MLA path cannot run this shape (empty: it can). Decode runs the rope part as query/key and the
    latent as value; prefill is plain attention over ``nope + rope`` query/key widths and ``v`` value widths."""
    if not (rope <= 64 and 256 <= rank <= 512 and rank % 8 == 0 and rope % 8 == 0):
        return (f"kv_lora_rank {rank} + qk_rope_head_dim {rope}: SGLang's FA3 MLA decode needs a rank of 256-512 and a "
                f"rope dim of at most 64, both multiples of 8")
    qk = nope + rope
    if not ((qk == v and qk <= 256) or (128 < qk <= 192 and 96 < v <= 128) or (qk <= 64 and v <= 512)):
        return (f"query/key width {nope}+{rope} = {qk} with value width {v}: SGLang's FA3 prefill takes equal widths "
                f"up to 256, query/key 129-192 with value 97-128, or query/key up to 64")
    return ""


def is_portable(verdicts: list) -> bool:
    """True only when every engine in ``verdicts`` serves the checkpoint with a compressed cache."""
    return all((v["compressed"] if isinstance(v, dict) else v.compressed) for v in verdicts)


def _vllm_gpu_why(size: int, rank, rope, nope, v) -> str:
    if size not in VLLM_GPU_SIZES:
        return (f"kv_lora_rank + qk_rope_head_dim is {rank}+{rope} = {size}; vLLM's GPU MLA backends take "
                f"{' or '.join(map(str, VLLM_GPU_SIZES))} only")
    return (f"(qk_nope_head_dim, qk_rope_head_dim, v_head_dim) is ({nope}, {rope}, {v}); vLLM's GPU MLA prefill "
            f"backend takes only {', '.join(map(str, VLLM_GPU_PREFILL_DIMS))}")
