"""``--report``: a PNG that helps pick a rank — error per layer and singular-value energy kept vs rank."""

from __future__ import annotations

import os

from mha2mla.conversion.latent import LayerStats

__all__ = ["write_report", "REPORT_NAME"]

REPORT_NAME = "mha2mla-report.png"


def write_report(directory: str, *, stats: list[LayerStats], rank: int) -> str:
    """Write ``mha2mla-report.png`` into ``directory`` and return its path (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from mha2mla.errors import Mha2mlaError

        raise Mha2mlaError("--report needs matplotlib: pip install matplotlib") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    layers = list(range(len(stats)))
    ax1.plot(layers, [s.k_rel_error for s in stats], "o-", label="keys (no-RoPE part)")
    ax1.plot(layers, [s.v_rel_error for s in stats], "s-", label="values")
    if any(s.output_rel_error is not None for s in stats):
        ax1.plot(layers, [s.output_rel_error or 0 for s in stats], "^-", label="attention output (calibration)")
    if any(s.output_fit_rel_error is not None for s in stats):
        ax1.plot(layers, [s.output_fit_rel_error or 0 for s in stats], "v-", label="attention output after value fit")
    ax1.set(xlabel="layer", ylabel="relative error", title=f"Error per layer at rank {rank}")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for i, s in enumerate(stats):
        sv = [x * x for x in s.singular_values]
        total = sum(sv) or 1.0
        acc, curve = 0.0, []
        for x in sv:
            acc += x
            curve.append(acc / total)
        ax2.plot(range(1, len(curve) + 1), curve, color=plt.cm.viridis(i / max(len(stats) - 1, 1)), lw=0.8)
    ax2.axvline(rank, color="k", ls="--", lw=1, label=f"--rank {rank}")
    ax2.set(xlabel="rank", ylabel="energy kept", title="Singular-value energy vs rank (one line per layer)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, REPORT_NAME)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
