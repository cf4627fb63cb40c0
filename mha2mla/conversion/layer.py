"""One layer end to end: read its source tensors, measure its calibration statistics, convert it (the latent, then
the query fit, then the output fit), and move the calibration stream past it.

:func:`convert_layer` is the one function that converts a layer; :func:`mha2mla.conversion.pipeline.convert` calls
it for every layer in turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mha2mla.allocator import release_freed_memory
from mha2mla.checkpoint.source import SourceModel
from mha2mla.conversion.latent import AttentionWeights, LayerStats, convert_attention
from mha2mla.conversion.options import Method, Policy
from mha2mla.conversion.stream import CalibrationSet, LayerCalibration, Propagation, calibration_tokens
from mha2mla.errors import Mha2mlaError
from mha2mla.ops.attention import (mla_attention, mla_head_contexts, mla_output_from_contexts, relative_output_error,
                                   source_attention, source_output_from_heads, value_up_projection)
from mha2mla.ops.query_fit import fit_queries, query_weight_name, source_log_probs, spread_rows
from mha2mla.ops.rope import kept_frequencies
from mha2mla.ops.shapes import ConversionPlan
from mha2mla.ops.value_fit import HeadwiseValueFit, ValuePathFit, value_path_prior, with_head_values, with_value_path

__all__ = ["LayerResult", "REST_NAMES", "compute_dtype", "read_layer", "long_stream", "measure", "convert_layer",
           "advance"]

# Up to this hidden size the layer math runs in float64 (cheap, and exact to rounding); above it in float32.
FLOAT64_MAX_HIDDEN = 2048
# The output fit keeps each calibration batch's converted head contexts for the step past the layer when they take at
# most this many floats (N·L·heads·rank); above it the converted layer is run again.
CONTEXT_CACHE_MAX_FLOATS = 256 * 2**20
# A layer's tensors besides its attention, in the order they are written.
REST_NAMES = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight")


def compute_dtype(hidden: int) -> torch.dtype:
    """The dtype the layer math runs in for a model of this hidden size."""
    return torch.float64 if hidden <= FLOAT64_MAX_HIDDEN else torch.float32


@dataclass
class LayerResult:
    """One converted layer.

    Attributes:
        tensors: the attention tensors, named relative to ``self_attn.``, in the compute dtype.
        stats: what the conversion cost (the record's per-layer entry).
        outputs: the converted attention's outputs per calibration batch (source residual scale), when they were
            cheap to keep: the stream then moves past the layer without running it again.
        source_outputs: the source attention's outputs on the source's own stream per batch (tracked streams only).
    """

    tensors: dict[str, torch.Tensor]
    stats: LayerStats
    outputs: list[torch.Tensor] | None = None
    source_outputs: list[torch.Tensor] | None = None


def read_layer(src: SourceModel, i: int, dtype: torch.dtype, *,
               mlp: bool = True) -> tuple[AttentionWeights, dict[str, torch.Tensor]]:
    """Layer ``i``'s attention weights in ``dtype`` (shapes checked against the config), and its norms and (with
    ``mlp``) MLP as stored."""
    p = f"model.layers.{i}."

    def get(n):
        return src.get(p + n).to(dtype)

    def bias(x):
        return get(f"self_attn.{x}_proj.bias") if src.bias[x] else None

    attn = AttentionWeights(
        q=get("self_attn.q_proj.weight"), k=get("self_attn.k_proj.weight"), v=get("self_attn.v_proj.weight"),
        o=get("self_attn.o_proj.weight"), q_bias=bias("q"), k_bias=bias("k"), v_bias=bias("v"), o_bias=bias("o"),
    )
    want = {"q": (src.n_heads * src.head_dim, src.hidden), "k": (src.n_kv * src.head_dim, src.hidden),
            "v": (src.n_kv * src.head_dim, src.hidden), "o": (src.hidden, src.n_heads * src.head_dim)}
    for x, shape in want.items():
        got = tuple(getattr(attn, x).shape)
        if got != shape:
            raise Mha2mlaError(f"layer {i} {x}_proj has shape {got}, but config.json implies {shape}; config and weights disagree")
    return attn, {n: src.get(p + n) for n in REST_NAMES if mlp or not n.startswith("mlp.")}


def long_stream(*, source: SourceModel, calib: CalibrationSet, method: Method, policy: Policy,
                device: torch.device) -> tuple[Propagation | None, dict]:
    """The query fit's long sequence: one sequence of ``method.query_fit_context`` tokens (at most the source's
    ``max_position_embeddings``), carried through the converted layers like the calibration stream, so that each
    layer's queries are also fitted to the source's attention at long distances. ``None`` when the query fit is off,
    the length is not above the calibration length, or the text is too short; the dict says which, for the record."""
    length = method.query_fit_context
    if calib.max_positions is not None:
        length = min(length, calib.max_positions)
    if method.query_fit <= 0 or length <= calib.length:
        return None, {}
    try:
        tokens = calibration_tokens(source=source, data=calib.data, samples=1, length=length, seed=1)
    except Mha2mlaError:
        return None, {"query_fit_context": f"not used: the calibration text has fewer than {length} tokens"}
    stream = Propagation(source=source, tokens=tokens, batch=1, device=device, mlp_dtype=policy.mlp_dtype)
    return stream, {"query_fit_context": length, "query_fit_rows": len(spread_rows(length=length,
                                                                                    count=method.query_fit_rows))}


def measure(stream: Propagation, i: int, method: Method) -> LayerCalibration:
    """Layer ``i``'s calibration statistics on the stream's current hidden states, as far as ``method`` reads them.
    The stream then parks the layer's weights (:meth:`Propagation.park`) until :func:`advance` needs them."""
    calib = stream.layer_calibration(i, value_contexts=method.value_refit,
                                     context_sequences=method.context_sequences or None,
                                     context_stride=method.context_stride, head_outputs=method.output_fit)
    stream.park(i)
    release_freed_memory()
    return calib


