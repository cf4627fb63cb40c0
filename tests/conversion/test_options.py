"""The calibrated method's switches (:class:`mha2mla.conversion.options.Method`) and what they mean for one plan
and device (:meth:`Method.resolve` → :class:`Policy`)."""

from __future__ import annotations

import math

import pytest
import torch

import mha2mla
from mha2mla.conversion.options import Method, Policy
from mha2mla.conversion.stream import native_bfloat16
from mha2mla.ops.shapes import ConversionPlan
from mha2mla.ops.value_fit import JOINT_MAX_FEATURES, moment_stride
from tests.conftest import CORPUS

CPU = torch.device("cpu")


def _plan(*, n_heads=4, n_kv=2, head_dim=16, rank=8) -> ConversionPlan:
    return ConversionPlan(rank=rank, rope_dim=8, rope_stride=2, rope_theta=100.0, n_layers=2, hidden=64,
                          n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, q_lora_rank=None, attention_bias=False,
                          residual_scale=1.0, tie_embeddings=True, dtype="float32")


def test_resolve_fits_all_heads_jointly_up_to_the_joint_size_and_head_by_head_above():
    assert JOINT_MAX_FEATURES == 4096
    joint = Method().resolve(plan=_plan(n_heads=32, n_kv=8, head_dim=128, rank=128), device=CPU)  # 4096 features
    wide = Method().resolve(plan=_plan(n_heads=32, n_kv=8, head_dim=128, rank=129), device=CPU)
    assert isinstance(joint, Policy) and joint.joint_output_fit and not wide.joint_output_fit
    assert joint.output_fit_stride == moment_stride(features=4096) == 16 and wide.output_fit_stride == 1
    pinned = Method(output_fit_stride=3)
    assert pinned.resolve(plan=_plan(n_heads=32, n_kv=8, head_dim=128, rank=129), device=CPU).output_fit_stride == 3
    assert pinned.resolve(plan=_plan(), device=CPU).output_fit_stride == 3
    assert Method().resolve(plan=_plan(), device=CPU).output_fit_stride == 1  # 32 features: every position


def test_resolve_applies_the_drift_corrections_only_below_the_share_of_the_key_width():
    narrow, wide = _plan(rank=15), _plan(rank=16)  # key width n_kv·head_dim = 32, drift_below_share 0.5
    on = Method().resolve(plan=narrow, device=CPU)
    assert on.tracks_source and on.drift_note is None
    assert (on.attention_drift, on.mlp_drift) == (Method().drift_correction, Method().mlp_drift) == (0.4, 0.4)
    off = Method().resolve(plan=wide, device=CPU)
    assert not off.tracks_source and (off.attention_drift, off.mlp_drift) == (0.0, 0.0)
    assert off.drift_note == "off: rank 16 ≥ drift_below_share 0.5 × the source's key width 32 (n_kv·head_dim)"
    forced = Method(drift_below_share=math.inf).resolve(plan=wide, device=CPU)
    assert forced.tracks_source and forced.drift_note is None and forced.mlp_drift == 0.4


@pytest.mark.parametrize("method,tracks,attention,mlp", [
    (Method(mlp_drift=0.0), True, 0.4, 0.0),  # the attention's drift correction alone
    (Method(drift_correction=0.0), True, 0.0, 0.4),  # the MLP refit alone
    (Method(drift_correction=0.0, mlp_drift=0.0), False, 0.0, 0.0),  # none asked
    (Method(sequential=False), False, 0.0, 0.0),  # no converted stream to drift
    (Method(output_fit=False, mlp_drift=0.0), False, 0.0, 0.0),  # the attention's correction moves the output fit's target
])
def test_resolve_tracks_the_source_only_for_a_drift_correction_that_is_asked_for(method, tracks, attention, mlp):
    policy = method.resolve(plan=_plan(rank=8), device=CPU)
    assert (policy.tracks_source, policy.attention_drift, policy.mlp_drift) == (tracks, attention, mlp)
    assert policy.drift_note is None
    assert method.resolve(plan=_plan(rank=16), device=CPU).drift_note == (
        None if not tracks else "off: rank 16 ≥ drift_below_share 0.5 × the source's key width 32 (n_kv·head_dim)")


def test_resolve_keeps_the_attention_drift_to_the_joint_fit(monkeypatch):
    """The head-wise fit of wide models keeps W_o and corrects no drift; the MLP refit still runs there."""
    import mha2mla.conversion.options as options

    monkeypatch.setattr(options, "JOINT_MAX_FEATURES", 0)
    policy = Method().resolve(plan=_plan(rank=8), device=CPU)
    assert not policy.joint_output_fit and policy.tracks_source
    assert (policy.attention_drift, policy.mlp_drift) == (0.0, 0.4)


