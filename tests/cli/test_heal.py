"""``mha2mla heal`` (:mod:`mha2mla.cli.heal`): a run through the command line, and its errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mha2mla.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def _heal(*args):
    return CliRunner().invoke(main, ["heal", *map(str, args)])


def test_cli_runs_and_refuses_an_existing_output(heal_assets, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# mha2mla heal ...\nseq_len: 16\nmicro_batch_size: 2\nmax_steps: 5\nlr: 1.0e-3\n")
    out = tmp_path / "cli"
    r = _heal(heal_assets["model"], "--output", out, "--data", heal_assets["text"], "--recipe", recipe, "--max-steps", 2,
             "--save-every", 1, "--set", "log_every=1", "-q")
    assert r.exit_code == 0, r.output
    assert json.load(open(out / "mha2mla.json"))["heal"]["steps"] == 2
    assert not (out / "checkpoints").exists()  # resumable state is dropped once the run is finished
    r = _heal(heal_assets["model"], "--output", out, "--data", heal_assets["text"], "--recipe", recipe)
    assert r.exit_code == 2 and "exists; pass --force" in r.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["{root}/nope", "--data", "{text}"], ["model", "nope", "does not exist"]),
        (["{root}", "--data", "{text}"], ["not a model directory (no config.json)"]),
        (["{model}", "--data", "{text}", "--seq-len", "4096"], ["seq_len 4096", "max_position_embeddings 1024"]),
        (["{model}", "--data", "{empty}"], ["empty.txt", "is empty"]),
        (["{model}", "--data", "{root}/missing.txt"], ["missing.txt", "does not exist"]),
        (["{model}"], ["no data"]),
        (["{model}", "--data", "{text}", "--set", "warmup=3"], ["unknown key 'warmup'", "warmup_steps"]),
        (["{model}", "--data", "{text}", "--set", "lr=0"], ["lr must be > 0.0", "got 0"]),
        (["{model}", "--data", "{text}", "--set", "oops"], ["expected KEY=VALUE"]),
        (["{model}", "--data", "{text}", "--teacher", "{root}/nope"], ["teacher", "does not exist"]),
        (["{model}", "--data", "{text}", "--recipe", "{root}/none.yaml"], ["recipe", "none.yaml", "does not exist"]),
    ],
)
def test_cli_errors_are_one_clear_line(heal_assets, tmp_path, args, words):
    args = [a.format(**heal_assets) for a in args]
    r = _heal(*args, "--output", tmp_path / "o")
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if "error" in ln.lower()]
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and errors == [line], r.output
    for w in words:
        assert w in line, line
    assert not (tmp_path / "o").exists()


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "mha2mla", "heal", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--teacher" in r.stdout and "--resume" in r.stdout
