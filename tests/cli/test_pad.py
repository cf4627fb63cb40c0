"""``mha2mla pad`` (:mod:`mha2mla.cli.pad`) on a conversion: exact, and warned when the padded cache is larger than
the source's."""

from __future__ import annotations

from click.testing import CliRunner

import mha2mla
from mha2mla.cli import main
from tests.conftest import logits, token_ids


def test_pad_cli_on_a_conversion_warns_about_a_larger_cache(tiny_source, tmp_path):
    src = tiny_source(n_kv=1, head_dim=16)  # source cache 2·1·16 = 32 values per token per layer
    conv = tmp_path / "mla"
    mha2mla.convert(source=src, output=str(conv), rank=12, rope_dim=8, progress=False)
    result = CliRunner().invoke(main, ["pad", str(conv), "--output", str(tmp_path / "served")])
    assert result.exit_code == 0, result.output
    assert "12+8 (nope 16, v 16) -> 512+64 (nope 128, v 128)" in result.output
    assert "warning: the padded cache (576 values per token per layer) is larger than the source model's own (32)" \
        in result.output
    assert "vLLM (CPU): yes, compressed cache" in result.output
    card = (tmp_path / "served" / "README.md").read_text()
    assert "larger than the source model's own" in card and "vllm serve" in card
    assert (tmp_path / "served" / "tokenizer.json").exists()
    ids = token_ids(vocab=97, length=40, low=0)
    diff = (logits(str(conv), ids) - logits(str(tmp_path / "served"), ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| {diff}"
