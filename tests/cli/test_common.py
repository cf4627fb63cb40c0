"""What every command shares (:mod:`mha2mla.cli.common`): usage errors, user errors and interruptions are one
``error:`` line with its exit code, progress bars are erased first, and the per-engine serving lines."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mha2mla.cli.common import serving_lines
from tests.conftest import ENV, ROOT, assert_user_error, leftovers, run_cli, slow_cli


def test_serving_lines_say_yes_or_why_not_and_the_fix():
    lines = serving_lines([
        {"engine": "transformers", "compressed": True, "why": "", "fix": ""},
        {"engine": "vLLM (CPU)", "compressed": False, "why": "96+32 is not 576", "fix": "mha2mla pad"},
        {"engine": "vLLM (GPU)", "compressed": False, "why": "biases", "fix": None},
    ])
    assert lines == ["transformers: yes, compressed cache", "vLLM (CPU): no: 96+32 is not 576; fix: mha2mla pad",
                     "vLLM (GPU): no: biases"]


def test_usage_errors_are_one_line(tmp_path):
    for args, phrase in ((["convert"], "Missing argument 'SOURCE'"),
                         (["convert", "x", "-o", tmp_path / "o", "--rank", "abc"], "'abc' is not a valid integer"),
                         (["no-such-command"], "No such command")):
        r = run_cli(*args)
        assert r.returncode == 2
        assert_user_error(r, phrase)


@pytest.mark.usefixtures("one_thread")
def test_error_mid_conversion_erases_the_progress_bar(sources, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import mha2mla.conversion.pipeline as pipeline
    from mha2mla.cli import main
    from mha2mla.errors import Mha2mlaError

    real = pipeline.convert_layer
    seen = []

    def fail_on_second_layer(**kw):
        seen.append(1)
        if len(seen) == 2:
            raise Mha2mlaError("a problem found at layer 1")
        return real(**kw)

    monkeypatch.setattr(pipeline, "convert_layer", fail_on_second_layer)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", sources["src"], "-o", str(out), "-r", "8"])
    assert r.exit_code == 2 and "converting layers" in r.stderr  # the bar was drawn ...
    shown = [line.split("\r")[-1] for line in r.stderr.split("\n")]  # ... and erased: what a terminal shows
    assert [line for line in shown if line.strip()] == ["error: a problem found at layer 1"], r.stderr
    assert not out.exists() and leftovers(out) == []


def test_convert_interrupted_by_sigterm_before_writing(sources, tmp_path):
    out = tmp_path / "out"
    slow = slow_cli("mha2mla.conversion.pipeline", "load_source", first=f"open({str(tmp_path / 'started')!r}, 'w').close()")
    p = subprocess.Popen([sys.executable, "-c", slow, "convert", sources["src"], "--output", str(out), "--rank", "8", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"convert never started: {p.communicate()}")
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert_user_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr),
                       "interrupted; no output was written", out)
    assert p.returncode == 130
