"""``mha2mla convert``: the whole model, streamed one layer at a time.

:func:`convert` reads top to bottom: validate the options → load the source → plan → choose the schedule (calibrated)
→ per layer: measure → :func:`~mha2mla.conversion.layer.convert_layer` → advance the stream → write → record.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from mha2mla.allocator import keep_freed_memory
from mha2mla.checkpoint.source import SourceModel, copy_tokenizer_files, load_source
from mha2mla.checkpoint.target_config import deepseek_v3_config
from mha2mla.checkpoint.writer import ShardWriter, atomic_output_dir, check_output_path, shard_bytes
from mha2mla.conversion.latent import LayerStats
from mha2mla.conversion.layer import REST_NAMES, advance, compute_dtype, convert_layer, long_stream, measure, read_layer
from mha2mla.conversion.options import Method, Policy
from mha2mla.conversion.record import write_model_card, write_record
from mha2mla.conversion.schedule import Schedule, choose_schedule, first_plan
from mha2mla.conversion.stream import CalibrationSet, Propagation, calibration_set
from mha2mla.errors import Mha2mlaError
from mha2mla.loading import check_device
from mha2mla.ops.shapes import ConversionPlan
from mha2mla.progress import Steps

__all__ = ["convert", "ConversionResult"]


@dataclass
class ConversionResult:
    """What :func:`convert` wrote."""

    output: str
    plan: ConversionPlan
    layers: list[LayerStats]
    record: dict
    seconds: float


def convert(
    *,
    source: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    rope_dim: int | None = None,
    kv_budget: int | None = None,
    rope_stride: int | None = None,
    rope_scaling: str = "auto",
    biases: str = "auto",
    calibration: str | list[str] | None = None,
    calibration_samples: int = 48,
    calibration_length: int = 512,
    method: Method | None = None,
    dtype: str = "auto",
    force: bool = False,
    max_shard_size: str | int = "500MB",
    report: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> ConversionResult:
    """Convert a Llama/Mistral/Qwen2 checkpoint into a native ``DeepseekV3ForCausalLM`` MLA checkpoint.

    Args:
        source: local HF directory, hub id, or ``.gguf`` file.
        output: directory to create (written to a temporary sibling and renamed at the end).
        rank: ``kv_lora_rank``, the latent size R.
        rope_dim: ``qk_rope_head_dim`` D (even, divides head_dim); default ``head_dim/2``.
        kv_budget: instead of ``rank``/``rope_dim``: cached values per token per layer ``R + D``; the split is chosen by
            measuring the attention-output error on the calibration data (needs ``calibration``).
        rope_stride: keep every ``stride``-th frequency (default ``head_dim/D``, which keeps θ).
        rope_scaling: for a ``llama3``/``linear`` rope source: ``portable`` (a ``default`` target rope of the
            frequencies the scaling leaves unchanged, the others' planes zero), ``keep`` (the scaling carried over:
            exact in transformers, rewritten by vLLM/SGLang), ``auto`` (portable where possible).
        biases: for a source with attention biases (Qwen2): ``absorb`` (bias-free projections fitted on the calibration
            data; vLLM and SGLang drop attention biases), ``keep`` (exact, transformers only), ``auto`` (absorb when
            calibrated).
        calibration: calibration text (file, JSONL, directory, dataset, or a list of documents); ``None`` converts
            data-free.
        calibration_samples: number of calibration sequences.
        calibration_length: tokens per calibration sequence (at most the source's ``max_position_embeddings``: a longer
            request is shortened to it, and the record says so).
        method: calibrated ingredients (default: all; see :class:`mha2mla.conversion.options.Method`).
        dtype: ``auto`` (source's, bf16 for fp16 sources), ``float32`` or ``bfloat16``.
        force: replace an existing ``output``.
        max_shard_size: largest output shard, e.g. ``"500MB"`` (one shard is buffered, and copied once while it is written).
        report: also write ``mha2mla-report.png`` (error per layer, energy vs rank) next to the weights.
        device: where calibration runs (the layer forwards, statistics and output fit): ``cpu``, ``cuda``, ``cuda:1``…
            The factorisation itself runs on the CPU in float64/float32. A calibrated conversion also asks glibc's
            ``malloc`` to keep freed memory for reuse, for the rest of the process (:mod:`mha2mla.allocator`).
        progress: show a progress bar per layer.

    Returns:
        :class:`ConversionResult`.

    Raises:
        Mha2mlaError: bad source, options or output; the output directory is then left untouched.

    >>> convert(source="HuggingFaceTB/SmolLM2-135M", output="smollm2-mla", rank=96, rope_dim=32)  # doctest: +SKIP
    """
    t0 = time.time()
    dev, shard_size = _check_options(rank, rope_dim, kv_budget, calibration, device, max_shard_size)
    src = load_source(source)
    protect = _protected(src, calibration)
    check_output_path(output, force=force, protect=protect)  # up front: refuse before any expensive work
    plan = first_plan(source=src, rank=rank, rope_dim=rope_dim, kv_budget=kv_budget, rope_stride=rope_stride, dtype=dtype,
                      rope_scaling=rope_scaling, biases=biases, calibrated=calibration is not None)
    method, schedule, calib, stream, policy, long = method or Method(), Schedule(plan), None, None, None, None
    if calibration is not None:
        keep_freed_memory()  # the calibration loops reuse large activations (mha2mla.allocator; process-wide)
        calib = calibration_set(source=src, data=calibration, samples=calibration_samples, length=calibration_length)
        schedule = choose_schedule(source=src, plan=plan, kv_budget=kv_budget, rope_stride=rope_stride, calib=calib,
                                   method=method, device=dev, progress=progress)
        policy = method.resolve(plan=schedule.plan, device=dev)
        stream = Propagation(source=src, tokens=calib.tokens, device=dev, track_source=policy.tracks_source,
                             source_sequences=method.source_sequences or None, mlp_dtype=policy.mlp_dtype)
        long, long_info = long_stream(source=src, calib=calib, method=method, policy=policy, device=dev)
        schedule.info.update(long_info)
    plan, stats = schedule.plan, []
    with atomic_output_dir(os.fspath(output), force=force, protect=protect) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=shard_size)
        _write_shared(writer, src, plan)
        bar = Steps(plan.n_layers, desc="calibrating and converting layers" if stream else "converting layers",
                    enabled=progress)
        for i in bar:
            t_layer = time.time()
            weights, rest = read_layer(src, i, compute_dtype(plan.hidden), mlp=False)  # (MLP: read when written)
            stats_i = None if stream is None else measure(stream, i, method)
            layer = convert_layer(plan=plan, weights=weights, input_norm=rest["input_layernorm.weight"], index=i,
                                  calib=stats_i, stream=stream, method=method, policy=policy, long=long)
            del stats_i  # (the statistics are the largest per-layer buffers: freed before the next layer's)
            if stream is not None:
                advance(stream=stream, index=i, layer=layer, rest=rest, plan=plan, method=method, policy=policy,
                        long=long)
            _write_layer(writer, src, i, layer.tensors, rest, plan)
            layer.stats.seconds = time.time() - t_layer
            stats.append(layer.stats)
            bar.set_postfix(k_err=f"{layer.stats.k_rel_error:.3f}", v_err=f"{layer.stats.v_rel_error:.3f}")
        del stream, long
        calib_record = None if calib is None else _calibration_record(calib, schedule, policy, method, time.time() - t0)
        record = _finish(tmp, writer, src, plan, stats, report, calibration=calib_record, options={
            "kv_budget": kv_budget, "rope_scaling": rope_scaling, "biases": biases, "calibration": _describe(calibration),
            "max_shard_size": str(max_shard_size)})
    return ConversionResult(output=os.fspath(output), plan=plan, layers=stats, record=record, seconds=time.time() - t0)


def _check_options(rank, rope_dim, kv_budget, calibration, device, max_shard_size) -> tuple[torch.device, int]:
    """The option combinations that are refused before the source is read; the device and the shard size in bytes."""
    if (rank is None) == (kv_budget is None):
        raise Mha2mlaError("give either --rank (with --rope-dim) or --kv-budget, not both or neither")
    if kv_budget is not None and calibration is None:
        raise Mha2mlaError("--kv-budget chooses the rank/rope split by measuring on calibration data: add --calibration, "
                           "or give --rank and --rope-dim")
    if kv_budget is not None and rope_dim is not None:
        raise Mha2mlaError("--kv-budget chooses --rope-dim itself; drop --rope-dim (or use --rank)")
    dev = check_device(device) if calibration is not None else torch.device("cpu")
    return dev, shard_bytes(max_shard_size)


def _protected(src: SourceModel, calibration) -> tuple[tuple[str, str | None], ...]:
    """The inputs an output path must never touch."""
    gguf_file = os.path.join(*src.gguf) if src.gguf else None
    calib_file = calibration if isinstance(calibration, str) and os.path.exists(calibration) else None
    return ("source", src.path), ("source", gguf_file), ("calibration data", calib_file)


def _describe(calibration) -> str | None:
    return calibration if calibration is None or isinstance(calibration, str) else f"{len(calibration)} documents"


def _scaled(t: torch.Tensor, scale: float, out_dt: torch.dtype, rows: int = 8192) -> torch.Tensor:
    """``t·scale`` rounded once to ``out_dt``, ``rows`` rows at a time: never a float32 copy of a large tensor (an
    embedding table), and each row's values are those of the whole-tensor product."""
    if scale == 1.0:
        return t.to(out_dt)
    out = torch.empty(t.shape, dtype=out_dt)
    for r in range(0, t.shape[0], rows):
        part = t[r : r + rows]
        wide = part if part.dtype in (out_dt, torch.float32, torch.float64) else part.float()
        out[r : r + rows] = (wide * scale).to(out_dt)
    return out


def _write_shared(writer: ShardWriter, src: SourceModel, plan: ConversionPlan) -> None:
    """The tensors outside the layers: embedding (in the target's residual scale), output head, final norm."""
    out_dt, s = plan.torch_dtype, plan.residual_scale
    embed = src.get("model.embed_tokens.weight")
    writer.add("model.embed_tokens.weight", _scaled(embed, s, out_dt))
    if not plan.tie_embeddings:
        head = embed if src.tied else None
        del embed  # (one vocabulary-sized table at a time)
        writer.add("lm_head.weight", (head if head is not None else src.get("lm_head.weight")).to(out_dt))
        del head
    else:
        del embed
    writer.add("model.norm.weight", src.get("model.norm.weight").to(out_dt))


def _write_layer(writer: ShardWriter, src: SourceModel, i: int, attention: dict, rest: dict,
                 plan: ConversionPlan) -> None:
    """Layer ``i``'s converted attention, then its norms and MLP (the down-projection in the target's residual scale):
    from ``rest`` where the conversion holds them (a refit down-projection), else as the source stores them."""
    out_dt, p = plan.torch_dtype, f"model.layers.{i}."
    for n, t in attention.items():
        writer.add(p + "self_attn." + n, t.to(out_dt))
    for n in REST_NAMES:
        t = rest[n] if n in rest else src.get(p + n)
        t = _scaled(t, plan.residual_scale, out_dt) if n == "mlp.down_proj.weight" else t
        writer.add(p + n, t.to(out_dt))


def _calibration_record(calib: CalibrationSet, schedule: Schedule, policy: Policy, method: Method,
                        seconds: float) -> dict:
    """The record's ``calibration`` entry: the data, the method, and what the global choices and the policy were."""
    info = {"tokens": int(calib.tokens.numel()), "samples": calib.tokens.shape[0], "length": calib.length,
            "method": {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v  # (strict JSON)
                       for k, v in asdict(method).items()}}
    if calib.length != calib.requested_length:
        info["length_requested"] = calib.requested_length
    info.update(schedule.info)
    info["propagation"] = {"tracks_source": policy.tracks_source,
                           "mlp_dtype": str(policy.mlp_dtype).removeprefix("torch.")}
    if policy.drift_note:
        info["propagation"]["drift"] = policy.drift_note
    if method.output_fit:
        info["output_fit_stride"] = policy.output_fit_stride
    info["seconds"] = round(seconds, 1)
    return info


def _finish(tmp: str, writer: ShardWriter, src: SourceModel, plan: ConversionPlan, stats: list[LayerStats],
            report: bool, *, calibration: dict | None, options: dict) -> dict:
    """Close the shards, write the config, tokenizer, record and model card (and the report); return the record.
    ``options``: the user's options that the plan does not hold (kv_budget, rope_scaling, biases, calibration,
    max_shard_size)."""
    options = {"rank": plan.rank, "kv_budget": options["kv_budget"], "rope_dim": plan.rope_dim,
               "rope_stride": plan.rope_stride, "rope_scaling": options["rope_scaling"],
               "biases": options["biases"], "calibration": options["calibration"], "dtype": plan.dtype,
               "max_shard_size": options["max_shard_size"]}
    names = writer.close()
    config = deepseek_v3_config(source=src, plan=plan)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    copy_tokenizer_files(src, tmp)
    with open(os.path.join(tmp, "model.safetensors.index.json")) as f:
        weight_names = list(json.load(f)["weight_map"])
    record = write_record(tmp, source=src, plan=plan, stats=stats, config=config, weight_names=weight_names,
                          options=options, shards=names, extra={"calibration": calibration} if calibration else None)
    write_model_card(tmp, record=record)
    if report:
        from mha2mla.conversion.report import write_report

        write_report(tmp, stats=stats, rank=plan.rank)
    return record
