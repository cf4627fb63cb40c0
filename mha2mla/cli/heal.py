"""``mha2mla heal``: the CLI wrapper around :func:`mha2mla.heal.loop.heal`.

Flags override the recipe; ``--set KEY=VALUE`` overrides any other recipe key (the value is read as YAML).
"""

from __future__ import annotations

import logging

import click

from mha2mla.cli.common import user_errors
from mha2mla.errors import Mha2mlaError


def _parse_sets(sets: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Mha2mlaError(f"--set {item!r}: expected KEY=VALUE, e.g. --set warmup_steps=100")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise Mha2mlaError(f"--set {item!r}: {value!r} is not a valid YAML value") from None
    return out


@click.command("heal")
@click.argument("model_dir")
@click.option("--output", "-o", required=True, help="Healed checkpoint directory (checkpoints go to OUTPUT/checkpoints).")
@click.option("--data", default=None, help="Training text: .txt/.jsonl file, directory, or hf:DATASET (default: the recipe's).")
@click.option("--recipe", default=None, help="YAML recipe, e.g. recipes/smollm2-135m-cpu.yaml (default: built-in defaults).")
@click.option("--teacher", default=None, help="Distil from this causal-LM directory (same tokenizer), e.g. the source model.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--seq-len", type=int, default=None, help="Tokens per training sequence.")
@click.option("--micro-batch-size", type=int, default=None, help="Sequences per device per forward pass.")
@click.option("--grad-accum", "gradient_accumulation_steps", type=int, default=None, help="Gradient accumulation steps.")
@click.option("--train", type=click.Choice(["all", "attention"]), default=None, help="Parameters to train.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16"]), default=None, help="Autocast precision.")
@click.option("--save-every", type=int, default=None, help="Steps between resumable checkpoints (0: none).")
@click.option("--seed", type=int, default=None, help="Seed of the data order.")
@click.option("--text-field", default=None, help="JSONL key / dataset column with the text.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe key (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUTPUT/checkpoints.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--quiet", "-q", is_flag=True, help="Log warnings only.")
@user_errors
def heal_command(model_dir, output, data, recipe, teacher, max_steps, sets, resume, force, quiet, **flags):
    """Fine-tune the converted checkpoint MODEL_DIR (cross-entropy, or distillation with --teacher)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines
    overrides = _parse_sets(sets)
    given = {**{k: v for k, v in flags.items() if v is not None},
             **{k: v for k, v in (("data", data), ("teacher", teacher), ("max_steps", max_steps)) if v is not None}}
    both = sorted(set(given) & set(overrides))
    if both:  # one would silently mask the other
        k = both[0]
        flag = "--grad-accum" if k == "gradient_accumulation_steps" else "--" + k.replace("_", "-")
        raise Mha2mlaError(f"--set {k}={overrides[k]!r} and {flag} both set {k}; give it once")
    overrides.update(given)
    data, teacher, max_steps = (overrides.pop(k, None) for k in ("data", "teacher", "max_steps"))
    from accelerate import PartialState

    from mha2mla.heal.loop import heal

    rec = heal(model=model_dir, output=output, data=data, recipe=recipe, teacher=teacher, max_steps=max_steps,
               resume=resume, force=force, **overrides)
    if not PartialState().is_main_process:
        return
    first, last = (rec["losses"][0], rec["losses"][-1]) if rec["losses"] else (float("nan"), float("nan"))
    click.echo(f"wrote {output}: {rec['steps']} steps, {rec['tokens']:,} tokens, loss {first:.4f} -> {last:.4f} "
               f"(converted model at step 0: {rec['step0']['converted_loss']:.4f})")