def test_resolve_names_the_mlp_dtype():
    assert Method(mlp_dtype="float32").resolve(plan=_plan(), device=CPU).mlp_dtype is torch.float32
    assert Method(mlp_dtype="bfloat16").resolve(plan=_plan(), device=CPU).mlp_dtype is torch.bfloat16
    auto = Method().resolve(plan=_plan(), device=CPU).mlp_dtype
    assert auto is (torch.bfloat16 if native_bfloat16(CPU) else torch.float32)


def test_method_rejects_an_unknown_mlp_dtype():
    with pytest.raises(ValueError, match="mlp_dtype must be 'auto', 'float32' or 'bfloat16', got 'float16'"):
        Method(mlp_dtype="float16")
    with pytest.raises(ValueError, match="context_stride must be ≥ 1, got 0"):
        Method(context_stride=0)
    with pytest.raises(ValueError, match=r"source_sequences must be ≥ 0 \(0: all sequences\), got -1"):
        Method(source_sequences=-1)


def test_method_from_spec_parses_every_field_kind_and_rejects_unknown_names():
    m = Method.from_spec("expected_rotation=false, query_fit=3,drift_correction=0.25,mlp_dtype=float32")
    assert (m.expected_rotation, m.query_fit, m.drift_correction, m.mlp_dtype) == (False, 3, 0.25, "float32")
    assert Method.from_spec("") == Method()
    with pytest.raises(ValueError, match="method switch 'qfit=3'.*query_fit"):
        Method.from_spec("qfit=3")
    with pytest.raises(ValueError, match="mlp_dtype must be"):
        Method.from_spec("mlp_dtype=half")


def test_drift_corrections_run_only_where_the_latent_is_narrow(tiny_source, tmp_path):
    import dataclasses

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=2)  # key width n_kv·head_dim = 32: drift below rank 16
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    runs = {"narrow": (15, Method()), "wide": (16, Method()),
            "forced": (16, dataclasses.replace(Method(), drift_below_share=float("inf")))}
    for name, (rank, method) in runs.items():
        res = mha2mla.convert(source=src, output=str(tmp_path / name), rank=rank, method=method, **kw)
        prop = res.record["calibration"]["propagation"]
        changes = [x["mlp_down_rel_change"] for x in res.record["layers"]]
        corrected = "drift that the layers below" in (tmp_path / name / "README.md").read_text()
        if name == "wide":
            assert not prop["tracks_source"] and changes == [None, None] and not corrected
            assert prop["drift"] == "off: rank 16 ≥ drift_below_share 0.5 × the source's key width 32 (n_kv·head_dim)"
        else:
            assert prop["tracks_source"] and all(c > 1e-4 for c in changes) and corrected
            assert "drift" not in prop
    off = mha2mla.convert(source=src, output=str(tmp_path / "off"), rank=16, method=Method(mlp_drift=0, drift_correction=0), **kw)
    assert "drift" not in off.record["calibration"]["propagation"]  # (none was asked for: nothing to explain)
    with pytest.raises(ValueError, match=r"drift_below_share must be ≥ 0 \(inf: always\), got -1"):
        Method(drift_below_share=-1)


def test_output_fit_stride_is_chosen_from_the_joint_fits_size(tiny_source, tmp_path, monkeypatch):
    import mha2mla.ops.value_fit as value_fit
    from safetensors.torch import load_file

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=2)  # 4 heads
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=8, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    res = mha2mla.convert(source=src, output=str(tmp_path / "full"), **kw)
    assert res.record["calibration"]["output_fit_stride"] == 1  # 32 features
    monkeypatch.setattr(value_fit, "OUTPUT_FIT_FULL_FEATURES", 16)  # 32 features are now twice the full size: every 4th
    auto = mha2mla.convert(source=src, output=str(tmp_path / "auto"), **kw)
    assert auto.record["calibration"]["output_fit_stride"] == 4
    pinned = mha2mla.convert(source=src, output=str(tmp_path / "pinned"), method=Method(output_fit_stride=4), **kw)
    weights = {n: {k: v for f in sorted((tmp_path / n).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
               for n in ("full", "auto", "pinned")}
    assert weights["auto"].keys() == weights["pinned"].keys()
    assert all(torch.equal(weights["auto"][k], weights["pinned"][k]) for k in weights["auto"])
    assert not torch.equal(weights["auto"]["model.layers.0.self_attn.o_proj.weight"],
                           weights["full"]["model.layers.0.self_attn.o_proj.weight"])
    assert pinned.record["calibration"]["output_fit_stride"] == 4
