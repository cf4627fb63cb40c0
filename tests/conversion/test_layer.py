"""One layer end to end (:mod:`mha2mla.conversion.layer`): reading it, the query fit, the output fit, and moving
the calibration stream past it (the MLP refit against the drift)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.latent import convert_attention
from mha2mla.conversion.layer import LayerResult, compute_dtype, convert_layer, read_layer
from mha2mla.conversion.options import Method
from mha2mla.conversion.plan import make_plan
from mha2mla.errors import Mha2mlaError
from tests.conftest import CORPUS, held_out_error, load_json


@pytest.mark.parametrize("bias", [False, True])
def test_read_layer_gives_the_attention_in_the_compute_dtype_and_the_rest_as_stored(tiny_source, bias):
    src = load_source(tiny_source(arch="qwen2" if bias else "llama", n_kv=2, dtype=torch.bfloat16))
    attn, rest = read_layer(src, 1, torch.float64)
    p = "model.layers.1."
    assert torch.equal(attn.k, src.get(p + "self_attn.k_proj.weight").double())
    assert attn.q.dtype == torch.float64 and attn.q.shape == (4 * 16, 64) and attn.o.shape == (64, 4 * 16)
    assert (attn.q_bias is not None, attn.k_bias is not None, attn.v_bias is not None) == (bias, bias, bias)
    assert attn.o_bias is None
    assert set(rest) == {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                         "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert all(t.dtype == torch.bfloat16 for t in rest.values())  # as stored: written in the output dtype later
    assert torch.equal(rest["mlp.down_proj.weight"], src.get(p + "mlp.down_proj.weight"))
    assert compute_dtype(2048) == torch.float64 and compute_dtype(2049) == torch.float32


def test_read_layer_refuses_weights_that_disagree_with_the_config(tiny_source):
    path = tiny_source(n_kv=2)  # head_dim 16: q_proj [64, 64]
    cfg = load_json(f"{path}/config.json")
    with open(f"{path}/config.json", "w") as f:
        json.dump({**cfg, "head_dim": 8}, f)
    src = load_source(path)  # every tensor is present: only their shapes tell
    with pytest.raises(Mha2mlaError, match=r"layer 0 q_proj has shape \(64, 64\), but config.json implies \(32, 64\); "
                                           "config and weights disagree"):
        read_layer(src, 0, torch.float64)


def test_data_free_layer_is_the_latent_alone(tiny_source):
    """Without calibration statistics convert_layer is convert_attention with the input norm's bound: no query fit,
    no output fit, no kept outputs."""
    src = load_source(tiny_source(n_kv=2))
    plan = make_plan(source=src, rank=12, rope_dim=8, dtype="float32")
    attn, rest = read_layer(src, 0, torch.float64)
    layer = convert_layer(plan=plan, weights=attn, input_norm=rest["input_layernorm.weight"], index=0)
    bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].double().abs().max())
    tensors, stats = convert_attention(plan=plan, weights=attn, input_norm_bound=bound)
    assert isinstance(layer, LayerResult) and layer.outputs is None and layer.source_outputs is None
    assert layer.tensors.keys() == tensors.keys() and all(torch.equal(layer.tensors[k], tensors[k]) for k in tensors)
    assert layer.stats.to_dict() == stats.to_dict()
    assert layer.stats.query_kl_before is None and layer.stats.output_fit_rel_error is None


def test_sequential_conversion_records_fit_and_beats_no_fit(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=10, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    fitted = mha2mla.convert(source=src, output=str(tmp_path / "fit"), **kw)
    assert all(0 <= layer["output_fit_rel_error"] < 1 for layer in fitted.record["layers"])
    assert "mean relative error after the fit" in (tmp_path / "fit" / "README.md").read_text()
    plain = mha2mla.convert(source=src, output=str(tmp_path / "plain"), method=Method(output_fit=False, sequential=False), **kw)
    assert all(layer["output_fit_rel_error"] is None for layer in plain.record["layers"])
    assert held_out_error(src, str(tmp_path / "fit")) < held_out_error(src, str(tmp_path / "plain"))


@pytest.mark.parametrize("joint_max", [4096, 0])  # the joint fit, and the per-head fit wide models get
def test_output_fit_keeps_a_biased_full_rank_conversion_exact(tiny_source, tmp_path, monkeypatch, joint_max):
    import mha2mla.conversion.options as options

    monkeypatch.setattr(options, "JOINT_MAX_FEATURES", joint_max)
    src = tiny_source(arch="qwen2", n_kv=1, head_dim=16, seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 20)
    res = mha2mla.convert(source=src, output=str(tmp_path / "q"), rank=16, rope_dim=16, progress=False, dtype="float32",
                          calibration=str(corpus), calibration_samples=4, calibration_length=32, biases="keep",
                          method=Method(mlp_dtype="float32"))  # (exactness: no bfloat16 stream rounding)
    assert res.record["calibration"]["propagation"]["mlp_dtype"] == "float32"
    assert all(layer["output_fit_rel_error"] < 1e-3 for layer in res.record["layers"])
    # float32 calibration: the fits' rounding alone leaves 0.8-1.1e-4 here; one rank short (15) gives 2.3e-4, 12 7.2e-4
    assert held_out_error(src, str(tmp_path / "q")) < 1.5e-4


def test_kept_layer_outputs_move_the_stream_like_rerunning_the_layer(tiny_source, tmp_path, monkeypatch):
    import mha2mla.conversion.layer as layer

    src = tiny_source(n_kv=2, head_dim=16, seed=8, layers=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 20)
    # float32 streams: the two paths round differently (fused vs blockwise attention), bfloat16 would magnify that
    kw = dict(rank=10, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=4, calibration_length=32,
              method=Method(mlp_dtype="float32"))
    kept = mha2mla.convert(source=src, output=str(tmp_path / "kept"), **kw)
    monkeypatch.setattr(layer, "CONTEXT_CACHE_MAX_FLOATS", 0)  # run the converted layer again instead
    rerun = mha2mla.convert(source=src, output=str(tmp_path / "rerun"), **kw)
    for a, b in zip(kept.record["layers"], rerun.record["layers"]):
        assert a["output_fit_rel_error"] == pytest.approx(b["output_fit_rel_error"], rel=1e-3, abs=1e-6)


def test_conversion_records_the_query_fit(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    res = mha2mla.convert(source=src, output=str(tmp_path / "out"), rank=24, rope_dim=4, calibration=str(corpus),
                          calibration_samples=8, calibration_length=32, progress=False)
    layers = json.loads((tmp_path / "out" / "mha2mla.json").read_text())["layers"]
    assert len(layers) == len(res.layers) == 2
    for layer in layers:
        assert layer["attention_kl_after_query_fit"] < layer["attention_kl_before_query_fit"]
    off = mha2mla.convert(source=src, output=str(tmp_path / "off"), rank=24, rope_dim=4, calibration=str(corpus),
                          calibration_samples=8, calibration_length=32, progress=False, method=Method(query_fit=0))
    assert all(layer.query_kl_before is None for layer in off.layers)


def _attention_kl_past(path_src: str, path_mla: str, ids: torch.Tensor, start: int) -> float:
    """Mean KL(source ‖ converted) of layer 0's attention over the heads and the query rows from ``start`` on."""
    from transformers import AutoModelForCausalLM

    probs = []
    for path in (path_src, path_mla):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            probs.append(model(ids[None], output_attentions=True).attentions[0][0, :, start:])
    p, q = probs
    return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean())


