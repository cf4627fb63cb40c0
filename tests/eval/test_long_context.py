"""Long-context evaluation (:mod:`mha2mla.eval.long_context`): perplexity by position bucket and passkey retrieval, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mha2mla.conversion.pipeline import convert
from mha2mla.errors import Mha2mlaError
from mha2mla.eval.long_context import (PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_KEY, PASSKEY_QUESTION, bucket_edges,
                                       greedy_tokens, parse_passkey, passkey_prompt, passkey_retrieval,
                                       position_perplexity, render_long_context, token_nll)
from mha2mla.eval.perplexity import perplexity


@pytest.fixture
def tiny(tiny_source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_source(max_position_embeddings=512, vocab=97)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_bucket_edges_cut_to_the_window():
    assert bucket_edges(window=3000) == [(0, 512), (512, 1024), (1024, 2048), (2048, 3000)]
    assert bucket_edges(window=8192)[-1] == (4096, 8192)
    assert bucket_edges(window=100, edges=(0, 10, 50)) == [(0, 10), (10, 50)]
    with pytest.raises(Mha2mlaError, match="increasing"):
        bucket_edges(window=100, edges=(1, 10))
    with pytest.raises(Mha2mlaError, match="at least 2"):
        bucket_edges(window=1)


def test_token_nll_matches_full_logits(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr("mha2mla.eval.long_context.LOGIT_CHUNK", 7)  # several chunks, the last one partial
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = token_nll(model=model, ids=ids)
        want = F.cross_entropy(model(input_ids=ids[None]).logits[0, :-1].float(), ids[1:], reduction="none")
    assert got.shape == (39,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_buckets_average_back_to_the_window_and_match_perplexity(tiny):
    model, tok = tiny
    tokens = torch.randint(3, 97, (3 * 64,), generator=torch.Generator().manual_seed(1))
    r = position_perplexity(model=model, tokens=tokens, window=64, windows=3, edges=(0, 8, 16, 32, 64))
    assert [(b["start"], b["end"]) for b in r.buckets] == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert [b["tokens"] for b in r.buckets] == [3 * 7, 3 * 8, 3 * 16, 3 * 32]
    assert sum(b["tokens"] for b in r.buckets) == r.tokens == 3 * 63
    weighted = sum(b["nll"] * b["tokens"] for b in r.buckets) / r.tokens
    assert weighted == pytest.approx(r.nll, rel=1e-9)
    # the same windows through the non-overlapping-window perplexity give the same whole-window NLL
    whole = perplexity(model=model, tokenizer=tok, tokens=tokens, ctx=64, max_tokens=None)
    assert r.nll == pytest.approx(whole.nll, rel=1e-5)
    # a bucket is the mean NLL of exactly its positions
    with torch.inference_mode():
        nll = torch.stack([token_nll(model=model, ids=w) for w in tokens.view(3, 64)])
    assert r.buckets[1]["nll"] == pytest.approx(float(nll[:, 7:15].mean()), rel=1e-5)  # positions 8..15
    assert r.buckets[1]["ppl"] == pytest.approx(math.exp(r.buckets[1]["nll"]))


def test_position_perplexity_rejects_bad_requests(tiny):
    model, tok = tiny
    tokens = torch.arange(3, 60)
    with pytest.raises(Mha2mlaError, match="max_position_embeddings 512"):
        position_perplexity(model=model, tokens=torch.arange(2000) % 90 + 3, window=1024, windows=1)
    with pytest.raises(Mha2mlaError, match="needs 2 windows of 40 tokens = 80 tokens; the text has 57"):
        position_perplexity(model=model, tokens=tokens, window=40, windows=2)
    with pytest.raises(Mha2mlaError, match="exactly one"):
        position_perplexity(model=model, window=40, windows=1)


def _char_tokenizer():
    """A character-level tokenizer (digits included), built offline."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r\t\n"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("length", [600, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.77, 1.0])
def test_passkey_prompt_puts_the_key_at_the_asked_depth(length, depth):
    tok = _char_tokenizer()
    ids, start = passkey_prompt(tokenizer=tok, length=length, depth=depth, key="48213")
    filler = len(PASSKEY_FILLER)  # one token per character
    assert length - filler < len(ids) <= length
    text = tok.decode(ids)
    assert text.startswith(PASSKEY_INTRO) and text.endswith(PASSKEY_QUESTION) and text.count("48213") == 2
    assert text[start:].startswith(PASSKEY_KEY.format(key="48213"))
    n_filler = (len(ids) - len(PASSKEY_INTRO) - len(PASSKEY_KEY.format(key="48213")) - len(PASSKEY_QUESTION)) // filler
    before = (start - len(PASSKEY_INTRO)) / filler
    assert before == int(before) and abs(before / n_filler - depth) <= 0.5 / n_filler + 1e-9


