"""``mha2mla eval``: compare a converted model with its source on lm-eval tasks, perplexity and KV size."""

from __future__ import annotations

import json
import logging
import os

import click

from mha2mla.cli.common import user_errors
from mha2mla.errors import Mha2mlaError


class _ClickHandler(logging.Handler):
    """Log lines to the current stderr (looked up at each record, so it follows CliRunner's streams)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("mha2mla")
    if not any(isinstance(h, _ClickHandler) for h in logger.handlers):
        logger.addHandler(_ClickHandler())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise Mha2mlaError(f"--batch-size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise Mha2mlaError(f"--batch-size must be a positive integer or 'auto', got {value!r}")
    return n


@click.command("eval")
@click.argument("model")
@click.option("--baseline", metavar="SOURCE", help="Source model to compare with (HF directory or hub id).")
@click.option("--tasks", default=",".join(("arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai")),
              show_default=True, help="Comma-separated lm-eval tasks; NAME falls back to NAME_local. Empty: none.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N documents of each task.")
@click.option("--include-path", "include_path", metavar="TASKDIR", help="Directory of extra lm-eval task YAMLs.")
@click.option("--ppl-data", metavar="TEXT", help="Text for perplexity: .txt/.jsonl file, directory or hf:DATASET.")
@click.option("--ppl-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Perplexity over the first N tokens.")
@click.option("--ppl-ctx", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Perplexity window (non-overlapping).")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples (default: each task's own).")
@click.option("--batch-size", default="8", show_default=True, help="Batch size: an integer or 'auto'.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default="float32",
              show_default=True, help="Weights dtype for evaluation (auto: the checkpoint's).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, mps; auto: cuda if available.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="Write every number and setting as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Save a recovery bar chart (PNG) here; needs --baseline.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Result cache [default: $MHA2MLA_CACHE/eval or ~/.cache/mha2mla/eval].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write cached results.")
@click.option("--long-context", is_flag=True,
              help="Also perplexity by position (0-512 ... 4k-8k) on long windows of --ppl-data and passkey retrieval.")
@click.option("--long-context-max", type=click.IntRange(min=1024), default=8192, show_default=True,
              help="Longest window / passkey prompt (capped at the model's max_position_embeddings).")
@click.option("--long-context-windows", type=click.IntRange(min=1), default=2, show_default=True,
              help="Windows for the perplexity by position.")
@click.option("--passkey-trials", type=click.IntRange(min=1), default=10, show_default=True,
              help="Passkey prompts per length (1k, 2k, 4k, 8k).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@user_errors
def eval_command(model, baseline, tasks, limit, include_path, ppl_data, ppl_tokens, ppl_ctx, num_fewshot, batch_size,
                 dtype, device, seed, output, plot, cache_dir, no_cache, long_context, long_context_max,
                 long_context_windows, passkey_trials, quiet):
    """Evaluate MODEL (and --baseline SOURCE with the same settings) and print one Markdown table.

    The table gives, per task metric, source / converted / Δ / recovery % (converted/source for
    accuracy, source/converted for perplexity), then perplexity and bits per byte on --ppl-data,
    then KV-cache values per token per layer and bytes at 4k context. Results are cached, so the
    baseline is only evaluated once per settings. --long-context adds perplexity by position
    inside long windows (and its ratio to the baseline) and passkey retrieval at 1k-8k.

    \b
    Example:
      mha2mla eval out/smollm2-mla --baseline HuggingFaceTB/SmolLM2-135M \\
          --tasks arc_easy,hellaswag --include-path tasks/ --limit 500 \\
          --ppl-data wiki.test.txt --output results.json --plot recovery.png
    """
    from mha2mla.eval.compare import evaluate, plot_recovery, render_markdown

    _setup_logging(quiet)
    if plot and not baseline:
        raise Mha2mlaError("--plot shows recovery against a baseline; pass --baseline SOURCE too")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate(
        model=model, baseline=baseline, tasks=tasks, limit=limit, include_path=include_path, ppl_data=ppl_data,
        ppl_tokens=ppl_tokens, ppl_ctx=ppl_ctx, num_fewshot=num_fewshot, batch_size=_batch_size(batch_size),
        dtype=dtype, device=device, seed=seed, cache_dir=cache_dir, use_cache=not no_cache,
        long_context=long_context, long_context_max=long_context_max, long_context_windows=long_context_windows,
        passkey_trials=passkey_trials,
    )
    if output:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            with open(output, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            raise Mha2mlaError(f"cannot write {output!r} ({e.strerror})") from None
    if plot:
        plot_recovery(result, plot)
    click.echo(render_markdown(result))
    if result.get("long_context"):
        from mha2mla.eval.long_context import render_long_context

        click.echo("")
        click.echo(render_long_context(result["long_context"]))
    if output:
        click.echo(f"wrote {output}", err=True)
