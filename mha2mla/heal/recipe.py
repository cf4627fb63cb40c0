"""Healing recipes: the settings of one `mha2mla heal` run, loaded from YAML and validated up front.

A recipe is a flat YAML mapping whose keys are the fields of :class:`HealRecipe`. Unknown keys and out-of-range
values are errors whose message names the key and the value. Values given on the command line (or as keyword
arguments to :func:`mha2mla.heal.loop.heal`) override the recipe's.

>>> r = load_recipe(None, lr=3e-4, max_steps=10)
>>> r.lr, r.max_steps
(0.0003, 10)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from mha2mla.errors import Mha2mlaError

__all__ = ["HealRecipe", "load_recipe", "lr_factor"]

# Keys that may differ between a run and its --resume (they change neither the data order nor the losses so far).
# The memory settings change how the same losses are computed (up to float rounding), not what is computed.
RESUMABLE_CHANGES = frozenset({"max_steps", "save_every", "keep_checkpoints", "keep_checkpoints_at_end", "log_every",
                               "gradient_checkpointing", "attn_implementation", "loss_chunk_tokens"})


@dataclass(frozen=True)
class HealRecipe:
    """Settings of a healing run. Steps count optimizer updates; one step sees
    ``micro_batch_size × gradient_accumulation_steps × processes × seq_len`` tokens."""

    # data
    data: str | None = None  # text/JSONL file, directory, or hf:DATASET (the --data flag overrides it)
    text_field: str = "text"
    max_docs: int | None = None  # stop reading documents after this many
    max_data_tokens: int | None = None  # cap on the tokens kept from the data
    seq_len: int = 1024
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    seed: int = 0
    # what is trained, and on what loss
    train: str = "all"  # all | attention
    teacher: str | None = None  # HF causal-LM dir for distillation (the --teacher flag overrides it)
    distill_alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * T² * KL(teacher || student)
    distill_temperature: float = 1.0
    # optimizer (AdamW) and learning-rate schedule
    lr: float = 1e-5  # a calibrated conversion is close to its source: 1e-4 made a short heal worse (RESULTS.md)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only, never to norms and biases
    max_grad_norm: float = 1.0  # 0 turns clipping off
    schedule: str = "cosine"  # constant | cosine | linear | wsd (warmup, stable, then 1-sqrt decay)
    warmup_steps: int = 0
    decay_steps: int = 0  # wsd only: length of the final decay
    min_lr_ratio: float = 0.0
    # the latent RMSNorm made linear by the converter (see mha2mla/heal_ops.py)
    latent_rescale: bool = True  # train the tiny latent rows at a normal scale (exact reparametrisation)
    freeze_latent_norm: bool = False  # keep kv_a_layernorm.weight fixed
    # a tied source's embedding and head (written twice by the converter) trained as one table; both are saved
    tie_embeddings: bool = True
    # precision and memory
    dtype: str = "float32"  # weights and optimizer state: float32 | bfloat16
    mixed_precision: str = "no"  # no | bf16 (fp16 underflows the latent of converted checkpoints)
    # auto: on when the activations kept for the backward would outweigh the weights, gradients and AdamW state
    gradient_checkpointing: bool | str = "auto"  # auto | true | false
    attn_implementation: str = "auto"  # auto (sdpa where the model supports it) | sdpa | eager
    loss_chunk_tokens: int = 0  # positions per chunk of the fused output projection + loss; 0 = auto (~64 MiB logits)
    # checkpoints and logging
    save_every: int = 0  # steps between checkpoints in OUTPUT/checkpoints; 0 = none
    keep_checkpoints: int = 2
    keep_checkpoints_at_end: bool = False  # keep OUTPUT/checkpoints in the final directory (to extend with --resume)
    log_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_len


_CHOICES = {
    "train": ("all", "attention"),
    "schedule": ("constant", "cosine", "linear", "wsd"),
    "dtype": ("float32", "bfloat16"),
    "mixed_precision": ("no", "bf16"),
    "attn_implementation": ("auto", "sdpa", "eager"),
}
# key: (minimum, maximum, minimum inclusive)
_RANGES = {
    "max_docs": (1, None, True),
    "max_data_tokens": (1, None, True),
    "seq_len": (2, None, True),
    "micro_batch_size": (1, None, True),
    "gradient_accumulation_steps": (1, None, True),
    "max_steps": (0, None, True),
    "seed": (0, None, True),
    "distill_alpha": (0.0, 1.0, True),
    "distill_temperature": (0.0, None, False),
    "lr": (0.0, 1.0, False),
    "adam_beta1": (0.0, 1.0, True),
    "adam_beta2": (0.0, 1.0, True),
    "adam_eps": (0.0, 1.0, False),
    "weight_decay": (0.0, 1.0, True),
    "max_grad_norm": (0.0, None, True),
    "warmup_steps": (0, None, True),
    "decay_steps": (0, None, True),
    "min_lr_ratio": (0.0, 1.0, True),
    "save_every": (0, None, True),
    "keep_checkpoints": (1, None, True),
    "log_every": (1, None, True),
    "loss_chunk_tokens": (0, None, True),
}
_FIELDS = {f.name: f for f in fields(HealRecipe)}


def _check_value(key: str, value: Any, where: str) -> Any:
    kind = _FIELDS[key].type.replace(" | None", "")
    optional = "None" in _FIELDS[key].type
    if value is None:
        if optional:
            return None
        raise Mha2mlaError(f"{where}: {key} must be set, got null")
    if kind == "bool | str":  # a switch that may also be left to the run: auto | true | false
        if not isinstance(value, bool) and value != "auto":
            raise Mha2mlaError(f"{where}: {key} must be auto, true or false, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise Mha2mlaError(f"{where}: {key} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise Mha2mlaError(f"{where}: {key} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Mha2mlaError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise Mha2mlaError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise Mha2mlaError(f"{where}: {key} must be one of {', '.join(_CHOICES[key])}; got {value!r}")
    if key in _RANGES:
        lo, hi, lo_incl = _RANGES[key]
        if (lo is not None and (value < lo if lo_incl else value <= lo)) or (hi is not None and value > hi):
            bound = f"{'≥' if lo_incl else '>'} {lo}" + (f" and ≤ {hi}" if hi is not None else "")
            raise Mha2mlaError(f"{where}: {key} must be {bound}, got {value!r}")
    return value


def _unknown_key(key: str, where: str) -> Mha2mlaError:
    close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_FIELDS)}"
    return Mha2mlaError(f"{where}: unknown key {key!r}{hint}")


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise Mha2mlaError(f"recipe {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise Mha2mlaError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise Mha2mlaError(f"recipe {path}: must be a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def load_recipe(recipe: str | os.PathLike | dict | HealRecipe | None = None, **overrides: Any) -> HealRecipe:
    """Build a validated :class:`HealRecipe`.

    Args:
        recipe: a YAML path, a mapping, a ready :class:`HealRecipe`, or None for the defaults.
        **overrides: recipe keys that replace the recipe's values; None values are ignored (an unset CLI flag).

    Raises:
        Mha2mlaError: unknown key, wrong type, value out of range, or inconsistent values; the message names them.
    """
    if isinstance(recipe, HealRecipe):
        values, where = recipe.to_dict(), "recipe"
    elif isinstance(recipe, dict):
        values, where = dict(recipe), "recipe"
    elif recipe is None:
        values, where = {}, "recipe"
    else:
        where = f"recipe {os.fspath(recipe)}"
        values = _read_yaml(os.fspath(recipe))
    for key in values:
        if key not in _FIELDS:
            raise _unknown_key(key, where)
    checked = {k: _check_value(k, v, where) for k, v in values.items()}
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise _unknown_key(key, "override")
        if value is not None:
            checked[key] = _check_value(key, value, "override")
    r = HealRecipe(**checked)
    if r.schedule == "wsd" and r.decay_steps == 0:
        raise Mha2mlaError("recipe: schedule 'wsd' needs decay_steps > 0 (the length of the final decay), got 0")
    return r


def lr_factor(recipe: HealRecipe, step: int) -> float:
    """Multiplier of ``recipe.lr`` for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warm, total, floor = recipe.warmup_steps, max(recipe.max_steps, 1), recipe.min_lr_ratio
    if step < warm:
        return (step + 1) / warm
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "wsd":
        start = max(total - recipe.decay_steps, warm)
        if step < start:
            return 1.0
        t = min((step - start) / max(total - start, 1), 1.0)
        return floor + (1.0 - floor) * (1.0 - math.sqrt(t))
    t = min((step - warm) / max(total - warm, 1), 1.0)
    if recipe.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - t)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
