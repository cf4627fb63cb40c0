"""Exact zero-padding of a DeepseekV3 MLA checkpoint to the shapes vLLM's MLA kernels accept.

vLLM's MLA backends take ``kv_lora_rank + qk_rope_head_dim`` of 576 only on CPU (320 or 576 on GPU) and its Hopper
prefill path wants ``qk_nope_head_dim = v_head_dim = 128`` with rope 64 (see :mod:`mha2mla.checkpoint.portability`). A conversion
at, say, 96+32 with head_dim-64 heads is padded to 512+64 / 128 / 128 without changing a single output:

- **latent** r → r': zero rows of ``kv_a_proj_with_mqa`` and zero columns of ``kv_b_proj``. The latent RMSNorm sees a
  mean square r/r' times smaller, so the latent rows are scaled by c = sqrt(r'/r) and the norm weight divided by c:
  RMSNorm(c·z) · w/c = RMSNorm(z) · w for every input, not only in the linear regime.
- **rope** D → D': the interleaved pairs of frequency θ^(-2i/D), i < D/2, stay where they are; θ'' = θ^(D'/D) gives
  them the same frequencies at D', and the new pairs (lower frequencies) get zero rows in q and in the rope key.
- **nope / value** → 128: zero rows of q and of ``kv_b_proj``; zero ``o_proj`` columns for the new value dims.
- **softmax scale** (nope+rope)^-½ → (nope'+rope')^-½: folded into the query rows as sqrt((nope'+rope')/(nope+rope)).

The cache per token and layer grows from r+D to r'+D' values; for a small GQA source it can exceed the source's own
2·n_kv·head_dim, which :func:`pad_checkpoint` reports.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from mha2mla.errors import Mha2mlaError
from mha2mla.serve.targets import SERVE_TARGETS, MlaDims

__all__ = ["MlaDims", "SERVE_TARGETS", "pad_tensor", "pad_config", "pad_checkpoint", "PadResult", "convert_for_serving"]

PAD_ROPE_TYPES = ("default", "llama3")
FLOAT32_MAX = 3.4e38  # frequency-wise schedules: the same frequencies at θ'' and D'


def _check_target(src: MlaDims, dst: MlaDims) -> None:
    for k, v in asdict(src).items():
        if getattr(dst, k) < v:
            raise Mha2mlaError(f"cannot pad {k} {v} down to {getattr(dst, k)}: padding only grows dims "
                               f"(source {src.label}, nope {src.qk_nope_head_dim}, v {src.v_head_dim})")
    if dst.qk_rope_head_dim % 2 or src.qk_rope_head_dim % 2:
        raise Mha2mlaError(f"qk_rope_head_dim must be even, got {src.qk_rope_head_dim} → {dst.qk_rope_head_dim}")


def _pad_rows(w: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Split ``w``'s first dim into consecutive blocks of ``old`` rows and place each at the start of ``new`` zero
    rows (``blocks``: [(old, new), ...], repeated over the whole first dim)."""
    period = sum(o for o, _ in blocks)
    if w.shape[0] % period:
        raise Mha2mlaError(f"a tensor of {w.shape[0]} rows is not a whole number of blocks of {period}")
    reps = w.shape[0] // period
    parts, at = [], 0
    for _ in range(reps):
        for old, new in blocks:
            piece = w[at:at + old]
            at += old
            parts.append(piece)
            if new > old:
                parts.append(w.new_zeros((new - old,) + tuple(w.shape[1:])))
    return torch.cat(parts, 0)


