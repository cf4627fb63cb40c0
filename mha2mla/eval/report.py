"""Rows, Markdown table and recovery plot of an :func:`mha2mla.eval.compare.evaluate` result."""

from __future__ import annotations

from mha2mla.errors import Mha2mlaError

__all__ = ["recovery", "render_markdown", "plot_recovery"]


def recovery(source: float | None, converted: float | None, *, higher_is_better: bool) -> float | None:
    """Recovery %: ``converted/source*100`` if higher is better, else ``source/converted*100``.

    ``None`` when a value is missing or the denominator is 0.
    """
    num, den = (converted, source) if higher_is_better else (source, converted)
    if num is None or not den:
        return None
    return num / den * 100.0


def make_row(kind: str, task: str, metric: str, values: dict, *, higher_is_better: bool | None,
             lm_eval_task: str | None = None, stderr: dict | None = None) -> dict:
    """One table row: ``values`` and ``stderr`` map ``"source"`` / ``"converted"`` to numbers."""
    src, conv = values.get("source"), values.get("converted")
    return {
        "kind": kind, "task": task, "lm_eval_task": lm_eval_task, "metric": metric,
        "higher_is_better": higher_is_better,
        "source": src, "converted": conv,
        "source_stderr": (stderr or {}).get("source"), "converted_stderr": (stderr or {}).get("converted"),
        "delta": conv - src if src is not None and conv is not None else None,
        "recovery": recovery(src, conv, higher_is_better=higher_is_better) if higher_is_better is not None else None,
    }


def _fmt(v, *, metric: str = "", signed: bool = False) -> str:
    if v is None:
        return "—"
    if "bytes" in metric:
        return f"{v / 2**20:+,.2f} MiB" if signed else f"{v / 2**20:,.2f} MiB"
    if isinstance(v, int):
        return f"{v:+,d}" if signed else f"{v:,d}"
    if abs(v) >= 100:
        return f"{v:+,.2f}" if signed else f"{v:,.2f}"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def render_markdown(result: dict) -> str:
    """The result as one Markdown table.

    With a baseline: ``task | metric | source | converted | Δ | recovery %``; without: ``task | metric | model``.
    A task resolved to another lm-eval name shows both, e.g. ``arc_easy (arc_easy_local)``.
    """
    has_source = "source" in result["models"]
    head = ["task", "metric", "source", "converted", "Δ", "recovery %"] if has_source else ["task", "metric", "model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in result["rows"]:
        task = r["task"]
        if r["lm_eval_task"] and r["lm_eval_task"] != task:
            task = f"{task} ({r['lm_eval_task']})"
        cells = [task, r["metric"]]
        if has_source:
            rec = "—" if r["recovery"] is None else f"{r['recovery']:.1f}"
            cells += [_fmt(r["source"], metric=r["metric"]), _fmt(r["converted"], metric=r["metric"]),
                      _fmt(r["delta"], metric=r["metric"], signed=True), rec]
        else:
            cells.append(_fmt(r["converted"], metric=r["metric"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_recovery(result: dict, path: str) -> str:
    """Bar chart of recovery % per task metric and perplexity (100 % = as good as the source), saved to ``path``.

    Raises:
        Mha2mlaError: no baseline in ``result``, nothing to plot, or matplotlib missing.
    """
    if "source" not in result["models"]:
        raise Mha2mlaError("a recovery plot needs a baseline; pass --baseline SOURCE")
    rows = [r for r in result["rows"] if r["recovery"] is not None]
    if not rows:
        raise Mha2mlaError("nothing to plot: no metric has a recovery value")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Mha2mlaError("plotting needs matplotlib: pip install matplotlib") from None

    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    values = [r["recovery"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    bars = ax.bar(range(len(rows)), values, color=["tab:blue" if r["kind"] == "task" else "tab:orange" for r in rows])
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("recovery % of source")
    ax.set_title(f"{result['models']['converted']['path']} vs {result['models']['source']['path']}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise Mha2mlaError(f"cannot write plot {path!r} ({e.strerror})") from None
    finally:
        plt.close(fig)
    return path
