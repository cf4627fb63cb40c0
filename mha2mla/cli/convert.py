"""``mha2mla convert``: the CLI wrapper around :func:`mha2mla.conversion.pipeline.convert`."""

from __future__ import annotations

import dataclasses
import functools

import click

from mha2mla.cli.common import serving_lines, user_errors
from mha2mla.serve.targets import SERVE_TARGETS


@click.command("convert")
@click.argument("source")
@click.option("--output", "-o", required=True, help="Directory to create (written to a temporary sibling, renamed at the end).")
@click.option("--rank", "-r", type=int, default=None, help="kv_lora_rank: size of the cached latent per token and layer.")
@click.option("--kv-budget", type=int, default=None, help="Instead of --rank/--rope-dim: cached values per token per layer; the split is measured on --calibration data.")
@click.option("--rope-dim", type=int, default=None, help="qk_rope_head_dim: rotary dims of the one shared rope key (even, divides head_dim). Default head_dim/2.")
@click.option("--rope-stride", type=int, default=None, help="Keep every k-th source frequency (default head_dim/rope-dim, which keeps θ; with --calibration it is chosen from the data).")
@click.option("--rope-scaling", type=click.Choice(["auto", "portable", "keep"]), default="auto", show_default=True,
              help="A llama3/linear rope source: portable = a default rope of only the frequencies its scaling leaves "
                   "unchanged (served as written by vLLM/SGLang); keep = its scaling carried over (exact in transformers; "
                   "vLLM/SGLang rewrite it to DeepSeek YaRN); auto = portable where possible.")
@click.option("--biases", type=click.Choice(["auto", "absorb", "keep"]), default="auto", show_default=True,
              help="A source with attention biases (Qwen2): absorb = bias-free projections fitted on --calibration data "
                   "(vLLM/SGLang drop attention biases); keep = biases carried (exact, transformers only); auto = absorb "
                   "when calibrated.")
@click.option("--calibration", default=None, help="Calibration text: .txt/.jsonl file, directory, or hf:DATASET.")
@click.option("--calibration-samples", type=int, default=48, show_default=True, help="Calibration sequences.")
@click.option("--calibration-length", type=int, default=512, show_default=True,
              help="Tokens per calibration sequence (shortened to the source's max_position_embeddings if longer).")
@click.option("--device", default="cpu", show_default=True, help="Where calibration runs: cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True, help="Output dtype.")
@click.option("--max-shard-size", default="500MB", show_default=True, help="Largest output safetensors shard (the writer buffers one shard in memory).")
@click.option("--keep-mlp", is_flag=True, help="Copy every MLP weight from the source unchanged (no MLP refit against the drift: faster, a little worse at small ranks).")
@click.option("--mlp-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Precision of the MLP forwards that move the calibration streams (auto: bfloat16 where the CPU/GPU "
                   "multiplies it natively, faster there; float32 for exact full-rank checks).")
@click.option("--method", "method_spec", default="", metavar="SPEC",
              help="Calibrated ingredients for ablations, comma-separated NAME=VALUE switches of mha2mla.conversion.latent.Method, "
                   "e.g. 'drift_below_share=inf,output_fit_stride=1' (the slowest, most thorough settings).")
@click.option("--report", is_flag=True, help="Also write mha2mla-report.png (error per layer, energy vs rank).")
@click.option("--serve", type=click.Choice(sorted(SERVE_TARGETS)), default=None,
              help="Write the checkpoint zero-padded (exactly) to the shape vLLM's MLA kernels accept: vllm = 512+64 with "
                   "qk_nope_head_dim = v_head_dim = 128 (CPU and GPU); vllm-gpu-320 = 256+64 (GPU only). See `mha2mla pad`.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def convert_cmd(source, output, rank, kv_budget, rope_dim, rope_stride, rope_scaling, biases, calibration, calibration_samples, calibration_length,
                device, dtype, max_shard_size, keep_mlp, mlp_dtype, method_spec, report, serve, force, quiet):
    """Convert SOURCE (HF directory, hub id or .gguf file) into a native DeepseekV3 MLA checkpoint."""
    from mha2mla.conversion.options import Method
    from mha2mla.conversion.pipeline import convert

    try:
        method = Method.from_spec(method_spec)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--method") from None
    if keep_mlp:
        method = dataclasses.replace(method, mlp_drift=0.0)
    if mlp_dtype != "auto":
        method = dataclasses.replace(method, mlp_dtype=mlp_dtype)
    if serve:
        from mha2mla.serve.pad import convert_for_serving

        convert = functools.partial(convert_for_serving, serve=serve)
    res = convert(method=method, source=source, output=output, rank=rank, kv_budget=kv_budget, rope_dim=rope_dim, rope_stride=rope_stride,
                  rope_scaling=rope_scaling, biases=biases, calibration=calibration, calibration_samples=calibration_samples,
                  calibration_length=calibration_length, dtype=dtype, force=force, max_shard_size=max_shard_size,
                  report=report, device=device, progress=not quiet)
    kv = res.record["kv_cache"]
    port = res.record["portability"]
    click.echo(f"wrote {res.output} in {res.seconds:.1f} s")
    budget = (res.record.get("calibration") or {}).get("kv_budget")
    if budget:
        click.echo(f"--kv-budget {budget['budget']}: chose {budget['chosen']} ({budget['why']}; "
                   f"measured {budget['mean_attention_output_rel_error']})")
    drift = ((res.record.get("calibration") or {}).get("propagation") or {}).get("drift")
    if drift:
        click.echo(f"drift corrections {drift} (--method drift_below_share=inf keeps them)")
    change = (f"{kv['saving'] * 100:.1f} % saved" if kv["saving"] >= 0
              else f"{-kv['saving'] * 100:.1f} % LARGER than the source's")
    click.echo(f"KV cache per token per layer: {kv['source_values_per_token_per_layer']} -> "
               f"{kv['mla_values_per_token_per_layer']} values ({change})")
    click.echo(f"mean relative error: keys {res.record['mean_k_rel_error']:.4f}, values {res.record['mean_v_rel_error']:.4f}")
    padding = res.record.get("padding")
    if padding:
        click.echo(f"padded exactly to {padding['to']['kv_lora_rank']}+{padding['to']['qk_rope_head_dim']} "
                   f"(nope {padding['to']['qk_nope_head_dim']}, v {padding['to']['v_head_dim']}) for --serve {serve}")
        if padding.get("warning"):
            click.echo(f"warning: {padding['warning']}")

    click.echo("portable (every engine serves it with a compressed cache): "
               + ("yes" if port["vllm_sglang_portable"] else "no"))
    for line in serving_lines(port["serving"]):
        click.echo(f"  {line}")
