"""The ``mha2mla`` command group: each subcommand lives in its own module and only parses options and calls the
Python API."""

from __future__ import annotations

import click

from mha2mla.cli.check import check
from mha2mla.cli.common import OneLineGroup
from mha2mla.cli.convert import convert_cmd
from mha2mla.cli.demo import demo_cmd
from mha2mla.cli.eval import eval_command
from mha2mla.cli.heal import heal_command
from mha2mla.cli.pad import pad_cmd

__all__ = ["main"]


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mha2mla")
def main() -> None:
    """Convert MHA/GQA checkpoints into native DeepSeek-V3 MLA checkpoints, heal and evaluate them."""


for _command in (convert_cmd, demo_cmd, eval_command, check, heal_command, pad_cmd):
    main.add_command(_command)
