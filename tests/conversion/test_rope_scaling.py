"""A source whose rope type scales frequencies (``llama3``): by default the target's rope is ``default`` and rotates only
frequencies the scaling leaves unchanged (what vLLM and SGLang serve as written); ``--rope-scaling keep`` carries the
scaling over (exact in transformers)."""

from __future__ import annotations

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.plan import make_plan
from mha2mla.errors import Mha2mlaError
from mha2mla.ops.rope import unscaled_frequencies
from tests.conftest import load_json, logits, token_ids

# head_dim 16, θ 1e4: wavelengths below 256/2 = 128 tokens (j = 0, 1, 2) are left alone, j = 3 is blended, j ≥ 4 divided
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
          "original_max_position_embeddings": 256}


@pytest.mark.parametrize("rope,head_dim", [
    (LLAMA3, 16),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 128),  # Llama-3.1-8B
])
def test_unscaled_frequencies_are_those_transformers_leaves_unchanged(rope, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope,
                      max_position_embeddings=4 * rope["original_max_position_embeddings"])
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = rope["rope_theta"] ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    same = (scaled.double() - plain).abs() <= 1e-6 * plain
    mask = unscaled_frequencies(rope=rope, head_dim=head_dim)
    assert torch.equal(mask, same) and 0 < int(mask.sum()) < head_dim // 2
    assert unscaled_frequencies(rope={"rope_type": "default"}, head_dim=8).all()
    assert not unscaled_frequencies(rope={"rope_type": "linear", "factor": 2.0}, head_dim=8).any()


def _source(tiny_source, name="src", rope=LLAMA3, **kw):
    return tiny_source(name, n_heads=4, n_kv=1, head_dim=16, rope_parameters=rope, max_position_embeddings=1024, **kw)


def test_the_plan_keeps_unscaled_planes_and_zeroes_the_rest(tiny_source):
    src = load_source(_source(tiny_source))
    plan = make_plan(source=src, rank=16, rope_dim=8)  # strides 1 (j 0..3: 3 unscaled) and 2 (j 0,2,4,6: 2)
    assert (plan.rope_type, plan.rope_stride, plan.rope_zero) == ("default", 1, (3,))
    assert plan.rope_theta == pytest.approx(1e4 ** 0.5)
    plan = make_plan(source=src, rank=16, rope_dim=8, rope_stride=2, rope_scaling="portable")
    assert (plan.rope_type, plan.rope_zero) == ("default", (2, 3))
    kept = make_plan(source=src, rank=16, rope_dim=8, rope_scaling="keep")
    assert (kept.rope_type, kept.rope_stride, kept.rope_zero, kept.rope_theta) == ("llama3", 2, (), 1e4)


def test_a_rope_scaling_that_changes_every_frequency_is_kept_or_refused(tiny_source):
    src = load_source(_source(tiny_source, rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    assert make_plan(source=src, rank=16, rope_dim=8).rope_type == "linear"  # auto: nothing portable to keep
    with pytest.raises(Mha2mlaError) as e:
        make_plan(source=src, rank=16, rope_dim=8, rope_scaling="portable")
    assert str(e.value) == ("--rope-scaling portable: the source's 'linear' rope scaling changes every frequency kept at "
                            "stride 2, so a default rope reproduces none of them; use --rope-scaling keep")
    with pytest.raises(Mha2mlaError, match="--rope-scaling must be one of auto, portable, keep, got 'yarn'"):
        make_plan(source=src, rank=16, rope_dim=8, rope_scaling="yarn")


def _attend_through(path: str, planes: range) -> str:
    """Zero every query and key row of the other frequency planes, so the source attends through ``planes`` only
    (e.g. the unscaled j = 0..2): then a target that rotates those right can be exact."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = torch.tensor([j + half for j in range(8) if j not in planes for half in (0, 8)])
    with torch.no_grad():
        for layer in model.model.layers:
            for proj, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, 1)):
                proj.weight.view(heads, 16, -1)[:, rows] = 0
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("unscaled_only", [True, False])
def test_portable_target_rotates_the_unscaled_frequencies_exactly(tiny_source, tmp_path, unscaled_only):
    src = _source(tiny_source, f"src{unscaled_only}")
    if unscaled_only:
        _attend_through(src, range(3))
    out = tmp_path / f"mla{unscaled_only}"
    res = mha2mla.convert(source=src, output=str(out), rank=16, rope_dim=16, dtype="float32", progress=False)
    cfg = load_json(out / "config.json")
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e4} and cfg["rope_scaling"] is None
    assert res.plan.rope_zero == (3, 4, 5, 6, 7)
    assert not [b for b in res.record["portability"]["blockers"] if "rope_type" in b]
    assert "rotates only frequencies the scaling leaves unchanged" in (out / "README.md").read_text()
    ids = token_ids(length=40)
    diff = (logits(src, ids) - logits(str(out), ids)).abs().max().item()
    if unscaled_only:  # exact: the planes it zeroes carried nothing
        assert diff <= 1e-4, f"max |Δlogit| {diff}"
    else:  # the scaled planes lost their rotation
        assert diff > 1e-2


def test_kept_scaling_is_exact_and_named_a_blocker(tiny_source, tmp_path):
    src = _source(tiny_source)
    out = tmp_path / "kept"
    res = mha2mla.convert(source=src, output=str(out), rank=16, rope_dim=16, rope_scaling="keep", dtype="float32",
                          progress=False)
    cfg = load_json(out / "config.json")
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert any("rope_type is 'llama3'" in b for b in res.record["portability"]["blockers"])
    assert res.record["options"]["rope_scaling"] == "keep"
    vllm = next(v for v in res.record["portability"]["serving"] if v["engine"] == "vLLM (CPU)")
    assert not vllm["compressed"] and vllm["fix"].startswith("convert again without --rope-scaling keep")
    ids = token_ids(length=40)
    diff = (logits(src, ids) - logits(str(out), ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| {diff}"


def test_kept_scaling_at_another_stride_is_exact(tiny_source, tmp_path):
    """Stride 1 at D = 8 keeps j = 0..3 (θ' = θ^½) and the llama3 scaling (kept) changes j = 3 as the source's does:
    exact on a source that attends through those planes only."""
    src = _attend_through(_source(tiny_source), range(4))
    out = tmp_path / "kept1"
    res = mha2mla.convert(source=src, output=str(out), rank=16, rope_dim=8, rope_stride=1, rope_scaling="keep",
                          dtype="float32", progress=False)
    assert (res.plan.rope_stride, res.plan.rope_type) == (1, "llama3")
    ids = token_ids(length=40)
    diff = (logits(src, ids) - logits(str(out), ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| {diff}"


def test_calibrated_stride_choice_counts_only_unscaled_frequencies(tiny_source, tmp_path, corpus):
    src = _source(tiny_source, layers=1)
    out = tmp_path / "calibrated"
    res = mha2mla.convert(source=src, output=str(out), rank=12, rope_dim=8, calibration=corpus, calibration_samples=4,
                          calibration_length=32, dtype="float32", progress=False)
    shares = res.record["calibration"]["rope_stride_shares"]
    # only the unscaled j = 0, 1, 2 score: stride 1 (j = 0..3) holds all of it, stride 2 (j = 0, 2, 4, 6) a part
    assert shares[1] == pytest.approx(1.0) and shares[2] < 1.0
    assert (res.plan.rope_type, res.plan.rope_stride, res.plan.rope_zero) == ("default", 1, (3,))
    assert load_json(out / "config.json")["rope_parameters"]["rope_type"] == "default"