def test_long_query_fit_matches_attention_past_the_calibration_length(tiny_source, tmp_path):
    """One long sequence (192 tokens against calibration sequences of 32) joins the query fit: the record says so,
    and on held-out text the converted attention past position 32 is closer to the source's than without it."""
    src = tiny_source(n_kv=2, head_dim=16, seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(source=src, rank=24, rope_dim=4, calibration=str(corpus), calibration_samples=8, calibration_length=32,
              progress=False)
    long = mha2mla.convert(output=str(tmp_path / "long"), method=Method(query_fit_context=192, query_fit_rows=48), **kw)
    short = mha2mla.convert(output=str(tmp_path / "short"), method=Method(query_fit_context=0), **kw)
    assert long.record["calibration"]["query_fit_context"] == 192
    assert long.record["calibration"]["query_fit_rows"] == 48
    assert "query_fit_context" not in short.record["calibration"]
    from mha2mla.data import pack_tokens
    from transformers import AutoTokenizer

    ids = pack_tokens(AutoTokenizer.from_pretrained(src), [CORPUS[len(CORPUS) // 3:] + CORPUS * 3], max_tokens=192)
    assert len(ids) == 192
    kl_long = _attention_kl_past(src, str(tmp_path / "long"), torch.as_tensor(ids), 32)
    kl_short = _attention_kl_past(src, str(tmp_path / "short"), torch.as_tensor(ids), 32)
    assert kl_long < 0.9 * kl_short


def test_long_query_fit_is_skipped_when_the_text_is_too_short(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 2)
    res = mha2mla.convert(source=src, output=str(tmp_path / "out"), rank=24, rope_dim=4, calibration=str(corpus),
                          calibration_samples=2, calibration_length=32, progress=False,
                          method=Method(query_fit_context=10_000))  # (capped at the source's 256 positions)
    assert res.record["calibration"]["query_fit_context"] == "not used: the calibration text has fewer than 256 tokens"


def test_drift_correction_lowers_the_error_that_reaches_the_logits(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=4)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    errors = {}
    for drift in (0.0, 0.5):
        out = str(tmp_path / f"d{drift}")
        res = mha2mla.convert(source=src, output=out, method=Method(drift_correction=drift, mlp_drift=0.0), **kw)
        assert res.record["calibration"]["method"]["drift_correction"] == drift
        assert res.record["calibration"]["propagation"]["tracks_source"] == (drift > 0)
        assert ("drift that the layers below" in (tmp_path / f"d{drift}" / "README.md").read_text()) == (drift > 0)
        errors[drift] = held_out_error(src, out)
    assert errors[0.5] < errors[0.0], errors


def test_mlp_refit_lowers_the_error_that_reaches_the_logits_and_is_recorded(tiny_source, tmp_path):
    from safetensors.torch import load_file

    def down_proj(folder):
        name = "model.layers.3.mlp.down_proj.weight"
        return next(t[name] for f in sorted(folder.glob("*.safetensors")) if name in (t := load_file(str(f))))

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=4)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    errors, downs = {}, {}
    for beta in (0.0, 0.4):
        out = tmp_path / f"m{beta}"
        res = mha2mla.convert(source=src, output=str(out), method=Method(mlp_drift=beta), **kw)
        changes = [x["mlp_down_rel_change"] for x in res.record["layers"]]
        if beta:
            assert all(c is not None and c > 1e-4 for c in changes), changes  # every layer, the last one too
        else:
            assert changes == [None] * 4
        assert ("MLP down-projections refit" in (out / "README.md").read_text()) == (beta > 0)
        downs[beta] = down_proj(out)
        errors[beta] = held_out_error(src, str(out))
    source_down = down_proj(tmp_path / "src") * res.plan.residual_scale  # the writer scales the residual branch
    assert torch.allclose(downs[0.0], source_down, rtol=1e-6) and not torch.allclose(downs[0.4], source_down, rtol=1e-3)
    assert errors[0.4] < errors[0.0], errors
