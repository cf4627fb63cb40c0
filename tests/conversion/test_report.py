"""``--report`` (:mod:`mha2mla.conversion.report`): a PNG of the error per layer and the energy kept vs rank."""

from __future__ import annotations

from mha2mla.conversion.latent import LayerStats
from mha2mla.conversion.report import REPORT_NAME, write_report


def test_report_is_a_png_in_the_output_directory(tmp_path):
    stats = [LayerStats(k_rel_error=0.1 * i, v_rel_error=0.2, energy_kept=0.9, rope_energy_kept=0.8, latent_scale=1e-3,
                        singular_values=[4.0, 2.0, 1.0, 0.5], output_rel_error=0.3 if i else None,
                        output_fit_rel_error=0.1) for i in range(3)]
    path = write_report(str(tmp_path), stats=stats, rank=2)
    assert path == str(tmp_path / REPORT_NAME) == str(tmp_path / "mha2mla-report.png")
    data = (tmp_path / REPORT_NAME).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_NAME]
