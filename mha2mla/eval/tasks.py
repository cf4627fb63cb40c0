"""lm-eval glue: resolve task names, run ``simple_evaluate`` on a loaded model, read its numbers back."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import logging
import math
import os
import sys
from collections.abc import Sequence

from mha2mla.errors import Mha2mlaError

__all__ = ["resolve_tasks", "run_lm_eval", "task_entry", "task_stamp"]

log = logging.getLogger(__name__)


def sha(data: bytes | str) -> str:
    """Hex SHA-256 of bytes or a UTF-8 string."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def dir_stamp(path: str, patterns: Sequence[str], hashed: Sequence[str]) -> str:
    """Hash of name, size and mtime of the files in ``path`` matching ``patterns`` (and the content of ``hashed``)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        st = os.stat(full)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if any(fnmatch.fnmatch(name, p) for p in hashed):
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line errors)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def finite(v) -> float | None:
    """``v`` as a float if it is a finite number, else ``None`` (JSON has no NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def resolve_tasks(*, names: Sequence[str], include_path: str | None = None):
    """Map each requested name to an lm-eval task: ``NAME`` if it exists, else ``NAME_local``.

    Tasks in ``include_path`` win over lm-eval's built-in ones, so with the local YAMLs ``arc_easy``
    resolves to ``arc_easy_local`` (offline) rather than the built-in ``arc_easy`` (needs the hub).
    The built-in index takes seconds to build, so it is only read when the include path lacks a name.

    Args:
        names: requested task names.
        include_path: a directory of extra task YAMLs, or ``None``.

    Returns:
        ``(mapping, task_manager)``: requested name -> lm-eval task name, and the ``TaskManager`` to run them with.

    Raises:
        Mha2mlaError: a name found neither as ``NAME`` nor as ``NAME_local``.
    """
    from lm_eval.tasks import TaskManager

    def first_match(index) -> dict[str, str]:
        return {n: next(c for c in (n, f"{n}_local") if c in index) for n in names if {n, f"{n}_local"} & index}

    local = {}
    if include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        local = first_match(set(tm.all_tasks))
        if len(local) == len(names):
            return local, tm
    log.info("reading the lm-eval task index ...")
    tm = TaskManager(include_path=include_path)
    index = set(tm.all_tasks)
    found = {**first_match(index), **local}
    unknown = [n for n in names if n not in found]
    if unknown:
        n = unknown[0]
        close = difflib.get_close_matches(n, sorted(index), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" or in {include_path}" if include_path else "; pass --include-path DIR for local task YAMLs"
        raise Mha2mlaError(
            f"unknown task {n!r}: neither {n!r} nor {n + '_local'!r} is in the lm-eval task index{where}{hint}"
        )
    return {n: found[n] for n in names}, tm


def task_stamp(*, task_manager, name: str) -> str | None:
    """A cache stamp of a task's definition: its YAML's content plus size/mtime of the files beside it (its data).

    ``None`` for tasks without a YAML file (Python-defined or generated).
    """
    entry = task_manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if path is None or not os.path.isfile(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    return sha(dir_stamp(folder, ("*",), ()) + dir_stamp(folder, (os.path.basename(path),), ("*",)))


def task_entry(*, raw: dict, task: str) -> dict:
    """One task's numbers from ``simple_evaluate``'s output.

    Returns:
        ``{"task", "metrics": {metric: {"value", "stderr", "higher_is_better"}}, "n_samples", "num_fewshot",
        "version"}``; a metric under a filter other than ``none`` is named ``metric,filter``.
    """
    res = raw.get("results", {}).get(task, {})
    hib = raw.get("higher_is_better", {}).get(task, {})
    metrics = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, filt = key.split(",", 1)
        metrics[name if filt == "none" else key] = {
            "value": finite(value),
            "stderr": finite(res.get(f"{name}_stderr,{filt}")),
            "higher_is_better": bool(hib.get(name, True)),
        }
    return {
        "task": task,
        "metrics": metrics,
        "n_samples": raw.get("n-samples", {}).get(task),
        "num_fewshot": raw.get("n-shot", {}).get(task),
        "version": raw.get("versions", {}).get(task),
    }


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval prints to stdout and logs a lot: send stdout to stderr and keep only its errors."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    old_mp = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # bootstrap stderr in-process: no fork of a process holding a model
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if old_mp is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old_mp


def run_lm_eval(
    *, model, tokenizer, tasks: Sequence[str], task_manager, limit: int | None, num_fewshot: int | None,
    batch_size: int | str, seed: int,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an already loaded HF model (wrapped in ``HFLM``).

    Seeds every lm-eval RNG with ``seed``, skips per-sample logs, bootstraps stderrs with 1000 draws
    in-process, and keeps stdout clean (lm-eval's prints go to stderr).

    Returns:
        ``simple_evaluate``'s result dict.

    Raises:
        Mha2mlaError: lm-eval failed (e.g. a task's dataset cannot be downloaded offline).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet_lm_eval():
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=False)
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except Mha2mlaError:
            raise
        except Exception as e:
            raise Mha2mlaError(f"lm-eval failed on {', '.join(tasks)} ({type(e).__name__}: {first_line(e)})") from None
    if raw is None:
        raise Mha2mlaError("lm-eval returned no results (non-zero rank of a distributed run?)")
    return raw