def convert_layer(*, plan: ConversionPlan, weights: AttentionWeights, input_norm: torch.Tensor, index: int,
                  calib: LayerCalibration | None = None, stream: Propagation | None = None,
                  method: Method = Method(), policy: Policy | None = None,
                  long: Propagation | None = None) -> LayerResult:
    """Convert layer ``index``'s attention: the latent and rope key (:func:`convert_attention`), then, calibrated, the
    query fit and the output fit on the stream's inputs.

    Args:
        plan: the target shapes and constants.
        weights: the source attention weights in the compute dtype (:func:`read_layer`).
        input_norm: the layer's input RMSNorm weight (it bounds the attention input's norm).
        index: the layer's index.
        calib: its statistics (:func:`measure`); ``None`` converts data-free. Its moments and input sample are
            released once the latent is fitted (only ``inv_freq`` and ``head_outputs`` are read after it).
        stream: the calibration stream the statistics came from (needed with ``calib``).
        method, policy: the calibrated ingredients, and what they mean for this plan (:meth:`Method.resolve`).
        long: the query fit's long sequence (:func:`long_stream`), when there is one.
    """
    bound = math.sqrt(plan.hidden) * float(input_norm.to(weights.q.dtype).abs().max())
    tensors, stats = convert_attention(plan=plan, weights=weights, input_norm_bound=bound, calib=calib, method=method)
    result = LayerResult(tensors, stats)
    if calib is None:
        return result
    # the moments and sample are read by the latent only; the later stages read inv_freq and head_outputs
    calib.sigma_ctx = calib.sigma_key = calib.sigma = calib.x_sample = None
    release_freed_memory()  # (between stages: see mha2mla.allocator)
    if method.query_fit > 0:
        result.tensors, stats.query_kl_before, stats.query_kl_after = _fit_queries(
            stream, index, plan, weights, result.tensors, calib, method, long)
        release_freed_memory()
    if method.output_fit:
        result.tensors, stats.output_fit_rel_error, result.outputs, result.source_outputs = _fit_output(
            stream, index, plan, weights, result.tensors, calib, policy)
        release_freed_memory()
    return result


