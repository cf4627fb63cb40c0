"""``mha2mla eval`` (:mod:`mha2mla.cli.eval`): the side-by-side table, JSON, plot and cache; long-context checks;
errors in one line."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

import mha2mla.eval.compare as ev
from mha2mla.cli import main
from mha2mla.conversion.pipeline import convert
from mha2mla.eval.report import render_markdown
from tests.conftest import CORPUS, assert_user_error, direct_perplexity, run_cli


def _eval_args(eval_assets, *extra):
    return ["eval", eval_assets["converted"], "--tasks", "tiny_mc", "--include-path", eval_assets["tasks"], "--limit", "4",
            "--ppl-data", eval_assets["text"], "--ppl-tokens", "70", "--ppl-ctx", "16", "--device", "cpu",
            "--batch-size", "2", "--cache-dir", str(eval_assets["root"] / "cache"), *extra]


def test_eval_cli_table_json_plot_and_cache(eval_assets, monkeypatch):
    out, png = eval_assets["root"] / "results.json", eval_assets["root"] / "recovery.png"
    args = _eval_args(eval_assets, "--baseline", eval_assets["source"], "--output", str(out), "--plot", str(png))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + res.stderr
    lines = res.stdout.strip().splitlines()
    assert all(line.startswith("|") for line in lines), res.stdout  # stdout holds the table only
    assert lines[0] == "| task | metric | source | converted | Δ | recovery % |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[:2] for c in cells] == [
        ["tiny_mc (tiny_mc_local)", "acc"], ["tiny_mc (tiny_mc_local)", "acc_norm"],
        ["ppl: wiki.test.txt", "ppl"], ["ppl: wiki.test.txt", "bits_per_byte"],
        ["KV cache", "KV values/token/layer"], ["KV cache", "KV bytes @4k ctx"]]
    assert cells[4][2:5] == ["32", "12", "-20"]  # Llama 2·2·8 vs MLA 8+4
    assert "tiny_mc_local" in res.stderr and png.read_bytes()[:4] == b"\x89PNG"

    result = json.loads(out.read_text())
    s = result["settings"]
    assert (s["limit"], s["ppl_tokens"], s["ppl_ctx"], s["seed"], s["dtype"]) == (4, 70, 16, 1234, "float32")
    assert s["resolved_tasks"] == {"tiny_mc": "tiny_mc_local"} and s["versions"]["lm_eval"]
    for row in result["rows"][:4]:
        assert all(math.isfinite(row[k]) for k in ("source", "converted", "delta", "recovery")), row
    assert result["tasks"]["tiny_mc"]["converted"]["n_samples"]["effective"] == 4
    assert result["models"]["source"]["kv"]["bytes"] == 32 * 2 * 4096 * 2
    assert result["cache"] == {"dir": str(eval_assets["root"] / "cache"), "hits": 0, "misses": 4}
    for role in ("source", "converted"):
        nll, n, _ = direct_perplexity(eval_assets["models"][role], eval_assets["tokenizer"], open(eval_assets["text"]).read(), 16, 70)
        assert result["perplexity"][role]["nll"] == pytest.approx(nll, rel=1e-4)
        assert result["perplexity"][role]["tokens"] == n

    # Second run: everything from the cache, neither lm-eval nor a model load.
    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(ev, "run_lm_eval", boom)
    monkeypatch.setattr(ev, "load_model", boom)
    again = CliRunner().invoke(main, _eval_args(eval_assets, "--baseline", eval_assets["source"]))
    assert again.exit_code == 0, again.output + again.stderr
    assert again.stdout == res.stdout
    # The model alone (no baseline) reuses its own cached results too.
    alone = ev.evaluate(model=eval_assets["converted"], tasks="tiny_mc", include_path=eval_assets["tasks"], limit=4,
                        ppl_data=eval_assets["text"], ppl_tokens=70, ppl_ctx=16, batch_size=2,
                        cache_dir=str(eval_assets["root"] / "cache"))
    assert alone["cache"]["hits"] == 2 and list(alone["models"]) == ["converted"]
    table = render_markdown(alone).splitlines()
    assert table[0] == "| task | metric | model |" and len(table) == 8


@pytest.mark.parametrize("case, expect", [
    ("missing_include", "include path"),
    ("bad_model", "cannot load model"),
    ("no_model_dir", "is not a directory"),
    ("missing_ppl", "does not exist"),
    ("unknown_task", "unknown task 'no_such_task_xyz'"),
])
def test_eval_errors_are_one_line(eval_assets, case, expect):
    bad = eval_assets["root"] / "bad_model"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text('{"model_type": "not_a_real_arch"}')
    args = {
        "missing_include": ["eval", eval_assets["converted"], "--tasks", "tiny_mc",
                            "--include-path", str(eval_assets["root"] / "nope")],
        "bad_model": ["eval", str(bad), "--tasks", ""],
        "no_model_dir": ["eval", eval_assets["converted"], "--baseline", str(eval_assets["root"] / "missing"), "--tasks", ""],
        "missing_ppl": ["eval", eval_assets["converted"], "--tasks", "", "--ppl-data", str(eval_assets["root"] / "nope.txt")],
        "unknown_task": ["eval", eval_assets["converted"], "--tasks", "no_such_task_xyz", "--include-path", eval_assets["tasks"]],
    }[case]
    res = CliRunner().invoke(main, args + ["--quiet", "--cache-dir", str(eval_assets["root"] / "cache-err")])
    assert res.exit_code != 0
    assert res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], res.stderr
    assert "Traceback" not in res.output + res.stderr


def test_eval_cli_long_context(tiny_source, tmp_path, monkeypatch):
    """`mha2mla eval --long-context`: position table with the ratio to the baseline, passkey table, JSON, cache."""
    src = tiny_source(max_position_embeddings=1024, n_heads=4, n_kv=2)
    conv = convert(source=src, output=tmp_path / "mla", rank=16, rope_dim=8, progress=False).output
    text = tmp_path / "text.txt"
    text.write_text(CORPUS * 60)
    out = tmp_path / "r.json"
    args = ["eval", str(conv), "--baseline", src, "--tasks", "", "--ppl-data", str(text), "--ppl-tokens", "64",
            "--ppl-ctx", "32", "--long-context", "--long-context-windows", "1", "--passkey-trials", "2",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + res.stderr
    assert "Perplexity by position, windows of 1024 tokens (1 windows):" in res.stdout
    assert "| ↳ ratio to source |" in res.stdout and "Passkey retrieval" in res.stdout
    lc = json.loads(out.read_text())["long_context"]
    for role in ("source", "converted"):
        assert lc[role]["window"] == 1024
        (pos,) = lc[role]["positions"]
        assert [(b["start"], b["end"]) for b in pos["buckets"]] == [(0, 512), (512, 1024)]
        assert [(k["length"], k["trials"]) for k in lc[role]["passkey"]] == [(1024, 2)]

    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(ev, "load_model", boom)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output + again.stderr
    assert json.loads(out.read_text())["long_context"] == lc


def test_eval_with_an_unknown_task(sources, tmp_path):
    out = tmp_path / "results.json"
    r = run_cli("eval", sources["src"], "--tasks", "no_such_task_xyz", "--no-cache", "--output", out, "-q")
    assert_user_error(r, "unknown task 'no_such_task_xyz'", out)
