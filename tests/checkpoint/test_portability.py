"""Which engines serve a DeepseekV3 checkpoint with a compressed cache (:mod:`mha2mla.checkpoint.portability`):
the vLLM/SGLang blockers, the fast-kernel notes, and the per-engine verdicts."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from mha2mla.checkpoint.portability import fast_kernel_notes, portability_blockers, rope_type, serving_verdicts
from tests.conftest import small_mla_config


def _meta(**overrides) -> tuple[dict, list[str]]:
    config = small_mla_config(**overrides)
    torch.manual_seed(0)
    names = list(DeepseekV3ForCausalLM(config).state_dict())
    return config.to_dict(), names


def _engines(config: dict, names=("lm_head.weight",)) -> dict[str, bool]:
    return {v.engine: v.compressed for v in serving_verdicts(config, list(names))}


def _shape(rank, rope, nope, v, **extra) -> dict:
    cfg = {"model_type": "deepseek_v3", "kv_lora_rank": rank, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
           "v_head_dim": v, "rms_norm_eps": 1e-6, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_hidden_layers": 2, "first_k_dense_replace": 2, "n_routed_experts": 1}
    cfg.update(extra)
    return cfg


VG, VC, ST, SF, SM = ("vLLM (GPU)", "vLLM (CPU)", "SGLang (triton backend)", "SGLang (FA3 backend, Hopper default)",
                      "SGLang (FlashMLA backend)")

# (config, engines that serve it compressed): the vLLM rows follow vLLM 0.32.0's MLACommonBackend / CPUMLABackend
# head sizes and FlashAttnPrefillBackend's dims (benchmarks/serve_vllm.py --check-table asks vLLM's own classes).
TABLE = [
    (_shape(512, 64, 128, 128), {VG, VC, ST, SF, SM}),     # DeepSeek's shape: every engine
    (_shape(256, 64, 128, 128), {VG, ST, SF}),             # 320: vLLM GPU only; FA3 decode takes ranks 256-512
    (_shape(448, 64, 128, 128), {VG, ST, SF}),             # 512: vLLM GPU (MLACommonBackend lists 512), not CPU
    (_shape(96, 32, 64, 64), {ST}),                        # SmolLM2 96+32: only SGLang's triton backend
    (_shape(160, 32, 64, 64), {ST}),                       # SmolLM2 at the larger budget
    (_shape(512, 64, 64, 64), {VC, ST, SM}),               # 576 but nope/v 64: no GPU prefill kernel in vLLM
    (_shape(512, 64, 64, 128), {VG, VC, ST, SF, SM}),      # (64, 64, 128) is one of FlashAttn prefill's shapes;
                                                           # FA3 prefill: query/key 128 = value 128
    (_shape(544, 32, 128, 128), {ST}),                     # 576 but 544+32: CPU decode kernel is 512+64; GPU prefill
                                                           # rope 64; FA3 decode rank ≤ 512
    (_shape(512, 64, 128, 128, rms_norm_eps=1e-5), set()),  # eps mismatch: every engine but transformers differs
    (_shape(512, 64, 128, 128, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), set()),
    (_shape(512, 64, 128, 128, rope_interleave=False), {ST, SF, SM}),  # SGLang 0.5.23 reads rope_interleave
    (_shape(512, 64, 128, 128, num_key_value_heads=1), set()),
    (_shape(512, 64, 128, 128, tie_word_embeddings=True), {ST, SF, SM}),  # vLLM never ties lm_head; SGLang 0.5.23 does
]


def test_converted_shape_is_portable():
    config, names = _meta()
    assert portability_blockers(config, names) == []
    config, names = _meta(q_lora_rank=24)
    assert portability_blockers(config, names) == []


def test_attention_bias_tensors_block():
    config, names = _meta(attention_bias=True)
    assert any(n.endswith("self_attn.o_proj.bias") for n in names)
    (blocker,) = portability_blockers(config, names)
    assert "bias" in blocker and "self_attn" in blocker
    # the flag alone (no tensors) also blocks: transformers would add parameters the engines never build
    config, names = _meta()
    config["attention_bias"] = True
    (blocker,) = portability_blockers(config, names)
    assert "attention_bias" in blocker


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama3"),
        ("rope_interleave", False, "interleaved"),
        ("rms_norm_eps", 1e-5, "rms_norm_eps is 1e-05"),
        ("first_k_dense_replace", 1, "layers 1"),
        ("num_key_value_heads", 1, "num_key_value_heads is 1"),
        ("model_type", "llama", "not an MLA checkpoint"),
    ],
)
def test_each_blocker_is_one_sentence(key, value, words):
    config, names = _meta()
    config[key] = value
    blockers = portability_blockers(config, names)
    assert len(blockers) == 1, blockers
    assert words in blockers[0]
    assert "\n" not in blockers[0] and not blockers[0].endswith(".")


def test_rope_type_reads_v5_and_legacy_keys():
    assert rope_type({}) == "default"
    assert rope_type({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) == "default"
    assert rope_type({"rope_scaling": {"type": "yarn", "factor": 4.0}}) == "yarn"
    assert rope_type({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3"}}) == "llama3"
    config, names = _meta()
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    assert "yarn" in portability_blockers(config, names)[0]


def test_real_moe_layers_are_fine_when_experts_exist():
    config, names = _meta()
    config["first_k_dense_replace"] = 1
    names = names + [f"model.layers.1.mlp.experts.{i}.gate_proj.weight" for i in range(4)]
    assert portability_blockers(config, names) == []


def test_several_blockers_are_all_reported():
    config, names = _meta(attention_bias=True, rms_norm_eps=1e-5, rope_interleave=False)
    assert len(portability_blockers(config, names)) == 3


def test_fast_kernel_notes():
    cpu = "SGLang on CPU is not listed: its CPU rope (get_rope_cpu in 0.5.23) builds DeepSeek YaRN only"
    (note,) = fast_kernel_notes({"kv_lora_rank": 512, "qk_rope_head_dim": 64})
    assert note.startswith(cpu)
    notes = fast_kernel_notes({"kv_lora_rank": 96, "qk_rope_head_dim": 32})
    assert len(notes) == 2 and "is 96+32, not 512+64" in notes[0] and notes[1].startswith(cpu)
    llama3 = {"rope_parameters": {"rope_type": "llama3"}}
    assert fast_kernel_notes({"kv_lora_rank": 512, "qk_rope_head_dim": 64, **llama3}) == []


@pytest.mark.parametrize("config, serves", TABLE)
def test_verdict_table(config, serves):
    got = _engines(config, () if config.get("tie_word_embeddings") else ("lm_head.weight",))
    assert got.pop("transformers") is True
    assert {e for e, ok in got.items() if ok} == serves


def test_verdicts_on_biases_and_their_fixes():
    names = ["model.layers.0.self_attn.o_proj.bias"]
    verdicts = {v.engine: v for v in serving_verdicts(_shape(512, 64, 128, 128), names)}
    assert verdicts["transformers"].compressed
    for engine in (VG, VC, ST):
        assert not verdicts[engine].compressed and "bias" in verdicts[engine].why
        assert "convert again" in verdicts[engine].fix
    small = {v.engine: v for v in serving_verdicts(_shape(96, 32, 64, 64), [])}
    assert "mha2mla pad" in small[VC].fix and "VLLM_MLA_DISABLE=1" in small[VC].fix
    assert "96+32" in small[VC].why
    assert "--attention-backend triton" in small[SF].fix and "rank of 256-512" in small[SF].why
    wide = {v.engine: v for v in serving_verdicts(_shape(512, 64, 64, 64), [])}
    assert not wide[SF].compressed and "value width 64" in wide[SF].why


def test_vllm_only_blockers_leave_sglang_serving():
    verdicts = {v.engine: v for v in serving_verdicts(_shape(512, 64, 128, 128, rope_interleave=False), [])}
    assert not verdicts[VG].compressed and "vLLM hard-codes the interleaved layout" in verdicts[VG].why
    assert verdicts[ST].compressed and verdicts[SF].compressed
