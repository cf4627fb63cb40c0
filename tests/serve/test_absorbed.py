"""Weight-absorbed decoding (:mod:`mha2mla.serve.absorbed`) against the stock DeepseekV3 attention, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache

from mha2mla.serve.absorbed import absorb, absorbed, absorbed_is_cheaper, is_absorbed, unabsorb

VOCAB = 128


def tiny_model(*, attention_bias: bool = False, q_lora_rank: int | None = None, attn: str = "sdpa", seed: int = 0):
    """A converted-shape DeepseekV3 (MHA, all dense, nope = v = 16, rope 8, rank 24) with weights large enough that
    attention is far from uniform and logits are O(1)."""
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4, rope_interleave=True, rms_norm_eps=1e-6,
        max_position_embeddings=512, attention_bias=attention_bias, initializer_range=0.15, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.set_attn_implementation(attn)
    return model


CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(attention_bias=True), id="bias"),
    pytest.param(dict(q_lora_rank=32), id="q_lora"),
    pytest.param(dict(attention_bias=True, q_lora_rank=64), id="bias+q_lora"),
]


def _kv_b_calls(model) -> list[int]:
    """Count kv_b_proj module calls: the stock path calls it, the absorbed path only reads its weight."""
    calls = [0]
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _step_logits(model, ids, attention_mask, steps):
    """Prefill ``ids`` then ``steps`` greedy decode steps with a DynamicCache; the logits of every step."""
    cache = DynamicCache(config=model.config)
    out = model(ids, attention_mask=attention_mask, cache=cache, use_cache=True)
    logits = [out.logits]
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
        out = model(nxt, attention_mask=attention_mask, cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("mode", ["always", "auto"])
@torch.no_grad()
def test_prefill_and_decode_logits_match_stock(kw, mode):
    stock = tiny_model(**kw)
    model = absorb(copy.deepcopy(stock), mode=mode)
    calls = _kv_b_calls(model)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ref = _step_logits(stock, ids, mask, steps=6)
    got = _step_logits(model, ids, mask, steps=6)
    assert ref[0].std() > 0.3  # logits are not trivially small
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)
    layers = len(model.model.layers)
    # "always": no expansion at all; "auto": the 11-token prefill (no cache yet) is cheaper expanded, decode absorbed.
    assert calls[0] == (0 if mode == "always" else layers)


@pytest.mark.parametrize("kw", CASES)
@torch.no_grad()
def test_greedy_generate_equal(kw):
    stock = tiny_model(**kw, seed=3)
    model = absorb(copy.deepcopy(stock))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    args = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    ref = stock.generate(ids, output_logits=True, return_dict_in_generate=True, **args)
    got = model.generate(ids, output_logits=True, return_dict_in_generate=True, **args)
    assert torch.equal(ref.sequences, got.sequences)
    for r, g in zip(ref.logits, got.logits):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["always", "auto"])
@torch.no_grad()
def test_left_padded_batch_matches_stock(attn, mode):
    stock = tiny_model(attention_bias=True, attn=attn, seed=5)
    model = absorb(copy.deepcopy(stock), mode=mode)
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ref = _step_logits(stock, ids, mask, steps=5)
    got = _step_logits(model, ids, mask, steps=5)
    keep = mask.bool()
    torch.testing.assert_close(got[0][keep], ref[0][keep], atol=1e-4, rtol=0)  # padded positions are don't-care
    for r, g in zip(ref[1:], got[1:]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)
    args = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(stock.generate(ids, **args), model.generate(ids, **args))
    # each padded row alone, unpadded, gives the same continuation
    row = ids[0:1, 4:]
    alone = model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(alone[0, -8:], model.generate(ids, **args)[0, -8:])


@torch.no_grad()
def test_causal_prefill_without_cache_and_chunked_prefill():
    stock = tiny_model(seed=7)
    model = absorb(copy.deepcopy(stock), mode="always")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    ref = stock(ids, use_cache=False).logits
    torch.testing.assert_close(model(ids, use_cache=False).logits, ref, atol=1e-4, rtol=0)
    # prefill in two chunks of 10 + 6 over a cache: the second chunk attends causally, offset by 10
    cache = DynamicCache(config=model.config)
    model(ids[:, :10], cache=cache, use_cache=True)
    second = model(ids[:, 10:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(second, ref[:, 10:], atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_close_to_stock():
    stock = tiny_model(attention_bias=True, q_lora_rank=32, seed=9).to(torch.bfloat16)
    model = absorb(copy.deepcopy(stock))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = _step_logits(stock, ids, mask, steps=4)
    got = _step_logits(model, ids, mask, steps=4)
    for r, g in zip(ref[1:], got[1:]):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), atol=0.1, rtol=0.05)


@torch.no_grad()
def test_absorb_is_idempotent_and_reversible(tmp_path):
    stock = tiny_model(seed=11)
    model = copy.deepcopy(stock)
    keys = set(model.state_dict())
    absorb(model)
    forwards = [layer.self_attn.forward for layer in model.model.layers]
    assert absorb(model, mode="auto") is model and is_absorbed(model)
    assert [layer.self_attn.forward for layer in model.model.layers] == forwards
    assert set(model.state_dict()) == keys  # the checkpoint format is untouched

    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(10))
    args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    expected = stock.generate(ids, **args)
    assert torch.equal(model.generate(ids, **args), expected)

    # saved while absorbed, the directory loads and runs in plain transformers
    model.save_pretrained(tmp_path)
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not any("forward" in layer.self_attn.__dict__ for layer in reloaded.model.layers)
    assert torch.equal(reloaded.generate(ids, **args), expected)

    unabsorb(model)
    assert not is_absorbed(model)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    with absorbed(model, mode="always"):
        assert is_absorbed(model)
        with absorbed(model):
            pass
        assert is_absorbed(model)  # the inner block restores the outer state
    assert not is_absorbed(model)
    assert torch.equal(model.generate(ids, **args), expected)


def test_absorb_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        absorb(tiny_model(), mode="sometimes")
    with pytest.raises(TypeError, match="DeepseekV3Attention"):
        absorb(torch.nn.Linear(2, 2))


def test_cost_model_prefers_absorption_for_decode_only():
    shape = dict(num_heads=9, kv_lora_rank=96, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    assert absorbed_is_cheaper(query_len=1, kv_len=4096, **shape)
    assert absorbed_is_cheaper(query_len=64, kv_len=4096, **shape)
    assert not absorbed_is_cheaper(query_len=4096, kv_len=4096, **shape)


@pytest.mark.parametrize("mode", ["always", "auto"])
@pytest.mark.parametrize("padded", [True, False])
@torch.no_grad()
def test_static_cache_generate_equal(mode, padded):
    # unpadded: the prefill gets no mask while the static cache is longer than the prompt (causal, top-left aligned)
    stock = tiny_model(seed=13)
    model = absorb(copy.deepcopy(stock), mode=mode)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    args = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    ref, got = stock.generate(ids, **args), model.generate(ids, **args)
    assert torch.equal(ref.sequences, got.sequences)
    for r, g in zip(ref.logits, got.logits):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)
