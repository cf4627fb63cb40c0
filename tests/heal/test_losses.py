"""The healing loop's memory-lean pieces (:mod:`mha2mla.heal.losses`): the fused, chunked loss, the padded SDPA
attention, the activation estimate, the latent's training scale, and the order of the data blocks."""

from __future__ import annotations

import math

import pytest
import torch

from mha2mla.heal.losses import (SDPA, ScaledHeadEmbedding, activation_bytes, block_indices, causal_lm_loss,
                                 chunked_lm_loss, measure_latent_scales, register_sdpa, split_head,
                                 tied_embedding_scale, to_stock_state_dict)
from tests.conftest import frozen_model, mla_config, random_mla

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("teacher", [False, True], ids=["ce", "kd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 7, 0, 10_000])
def test_fused_chunked_loss_equals_the_full_logits_loss_and_gradients(teacher, temperature, chunk):
    student, tutor = random_mla(0), (random_mla(1).requires_grad_(False) if teacher else None)
    ids = torch.randint(0, 53, (3, 11), generator=torch.Generator().manual_seed(2))
    kw = dict(alpha=0.3, temperature=temperature)

    t_logits = tutor(input_ids=ids).logits if teacher else None
    ref, ref_ce, ref_kd = causal_lm_loss(student(input_ids=ids).logits, ids, t_logits, **kw)
    (ref * 0.25).backward()  # a scaled loss (as gradient accumulation passes it): the backward scales in place
    ref_grads = _grads(student)
    student.zero_grad(set_to_none=True)

    with split_head(student) as w:
        hidden = student(input_ids=ids).logits
    assert w is student.lm_head.weight and hidden.shape == (3, 11, 64)  # the head was split off, and put back after
    assert student(input_ids=ids).logits.shape == (3, 11, 53)
    t_hidden, t_w = None, None
    if teacher:
        with torch.inference_mode(), split_head(tutor) as t_w:
            t_hidden = tutor(input_ids=ids).logits
    loss, ce, kd = chunked_lm_loss(hidden, w, ids, t_hidden, t_w, chunk_tokens=chunk, **kw)
    (loss * 0.25).backward()

    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-5)
    assert float(ce) == pytest.approx(float(ref_ce.detach()), abs=1e-5)
    assert (kd is None) == (ref_kd is None)
    if teacher:
        assert float(kd) == pytest.approx(float(ref_kd.detach()), abs=1e-5) and float(kd) > 0.01
    _close(_grads(student), ref_grads, 1e-5)
    assert not ce.requires_grad and (kd is None or not kd.requires_grad)


def test_chunked_loss_on_logits_and_without_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 6, 17, generator=g)).requires_grad_()
    t_logits = 3 * torch.randn(2, 6, 17, generator=g)
    ids = torch.randint(0, 17, (2, 6), generator=g)
    ref = causal_lm_loss(logits, ids, t_logits, alpha=0.6, temperature=1.5)
    (g_ref,) = torch.autograd.grad(ref[0], logits)
    got = chunked_lm_loss(logits, None, ids, t_logits, None, alpha=0.6, temperature=1.5, chunk_tokens=4)
    (g_got,) = torch.autograd.grad(got[0], logits)
    assert all(float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-6) for a, b in zip(ref, got))
    assert torch.allclose(g_got, g_ref, atol=1e-7)
    with torch.no_grad():
        again = chunked_lm_loss(logits, None, ids, t_logits, None, alpha=0.6, temperature=1.5, chunk_tokens=4)
    assert float(again[0]) == pytest.approx(float(ref[0].detach()), abs=1e-6) and not again[0].requires_grad
    with pytest.raises(ValueError, match="differ"):
        chunked_lm_loss(logits, None, ids, t_logits[..., :5], None)


def test_split_head_leaves_other_heads_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=32))
    with split_head(model) as w:
        assert w is None and model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.shape[-1] == 40
    student = random_mla(0)
    with split_head(student, enabled=False) as w:
        assert w is None
    assert "forward" not in vars(student.lm_head)


