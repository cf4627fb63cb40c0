"""``mha2mla pad``: the CLI wrapper around :func:`mha2mla.serve.pad.pad_checkpoint`."""

from __future__ import annotations

import click

from mha2mla.cli.common import serving_lines, user_errors
from mha2mla.serve.targets import SERVE_TARGETS

__all__ = ["pad_cmd"]


@click.command("pad")
@click.argument("source", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--output", "-o", required=True, help="Directory to create (written to a temporary sibling, renamed at the end).")
@click.option("--serve", "target", type=click.Choice(sorted(SERVE_TARGETS)), default="vllm", show_default=True,
              help="Shape to pad to: vllm = 512+64 with qk_nope_head_dim = v_head_dim = 128 (vLLM's CPU and GPU MLA "
                   "backends); vllm-gpu-320 = 256+64 (vLLM's GPU MLA backends only).")
@click.option("--max-shard-size", default="500MB", show_default=True, help="Largest output safetensors shard.")
@click.option("--force", is_flag=True, help="Replace an existing output directory written by mha2mla.")
@user_errors
def pad_cmd(source: str, output: str, target: str, max_shard_size: str, force: bool) -> None:
    """Zero-pad the MLA checkpoint in DIR to the shape vLLM's MLA kernels accept (exact: same outputs)."""
    from mha2mla.serve.pad import pad_checkpoint

    res = pad_checkpoint(source=source, output=output, target=target, force=force, max_shard_size=max_shard_size)
    click.echo(f"wrote {res.output}: {res.source_dims.label} (nope {res.source_dims.qk_nope_head_dim}, v "
               f"{res.source_dims.v_head_dim}) -> {res.dims.label} (nope {res.dims.qk_nope_head_dim}, v "
               f"{res.dims.v_head_dim}), exact zero-padding")
    warning = res.record["padding"].get("warning")
    if warning:
        click.echo(f"warning: {warning}")
    for line in serving_lines(res.record["portability"]["serving"]):
        click.echo(line)
