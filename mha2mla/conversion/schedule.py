"""The conversion's global choices, made once before the layers: the RoPE schedule (which source frequencies keep
their rotation) and, for ``--kv-budget``, the split of the budget between the latent and the rope key.

Both are decided on a quick calibration pass over a few sequences: the schedule by the query-weighted rotary key
energy each standard stride keeps over all layers, the split by the attention-output error of a few probe layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from mha2mla.checkpoint.source import SourceModel
from mha2mla.conversion.latent import convert_attention, rope_frequency_scores
from mha2mla.conversion.layer import compute_dtype, read_layer
from mha2mla.conversion.options import Method
from mha2mla.conversion.plan import make_plan
from mha2mla.conversion.stream import CalibrationSet, calibrate, calibration_tokens
from mha2mla.errors import Mha2mlaError
from mha2mla.ops.rope import kept_frequencies, unscaled_frequencies
from mha2mla.ops.shapes import ConversionPlan, max_rank

__all__ = ["Schedule", "first_plan", "choose_schedule", "choose_rope_stride", "budget_candidates"]

# Calibration sequences the kv-budget split is decided on.
PLAN_SEQUENCES = 4
# Calibration sequences the RoPE schedule alone is decided on (a choice among a few strides).
STRIDE_SEQUENCES = 2


@dataclass
class Schedule:
    """The plan after the global choices, and what the record says about them."""

    plan: ConversionPlan
    info: dict = field(default_factory=dict)


def budget_candidates(*, source: SourceModel, budget: int) -> list[int]:
    """Rope dims worth trying for a KV budget: even divisors of head_dim from head_dim/8 up, leaving a valid rank."""
    hd = source.head_dim
    top = max_rank(n_kv=source.n_kv, head_dim=hd, hidden=source.hidden)
    dims = [d for d in range(2, hd + 1, 2) if hd % d == 0 and d >= max(2, hd // 8) and 1 <= budget - d <= top]
    if not dims:
        raise Mha2mlaError(f"--kv-budget {budget} leaves no valid split for head_dim {hd} (rank must be in 1..{top}); "
                           f"try a budget between {hd // 8 + 1} and {top + hd}")
    return dims


def first_plan(*, source: SourceModel, rank: int | None, rope_dim: int | None, kv_budget: int | None,
               rope_stride: int | None, dtype: str, rope_scaling: str = "auto", biases: str = "auto",
               calibrated: bool = False) -> ConversionPlan:
    """The plan as asked, validated before any data is read (for ``kv_budget``, its middle candidate split)."""
    if kv_budget is not None:
        dims = budget_candidates(source=source, budget=kv_budget)
        rope_dim = dims[len(dims) // 2]
        rank = kv_budget - rope_dim
    return make_plan(source=source, rank=rank, rope_dim=rope_dim, rope_stride=rope_stride, dtype=dtype,
                     rope_scaling=rope_scaling, biases=biases, calibrated=calibrated)


def _choices(plan: ConversionPlan) -> dict:
    """The ``make_plan`` modes that re-plan to ``plan``'s rope type and biases (at another stride or split)."""
    return {"rope_scaling": "portable" if plan.rope_type == "default" else "keep",
            "biases": "keep" if plan.attention_bias else "absorb", "calibrated": True}


