"""``mha2mla convert`` (:mod:`mha2mla.cli.convert`): a run and its summary, the switches that reach the method and
the record, ``--serve``, and errors in one line."""

from __future__ import annotations

import json
import os

import torch
from click.testing import CliRunner

from mha2mla.cli import main
from mha2mla.conversion.stream import native_bfloat16
from tests.conftest import CORPUS, logits, token_ids


def test_cli_convert_and_one_line_errors(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    runner = CliRunner()
    assert runner.invoke(main, ["convert", "--help"]).exit_code == 0
    res = runner.invoke(main, ["convert", src, "--output", str(tmp_path / "mla"), "--rank", "24", "--rope-dim", "8", "-q"])
    assert res.exit_code == 0, res.output
    assert "(50.0 % saved)" in res.output
    bad = runner.invoke(main, ["convert", src, "--output", str(tmp_path / "x"), "--rank", "999"])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: --rank must be in 1..64")
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1


def test_cli_keep_mlp_switches_the_mlp_refit_off(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=2)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    changes = {}
    for flag in ([], ["--keep-mlp"]):
        out = tmp_path / ("keep" if flag else "refit")
        res = CliRunner().invoke(main, ["convert", src, "-o", str(out), "--rank", "6", "--rope-dim", "8", "-q",
                                        "--calibration", str(corpus), "--calibration-samples", "8",
                                        "--calibration-length", "32", *flag])
        assert res.exit_code == 0, res.output
        record = json.loads((out / "mha2mla.json").read_text())
        assert record["calibration"]["method"]["mlp_drift"] == (0.0 if flag else 0.4)
        changes[bool(flag)] = [x["mlp_down_rel_change"] for x in record["layers"]]
    assert changes[True] == [None, None] and all(c > 0 for c in changes[False])


def test_cli_mlp_dtype_reaches_the_record(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    expected = {"float32": "float32", "bfloat16": "bfloat16",
                "auto": "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"}
    for choice, want in expected.items():
        out = tmp_path / choice
        res = CliRunner().invoke(main, ["convert", src, "-o", str(out), "--rank", "6", "--rope-dim", "8", "-q",
                                        "--calibration", str(corpus), "--calibration-samples", "4",
                                        "--calibration-length", "32", "--mlp-dtype", choice])
        assert res.exit_code == 0, res.output
        record = json.loads((out / "mha2mla.json").read_text())
        assert record["calibration"]["propagation"]["mlp_dtype"] == want
        assert record["calibration"]["method"]["mlp_dtype"] == choice
    res = CliRunner().invoke(main, ["convert", src, "-o", str(tmp_path / "x"), "--rank", "6", "--mlp-dtype", "fp8"])
    assert res.exit_code == 2 and "fp8" in res.output


def test_cli_method_switches_reach_the_record_and_bad_ones_fail_in_one_line(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    base = ["convert", src, "--rank", "16", "--rope-dim", "8", "-q", "--calibration", str(corpus),
            "--calibration-samples", "8", "--calibration-length", "32"]
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "a"), "--method", "drift_below_share=inf,output_fit_stride=2"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "a" / "mha2mla.json").read_text())
    assert record["calibration"]["method"]["drift_below_share"] == "inf"  # (strict JSON has no Infinity)
    assert record["calibration"]["propagation"]["tracks_source"] and record["calibration"]["output_fit_stride"] == 2
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "b")])
    assert res.exit_code == 0 and "drift corrections off: rank 16 ≥ drift_below_share 0.5" in res.output, res.output
    for spec, message in (("qfit=3", "method switch 'qfit=3': expected NAME=VALUE with NAME one of"),
                          ("drift_below_share=x", "method switch 'drift_below_share=x': drift_below_share takes a float, got 'x'")):
        res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "c"), "--method", spec])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "c").exists()


def test_convert_serve_vllm(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16)
    out = tmp_path / "served"
    result = CliRunner().invoke(main, ["convert", src, "--output", str(out), "--rank", "24", "--rope-dim", "8",
                                       "--serve", "vllm", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "padded exactly to 512+64 (nope 128, v 128) for --serve vllm" in result.output
    assert "LARGER than the source's" in result.output and "warning:" in result.output
    assert "portable (every engine serves it with a compressed cache): yes" in result.output
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no unpadded leftover
    ref = tmp_path / "plain"
    CliRunner().invoke(main, ["convert", src, "--output", str(ref), "--rank", "24", "--rope-dim", "8", "--quiet"])
    ids = token_ids(vocab=97, length=40, low=0)
    diff = (logits(str(ref), ids) - logits(str(out), ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| {diff}"
    check = CliRunner().invoke(main, ["check", str(out)])
    assert check.exit_code == 0 and check.output.startswith("PORTABLE")
