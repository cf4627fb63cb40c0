"""The conversion's global choices (:mod:`mha2mla.conversion.schedule`): the RoPE schedule and the ``--kv-budget``
split, decided on a calibration pre-pass."""

from __future__ import annotations

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.options import Method
from mha2mla.conversion.pipeline import convert
from mha2mla.conversion.schedule import budget_candidates, choose_rope_stride, first_plan
from mha2mla.errors import Mha2mlaError
from tests.conftest import CORPUS


def test_the_stride_that_keeps_the_most_score_wins_and_every_share_is_reported():
    scores = torch.tensor([1.0, 0, 0, 4, 0, 0, 0, 2], dtype=torch.float64)  # head_dim 16: 8 frequencies
    stride, shares = choose_rope_stride(scores=scores, head_dim=16, rope_dim=4)  # 2 kept: frequencies 0 and stride
    assert shares == pytest.approx({1: 1 / 7, 2: 1 / 7, 3: 5 / 7, 4: 1 / 7}, rel=1e-12)
    assert stride == 3
    stride, shares = choose_rope_stride(scores=torch.arange(8, 0, -1, dtype=torch.float64), head_dim=16, rope_dim=8)
    assert stride == 1 and shares == pytest.approx({1: 26 / 36, 2: 20 / 36})  # the fast frequencies: stride 1


def test_budget_candidates_are_the_even_divisors_that_leave_a_valid_rank(tiny_source):
    src = load_source(tiny_source(n_kv=2))  # head_dim 16, ranks 1..64
    assert budget_candidates(source=src, budget=24) == [2, 4, 8, 16]
    assert budget_candidates(source=src, budget=10) == [2, 4, 8]  # 16 would leave no latent
    assert budget_candidates(source=src, budget=72) == [8, 16]  # rank ≤ 64
    with pytest.raises(Mha2mlaError, match=r"--kv-budget 2 leaves no valid split for head_dim 16 \(rank must be in "
                                           r"1..64\); try a budget between 3 and 80"):
        budget_candidates(source=src, budget=2)


def test_first_plan_takes_the_middle_budget_split_or_the_plan_as_asked(tiny_source):
    src = load_source(tiny_source(n_kv=2))
    budget = first_plan(source=src, rank=None, rope_dim=None, kv_budget=24, rope_stride=None, dtype="auto")
    assert (budget.rank, budget.rope_dim) == (16, 8)  # candidates 2, 4, 8, 16: the middle one
    asked = first_plan(source=src, rank=12, rope_dim=4, kv_budget=None, rope_stride=3, dtype="auto")
    assert (asked.rank, asked.rope_dim, asked.rope_stride) == (12, 4, 3)


def test_no_schedule_is_chosen_when_the_stride_is_given_or_the_conversion_is_data_free(tiny_source, corpus, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, layers=1)
    free = convert(source=src, output=tmp_path / "free", rank=12, rope_dim=4, progress=False)
    assert free.plan.rope_stride == 4 and "calibration" not in free.record
    quick = Method(query_fit=0, output_fit=False, sequential=False, balance_search=False, alternating=0)
    given = convert(source=src, output=tmp_path / "given", rank=12, rope_dim=4, rope_stride=3, calibration=corpus,
                    calibration_samples=2, calibration_length=16, progress=False, method=quick)
    assert given.plan.rope_stride == 3 and "rope_stride_shares" not in given.record["calibration"]


def test_kv_budget_chooses_a_split_by_measurement(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=2, head_dim=16, seed=4)
    res = mha2mla.convert(source=src, output=str(tmp_path / "b"), kv_budget=24, progress=False, report=True,
                          calibration=corpus, calibration_samples=4, calibration_length=32)
    info = res.record["calibration"]["kv_budget"]
    assert res.plan.rank + res.plan.rope_dim == 24
    errors = info["mean_attention_output_rel_error"]
    assert info["chosen"] == min(errors, key=errors.get) and len(errors) >= 2
    assert (tmp_path / "b" / "mha2mla-report.png").stat().st_size > 1000
    with pytest.raises(mha2mla.Mha2mlaError, match="--kv-budget chooses the rank/rope split"):
        mha2mla.convert(source=src, output=str(tmp_path / "c"), kv_budget=24)
    with pytest.raises(mha2mla.Mha2mlaError, match="either --rank"):
        mha2mla.convert(source=src, output=str(tmp_path / "c"), rank=8, kv_budget=24, calibration=corpus)


def test_rope_schedule_is_chosen_over_a_long_calibration_sequence(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, max_position_embeddings=256)
    text = tmp_path / "c.txt"
    text.write_text(CORPUS * 40)
    kw = dict(source=src, rank=12, rope_dim=4, calibration=str(text), calibration_samples=4, calibration_length=32,
              progress=False)
    rec = convert(output=tmp_path / "a", method=Method(rope_context=4096), **kw).record["calibration"]
    assert rec["rope_context"] == 256  # capped at max_position_embeddings
    assert len(rec["rope_stride_shares"]) == 4  # strides 1..head_dim/rope_dim
    rec = convert(output=tmp_path / "b", **kw).record["calibration"]  # the default: the calibration sequences decide
    assert "rope_context" not in rec and rec["rope_stride_shares"]
    text.write_text(CORPUS * 2)  # too little text for one sequence of 256 tokens: the calibration sequences decide
    rec = convert(output=tmp_path / "c", method=Method(rope_context=4096), **kw).record["calibration"]
    assert rec["rope_context"].startswith("not used") and rec["rope_stride_shares"]