def pad_tensor(name: str, w: torch.Tensor, *, src: MlaDims, dst: MlaDims, n_heads: int) -> torch.Tensor:
    """One checkpoint tensor padded from ``src`` to ``dst`` dims (computed in float64, returned in ``w``'s dtype).

    Tensors outside the attention, and attention tensors that do not depend on these dims (``q_a_proj``,
    ``q_a_layernorm``, ``o_proj.bias``), come back unchanged.

    Args:
        name: the tensor's checkpoint name (``model.layers.3.self_attn.kv_b_proj.weight``).
        w: the tensor.
        src: the checkpoint's dims.
        dst: the padded dims (each ≥ the source's).
        n_heads: ``num_attention_heads``.

    Returns:
        The padded tensor.
    """
    _check_target(src, dst)
    leaf = name.rsplit("self_attn.", 1)[-1] if ".self_attn." in name else None
    if leaf is None:
        return w
    x = w.double()
    r, D, n, v = src.kv_lora_rank, src.qk_rope_head_dim, src.qk_nope_head_dim, src.v_head_dim
    r2, D2, n2, v2 = dst.kv_lora_rank, dst.qk_rope_head_dim, dst.qk_nope_head_dim, dst.v_head_dim
    c = math.sqrt(r2 / r)  # keeps the latent's mean square over r2 dims equal to the source's over r
    if leaf in ("q_proj.weight", "q_b_proj.weight"):
        if x.shape[0] != n_heads * (n + D):
            raise Mha2mlaError(f"{name} has {x.shape[0]} rows, not num_attention_heads·(nope+rope) = {n_heads * (n + D)}")
        out = _pad_rows(x, [(n, n2), (D, D2)]) * math.sqrt((n2 + D2) / (n + D))
    elif leaf in ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias"):
        if x.shape[0] != r + D:
            raise Mha2mlaError(f"{name} has {x.shape[0]} rows, not kv_lora_rank + qk_rope_head_dim = {r + D}")
        out = _pad_rows(torch.cat([x[:r] * c, x[r:]], 0), [(r, r2), (D, D2)])
    elif leaf == "kv_a_layernorm.weight":
        out = torch.cat([x / c, x.new_ones(r2 - r) / c])  # (the new entries multiply zero latents)
    elif leaf == "kv_b_proj.weight":
        if tuple(x.shape) != (n_heads * (n + v), r):
            raise Mha2mlaError(f"{name} has shape {list(x.shape)}, not {[n_heads * (n + v), r]}")
        rows = _pad_rows(x, [(n, n2), (v, v2)])
        out = torch.cat([rows, rows.new_zeros(rows.shape[0], r2 - r)], 1)
    elif leaf == "o_proj.weight":
        if x.shape[1] != n_heads * v:
            raise Mha2mlaError(f"{name} has {x.shape[1]} columns, not num_attention_heads·v_head_dim = {n_heads * v}")
        out = _pad_rows(x.T, [(v, v2)]).T
    else:
        return w
    return out.to(w.dtype).contiguous()


def pad_config(config: dict, *, dst: MlaDims) -> dict:
    """The padded checkpoint's ``config.json``: the new dims and θ'' = θ^(D'/D) (both the v5 and legacy rope keys)."""
    src = MlaDims.of(config)
    _check_target(src, dst)
    from mha2mla.checkpoint.portability import rope_type

    kind = rope_type(config)
    if kind not in PAD_ROPE_TYPES:
        raise Mha2mlaError(f"rope_type {kind!r} cannot be padded exactly (only {', '.join(PAD_ROPE_TYPES)}: their "
                           f"frequencies depend on θ and the rotary dim only through θ^(-2i/D))")
    out = json.loads(json.dumps(config))
    for k, val in asdict(dst).items():
        out[k] = val
    if "head_dim" in out:
        out["head_dim"] = dst.qk_rope_head_dim  # transformers' DeepseekV3Config sets head_dim = qk_rope_head_dim
    exponent = dst.qk_rope_head_dim / src.qk_rope_head_dim
    theta = None
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        theta = float(rope["rope_theta"])
        rope["rope_theta"] = theta ** exponent
    if out.get("rope_theta") is not None:
        theta = float(out["rope_theta"]) if theta is None else theta
        out["rope_theta"] = float(out["rope_theta"]) ** exponent
    if theta is None:
        theta = 10000.0  # transformers' default
        out["rope_theta"] = theta ** exponent
        if isinstance(rope, dict):
            rope["rope_theta"] = theta ** exponent
    if theta ** exponent > FLOAT32_MAX:
        raise Mha2mlaError(f"padding qk_rope_head_dim {src.qk_rope_head_dim} → {dst.qk_rope_head_dim} needs rope_theta "
                           f"{theta:g}^{exponent:g} = {theta ** exponent:.3g}, beyond float32 (engines compute the "
                           f"frequencies from it in float32); convert with a larger --rope-dim first")
    return out


