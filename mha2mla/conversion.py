"""``mha2mla convert``: load → plan → factorise → write, streaming one layer at a time."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from mha2mla.allocator import keep_freed_memory
from mha2mla.attention import AttentionWeights, LayerStats, Method, choose_rope_stride, convert_attention, rope_frequency_scores
from mha2mla.calibration import LayerCalibration, Propagation, calibrate, calibration_tokens, native_bfloat16
from mha2mla.errors import Mha2mlaError
from mha2mla.progress import Steps
from mha2mla.plan import ConversionPlan, make_plan
from mha2mla.reference import (mla_attention, mla_head_contexts, mla_output_from_contexts, relative_output_error,
                               source_attention, source_output_from_heads)
from mha2mla.rope import kept_frequencies
from mha2mla.query_fit import fit_queries, query_weight_name, source_log_probs
from mha2mla.record import write_model_card, write_record
from mha2mla.source import TOKENIZER_FILES, SourceModel, load_source
from mha2mla.target_config import deepseek_v3_config
from mha2mla.value_path import (JOINT_MAX_FEATURES, HeadwiseValueFit, ValuePathFit, moment_stride, value_path_prior,
                                with_head_values, with_value_path)
from mha2mla.writer import ShardWriter, atomic_output_dir, check_output_path, shard_bytes

__all__ = ["convert", "ConversionResult"]

# Up to this hidden size the layer math runs in float64 (cheap, and exact to ~1e-12); above it in float32.
FLOAT64_MAX_HIDDEN = 2048
# Sequences of the calibration set on which the global choices (RoPE schedule, kv-budget split) are made.
PLAN_SEQUENCES = 4  # (4 × the default 512 tokens)
# The RoPE schedule alone (no --kv-budget) is decided on fewer: it is a choice among a few strides, and SmolLM2's
# winner holds 96 % of the score against 50 % for the next (the pre-pass is ~3 % of a calibrated conversion).
STRIDE_SEQUENCES = 2


def _compute_dtype(hidden: int) -> torch.dtype:
    return torch.float64 if hidden <= FLOAT64_MAX_HIDDEN else torch.float32


@dataclass
class ConversionResult:
    """What :func:`convert` wrote."""

    output: str
    plan: ConversionPlan
    layers: list[LayerStats]
    record: dict
    seconds: float


def _layer_tensors(src: SourceModel, i: int, dt: torch.dtype) -> tuple[AttentionWeights, dict[str, torch.Tensor]]:
    p = f"model.layers.{i}."

    def get(n):
        return src.get(p + n).to(dt)

    def bias(x):
        return get(f"self_attn.{x}_proj.bias") if src.bias[x] else None

    attn = AttentionWeights(
        q=get("self_attn.q_proj.weight"), k=get("self_attn.k_proj.weight"), v=get("self_attn.v_proj.weight"),
        o=get("self_attn.o_proj.weight"), q_bias=bias("q"), k_bias=bias("k"), v_bias=bias("v"), o_bias=bias("o"),
    )
    rest = {n: src.get(p + n) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
    return attn, rest


def _check_shapes(src: SourceModel, attn: AttentionWeights, i: int) -> None:
    want = {"q": (src.n_heads * src.head_dim, src.hidden), "k": (src.n_kv * src.head_dim, src.hidden),
            "v": (src.n_kv * src.head_dim, src.hidden), "o": (src.hidden, src.n_heads * src.head_dim)}
    for x, shape in want.items():
        got = tuple(getattr(attn, x).shape)
        if got != shape:
            raise Mha2mlaError(f"layer {i} {x}_proj has shape {got}, but config.json implies {shape}; config and weights disagree")


def _choose_stride(src, plan, calibs, method, rope_dim, dtype, rank):
    """Pick the RoPE schedule (stride) that keeps the most query-weighted rotary key energy over all layers."""
    compute = _compute_dtype(plan.hidden)
    scores = None
    for i, calib in enumerate(calibs):
        attn, _ = _layer_tensors(src, i, compute)
        sc = rope_frequency_scores(weights=attn, calib=calib, n_heads=plan.n_heads, n_kv=plan.n_kv,
                                   head_dim=plan.head_dim, method=method)
        scores = sc if scores is None else scores + sc
    stride, shares = choose_rope_stride(scores=scores, head_dim=plan.head_dim, rope_dim=plan.rope_dim)
    return make_plan(source=src, rank=rank, rope_dim=rope_dim, rope_stride=stride, dtype=dtype), shares


def _budget_candidates(src: SourceModel, budget: int) -> tuple[int, list[int]]:
    """Rope dims worth trying for a KV budget: even divisors of head_dim from head_dim/8 up, leaving a valid rank."""
    hd = src.head_dim
    max_rank = min(2 * src.n_kv * hd, src.hidden)
    dims = [d for d in range(2, hd + 1, 2) if hd % d == 0 and d >= max(2, hd // 8) and 1 <= budget - d <= max_rank]
    if not dims:
        raise Mha2mlaError(f"--kv-budget {budget} leaves no valid split for head_dim {hd} (rank must be in 1..{max_rank}); "
                           f"try a budget between {hd // 8 + 1} and {max_rank + hd}")
    return dims[len(dims) // 2], dims


def _choose_split(src, calibs, method, budget, dims, rope_stride, dtype):
    """Measure each rope dim's mean attention-output error on a few layers; keep the best split of the budget."""
    compute = _compute_dtype(src.hidden)
    layers = sorted(set(range(0, src.n_layers, max(1, src.n_layers // 6))))
    probe = Method(**{**asdict(method), "balance_search": True, "alternating": 0})
    errors = {}
    for d in dims:
        plan = make_plan(source=src, rank=budget - d, rope_dim=d, rope_stride=rope_stride, dtype=dtype)
        if rope_stride is None and src.rope["rope_type"] == "default":
            plan, _ = _choose_stride(src, plan, calibs, method, d, dtype, budget - d)
        errs = []
        for i in layers:
            attn, rest = _layer_tensors(src, i, compute)
            bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
            _, st = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calibs[i], method=probe)
            errs.append(st.output_rel_error)
        errors[d] = (sum(errs) / len(errs), plan)
    best = min(errors, key=lambda d: errors[d][0])
    info = {"budget": budget, "chosen": f"{budget - best}+{best}", "probe_layers": layers,
            "mean_attention_output_rel_error": {f"{budget - d}+{d}": round(e, 5) for d, (e, _) in errors.items()},
            "why": f"{budget - best}+{best} had the lowest mean attention-output error on the calibration data"}
    return errors[best][1], info


# The output fit keeps each calibration batch's converted head contexts for the step past the layer when they take at
# most this many floats (N·L·heads·rank; 35M for SmolLM2 at 160+32); above it the converted layer is run again.
CONTEXT_CACHE_MAX_FLOATS = 256 * 2**20


def _joint_fit(plan: ConversionPlan) -> bool:
    """Whether the output fit solves all heads' value paths jointly (``W_o`` refit) rather than head by head."""
    return plan.n_heads * plan.rank <= JOINT_MAX_FEATURES


def _output_fit_stride(method: Method, plan: ConversionPlan) -> int:
    """The output fit's query-position stride: ``Method.output_fit_stride``, or chosen from the joint fit's size."""
    if method.output_fit_stride > 0:
        return method.output_fit_stride
    return moment_stride(features=plan.n_heads * plan.rank) if _joint_fit(plan) else 1


def _drift_applies(method: Method, plan: ConversionPlan) -> bool:
    """Whether the latent is narrow enough for the drift corrections (``Method.drift_below_share``)."""
    return plan.rank < method.drift_below_share * plan.n_kv * plan.head_dim


def _drift_asked(method: Method, plan: ConversionPlan) -> bool:
    """Whether the method asks for a drift correction: the output fit's (joint fit only) or the MLP refit, both of
    sequential conversion."""
    attention = method.drift_correction > 0 and method.output_fit and _joint_fit(plan)
    return method.sequential and (attention or method.mlp_drift > 0)


def _tracks_source(method: Method, plan: ConversionPlan) -> bool:
    """Whether the source model's own hidden states are carried beside the converted ones: for the drift corrections
    asked for, where the latent is narrow enough."""
    return _drift_asked(method, plan) and _drift_applies(method, plan)


def _mlp_dtype(method: Method, device: torch.device) -> torch.dtype:
    """The dtype the calibration streams' MLPs run in (see ``Method.mlp_dtype``)."""
    if method.mlp_dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, method.mlp_dtype)


def _on_device(prop: Propagation, attn: AttentionWeights,
               calib: LayerCalibration) -> tuple[AttentionWeights, torch.Tensor]:
    """The source layer's attention weights in float32 on the calibration device, and its angles ``pos·ω [L, hd/2]``."""
    dev = prop.device
    w32 = AttentionWeights(**{k: None if v is None else v.to(dev, torch.float32) for k, v in vars(attn).items()})
    pos = torch.arange(prop.h.shape[1], dtype=torch.float32, device=dev)[:, None]
    return w32, pos * calib.inv_freq.to(dev, torch.float32)


def _fit_output(prop: Propagation, i: int, plan: ConversionPlan, attn: AttentionWeights, tensors: dict,
                calib: LayerCalibration, stride: int = 1,
                drift: float = 0.0) -> tuple[dict, float, list | None, list | None]:
    """Refit layer ``i``'s value path so its output on the calibration inputs matches the source layer's (the moments
    on every ``stride``-th query position).

    The target is the source layer's attention applied to the converted model's inputs; with ``drift > 0`` (the joint
    fit, and the source's own hidden states tracked) it moves by ``drift`` towards what puts the residual stream back
    on the source's, ``a_src(x_src) + h_src − h``: each layer also corrects part of the error the layers below it left.
    (The head-wise fit of wide models keeps ``W_o``; there, spreading the shift over the heads through W_o's
    ridge pseudo-inverse did not help on tiny models, so it is not corrected.)

    Returns the tensors, the relative output error on the first calibration batch after the fit (against the source
    layer on the same inputs, measured on the written tensors), the converted layer's outputs per batch (source
    residual scale) when they were cheap to keep, and the source layer's attention outputs on the source's own hidden
    states per batch (when drift is corrected, for :meth:`Propagation.advance`).
    """
    dev = prop.device
    f32 = {k: v.to(dev, torch.float32) for k, v in tensors.items()}
    w32, src_angles = _on_device(prop, attn, calib)
    mla_angles = _mla_angles(plan, src_angles)
    joint = _joint_fit(plan)
    fit = (ValuePathFit if joint else HeadwiseValueFit)(plan=plan, intercept=plan.attention_bias)
    shape = dict(n_heads=plan.n_heads, n_kv=plan.n_kv, head_dim=plan.head_dim)
    keep = prop.h.shape[0] * prop.h.shape[1] * plan.n_heads * plan.rank <= CONTEXT_CACHE_MAX_FLOATS
    kept, first = [], None
    # the source stream is tracked for the drift corrections (see convert); only the joint fit's target moves
    sources = prop.source_inputs(i) if prop.tracks_source else None
    src_outputs = [] if sources is not None else None

    # the source model's own stream moves in the streams' precision (like its MLP, Propagation.mlp_dtype): only the
    # drift target and the next layer's source inputs read it; the fit's own target (the source heads on the
    # converted inputs) stays float32
    low = prop.mlp_dtype
    w_src = w32 if low == torch.float32 else AttentionWeights(
        **{k: None if v is None else v.to(low) for k, v in vars(w32).items()})

    with torch.no_grad():
        for n, x in enumerate(prop.inputs(i)):
            if calib.head_outputs is not None:
                heads = calib.head_outputs[n]
            else:
                heads = source_attention(weights=w32, x=x, angles=src_angles, heads=True, **shape)
            contexts = mla_head_contexts(tensors=f32, plan=plan, x=x, angles=mla_angles)
            output = source_output_from_heads(weights=w32, heads=heads) if joint or n == 0 else None
            if n == 0:
                first = (contexts, output)
            src_in = None if sources is None else next(sources, None)  # (tracked batches only: source_sequences)
            if src_in is not None:
                x_src, gap = src_in
                a_src = source_attention(weights=w_src, x=x_src.to(low), angles=src_angles, **shape).float()
                src_outputs.append(a_src)
                if joint and drift > 0:
                    output = output + drift * (a_src + gap - output)
            fit.add(contexts=contexts[:, :, ::stride], target=output[:, ::stride] if joint else heads[:, :, ::stride])
            if keep:
                kept.append(contexts)
        if joint:
            maps, bias, _ = fit.solve(prior=value_path_prior(tensors=tensors, plan=plan))
            new = with_value_path(tensors=tensors, plan=plan, maps=maps, bias=bias)
        else:
            prior = tensors["kv_b_proj.weight"].reshape(plan.n_heads, 2 * plan.head_dim, plan.rank)[:, plan.head_dim:]
            up_v, head_bias = fit.solve(prior=prior)
            new = with_head_values(tensors=tensors, plan=plan, up_v=up_v, head_bias=head_bias, o_bias=attn.o_bias)
        # measured on the written tensors (values are linear in the latent: the contexts give the layer's output)
        n32 = {k: v.to(dev, torch.float32) for k, v in new.items()}
        outputs = None
        if keep:
            outputs = [mla_output_from_contexts(tensors=n32, plan=plan, contexts=c) / plan.residual_scale for c in kept]
        got = outputs[0] if keep else mla_output_from_contexts(tensors=n32, plan=plan, contexts=first[0]) / plan.residual_scale
        rel = relative_output_error(first[1], got)
    return new, rel, outputs, src_outputs


def _fit_queries(prop: Propagation, i: int, plan: ConversionPlan, attn: AttentionWeights, tensors: dict,
                 calib: LayerCalibration, method: Method) -> tuple[dict, float, float]:
    """Refit layer ``i``'s query weight to the source attention distributions on the first
    ``method.query_fit_sequences`` calibration sequences (:func:`mha2mla.query_fit.fit_queries`)."""
    w32, src_angles = _on_device(prop, attn, calib)
    xs, targets, rows = [], [], 0
    for x in prop.inputs(i):
        x = x[: method.query_fit_sequences - rows]
        xs.append(x)
        targets.append(source_log_probs(weights=w32, x=x, angles=src_angles, n_heads=plan.n_heads, n_kv=plan.n_kv,
                                        head_dim=plan.head_dim))
        rows += x.shape[0]
        if rows >= method.query_fit_sequences:
            break
    f32 = {k: v.to(prop.device, torch.float32) for k, v in tensors.items()}
    fitted, info = fit_queries(tensors=f32, plan=plan, inputs=xs, targets=targets, angles=_mla_angles(plan, src_angles),
                               iterations=method.query_fit)
    name = query_weight_name(tensors)
    out = dict(tensors)
    out[name] = fitted[name].to("cpu", tensors[name].dtype)
    return out, info["kl_before"], info["kl_after"]


def _mla_angles(plan: ConversionPlan, src_angles: torch.Tensor) -> torch.Tensor:
    kept = kept_frequencies(head_dim=plan.head_dim, rope_dim=plan.rope_dim, stride=plan.rope_stride)
    return src_angles[:, kept.to(src_angles.device)]


def _converted_attention(plan: ConversionPlan, tensors: dict, inv_freq: torch.Tensor, length: int, device: torch.device):
    """The converted attention block as a function of its input, in source residual scale (for sequential calibration)."""
    f32 = {k: v.to(device, torch.float32) for k, v in tensors.items()}
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    angles = _mla_angles(plan, pos * inv_freq.to(device, torch.float32))
    return lambda x: mla_attention(tensors=f32, plan=plan, x=x, angles=angles) / plan.residual_scale


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Mha2mlaError(f"--device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Mha2mlaError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise Mha2mlaError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        raise Mha2mlaError(f"--device {device}: only cpu and cuda are supported")
    return dev


def _describe(calibration) -> str | None:
    return calibration if calibration is None or isinstance(calibration, str) else f"{len(calibration)} documents"


def _scaled(t: torch.Tensor, scale: float, out_dt: torch.dtype) -> torch.Tensor:
    """``t·scale`` rounded once to ``out_dt`` without a float64/float32 copy of a large tensor (scalar ops on bf16
    compute in float32 internally, so this equals rounding the exact product)."""
    if scale == 1.0:
        return t.to(out_dt)
    return (t * scale).to(out_dt) if t.dtype in (out_dt, torch.float32, torch.float64) else (t.float() * scale).to(out_dt)


def _drop_auto_map(path: str) -> None:
    """Remove ``auto_map`` (a pointer to remote code, which is never copied) from a copied JSON config."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(cfg, dict) and cfg.pop("auto_map", None) is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")


def _copy_side_files(src: SourceModel, out: str) -> None:
    if src.path is not None:
        for n in TOKENIZER_FILES:
            f = os.path.join(src.path, n)
            if os.path.isfile(f):
                shutil.copyfile(f, os.path.join(out, n))
        _drop_auto_map(os.path.join(out, "tokenizer_config.json"))
    elif src.gguf is not None:
        from transformers import AutoTokenizer

        folder, fname = src.gguf
        AutoTokenizer.from_pretrained(folder, gguf_file=fname).save_pretrained(out)


def convert(
    *,
    source: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    rope_dim: int | None = None,
    kv_budget: int | None = None,
    rope_stride: int | None = None,
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
        calibration: calibration text (file, JSONL, directory, dataset, or a list of documents); ``None`` converts
            data-free.
        calibration_samples: number of calibration sequences.
        calibration_length: tokens per calibration sequence (at most the source's ``max_position_embeddings``: a longer
            request is shortened to it, and the record says so).
        method: calibrated ingredients (default: all; see :class:`mha2mla.attention.Method`).
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
    if (rank is None) == (kv_budget is None):
        raise Mha2mlaError("give either --rank (with --rope-dim) or --kv-budget, not both or neither")
    if kv_budget is not None and calibration is None:
        raise Mha2mlaError("--kv-budget chooses the rank/rope split by measuring on calibration data: add --calibration, "
                           "or give --rank and --rope-dim")
    if kv_budget is not None and rope_dim is not None:
        raise Mha2mlaError("--kv-budget chooses --rope-dim itself; drop --rope-dim (or use --rank)")
    device = _check_device(device) if calibration is not None else torch.device("cpu")
    n_shard_bytes = shard_bytes(max_shard_size)
    src = load_source(source)
    gguf_file = os.path.join(*src.gguf) if src.gguf else None
    calib_file = calibration if isinstance(calibration, str) and os.path.exists(calibration) else None
    protect = (("source", src.path), ("source", gguf_file), ("calibration data", calib_file))
    check_output_path(output, force=force, protect=protect)  # up front: refuse before any expensive work
    budget_info = None
    if kv_budget is not None:
        rope_dim, budget_info = _budget_candidates(src, kv_budget)
        rank = kv_budget - rope_dim
    plan = make_plan(source=src, rank=rank, rope_dim=rope_dim, rope_stride=rope_stride, dtype=dtype)
    method = method or Method()
    calib_info, prop = None, None
    if calibration is not None:
        keep_freed_memory()  # the calibration loops reuse large activations (mha2mla.allocator; process-wide)
        length = calibration_length
        max_pos = src.config.get("max_position_embeddings")
        if isinstance(max_pos, int) and 16 <= max_pos < length:
            length = max_pos  # calibrate within the context the source was trained for
        tokens = calibration_tokens(source=src, data=calibration, samples=calibration_samples, length=length)
        calib_info = {"tokens": int(tokens.numel()), "samples": calibration_samples, "length": length,
                      "method": {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v  # (strict JSON)
                                 for k, v in asdict(method).items()}}
        if length != calibration_length:
            calib_info["length_requested"] = calibration_length
        choose_stride = rope_stride is None and src.rope["rope_type"] == "default"
        if budget_info is not None or choose_stride:
            # the schedule and split are global choices: decide them on a quick pass over a few sequences
            pre_n = PLAN_SEQUENCES if budget_info is not None else STRIDE_SEQUENCES
            pre_tokens = tokens[:pre_n]
            rope_len = min(method.rope_context, max_pos) if isinstance(max_pos, int) else method.rope_context
            if budget_info is None and rope_len > length:  # the schedule over the attention distances of long contexts
                try:
                    pre_tokens = calibration_tokens(source=src, data=calibration, samples=1, length=rope_len)
                    calib_info["rope_context"] = rope_len
                except Mha2mlaError:  # too little text for one such sequence: the calibration sequences decide
                    calib_info["rope_context"] = f"not used: the calibration text has fewer than {rope_len} tokens"
            pre = calibrate(source=src, tokens=pre_tokens, value_contexts=False, device=device,
                            progress=progress, desc="choosing the RoPE schedule")
            if budget_info is not None:
                plan, calib_info["kv_budget"] = _choose_split(src, pre, method, kv_budget, budget_info, rope_stride, dtype)
                rank, rope_dim = plan.rank, plan.rope_dim
            else:
                plan, calib_info["rope_stride_shares"] = _choose_stride(src, plan, pre, method, rope_dim, dtype, rank)
            del pre
        mlp_dtype = _mlp_dtype(method, device)
        prop = Propagation(source=src, tokens=tokens, device=device, track_source=_tracks_source(method, plan),
                           source_sequences=method.source_sequences or None,
                           mlp_dtype=mlp_dtype)
        calib_info["propagation"] = {"tracks_source": prop.tracks_source,
                                     "mlp_dtype": str(mlp_dtype).removeprefix("torch.")}
        if _drift_asked(method, plan) and not _drift_applies(method, plan):
            calib_info["propagation"]["drift"] = (
                f"off: rank {plan.rank} ≥ drift_below_share {method.drift_below_share:g} × the source's key width "
                f"{plan.n_kv * plan.head_dim} (n_kv·head_dim)")
        fit_stride = _output_fit_stride(method, plan)
        if method.output_fit:
            calib_info["output_fit_stride"] = fit_stride
    compute = _compute_dtype(plan.hidden)
    out_dt = plan.torch_dtype
    s = plan.residual_scale
    stats: list[LayerStats] = []
    with atomic_output_dir(os.fspath(output), force=force, protect=protect) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=n_shard_bytes)
        embed = src.get("model.embed_tokens.weight")
        writer.add("model.embed_tokens.weight", _scaled(embed, s, out_dt))
        if not plan.tie_embeddings:
            head = embed if src.tied else src.get("lm_head.weight")
            writer.add("lm_head.weight", head.to(out_dt))
        del embed
        writer.add("model.norm.weight", src.get("model.norm.weight").to(out_dt))
        desc = "calibrating and converting layers" if prop is not None else "converting layers"
        bar = Steps(plan.n_layers, desc=desc, enabled=progress)
        for i in bar:
            t_layer = time.time()
            attn, rest = _layer_tensors(src, i, compute)
            _check_shapes(src, attn, i)
            gamma = rest["input_layernorm.weight"].to(compute)
            bound = math.sqrt(plan.hidden) * float(gamma.abs().max())
            calib = None if prop is None else prop.layer_calibration(
                i, value_contexts=method.value_refit, context_sequences=method.context_sequences or None,
                context_stride=method.context_stride,
                head_outputs=method.output_fit)
            new, st = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calib, method=method)
            if prop is not None:
                outputs, src_outputs = None, None
                if method.query_fit > 0:
                    new, st.query_kl_before, st.query_kl_after = _fit_queries(prop, i, plan, attn, new, calib, method)
                if method.output_fit:
                    new, st.output_fit_rel_error, outputs, src_outputs = _fit_output(
                        prop, i, plan, attn, new, calib, fit_stride, method.drift_correction)
                mlp_drift = method.mlp_drift if prop.tracks_source else 0.0
                last = i == plan.n_layers - 1  # (nothing reads the hidden states past it: advance only refits)
                if not method.sequential:
                    prop.advance(i, last=last)
                else:
                    down = prop.advance(
                        i, outputs or _converted_attention(plan, new, calib.inv_freq, prop.h.shape[1], prop.device),
                        source_outputs=src_outputs, mlp_drift=mlp_drift, last=last)
                    if down is not None:
                        w0 = rest["mlp.down_proj.weight"]
                        st.mlp_rel_change = float((down - w0.double()).norm() / w0.double().norm().clamp_min(1e-30))
                        rest["mlp.down_proj.weight"] = down.to(compute)
                del calib, outputs, src_outputs
            stats.append(st)
            p = f"model.layers.{i}."
            for n, t in new.items():
                writer.add(p + "self_attn." + n, t.to(out_dt))
            for n, t in rest.items():
                t = _scaled(t, s, out_dt) if n == "mlp.down_proj.weight" else t
                writer.add(p + n, t.to(out_dt))
            st.seconds = time.time() - t_layer
            bar.set_postfix(k_err=f"{st.k_rel_error:.3f}", v_err=f"{st.v_rel_error:.3f}")
            del attn, rest, new
        if calib_info is not None:
            calib_info["seconds"] = round(time.time() - t0, 1)
        del prop
        names = writer.close()
        config = deepseek_v3_config(source=src, plan=plan)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        _copy_side_files(src, tmp)
        with open(os.path.join(tmp, "model.safetensors.index.json")) as f:
            weight_names = list(json.load(f)["weight_map"])
        record = write_record(tmp, source=src, plan=plan, stats=stats, config=config, weight_names=weight_names,
                              options={"rank": plan.rank, "kv_budget": kv_budget, "rope_dim": plan.rope_dim,
                                       "rope_stride": plan.rope_stride, "calibration": _describe(calibration),
                                       "dtype": plan.dtype, "max_shard_size": str(max_shard_size)},
                              shards=names, extra={"calibration": calib_info} if calib_info else None)
        write_model_card(tmp, record=record)
        if report:
            from mha2mla.report import write_report

            write_report(tmp, stats=stats, rank=plan.rank)
    return ConversionResult(output=os.fspath(output), plan=plan, layers=stats, record=record, seconds=time.time() - t0)
