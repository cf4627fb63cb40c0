"""Evaluate a (converted) model against its source: lm-eval tasks, perplexity, KV-cache size.

Both models are run with the same settings. Each (model, task, settings) result and each
(model, text, settings) perplexity is cached as JSON, keyed by the model directory's path, the
size/mtime of its weight and tokenizer files and a hash of its ``config.json``, so evaluating the
same baseline again is free. The cache lives in ``cache_dir``, else ``$MHA2MLA_CACHE/eval``, else
``~/.cache/mha2mla/eval``.

Recovery % is ``converted / source * 100`` for higher-is-better metrics (accuracy) and
``source / converted * 100`` for lower-is-better ones (perplexity, bits per byte).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Sequence
from importlib import metadata

from mha2mla.data import load_texts
from mha2mla.loading import check_device, load_tokenizer, quiet_loading
from mha2mla.errors import Mha2mlaError
from mha2mla.eval.report import make_row, plot_recovery, render_markdown
from mha2mla.eval.tasks import dir_stamp, finite, first_line, resolve_tasks, run_lm_eval, sha, task_entry, task_stamp
from mha2mla.serve.kvcache import kv_cache_bytes, kv_values_per_token_per_layer

__all__ = ["DEFAULT_TASKS", "default_cache_dir", "evaluate", "load_model", "model_fingerprint", "plot_recovery",
           "render_markdown"]

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai")
DTYPES = ("float32", "bfloat16", "float16", "auto")
KV_CONTEXT = 4096
_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.index.json", "*.gguf",
                "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "*.tiktoken")
_HASHED = ("config.json", "*.index.json")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def default_cache_dir() -> str:
    """``$MHA2MLA_CACHE/eval`` if set, else ``~/.cache/mha2mla/eval``."""
    root = os.environ.get("MHA2MLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mha2mla")
    return os.path.join(root, "eval")


def model_fingerprint(path: str) -> dict:
    """What identifies a model for caching: its real path and a stamp of its weight/config/tokenizer files.

    Hub ids (not a local directory) are identified by the id alone.
    """
    if os.path.isdir(path):
        return {"path": os.path.realpath(path), "files": dir_stamp(path, _MODEL_FILES, _HASHED)}
    return {"path": path}


class _Cache:
    """One JSON file per key (a dict), named by the key's hash."""

    def __init__(self, directory: str | None):
        self.dir = directory
        self.hits = self.misses = 0

    def _file(self, key: dict) -> str:
        return os.path.join(self.dir, sha(json.dumps(key, sort_keys=True))[:32] + ".json")

    def get(self, key: dict):
        if self.dir is not None:
            try:
                with open(self._file(key), encoding="utf-8") as f:
                    entry = json.load(f)
                if entry.get("key") == key:
                    self.hits += 1
                    return entry["value"]
            except (OSError, ValueError, KeyError):
                pass
        self.misses += 1
        return None

    def put(self, key: dict, value) -> None:
        if self.dir is None:
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
            path = self._file(key)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"key": key, "value": value}, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.warning("could not write the eval cache in %s (%s); results are not cached", self.dir, e.strerror)


# --- models ----------------------------------------------------------------------------------------


