"""What every command shares: one-line errors and exit codes (:func:`user_errors`, :class:`OneLineGroup`), and the
per-engine serving lines that ``convert``, ``pad`` and ``check`` print."""

from __future__ import annotations

import functools
import signal
import sys

import click

from mha2mla.errors import Mha2mlaError

__all__ = ["OneLineGroup", "user_errors", "serving_lines"]


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


class OneLineGroup(click.Group):
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


def serving_lines(verdicts: list[dict]) -> list[str]:
    """One line per engine: ``vLLM (CPU): yes, compressed cache`` or ``...: no — why; fix: ...``."""
    out = []
    for v in verdicts:
        if v["compressed"]:
            out.append(f"{v['engine']}: yes, compressed cache")
        else:
            fix = f"; fix: {v['fix']}" if v["fix"] else ""
            out.append(f"{v['engine']}: no: {v['why']}{fix}")
    return out
