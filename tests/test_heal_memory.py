"""Healing within memory: the fused, chunked loss, the padded SDPA attention and the automatic memory settings."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mha2mla.errors import Mha2mlaError
from mha2mla.heal import heal
from mha2mla.heal_ops import SDPA, activation_bytes, causal_lm_loss, chunked_lm_loss, register_sdpa, split_head
from mha2mla.recipe import RESUMABLE_CHANGES, load_recipe

SENTENCES = [
    "the quick brown fox jumps over the lazy dog .",
    "a latent attention model compresses keys and values into a small cache .",
    "healing a converted model recovers most of the lost quality .",
    "multi head latent attention caches one latent vector per token .",
]
FAST = dict(seq_len=16, micro_batch_size=2, lr=3e-3, log_every=100)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mla_config(vocab: int = 53, **kw):
    from transformers import DeepseekV3Config

    # query/key heads (16 + 8) wider than value heads (16), as in every converted checkpoint
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2, n_routed_experts=2, n_shared_experts=1,
                num_experts_per_tok=1, n_group=1, topk_group=1, max_position_embeddings=256, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return DeepseekV3Config(**{**base, **kw})


def _mla(seed: int = 0, **kw):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(_mla_config(**kw)).float()
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's 0.02, so that logits and KL are far from uniform
            p.mul_(4.0) if p.ndim >= 2 else None
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (k, float((a[k] - b[k]).abs().max()))


# --- the loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", [False, True], ids=["ce", "kd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 7, 0, 10_000])
def test_fused_chunked_loss_equals_the_full_logits_loss_and_gradients(teacher, temperature, chunk):
    student, tutor = _mla(0), (_mla(1).requires_grad_(False) if teacher else None)
    ids = torch.randint(0, 53, (3, 11), generator=torch.Generator().manual_seed(2))
    kw = dict(alpha=0.3, temperature=temperature)

    t_logits = tutor(input_ids=ids).logits if teacher else None
    ref, ref_ce, ref_kd = causal_lm_loss(student(input_ids=ids).logits, ids, t_logits, **kw)
    ref.backward()
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
    loss.backward()

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
    assert float(again[0]) == pytest.approx(float(ref[0]), abs=1e-6) and not again[0].requires_grad
    with pytest.raises(ValueError, match="differ"):
        chunked_lm_loss(logits, None, ids, t_logits[..., :5], None)


def test_split_head_leaves_other_heads_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=32))
    with split_head(model) as w:
        assert w is None and model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.shape[-1] == 40
    student = _mla(0)
    with split_head(student, enabled=False) as w:
        assert w is None
    assert "forward" not in vars(student.lm_head)


# --- attention -----------------------------------------------------------------------------------------------------


def test_padded_sdpa_equals_eager_attention_in_loss_and_gradients():
    eager, sdpa = _mla(0), _mla(0)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation(register_sdpa())
    assert sdpa.config._attn_implementation == SDPA
    ids = torch.randint(0, 53, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (eager, sdpa):
        loss = causal_lm_loss(m(input_ids=ids).logits, ids)[0]
        loss.backward()
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    _close(_grads(sdpa), _grads(eager), 1e-5)


def test_activation_estimate_grows_with_tokens_and_width():
    small, wide = _mla_config(), _mla_config(hidden_size=128, intermediate_size=512)
    a = activation_bytes(small, tokens=100, bytes_per_value=4)
    assert activation_bytes(small, tokens=200, bytes_per_value=4) == 2 * a
    assert activation_bytes(small, tokens=100, bytes_per_value=2) * 2 == a
    assert activation_bytes(wide, tokens=100, bytes_per_value=4) > 2 * a


# --- recipe and the healing loop -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, words",
    [
        ({"gradient_checkpointing": "yes"}, ["gradient_checkpointing", "auto, true or false", "'yes'"]),
        ({"attn_implementation": "flash"}, ["attn_implementation", "'flash'", "sdpa"]),
        ({"loss_chunk_tokens": -1}, ["loss_chunk_tokens", "-1"]),
        ({"loss_chunk_tokens": 2.5}, ["loss_chunk_tokens", "2.5"]),
    ],
)
def test_recipe_checks_the_memory_keys(values, words):
    with pytest.raises(Mha2mlaError) as e:
        load_recipe(values)
    assert all(w in str(e.value) for w in words)


def test_recipe_memory_defaults_are_automatic_and_resumable():
    r = load_recipe(None)
    assert (r.gradient_checkpointing, r.attn_implementation, r.loss_chunk_tokens) == ("auto", "auto", 0)
    assert load_recipe({"gradient_checkpointing": True}).gradient_checkpointing is True
    assert {"gradient_checkpointing", "attn_implementation", "loss_chunk_tokens"} <= RESUMABLE_CHANGES


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("heal-memory")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    out = {}
    for name, seed in (("model", 0), ("teacher", 1)):
        m = _mla(seed, vocab=len(tok), eos_token_id=tok.eos_token_id)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    (root / "train.txt").write_text(" ".join(SENTENCES * 12))
    out["text"] = str(root / "train.txt")
    return out


def test_memory_settings_do_not_change_the_training_losses(assets, tmp_path):
    kw = dict(model=assets["model"], data=assets["text"], teacher=assets["teacher"], max_steps=3, distill_alpha=0.4,
              distill_temperature=2.0, **FAST)
    base = heal(output=tmp_path / "a", gradient_checkpointing=False, attn_implementation="eager",
                loss_chunk_tokens=10_000, **kw)
    lean = heal(output=tmp_path / "b", gradient_checkpointing=True, attn_implementation="sdpa", loss_chunk_tokens=5, **kw)
    assert base["memory"]["gradient_checkpointing"] is False and base["memory"]["attn_implementation"] == "eager"
    assert lean["memory"]["gradient_checkpointing"] is True and lean["memory"]["attn_implementation"] == SDPA
    assert lean["memory"]["loss_chunk_tokens"] == 5 and lean["memory"]["fused_head"] is True
    for key in ("losses", "ce", "kd"):
        assert len(lean[key]) == 3 and all(math.isfinite(x) for x in lean[key])
        assert lean[key] == pytest.approx(base[key], abs=1e-5)
    assert lean["step0"]["training_loss"] == pytest.approx(lean["step0"]["converted_loss"], abs=1e-6)
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert SDPA not in json.dumps(cfg)  # the healed checkpoint loads without mha2mla
    from transformers import AutoModelForCausalLM

    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert healed.config._attn_implementation != SDPA


def test_auto_checkpointing_follows_the_activation_estimate(assets, tmp_path):
    small = heal(model=assets["model"], output=tmp_path / "s", data=assets["text"], max_steps=1, **FAST)
    mem = small["memory"]
    assert mem["estimated_activation_bytes"] < mem["training_state_bytes"] and mem["gradient_checkpointing"] is False
    big = heal(model=assets["model"], output=tmp_path / "l", data=assets["text"], max_steps=1,
               **{**FAST, "seq_len": 64, "micro_batch_size": 8})
    mem = big["memory"]
    assert mem["estimated_activation_bytes"] > mem["training_state_bytes"] and mem["gradient_checkpointing"] is True
    assert mem["attn_implementation"] == SDPA and os.path.isdir(tmp_path / "l")