def _check_model_path(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise Mha2mlaError(f"model {path!r} is not a directory; give a Hugging Face model directory or hub id")


def _load_config(path: str):
    from transformers import AutoConfig

    _check_model_path(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise Mha2mlaError(f"cannot load model {path!r}: {first_line(e)}") from None


def load_model(path: str, *, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        with quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False,
                                                               output_loading_info=True)
    except Exception as e:
        raise Mha2mlaError(f"cannot load model {path!r} as a causal LM: {first_line(e)}") from None
    # transformers fills a missing weight randomly and drops an unexpected one: scoring that would be meaningless.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        bad = sorted(map(str, info.get(kind) or ()))
        if bad:
            raise Mha2mlaError(f"model {path!r} does not load cleanly: {len(bad)} {kind.replace('_', ' ')}, e.g. "
                               f"{bad[0]!r}; the checkpoint is incomplete or does not match its config.json")
    tokenizer = load_tokenizer(path, what="model", vocab_size=int(model.get_input_embeddings().weight.shape[0]))
    return model.to(device).eval(), tokenizer


def _kv_info(config) -> dict:
    values = kv_values_per_token_per_layer(config)
    return {
        "values_per_token_per_layer": values,
        "layers": int(config.num_hidden_layers),
        "context": KV_CONTEXT,
        "bytes": kv_cache_bytes(config, context=KV_CONTEXT, bytes_per_value=2),
        "bytes_per_value": 2,
    }


# --- the evaluation --------------------------------------------------------------------------------


def _evaluate_one(path: str, *, tasks: list[str], tm, texts, ppl_spec, settings: dict, cache: _Cache) -> dict:
    """Task entries and perplexity of one model, from the cache where possible (loading the model otherwise)."""
    from mha2mla.eval.perplexity import perplexity

    fp = model_fingerprint(path)
    versions = {k: settings["versions"][k] for k in ("lm_eval", "transformers")}
    run = {k: settings[k] for k in ("limit", "num_fewshot", "seed", "dtype", "device")}
    task_keys = {
        t: {"kind": "task", "model": fp, "task": t, "task_files": task_stamp(task_manager=tm, name=t), **run,
            "versions": versions}
        for t in tasks
    }
    out = {"tasks": {t: cache.get(k) for t, k in task_keys.items()}, "perplexity": None}
    lc_key = None
    if settings.get("long_context"):
        lc_key = {"kind": "long_context", "model": fp, "text": sha("\x1e".join(texts)) if texts is not None else None,
                  "method": 1, "versions": versions,
                  **{k: settings[k] for k in ("long_context_max", "long_context_windows", "passkey_trials", "seed",
                                              "dtype", "device")}}
        out["long_context"] = cache.get(lc_key)
    ppl_key = None
    if texts is not None:
        ppl_key = {"kind": "perplexity", "model": fp, "text": sha("\x1e".join(texts)), "method": 1,
                   "versions": versions, **{k: settings[k] for k in ("ppl_tokens", "ppl_ctx", "dtype", "device")}}
        out["perplexity"] = cache.get(ppl_key)
    pending = [t for t, v in out["tasks"].items() if v is None]
    if not pending and (texts is None or out["perplexity"] is not None) and out.get("long_context", True) is not None:
        log.info("%s: all results cached", path)
        return out

    log.info("loading %s (%s on %s) ...", path, settings["dtype"], settings["device"])
    model, tokenizer = load_model(path, dtype=settings["dtype"], device=settings["device"])
    try:
        if texts is not None and out["perplexity"] is None:
            log.info("%s: perplexity on %s (%d tokens, ctx %d) ...", path, ppl_spec, settings["ppl_tokens"],
                     settings["ppl_ctx"])
            res = perplexity(
                model=model, tokenizer=tokenizer, text=texts, ctx=settings["ppl_ctx"],
                max_tokens=settings["ppl_tokens"],
                batch_size=settings["batch_size"] if isinstance(settings["batch_size"], int) else 1,
                device=settings["device"],
            )
            out["perplexity"] = {k: (finite(v) if isinstance(v, float) else v) for k, v in res.to_dict().items()}
            cache.put(ppl_key, out["perplexity"])
        if lc_key is not None and out["long_context"] is None:
            from mha2mla.eval.long_context import evaluate_long_context

            out["long_context"] = evaluate_long_context(model=model, tokenizer=tokenizer, texts=texts,
                                                        max_len=settings["long_context_max"],
                                                        windows=settings["long_context_windows"],
                                                        trials=settings["passkey_trials"], seed=settings["seed"],
                                                        log=lambda line: log.info("%s: %s", path, line))
            cache.put(lc_key, out["long_context"])
        if pending:
            log.info("%s: lm-eval on %s ...", path, ", ".join(pending))
            raw = run_lm_eval(
                model=model, tokenizer=tokenizer, tasks=pending, task_manager=tm, limit=settings["limit"],
                num_fewshot=settings["num_fewshot"], batch_size=settings["batch_size"], seed=settings["seed"],
            )
            for t in pending:
                out["tasks"][t] = task_entry(raw=raw, task=t)
                if not out["tasks"][t]["metrics"]:
                    raise Mha2mlaError(f"lm-eval gave no numeric metric for task {t!r}; name a group's subtasks")
                cache.put(task_keys[t], out["tasks"][t])
    finally:
        del model
        gc.collect()
    return out


def _rows(tasks: dict[str, str], per: dict[str, dict], models: dict[str, dict], ppl_label: str | None) -> list[dict]:
    """The table rows: each task metric, then perplexity and bits per byte, then KV-cache size."""
    rows = []
    for req, t in tasks.items():
        for metric, m in per["converted"]["tasks"][t]["metrics"].items():
            vals = {r: (per[r]["tasks"][t]["metrics"].get(metric) or {}) for r in per}
            rows.append(make_row("task", req, metric, {r: v.get("value") for r, v in vals.items()},
                                 higher_is_better=m["higher_is_better"], lm_eval_task=t,
                                 stderr={r: v.get("stderr") for r, v in vals.items()}))
    if ppl_label is not None:
        for metric in ("ppl", "bits_per_byte"):
            values = {r: per[r]["perplexity"][metric] for r in per}
            rows.append(make_row("perplexity", ppl_label, metric, values, higher_is_better=False))
    kv_metrics = (("KV values/token/layer", "values_per_token_per_layer"),
                  (f"KV bytes @{KV_CONTEXT // 1024}k ctx", "bytes"))
    for metric, key in kv_metrics:
        values = {r: models[r]["kv"][key] for r in models}
        rows.append(make_row("kv", "KV cache", metric, values, higher_is_better=None))
    return rows


def evaluate(
    *,
    model: str,
    baseline: str | None = None,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    include_path: str | None = None,
    ppl_data: str | None = None,
    ppl_tokens: int = 16384,
    ppl_ctx: int = 1024,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 1234,
    cache_dir: str | None = None,
    use_cache: bool = True,
    long_context: bool = False,
    long_context_max: int = 8192,
    long_context_windows: int = 2,
    passkey_trials: int = 10,
) -> dict:
    """Evaluate ``model`` (and ``baseline`` with the same settings) on lm-eval tasks, perplexity and KV size.

    Args:
        model: the model to evaluate (usually the converted one): an HF directory or hub id.
        baseline: the source model to compare with, or ``None`` for ``model`` alone.
        tasks: lm-eval task names, a list or one comma-separated string; ``NAME`` falls back to
            ``NAME_local`` and tasks in ``include_path`` win over built-in ones. Empty: no tasks.
        limit: evaluate only the first ``limit`` documents of each task.
        include_path: a directory of extra lm-eval task YAMLs.
        ppl_data: text for perplexity (a .txt/.jsonl file, directory or ``hf:DATASET``); ``None``: skip.
        ppl_tokens: perplexity over the first this many tokens.
        ppl_ctx: perplexity window length (non-overlapping windows, see :mod:`mha2mla.eval.perplexity`).
        num_fewshot: few-shot examples per task (``None``: each task's default, mostly 0).
        batch_size: lm-eval batch size (an int or ``"auto"``); also the perplexity batch size.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's).
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
        seed: seed for lm-eval's sampling (few-shot examples).
        cache_dir: where results are cached (default: see :func:`default_cache_dir`).
        use_cache: read and write the cache.
        long_context: also measure perplexity by position on windows of ``min(max_position_embeddings,
            long_context_max)`` tokens of ``ppl_data`` and passkey retrieval up to that length
            (:func:`mha2mla.eval.long_context.evaluate_long_context`).
        long_context_max: longest window / passkey prompt in tokens.
        long_context_windows: windows for the perplexity by position.
        passkey_trials: passkey prompts per length.

    Returns:
        A JSON-ready dict: ``settings``, ``models`` (path, fingerprint, KV sizes), ``tasks`` (requested
        name -> lm-eval task and per-model metrics), ``perplexity``, ``rows`` (what the table shows:
        source, converted, delta, recovery per metric), ``long_context`` (per model, with ``long_context``) and
        ``cache`` (hits, misses).

    Raises:
        Mha2mlaError: an unknown task, missing include path or data, a model that does not load, bad settings.
    """
    import torch

    task_list = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if limit is not None and limit < 1:
        raise Mha2mlaError(f"limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise Mha2mlaError(f"num_fewshot must be 0 or more, got {num_fewshot}")
    if ppl_tokens < 2 or ppl_ctx < 2:
        raise Mha2mlaError(f"perplexity tokens and context must be at least 2, got {ppl_tokens=} {ppl_ctx=}")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise Mha2mlaError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    if dtype not in DTYPES:
        raise Mha2mlaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_device(device, kinds=("cpu", "cuda", "mps"))
    if long_context and (long_context_max < 1024 or long_context_windows < 1 or passkey_trials < 1):
        raise Mha2mlaError(f"long context needs a window of at least 1024 tokens, 1+ windows and 1+ passkey trials, "
                           f"got {long_context_max=} {long_context_windows=} {passkey_trials=}")
    if include_path is not None and not os.path.isdir(include_path):
        raise Mha2mlaError(f"include path {include_path!r} is not a directory of lm-eval task YAMLs")

    paths = {**({"source": baseline} if baseline is not None else {}), "converted": model}
    models = {}
    for role, path in paths.items():
        config = _load_config(path)
        models[role] = {"path": path, "fingerprint": model_fingerprint(path), "model_type": config.model_type,
                        "kv": _kv_info(config)}
    texts = load_texts(ppl_data) if ppl_data is not None else None
    mapping, tm = resolve_tasks(names=task_list, include_path=include_path) if task_list else ({}, None)
    for req, t in mapping.items():
        log.info("task %s: using lm-eval task %s", req, t)

    settings = {
        "tasks": task_list, "resolved_tasks": mapping, "limit": limit, "num_fewshot": num_fewshot,
        "include_path": os.path.abspath(include_path) if include_path else None, "ppl_data": ppl_data,
        "ppl_tokens": ppl_tokens, "ppl_ctx": ppl_ctx, "batch_size": batch_size, "dtype": dtype, "device": device,
        "seed": seed, "kv_context": KV_CONTEXT, "long_context": long_context, "long_context_max": long_context_max,
        "long_context_windows": long_context_windows, "passkey_trials": passkey_trials,
        "versions": {p: _version(p) for p in ("mha2mla", "lm_eval", "transformers", "torch")},
    }
    cache = _Cache((cache_dir or default_cache_dir()) if use_cache else None)
    per = {
        role: _evaluate_one(path, tasks=list(dict.fromkeys(mapping.values())), tm=tm, texts=texts, ppl_spec=ppl_data,
                            settings=settings, cache=cache)
        for role, path in paths.items()
    }
    ppl_label = f"ppl: {os.path.basename(os.path.normpath(ppl_data))}" if texts is not None else None
    return {
        "settings": settings,
        "models": models,
        "tasks": {req: {"lm_eval_task": t, **{r: per[r]["tasks"][t] for r in per}} for req, t in mapping.items()},
        "perplexity": {"data": ppl_data, **{r: per[r]["perplexity"] for r in per}} if texts is not None else None,
        "rows": _rows(mapping, per, models, ppl_label),
        "long_context": {r: per[r]["long_context"] for r in per} if long_context else None,
        "cache": {"dir": cache.dir, "hits": cache.hits, "misses": cache.misses},
    }
