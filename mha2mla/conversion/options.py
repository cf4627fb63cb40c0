"""The calibrated method's switches (:class:`Method`), and what they mean for one plan and device (:class:`Policy`).

Each switch turns one ingredient of the calibrated conversion on or off, or sets its size; docs/method.md explains the
ingredients and benchmarks/RESULTS.md measures them. The defaults are the best measured method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mha2mla.conversion.stream import native_bfloat16
from mha2mla.ops.shapes import ConversionPlan
from mha2mla.ops.value_fit import JOINT_MAX_FEATURES, moment_stride

__all__ = ["Method", "Policy"]


@dataclass(frozen=True)
class Method:
    """Which calibrated ingredients a conversion uses, grouped by the stage that reads them (data-free conversions
    read none). ``Method.from_spec("query_fit=0,mlp_dtype=float32")`` builds one from the CLI's ``--method``."""

    # RoPE slice (mha2mla.conversion.schedule, mha2mla.ops.rope)
    expected_rotation: bool = True  # planes that lose RoPE keep ρ = E[e^{-iΔω}] over the attention distances
    weighted_rope: bool = True  # the shared rope key keeps the query-weighted key energy that needs its rotation
    rope_context: int = 0  # choose the RoPE schedule over one sequence of this many tokens (0: the calibration ones)
    # Latent (mha2mla.conversion.latent, mha2mla.ops.factorize)
    activation_aware: bool = True  # minimise the key/value error on real inputs (E[xxᵀ]), not on the weights
    attention_weighted_keys: bool = True  # weight each key's input by the attention it receives
    output_weighted: bool = True  # weight keys by the queries that read them, values by W_o
    balance_search: bool = True  # choose the key/value balance by the layer's measured output error
    value_refit: bool = True  # fit values on the attention-averaged inputs x̄ = Σ_n p_mn x_n they really see
    alternating: int = 3  # alternating least-squares rounds for W_down (0: refit W_upV only)
    context_sequences: int = 0  # calibration sequences the averaged-input moment is measured on (0: all)
    context_stride: int = 4  # that moment reads every k-th query position (the offset turning with the batch)
    # Query fit (mha2mla.ops.query_fit)
    query_fit: int = 10  # L-BFGS iterations matching each head's attention distribution to the source's (0: off)
    query_fit_sequences: int = 2  # calibration sequences the query fit runs on
    query_fit_context: int = 8192  # …and one sequence this long (at most the source's context; 0 or ≤ the calibration length: not)
    query_fit_rows: int = 256  # query positions of that long sequence the fit reads, spread evenly
    # Output fit (mha2mla.ops.value_fit)
    output_fit: bool = True  # refit the value path so the layer's output matches the source layer's
    output_fit_stride: int = 0  # its moments read every k-th query position (0: chosen from the fit's size)
    # Calibration stream and drift (mha2mla.conversion.stream, mha2mla.ops.mlp_fit)
    sequential: bool = True  # calibrate each layer on the inputs the converted layers below it produce
    drift_correction: float = 0.4  # move the output-fit target this far towards the source's residual stream
    mlp_drift: float = 0.4  # refit each MLP down-projection to move this far towards the source's residual stream
    drift_below_share: float = 0.5  # drift corrections only where rank < this share of n_kv·head_dim (inf: always)
    source_sequences: int = 32  # carry the source's own stream for this many sequences (0: all)
    mlp_dtype: str = "auto"  # precision of the streams' MLP forwards: auto (bfloat16 where native), float32, bfloat16

    def resolve(self, *, plan: ConversionPlan, device: torch.device) -> "Policy":
        """What these switches mean for ``plan`` on ``device``: the choices that depend on the target's shapes."""
        joint = plan.n_heads * plan.rank <= JOINT_MAX_FEATURES
        stride = self.output_fit_stride or (moment_stride(features=plan.n_heads * plan.rank) if joint else 1)
        key_width = plan.n_kv * plan.head_dim
        asked = self.sequential and ((self.drift_correction > 0 and self.output_fit and joint) or self.mlp_drift > 0)
        applies = plan.rank < self.drift_below_share * key_width
        note = None
        if asked and not applies:
            note = (f"off: rank {plan.rank} ≥ drift_below_share {self.drift_below_share:g} × the source's key width "
                    f"{key_width} (n_kv·head_dim)")
        if self.mlp_dtype == "auto":
            mlp_dtype = torch.bfloat16 if native_bfloat16(device) else torch.float32
        else:
            mlp_dtype = getattr(torch, self.mlp_dtype)
        tracks = asked and applies
        return Policy(joint_output_fit=joint, output_fit_stride=stride, tracks_source=tracks, drift_note=note,
                      attention_drift=self.drift_correction if tracks and joint else 0.0,
                      mlp_drift=self.mlp_drift if tracks else 0.0, mlp_dtype=mlp_dtype)

    @classmethod
    def from_spec(cls, spec: str) -> "Method":
        """A method from comma-separated switches, e.g. ``"mlp_drift=0,query_fit=10,mlp_dtype=float32"`` (booleans
        take 0/1/false/true/no/yes); unknown names raise ValueError."""
        kw: dict = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, val = (t.strip() for t in item.partition("="))
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"method switch {item!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            kind = type(getattr(cls(), key))
            try:
                kw[key] = val.lower() not in ("0", "false", "no") if kind is bool else kind(val)
            except ValueError:
                raise ValueError(f"method switch {item!r}: {key} takes a {kind.__name__}, got {val!r}") from None
        return cls(**kw)

    def __post_init__(self):
        if self.mlp_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"Method.mlp_dtype must be 'auto', 'float32' or 'bfloat16', got {self.mlp_dtype!r}")
        if self.context_stride < 1:
            raise ValueError(f"Method.context_stride must be ≥ 1, got {self.context_stride}")
        if self.output_fit_stride < 0:
            raise ValueError(f"Method.output_fit_stride must be ≥ 0 (0: chosen from the fit's size), "
                             f"got {self.output_fit_stride}")
        if not self.drift_below_share >= 0:
            raise ValueError(f"Method.drift_below_share must be ≥ 0 (inf: always), got {self.drift_below_share}")
        if self.query_fit_rows < 1:
            raise ValueError(f"Method.query_fit_rows must be ≥ 1, got {self.query_fit_rows}")
        for name in ("context_sequences", "source_sequences", "rope_context", "query_fit_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"Method.{name} must be ≥ 0 (0: all sequences), got {getattr(self, name)}")




@dataclass(frozen=True)
class Policy:
    """A :class:`Method` resolved for one plan and device (:meth:`Method.resolve`).

    Attributes:
        joint_output_fit: the output fit solves all heads' value paths jointly with ``W_o`` (else head by head,
            keeping ``W_o``): when ``n_heads·rank`` features are few enough.
        output_fit_stride: the output fit's query-position stride.
        tracks_source: the source model's own hidden states are carried beside the converted ones (for the drift
            corrections, asked for and applying to this latent width).
        drift_note: why asked-for drift corrections are off for this plan (``None`` when they are not).
        attention_drift: how far each output-fit target moves towards the source's residual stream (0: not at all).
        mlp_drift: how far each MLP refit moves the layer towards the source's residual stream (0: no refit).
        mlp_dtype: the dtype the calibration streams' MLPs run in.
    """

    joint_output_fit: bool
    output_fit_stride: int
    tracks_source: bool
    drift_note: str | None
    attention_drift: float
    mlp_drift: float
    mlp_dtype: torch.dtype
