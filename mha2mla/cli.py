"""The ``mha2mla`` command line. It only parses arguments and calls the Python API."""

from __future__ import annotations

import functools
import signal
import sys

import click

from mha2mla.errors import Mha2mlaError


def _clear_progress() -> None:
    """Erase progress bars still on screen, so that an error is the only line a failed command leaves."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def user_errors(fn):
    """Turn a :class:`Mha2mlaError` (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Mha2mlaError as e:
            _clear_progress()
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _clear_progress()
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except MemoryError:
            _clear_progress()
            click.echo("error: out of memory; use a machine with more RAM (convert: or a smaller --max-shard-size)",
                       err=True)
            sys.exit(1)

    return wrapper


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM takes the Ctrl-C path: cleanup runs, one line, exit 130


class _OneLineGroup(click.Group):
    """A click group whose usage errors are one ``error:`` line (exit 2), like every other user error."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (embedded use): leave signals alone
            pass
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare `mha2mla`: show the help
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            hint = ""
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            click.echo(f"error: {e.format_message()}{hint}".replace("\n", " "), err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mha2mla")
def main() -> None:
    """Convert MHA/GQA checkpoints into native DeepSeek-V3 MLA checkpoints, heal and evaluate them."""


# --- subcommands are registered below, one import each -------------------------------------------
from mha2mla.commands_convert import convert_cmd  # noqa: E402

main.add_command(convert_cmd)
from mha2mla.commands_demo import demo_cmd  # noqa: E402

main.add_command(demo_cmd)
from mha2mla.commands_eval import eval_command  # noqa: E402

main.add_command(eval_command)
from mha2mla.commands_check import check  # noqa: E402

main.add_command(check)
from mha2mla.commands_heal import heal_command  # noqa: E402

main.add_command(heal_command)
from mha2mla.commands_pad import pad_cmd  # noqa: E402

main.add_command(pad_cmd)
