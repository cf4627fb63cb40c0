"""The conversion plan (:func:`mha2mla.conversion.plan.make_plan`): the user's choices validated against the source,
with messages that show the values and the valid range, and every target constant fixed."""

from __future__ import annotations

import math
import os

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.plan import make_plan
from mha2mla.errors import Mha2mlaError
from tests.conftest import assert_user_error, run_cli


@pytest.mark.parametrize("n_kv,top", [(1, 32), (2, 64), (4, 64)])  # min(2·n_kv·head_dim, hidden 64)
def test_rank_is_refused_outside_one_to_the_stacked_keys_and_values_rank(tiny_source, n_kv, top):
    src = load_source(tiny_source(n_kv=n_kv))
    assert make_plan(source=src, rank=top).max_rank == top
    for rank in (0, top + 1, -3):
        with pytest.raises(Mha2mlaError) as e:
            make_plan(source=src, rank=rank)
        assert str(e.value) == (f"--rank must be in 1..{top} (the rank of the stacked keys and values: 2·{n_kv} KV "
                                f"heads·16, hidden 64), got {rank}")
    with pytest.raises(Mha2mlaError, match=f"--rank must be in 1..{top} .*got 8.0"):
        make_plan(source=src, rank=8.0)  # a rank is a whole number


def test_rope_dim_and_stride_are_refused_with_their_ranges(tiny_source):
    src = load_source(tiny_source(n_kv=2))  # head_dim 16
    for rope_dim in (3, 6, 32, 0):
        with pytest.raises(Mha2mlaError, match=f"--rope-dim must be a positive even number that divides head_dim 16 "
                                               f"\\(e.g. 8 or 16\\), got {rope_dim}"):
            make_plan(source=src, rank=8, rope_dim=rope_dim)
    for stride in (0, 3):
        with pytest.raises(Mha2mlaError, match=f"--rope-stride must be in 1..2 for head_dim 16 and --rope-dim 8, got {stride}"):
            make_plan(source=src, rank=8, rope_dim=8, rope_stride=stride)
    assert make_plan(source=src, rank=8, rope_dim=4, rope_stride=4).rope_stride == 4


def test_a_kept_scaling_takes_any_stride(tiny_source):
    src = load_source(tiny_source(n_kv=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    plan = make_plan(source=src, rank=8, rope_dim=8, rope_stride=1)  # linear scales each frequency alone: exact
    assert (plan.rope_stride, plan.rope_type, plan.rope_theta) == (1, "linear", pytest.approx(1e4 ** 0.5))
    plan = make_plan(source=src, rank=8, rope_dim=8)  # the default stride keeps θ
    assert (plan.rope_stride, plan.rope_theta) == (2, 1e4)


@pytest.mark.parametrize("stored,asked,want", [
    (torch.float32, "auto", "float32"), (torch.bfloat16, "auto", "bfloat16"), (torch.float16, "auto", "bfloat16"),
    (torch.float32, "bfloat16", "bfloat16"), (torch.bfloat16, "float32", "float32"),
])
def test_dtype_auto_follows_the_source_and_float16_becomes_bfloat16(tiny_source, stored, asked, want):
    plan = make_plan(source=load_source(tiny_source(n_kv=2, dtype=stored)), rank=8, dtype=asked)
    assert plan.dtype == want and plan.torch_dtype is getattr(torch, want)


def test_float16_and_unknown_dtypes_are_refused(tiny_source):
    src = load_source(tiny_source(n_kv=2))
    with pytest.raises(Mha2mlaError, match="--dtype float16 is not supported: the linearised latent norm keeps latents"):
        make_plan(source=src, rank=8, dtype="float16")
    with pytest.raises(Mha2mlaError, match="--dtype must be auto, float32 or bfloat16, got 'int8'"):
        make_plan(source=src, rank=8, dtype="int8")


def test_plan_fixes_the_targets_constants(tiny_source):
    src = load_source(tiny_source(n_kv=2, n_heads=4, head_dim=16, layers=3, eps=1e-5, rope_theta=5e4))
    plan = make_plan(source=src, rank=12)
    assert (plan.rank, plan.rope_dim, plan.rope_stride) == (12, 8, 2)  # rope_dim head_dim/2, stride head_dim/rope_dim
    assert (plan.n_layers, plan.hidden, plan.n_heads, plan.n_kv, plan.head_dim) == (3, 64, 4, 2, 16)
    assert plan.rope_theta == 5e4  # the default stride keeps θ
    assert make_plan(source=src, rank=12, rope_stride=1).rope_theta == pytest.approx(5e4 ** 0.5, rel=1e-12)
    assert plan.residual_scale == pytest.approx(math.sqrt(1e-6 / 1e-5), rel=1e-12)  # eps 1e-5 → the target's 1e-6
    assert not plan.tie_embeddings  # a rescaled residual stream cannot share the embedding with the head
    assert plan.q_lora_rank is None and not plan.attention_bias
    exact = make_plan(source=load_source(tiny_source("tied", n_kv=2, eps=1e-6)), rank=12)
    assert exact.residual_scale == 1.0 and exact.tie_embeddings
    qwen = make_plan(source=load_source(tiny_source("qwen", arch="qwen2", n_kv=2, tied=False)), rank=12)
    assert qwen.q_lora_rank == 64 and qwen.attention_bias  # the query bias rides on q_a_proj
    assert not qwen.tie_embeddings


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "--rank must be in 1..64"),
    (dict(rank=65), "--rank must be in 1..64"),
    (dict(rank=8, rope_dim=3), "--rope-dim must be a positive even"),
    (dict(rank=8, rope_dim=6), "--rope-dim must be a positive even"),
    (dict(rank=8, rope_dim=32), "--rope-dim must be a positive even"),
    (dict(rank=8, dtype="float16"), "float16"),
])
def test_bad_options_are_refused_before_writing(tiny_source, tmp_path, kwargs, match):
    src = tiny_source(n_kv=2)
    out = tmp_path / "mla"
    with pytest.raises(Mha2mlaError, match=match):
        mha2mla.convert(source=src, output=str(out), progress=False, **kwargs)
    assert not out.exists()
    assert [n for n in os.listdir(tmp_path) if "tmp" in n] == []


@pytest.mark.parametrize("args,phrase", [
    (["--rank", 0], "--rank must be in 1..64"),
    (["--rank", 65], "--rank must be in 1..64"),
    (["--rank", 8, "--rope-dim", 3], "--rope-dim must be a positive even number that divides head_dim 16"),
    (["--rank", 8, "--rope-dim", 6], "--rope-dim must be a positive even number that divides head_dim 16"),
    (["--rank", 8, "--rope-dim", 32], "--rope-dim must be a positive even number that divides head_dim 16"),
])
def test_bad_rank_and_rope_dim(sources, tmp_path, args, phrase):
    out = tmp_path / "out"
    r = run_cli("convert", sources["src"], "--output", out, "-q", *args)
    line = assert_user_error(r, phrase, out)
    assert line.endswith(f"got {args[-1]}")