def test_passkey_prompt_with_the_test_tokenizer(tiny):
    _, tok = tiny
    # the word-level test tokenizer has no digits, so the key reads as <unk>: only lengths and places are checked
    ids, start = passkey_prompt(tokenizer=tok, length=200, depth=0.5, key="12345")
    assert len(ids) <= 200 and 0 < start < len(ids)
    with pytest.raises(Mha2mlaError, match="depth must be in"):
        passkey_prompt(tokenizer=tok, length=200, depth=1.5, key="12345")
    with pytest.raises(Mha2mlaError, match="too short"):
        passkey_prompt(tokenizer=tok, length=10, depth=0.5, key="12345")
    with pytest.raises(Mha2mlaError, match="digits"):
        passkey_prompt(tokenizer=tok, length=200, depth=0.5, key="12a45")


def test_parse_passkey():
    assert parse_passkey(" 48213. Remember") == "48213"
    assert parse_passkey(" 4821") == "4821"
    assert parse_passkey(" the key") is None


def test_passkey_retrieval_runs_and_is_reproducible(tiny):
    model, tok = tiny
    a = passkey_retrieval(model=model, tokenizer=tok, length=200, trials=3, seed=5, new_tokens=4)
    b = passkey_retrieval(model=model, tokenizer=tok, length=200, trials=3, seed=5, new_tokens=4)
    assert a.trials == 3 and 0 <= a.correct <= 3 and len(a.details) == 3
    assert [d["key"] for d in a.details] == [d["key"] for d in b.details]
    assert [d["answer"] for d in a.details] == [d["answer"] for d in b.details]
    assert all(len(d["key"]) == 5 and 0 <= d["depth"] <= 1 for d in a.details)
    with pytest.raises(Mha2mlaError, match="max_position_embeddings 512"):
        passkey_retrieval(model=model, tokenizer=tok, length=513, trials=1)
    assert all(d["tokens"] <= 200 - 4 for d in a.details)


def test_greedy_answer_equals_the_full_forward_argmax(tiny):
    """The cached greedy loop gives the same tokens as re-running the whole prompt each step."""
    model, _ = tiny
    ids = torch.randint(3, 97, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    got = greedy_tokens(model, ids, 5, "cpu")
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(5):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


def test_render_long_context_shows_ratios():
    pos = lambda ppl: {"window": 64, "windows": 1, "ppl": ppl, "nll": 0.0, "tokens": 63,  # noqa: E731
                       "buckets": [{"start": 0, "end": 32, "ppl": ppl, "nll": 0.0, "tokens": 31},
                                   {"start": 32, "end": 64, "ppl": 2 * ppl, "nll": 0.0, "tokens": 32}]}
    key = lambda c: [{"length": 1024, "trials": 10, "correct": c, "tokens": 1000.0, "details": []}]  # noqa: E731
    md = render_long_context({"source": {"positions": [pos(10.0)], "passkey": key(10)},
                              "96+32": {"positions": [pos(15.0)], "passkey": key(3)}})
    assert "| source | 10.00 | 20.00 | 10.00 |" in md
    assert "| ↳ ratio to source | 1.50 | 1.50 | 1.50 |" in md
    assert "| 96+32 | 3/10 |" in md


def test_converted_model_sdpa_matches_eager(tiny_source, tmp_path):
    """The long-context tools load converted DeepseekV3 checkpoints with sdpa attention: same NLL as eager."""
    from transformers import AutoModelForCausalLM

    src = tiny_source(max_position_embeddings=512, n_heads=4, n_kv=2)
    out = convert(source=src, output=tmp_path / "mla", rank=16, rope_dim=8, progress=False).output
    ids = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(3))
    nll = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(out, attn_implementation=impl).eval()
        with torch.inference_mode():
            nll[impl] = token_nll(model=model, ids=ids)
    torch.testing.assert_close(nll["sdpa"], nll["eager"], rtol=1e-4, atol=1e-4)
