"""``mha2mla check DIR``: does this DeepseekV3 checkpoint load, and which engines serve it with a compressed cache?

Reads ``config.json``, the safetensors index and every shard's header without loading weights: a shard shorter than
its header says, a tensor missing or in another shape than the config implies, or a config value no engine can build
(``kv_lora_rank: -4``, ``qk_rope_head_dim: null``) is an error. Then one verdict per engine
(:func:`mha2mla.checkpoint.portability.serving_verdicts`).
Exit status: 0 portable (every engine serves it compressed), 1 not portable, 2 not a checkpoint that loads.
"""

from __future__ import annotations

import sys

import click

from mha2mla.cli.common import serving_lines, user_errors
from mha2mla.checkpoint.meta import read_checkpoint_meta, read_checkpoint_tensors
from mha2mla.errors import Mha2mlaError
from mha2mla.checkpoint.portability import fast_kernel_notes, is_portable, serving_verdicts, shape_errors

__all__ = ["check", "read_checkpoint_meta", "read_checkpoint_tensors"]


@click.command("check")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@user_errors
def check(directory: str) -> None:
    """Check that the DeepseekV3 checkpoint in DIR loads, and which engines serve it with a compressed MLA cache.

    Reads config.json, the index and every shard's header (no weights), checks each tensor's presence and shape
    against the config, then prints PORTABLE (every engine below serves it compressed, with transformers' outputs) or
    NOT PORTABLE, one line per engine (vLLM GPU and CPU, SGLang by backend, transformers) with why not and the fix,
    and notes (fast kernels the shape misses, engines not listed).
    Exit status 0 if portable, 1 if not, 2 if DIR is not a checkpoint that loads.
    """

    config, shapes = read_checkpoint_tensors(directory)
    if config.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise Mha2mlaError(f"{directory} is a {config.get('model_type')!r} checkpoint, not deepseek_v3; "
                           f"convert it first with `mha2mla convert`")
    problems = shape_errors(config, shapes)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise Mha2mlaError(f"{directory} cannot load: {problems[0]}{more}")
    verdicts = serving_verdicts(config, list(shapes), as_dicts=True)
    portable = is_portable(verdicts)
    click.echo("PORTABLE" if portable else "NOT PORTABLE: not every engine serves it with a compressed cache")
    for line in serving_lines(verdicts):
        click.echo(f"- {line}")
    for note in fast_kernel_notes(config):  # (what the verdicts do not say: kernels missed, engines not listed)
        click.echo(f"note: {note}")
    sys.exit(0 if portable else 1)