def test_padded_sdpa_equals_eager_attention_in_loss_and_gradients():
    eager, sdpa = random_mla(0), random_mla(0)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation(register_sdpa())
    assert sdpa.config._attn_implementation == SDPA
    ids = torch.randint(0, 53, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (eager, sdpa):
        loss = causal_lm_loss(m(input_ids=ids).logits, ids)[0]
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    _close(_grads(sdpa), _grads(eager), 1e-5)


def test_activation_estimate_grows_with_tokens_and_width():
    small, wide = mla_config(), mla_config(hidden_size=128, intermediate_size=512)
    a = activation_bytes(small, tokens=100, bytes_per_value=4)
    assert activation_bytes(small, tokens=200, bytes_per_value=4) == 2 * a
    assert activation_bytes(small, tokens=100, bytes_per_value=2) * 2 == a
    assert activation_bytes(wide, tokens=100, bytes_per_value=4) > 2 * a


def test_latent_scale_is_measured_as_a_power_of_two(heal_assets):
    scales = measure_latent_scales(frozen_model(heal_assets["model"]))
    assert set(scales) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for s in scales.values():
        assert s == 2.0 ** round(math.log2(s)) and 2**-14 <= s <= 2**-10


def _tied_copy(scale: float, dtype: torch.dtype):
    """A random MLA whose embedding is its head times ``scale``, rounded to ``dtype`` (a converted tied source)."""
    model = random_mla(0)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.to(dtype))
        model.model.embed_tokens.weight.copy_((model.lm_head.weight * scale).to(dtype))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tied_source_is_recognised_by_its_scale(dtype):
    s = math.sqrt(1e-6 / 1e-5)
    model = _tied_copy(s, dtype)
    assert tied_embedding_scale(model, candidates=(s, 1.0), dtype=dtype) == s
    assert tied_embedding_scale(model, candidates=(1.0, s * 1.001), dtype=dtype) is None
    assert tied_embedding_scale(random_mla(0), candidates=(s, 1.0), dtype=dtype) is None  # independent tables
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] += 1e-3  # one value off: not the same table
    assert tied_embedding_scale(model, candidates=(s,), dtype=dtype) is None


def test_tied_training_form_is_the_tied_source_exactly():
    """Forward: the same embedding rows. Backward: the one table's gradient is the head's plus s times the embedding's
    (the chain rule of embedding = s · head), which is the tied source's gradient. The stock form writes both back."""
    s = math.sqrt(1e-6 / 1e-5)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(4))
    untied = _tied_copy(s, torch.float32)
    untied(input_ids=ids, labels=ids).loss.backward()
    want = untied.lm_head.weight.grad + s * untied.model.embed_tokens.weight.grad

    tied = _tied_copy(s, torch.float32)
    pad = tied.model.embed_tokens.padding_idx
    tied.set_input_embeddings(ScaledHeadEmbedding(tied.lm_head, s, padding_idx=pad))
    assert "model.embed_tokens.weight" not in dict(tied.named_parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - tied.lm_head.weight.numel()
    loss = tied(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        assert float(loss) == float(untied(input_ids=ids, labels=ids).loss)
    loss.backward()
    assert torch.allclose(tied.lm_head.weight.grad, want, atol=1e-6, rtol=1e-5)
    stock = to_stock_state_dict(tied.state_dict(), {}, 16, tied=("model.embed_tokens.weight", "lm_head.weight", s))
    assert torch.equal(stock["model.embed_tokens.weight"], untied.model.embed_tokens.weight)


def test_block_order_is_a_seeded_permutation_per_epoch():
    a = block_indices(0, 10, n_blocks=5, seed=3)
    assert sorted(a[:5].tolist()) == list(range(5)) and sorted(a[5:].tolist()) == list(range(5))
    assert torch.equal(block_indices(4, 3, n_blocks=5, seed=3), a[4:7])