@dataclass
class PadResult:
    """What :func:`pad_checkpoint` wrote."""

    output: str
    source_dims: MlaDims
    dims: MlaDims
    record: dict


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def pad_checkpoint(*, source: str | os.PathLike, output: str | os.PathLike, target: str = "vllm",
                   force: bool = False, max_shard_size: str | int = "500MB", input_label: str | None = None) -> PadResult:
    """Write ``source`` (a DeepseekV3 MLA checkpoint directory) zero-padded to ``target``'s dims into ``output``.

    The input directory is only read; ``output`` is written through :func:`mha2mla.checkpoint.writer.atomic_output_dir`.
    A tied embedding is written out as ``lm_head.weight`` too (vLLM and SGLang never tie DeepSeek's ``lm_head``).
    Tensors are padded one at a time (:func:`pad_tensor`), so memory stays about one shard.

    Args:
        source: the checkpoint to pad (its ``config.json`` and safetensors).
        output: the directory to create.
        target: a key of :data:`SERVE_TARGETS` (``vllm``: 512+64, nope = v = 128).
        force: replace an existing ``output`` written by this tool.
        max_shard_size: largest output shard.
        input_label: how the record names the input (default: its absolute path).

    Returns:
        :class:`PadResult`; its record is also written as ``mha2mla.json`` (with a ``padding`` entry), and the
        model card ``README.md`` is rewritten.

    Raises:
        Mha2mlaError: not a loadable DeepseekV3 checkpoint, a dim larger than the target's, a rope type that cannot be
            padded, or a refused output path.
    """
    from safetensors import safe_open

    from mha2mla.checkpoint.meta import read_checkpoint_tensors
    from mha2mla.checkpoint.portability import fast_kernel_notes, is_portable, portability_blockers, serving_verdicts, shape_errors
    from mha2mla.conversion.record import RECORD_NAME, write_model_card
    from mha2mla.checkpoint.source import TOKENIZER_FILES
    from mha2mla.checkpoint.writer import ShardWriter, atomic_output_dir, parse_size

    if target not in SERVE_TARGETS:
        raise Mha2mlaError(f"unknown serving target {target!r}; choose one of {', '.join(SERVE_TARGETS)}")
    src_dir = os.fspath(source)
    config, shapes = read_checkpoint_tensors(src_dir)
    if config.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise Mha2mlaError(f"{src_dir} is a {config.get('model_type')!r} checkpoint, not deepseek_v3; convert it first")
    problems = shape_errors(config, shapes)
    if problems:
        raise Mha2mlaError(f"{src_dir} cannot load: {problems[0]}")
    dst = SERVE_TARGETS[target]
    src = MlaDims.of(config)
    new_config = pad_config(config, dst=dst)
    # vLLM and SGLang build DeepSeek's lm_head untied: write the tied embedding out as lm_head too (exact)
    untie = bool(config.get("tie_word_embeddings")) and "lm_head.weight" not in shapes
    if untie:
        new_config["tie_word_embeddings"] = False
    n_heads = int(config["num_attention_heads"])
    index = _read_json(os.path.join(src_dir, "model.safetensors.index.json"))
    shard_names = sorted(set(index["weight_map"].values())) if index else sorted(
        n for n in os.listdir(src_dir) if n.endswith(".safetensors"))
    with atomic_output_dir(os.fspath(output), force=force, protect=(src_dir,)) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=parse_size(max_shard_size))
        for shard in shard_names:
            with safe_open(os.path.join(src_dir, shard), framework="pt") as f:
                for name in f.keys():
                    writer.add(name, pad_tensor(name, f.get_tensor(name), src=src, dst=dst, n_heads=n_heads))
                    if name == "model.embed_tokens.weight" and untie:
                        writer.add("lm_head.weight", f.get_tensor(name).clone())
        names = writer.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(new_config, f, indent=2)
            f.write("\n")
        for n in TOKENIZER_FILES + ("generation_config.json",):
            p = os.path.join(src_dir, n)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(tmp, n))
        with open(os.path.join(tmp, "model.safetensors.index.json")) as f:
            weight_names = list(json.load(f)["weight_map"])
        record = _padded_record(_read_json(os.path.join(src_dir, RECORD_NAME)), config=new_config, src=src, dst=dst,
                                target=target, shards=names, input_label=input_label or os.path.abspath(src_dir))
        serving = serving_verdicts(new_config, weight_names, as_dicts=True)
        record["portability"] = {"vllm_sglang_portable": is_portable(serving),
                                 "blockers": portability_blockers(new_config, weight_names),
                                 "notes": fast_kernel_notes(new_config), "serving": serving}
        with open(os.path.join(tmp, RECORD_NAME), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        if "source" in record and "plan" in record and "layers" in record:
            write_model_card(tmp, record=record)
    return PadResult(output=os.fspath(output), source_dims=src, dims=dst, record=record)


def _padded_record(old: dict | None, *, config: dict, src: MlaDims, dst: MlaDims, target: str, shards: list[str],
                   input_label: str) -> dict:
    """The conversion record of the padded checkpoint: the input's (if it has one) with a ``padding`` entry and the
    cache sizes of the padded shape."""
    record = dict(old) if old else {"format": "mha2mla conversion record v1"}
    n_layers = int(config["num_hidden_layers"])
    kv = dict(record.get("kv_cache") or {})
    source_values = kv.get("source_values_per_token_per_layer")
    kv.update({"mla_values_per_token_per_layer": dst.cache_values, "mla_bytes_per_token_bf16": 2 * dst.cache_values * n_layers,
               "unpadded_values_per_token_per_layer": src.cache_values})
    padding = {"from": asdict(src), "to": asdict(dst), "target": target, "input": input_label,
               "exact": True, "rope_theta": config.get("rope_theta")}
    if source_values:
        kv["saving"] = 1 - dst.cache_values / source_values
        if dst.cache_values > source_values:
            padding["warning"] = (f"the padded cache ({dst.cache_values} values per token per layer) is larger than the "
                                  f"source model's own ({source_values}): serving this in vLLM saves no memory over "
                                  f"serving the source; the unpadded {src.label} checkpoint caches {src.cache_values}")
    record["kv_cache"] = kv
    record["padding"] = padding
    record["shards"] = shards
    return record


def convert_for_serving(*, serve: str, source: str | os.PathLike, output: str | os.PathLike, force: bool = False,
                        max_shard_size: str | int = "500MB", **convert_kwargs):
    """:func:`mha2mla.conversion.pipeline.convert`, then :func:`pad_checkpoint` to ``serve``'s shape: the conversion is
    written to a temporary sibling of ``output`` and removed once the padded checkpoint is in place.

    Args:
        serve: a key of :data:`SERVE_TARGETS`.
        source: as for ``convert``.
        output: the padded checkpoint's directory.
        force: replace an existing ``output`` written by this tool.
        max_shard_size: largest output shard.
        **convert_kwargs: the other keyword arguments of ``convert`` (rank, rope_dim, calibration, ...).

    Returns:
        The conversion's :class:`mha2mla.conversion.pipeline.ConversionResult` with ``output`` and ``record`` of the padded
        checkpoint.
    """
    import tempfile
    import time

    from mha2mla.conversion.pipeline import convert
    from mha2mla.checkpoint.writer import check_output_path

    if serve not in SERVE_TARGETS:
        raise Mha2mlaError(f"--serve {serve!r} is not a serving target; choose one of {', '.join(SERVE_TARGETS)}")
    t0 = time.time()
    protect = tuple(p for p in (os.fspath(source) if os.path.exists(os.fspath(source)) else None,) if p)
    out = check_output_path(output, force=force, protect=protect)  # refuse before the expensive conversion
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    unpadded = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.unpadded-")
    try:
        res = convert(source=source, output=unpadded, force=True, max_shard_size=max_shard_size, **convert_kwargs)
        padded = pad_checkpoint(source=unpadded, output=output, target=serve, force=force,
                                max_shard_size=max_shard_size, input_label="the conversion of the same run (--serve)")
    finally:
        shutil.rmtree(unpadded, ignore_errors=True)
    res.output, res.record, res.seconds = os.fspath(output), padded.record, time.time() - t0
    return res
