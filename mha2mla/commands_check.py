"""``mha2mla check DIR``: will this DeepseekV3 checkpoint run unchanged in vLLM and SGLang?

Reads ``config.json`` and the tensor names (the safetensors index, else each shard's header) without loading weights.
Exit status: 0 portable, 1 not portable, 2 not a readable checkpoint directory.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import click

from mha2mla.cli import user_errors
from mha2mla.errors import Mha2mlaError
from mha2mla.portability import fast_kernel_notes, portability_blockers

__all__ = ["check", "read_checkpoint_meta"]

_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def _safetensors_names(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise ValueError(f"header length {size} is implausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise Mha2mlaError(f"cannot read the safetensors header of {path}: {e}") from None
    if not isinstance(header, dict):
        raise Mha2mlaError(f"cannot read the safetensors header of {path}: not a JSON object")
    return [k for k in header if k != "__metadata__"]


def read_checkpoint_meta(directory: str) -> tuple[dict, list[str]]:
    """``config.json`` as a dict and the checkpoint's tensor names, without loading any tensor.

    Raises:
        Mha2mlaError: the directory, its config or its safetensors files are missing or unreadable.
    """
    if not os.path.isdir(directory):
        raise Mha2mlaError(f"{directory} is not a directory")
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise Mha2mlaError(f"{directory} has no config.json; point to a checkpoint directory") from None
    except (OSError, ValueError) as e:
        raise Mha2mlaError(f"cannot read {config_path}: {e}") from None
    if not isinstance(config, dict):
        raise Mha2mlaError(f"{config_path} is not a JSON object")

    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            return config, list(weight_map)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Mha2mlaError(f"cannot read the weight map of {index_path}: {e!r}") from None
    shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not shards:
        raise Mha2mlaError(f"{directory} has no *.safetensors weights (check reads tensor names from safetensors only)")
    names = []
    for shard in shards:
        names += _safetensors_names(shard)
    return config, names


@click.command("check")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@user_errors
def check(directory: str) -> None:
    """Check that the DeepseekV3 checkpoint in DIR runs unchanged in vLLM and SGLang.

    Prints PORTABLE, or NOT PORTABLE and one line per blocker; then notes on the fast MLA kernels.
    Exit status 0 if portable, 1 if not, 2 if DIR is not a readable checkpoint.
    """
    config, names = read_checkpoint_meta(directory)
    if config.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise Mha2mlaError(f"{directory} is a {config.get('model_type')!r} checkpoint, not deepseek_v3; "
                           f"convert it first with `mha2mla convert`")
    blockers = portability_blockers(config, names)
    if blockers:
        click.echo("NOT PORTABLE to vLLM/SGLang:")
        for b in blockers:
            click.echo(f"- {b}")
    else:
        click.echo("PORTABLE")
    for note in fast_kernel_notes(config):
        click.echo(f"note: {note}")
    sys.exit(1 if blockers else 0)
