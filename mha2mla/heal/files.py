"""Files of a healing run: resumable checkpoints, and the final checkpoint directory with its record and plot.

Layout::

    OUTPUT/                      the healed model (written to a temporary sibling, then renamed)
      config.json, model.safetensors, tokenizer files, README.md (the source card + a healing section)
      mha2mla.json               the conversion record, with a "heal" record added
      loss.png                   the loss curve
      .heal-data/tokens.bin      the tokenised data (int32, memory-mapped by every process; removed at the end)
      checkpoints/step-N/        resumable state (written to checkpoints/.tmp-step-N, then renamed); removed when
                                 the run ends unless the recipe sets keep_checkpoints_at_end
        model.safetensors        weights in training form (see heal_ops: latent rows divided by the recorded scales)
        optimizer.bin            optimizer state (torch.save; loaded with weights_only=True)
        random_states_*.pkl      RNG states per process (accelerate; loaded with weights_only=True)
        trainer_state.json       step, data position, losses, latent scales, recipe, scheduler state
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from mha2mla.data import load_texts, pack_tokens
from mha2mla.errors import Mha2mlaError

__all__ = [
    "CHECKPOINTS",
    "latest_checkpoint",
    "save_checkpoint",
    "read_trainer_state",
    "write_loss_plot",
    "model_card",
    "finish_output",
    "prepare_tokens",
]

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
DATA_CACHE = ".heal-data"


def prepare_tokens(accelerator, output: str, *, data: str, tokenizer, text_field: str, max_docs: int | None,
                   max_tokens: int | None, chunk_docs: int = 1024) -> torch.Tensor:
    """The data as one 1-D int32 token stream (EOS between documents), tokenised once by the main process.

    The stream is written to ``OUTPUT/.heal-data/tokens.bin`` and memory-mapped by every process, so that a
    multi-process run neither reads the text nor holds the tokens once per process; ``--resume`` reuses it.
    """
    root = os.path.join(output, DATA_CACHE)
    path, meta_path = os.path.join(root, "tokens.bin"), os.path.join(root, "tokens.json")
    meta = {"data": data, "text_field": text_field, "max_docs": max_docs, "max_tokens": max_tokens,
            "vocab": len(tokenizer), "tokenizer": type(tokenizer).__name__}
    if accelerator.is_main_process:
        cached = None
        if os.path.isfile(meta_path) and os.path.isfile(path):
            with open(meta_path, encoding="utf-8") as f:
                cached = json.load(f)
        if cached is None or {k: cached.get(k) for k in meta} != meta:
            texts = load_texts(data, text_field=text_field, max_docs=max_docs, field_option="--text-field")
            parts, left = [], max_tokens
            for i in range(0, len(texts), chunk_docs):  # chunks keep the Python int lists small
                part = pack_tokens(tokenizer, texts[i : i + chunk_docs], max_tokens=left).to(torch.int32)
                parts.append(part)
                if left is not None:
                    left -= part.numel()
                    if left <= 0:
                        break
            tokens = torch.cat(parts)
            os.makedirs(root, exist_ok=True)
            tokens.numpy().tofile(path + ".tmp")
            os.replace(path + ".tmp", path)
            with open(meta_path, "w", encoding="utf-8") as f:
                json.dump({**meta, "n_tokens": tokens.numel()}, f)
    accelerator.wait_for_everyone()
    with open(meta_path, encoding="utf-8") as f:
        n = json.load(f)["n_tokens"]
    return torch.from_file(path, shared=False, size=n, dtype=torch.int32)


def _checkpoint_dirs(output: str) -> list[tuple[int, str]]:
    root = os.path.join(output, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output: str) -> str | None:
    """The complete checkpoint with the highest step under ``OUTPUT/checkpoints`` (temporary dirs are ignored)."""
    dirs = _checkpoint_dirs(output)
    return dirs[-1][1] if dirs else None


def read_trainer_state(path: str) -> dict:
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise Mha2mlaError(f"checkpoint {path}: cannot read {TRAINER_STATE} ({e})") from None


def save_checkpoint(accelerator, output: str, step: int, state: dict, *, keep: int) -> str:
    """Save resumable state atomically as ``OUTPUT/checkpoints/step-N``; keep the newest ``keep`` checkpoints.

    Every process must call this (sharded models save collectively).
    """
    root = os.path.join(output, CHECKPOINTS)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in _checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_loss_plot(path: str, losses: list[float], *, title: str, step0_reference: float | None = None) -> bool:
    """Loss per optimizer step as a PNG (matplotlib's Agg canvas, imported lazily). Returns False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(losses)), losses, lw=1.2, label="training loss")
    if step0_reference is not None:
        ax.axhline(step0_reference, color="grey", ls="--", lw=0.8, label="converted model, step-0 batch")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def model_card(source_card: str | None, record: dict) -> str:
    """The source model card with a healing section appended."""
    card = source_card.rstrip() + "\n\n" if source_card else "# Healed MLA checkpoint\n\n"
    r = record
    teacher = f", distilled from `{r['teacher']}` (alpha {r['recipe']['distill_alpha']})" if r.get("teacher") else ""
    first, last = (r["losses"][0], r["losses"][-1]) if r["losses"] else (float("nan"), float("nan"))
    card += (
        "## Healing\n\n"
        f"Fine-tuned with `mha2mla heal` for {r['steps']} steps ({r['tokens']:,} tokens) on `{r['data']}`{teacher}; "
        f"trained parameters: {r['recipe']['train']}. Training loss {first:.4f} → {last:.4f}. "
        "The full record (recipe, losses) is the `heal` entry of `mha2mla.json`; the curve is `loss.png`.\n"
    )
    return card


def finish_output(output: str, write_into, *, keep_checkpoints: bool) -> None:
    """Write the final directory next to ``output`` via ``write_into(tmp)``, move ``OUTPUT/checkpoints`` into it if
    ``keep_checkpoints``, and rename it to ``output`` (replacing the directory the run used for its checkpoints)."""
    parent, name = os.path.split(os.path.abspath(output))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_into(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpts = os.path.join(output, CHECKPOINTS)
    if keep_checkpoints and os.path.isdir(ckpts):
        os.replace(ckpts, os.path.join(tmp, CHECKPOINTS))
    old = None
    if os.path.exists(output):  # two renames, then the slow delete: a kill leaves a complete directory behind
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