def choose_rope_stride(*, scores: torch.Tensor, head_dim: int, rope_dim: int) -> tuple[int, dict[int, float]]:
    """The stride whose kept frequencies ``stride·m`` hold the most of ``scores``; returns it and every stride's share."""
    total = float(scores.sum()) or 1.0
    shares = {}
    for s in range(1, head_dim // rope_dim + 1):
        shares[s] = float(scores[kept_frequencies(head_dim=head_dim, rope_dim=rope_dim, stride=s)].sum()) / total
    return max(shares, key=shares.get), shares


def choose_schedule(*, source: SourceModel, plan: ConversionPlan, kv_budget: int | None, rope_stride: int | None,
                    calib: CalibrationSet, method: Method, device: torch.device, progress: bool) -> Schedule:
    """Choose the RoPE schedule (when the stride is not given) and the kv-budget split
    on a calibration pre-pass; the plan is returned unchanged when there is nothing to choose."""
    choose_stride = rope_stride is None
    if kv_budget is None and not choose_stride:
        return Schedule(plan)
    info: dict = {}
    tokens = calib.tokens[: PLAN_SEQUENCES if kv_budget is not None else STRIDE_SEQUENCES]
    max_pos = calib.max_positions
    rope_len = min(method.rope_context, max_pos) if max_pos is not None else method.rope_context
    if kv_budget is None and rope_len > calib.length:  # the schedule over the attention distances of long contexts
        try:
            tokens = calibration_tokens(source=source, data=calib.data, samples=1, length=rope_len)
            info["rope_context"] = rope_len
        except Mha2mlaError:  # too little text for one such sequence: the calibration sequences decide
            info["rope_context"] = f"not used: the calibration text has fewer than {rope_len} tokens"
    pre = calibrate(source=source, tokens=tokens, value_contexts=False, device=device, progress=progress,
                    desc="choosing the RoPE schedule")
    if kv_budget is not None:
        plan, info["kv_budget"] = _best_split(source, pre, method, kv_budget, rope_stride, plan)
    else:
        plan, info["rope_stride_shares"] = _stride_plan(source, plan, pre, method)
    return Schedule(plan, info)


def _stride_plan(src: SourceModel, plan: ConversionPlan, calibs: list, method: Method) -> tuple[ConversionPlan, dict]:
    """``plan`` with the stride that keeps the most query-weighted rotary key energy over all layers (of the
    frequencies a ``default`` target can rotate: those the source's rope scaling leaves unchanged)."""
    compute = compute_dtype(plan.hidden)
    scores = None
    for i, calib in enumerate(calibs):
        attn, _ = read_layer(src, i, compute)
        sc = rope_frequency_scores(weights=attn, calib=calib, n_heads=plan.n_heads, n_kv=plan.n_kv,
                                   head_dim=plan.head_dim, method=method)
        scores = sc if scores is None else scores + sc
    if plan.rope_type == "default":  # (a kept scaling rotates every frequency right)
        scores = scores * unscaled_frequencies(rope=src.rope, head_dim=plan.head_dim).to(scores.dtype)
    stride, shares = choose_rope_stride(scores=scores, head_dim=plan.head_dim, rope_dim=plan.rope_dim)
    return make_plan(source=src, rank=plan.rank, rope_dim=plan.rope_dim, rope_stride=stride, dtype=plan.dtype,
                     **_choices(plan)), shares


def _best_split(src: SourceModel, calibs: list, method: Method, budget: int, rope_stride: int | None,
                first: ConversionPlan) -> tuple[ConversionPlan, dict]:
    """Measure each candidate rope dim's mean attention-output error on a few layers; keep the best split."""
    compute = compute_dtype(src.hidden)
    layers = sorted(set(range(0, src.n_layers, max(1, src.n_layers // 6))))
    probe = Method(**{**asdict(method), "balance_search": True, "alternating": 0})
    errors = {}
    for d in budget_candidates(source=src, budget=budget):
        plan = make_plan(source=src, rank=budget - d, rope_dim=d, rope_stride=rope_stride, dtype=first.dtype,
                         **_choices(first))
        if rope_stride is None:
            plan, _ = _stride_plan(src, plan, calibs, method)
        errs = []
        for i in layers:
            attn, rest = read_layer(src, i, compute)
            bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
            _, st = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calibs[i], method=probe)
            errs.append(st.output_rel_error)
        errors[d] = (sum(errs) / len(errs), plan)
    best = min(errors, key=lambda d: errors[d][0])
    info = {"budget": budget, "chosen": f"{budget - best}+{best}", "probe_layers": layers,
            "mean_attention_output_rel_error": {f"{budget - d}+{d}": round(e, 5) for d, (e, _) in errors.items()},
            "why": f"{budget - best}+{best} had the lowest mean attention-output error on the calibration data"}
    return errors[best][1], info
