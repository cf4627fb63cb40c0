"""Perplexity in non-overlapping windows (:mod:`mha2mla.eval.perplexity`)."""

from __future__ import annotations

import math

import pytest
import torch

from mha2mla.data import pack_tokens
from mha2mla.errors import Mha2mlaError
from mha2mla.eval.perplexity import perplexity
from tests.conftest import direct_perplexity


def test_perplexity_matches_direct_loss(eval_assets):
    model, tok = eval_assets["models"]["source"], eval_assets["tokenizer"]
    text = open(eval_assets["text"]).read()
    r = perplexity(model=model, tokenizer=tok, text=text, ctx=16, max_tokens=70, batch_size=2)
    nll, n, n_bytes = direct_perplexity(model, tok, text, 16, 70)
    assert (r.tokens, r.windows, r.ctx, r.bytes) == (n, 5, 16, n_bytes)  # 4 full windows + one of 6 tokens
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(nll * n / math.log(2) / n_bytes, rel=1e-5)
    again = perplexity(model=model, tokenizer=tok, tokens=pack_tokens(tok, [text]), ctx=16, max_tokens=70)
    assert again.nll == pytest.approx(r.nll, rel=1e-5) and again.tokens == r.tokens


def test_perplexity_rejects_bad_arguments(eval_assets):
    model, tok = eval_assets["models"]["source"], eval_assets["tokenizer"]
    with pytest.raises(Mha2mlaError, match="max_position_embeddings 128"):
        perplexity(model=model, tokenizer=tok, text="hello", ctx=4096)
    with pytest.raises(Mha2mlaError, match="at least 2 tokens"):
        perplexity(model=model, tokenizer=tok, tokens=torch.tensor([1]), ctx=16)