def advance(*, stream: Propagation, index: int, layer: LayerResult, rest: dict[str, torch.Tensor], plan: ConversionPlan,
            method: Method, policy: Policy, long: Propagation | None = None) -> None:
    """Move the calibration stream (and the query fit's ``long`` one) past layer ``index`` (through the converted
    attention when ``method.sequential``). Where the MLP is refit against the drift, its new down-projection goes into
    ``rest["mlp.down_proj.weight"]`` and the layer's stats record how far it moved from the source's."""
    last = index == plan.n_layers - 1  # (nothing reads the hidden states past it: advance only refits)
    if not method.sequential:
        stream.advance(index, last=last)
        if long is not None:
            long.advance(index, last=last)
        return

    attention = layer.outputs or _converted_attention(plan, layer.tensors, stream.inv_freq, stream.h.shape[1],
                                                      stream.device)
    down = stream.advance(index, attention, source_outputs=layer.source_outputs, mlp_drift=policy.mlp_drift, last=last)
    layer.outputs = layer.source_outputs = None
    if long is not None and not last:  # through the same converted layer, the refit MLP included
        long.advance(index, _converted_attention(plan, layer.tensors, long.inv_freq, long.h.shape[1], long.device),
                     mlp_down=down)
    release_freed_memory()
    if down is not None:
        name = "mlp.down_proj.weight"
        w0 = rest[name] if name in rest else stream.source.get(f"model.layers.{index}.{name}")
        layer.stats.mlp_rel_change = float((down - w0.double()).norm() / w0.double().norm().clamp_min(1e-30))
        rest[name] = down.to(compute_dtype(plan.hidden))


def _on_device(prop: Propagation, attn: AttentionWeights, calib: LayerCalibration,
               length: int | None = None) -> tuple[AttentionWeights, torch.Tensor]:
    """The source layer's attention weights in float32 on the calibration device, and its angles ``pos·ω [L, hd/2]``
    (``L``: ``length``, default the stream's sequence length)."""
    dev = prop.device
    w32 = AttentionWeights(**{k: None if v is None else v.to(dev, torch.float32) for k, v in vars(attn).items()})
    pos = torch.arange(length or prop.h.shape[1], dtype=torch.float32, device=dev)[:, None]
    return w32, pos * calib.inv_freq.to(dev, torch.float32)


def _fit_output(prop: Propagation, i: int, plan: ConversionPlan, attn: AttentionWeights, tensors: dict,
                calib: LayerCalibration, policy: Policy) -> tuple[dict, float, list | None, list | None]:
    """Refit layer ``i``'s value path so its output on the calibration inputs matches the source layer's (the moments
    on every ``policy.output_fit_stride``-th query position).

    The target is the source layer's attention applied to the converted model's inputs; with ``policy.attention_drift > 0``
    (the joint fit, and the source's own hidden states tracked) it moves by ``policy.attention_drift`` towards what puts the residual stream back
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
    joint, stride, drift = policy.joint_output_fit, policy.output_fit_stride, policy.attention_drift
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
            prior = value_up_projection(tensors, plan)
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
                 calib: LayerCalibration, method: Method, long: Propagation | None) -> tuple[dict, float, float]:
    """Refit layer ``i``'s query weight to the source attention distributions on the first
    ``method.query_fit_sequences`` calibration sequences and, with ``long``, on ``method.query_fit_rows`` query
    positions of the long sequence (:func:`mha2mla.ops.query_fit.fit_queries`)."""
    length = prop.h.shape[1] if long is None else max(prop.h.shape[1], long.h.shape[1])
    w32, src_angles = _on_device(prop, attn, calib, length)
    shape = dict(n_heads=plan.n_heads, n_kv=plan.n_kv, head_dim=plan.head_dim)
    xs, targets, rows, seen = [], [], [], 0
    for x in prop.inputs(i):
        x = x[: method.query_fit_sequences - seen]
        xs.append(x)
        targets.append(source_log_probs(weights=w32, x=x, angles=src_angles, **shape))
        rows.append(None)
        seen += x.shape[0]
        if seen >= method.query_fit_sequences:
            break
    if long is not None:
        x = next(long.inputs(i))
        sel = spread_rows(length=x.shape[1], count=method.query_fit_rows).to(x.device)
        xs.append(x)
        targets.append(source_log_probs(weights=w32, x=x, angles=src_angles, rows=sel, **shape))
        rows.append(sel)
    f32 = {k: v.to(prop.device, torch.float32) for k, v in tensors.items()}
    fitted, info = fit_queries(tensors=f32, plan=plan, inputs=xs, targets=targets, angles=_mla_angles(plan, src_angles),
                               iterations=method.query_fit, rows=rows)
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
