"""Writing an output safely (:mod:`mha2mla.checkpoint.writer`): the paths a run must never replace, the temporary
sibling renamed into place (nothing left behind by errors, a full disk, signals or kill -9), and the shards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import mha2mla
from mha2mla.checkpoint.writer import ShardWriter, atomic_output_dir, check_output_path, is_our_output, parse_size, shard_bytes
from mha2mla.errors import Mha2mlaError
from tests.conftest import (ENV, ROOT, assert_user_error, convert_cli, copy_source, leftovers, logits, run_cli,
                            slow_cli, token_ids, tree)


@pytest.mark.parametrize("size,want", [("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1.5 gib", 3 * 2**29), (" 20kb ", 20_000),
                                       ("64KiB", 65536), ("7MiB", 7 * 2**20), ("123", 123), ("10B", 10), (4096, 4096)])
def test_sizes_are_parsed_in_decimal_and_binary_units(size, want):
    assert parse_size(size) == want and shard_bytes(size) == want


@pytest.mark.parametrize("size", ["lots", "5 TB", "MB"])
def test_sizes_that_are_not_understood_are_refused(size):
    with pytest.raises(Mha2mlaError, match=f"size {size!r} is not understood; write e.g. 2GB or 500MB"):
        parse_size(size)


@pytest.mark.parametrize("size", ["0", "0MB", 0, -5])
def test_a_shard_size_must_be_positive(size):
    with pytest.raises(Mha2mlaError, match=f"--max-shard-size must be a positive size such as 500MB, got {size!r}"):
        shard_bytes(size)


def test_check_output_path_refuses_what_a_run_must_not_replace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "models" / "src"
    src.mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    refusals = {
        "": "--output is empty; give the path of a new directory",
        "/": "--output / is a filesystem root",
        ".": "--output . is the working directory",
        str(src / "out"): f"--output {src / 'out'} is inside the teacher directory {src}; choose a directory elsewhere",
        str(tmp_path / "models"): f"--output {tmp_path / 'models'} contains the teacher {src}; choose a directory of its own",
        "file.txt": "--output file.txt exists and is a file; choose another path",
    }
    for output, message in refusals.items():
        with pytest.raises(Mha2mlaError) as e:
            check_output_path(output, force=True, protect=(("teacher", str(src)), None))
        assert str(e.value).startswith(message), (output, str(e.value))
    with pytest.raises(Mha2mlaError) as e:
        check_output_path(src / "x", protect=(str(src),), flag="--data")  # a bare path is labelled "source"
    assert str(e.value) == f"--data {src / 'x'} is inside the source directory {src}; choose a directory elsewhere"
    (tmp_path / "empty").mkdir()
    assert check_output_path("empty") == str(tmp_path / "empty")  # an empty directory is used as it is
    assert check_output_path("new/sub") == str(tmp_path / "new" / "sub") and not (tmp_path / "new").exists()


def test_only_directories_this_tool_wrote_count_as_its_outputs(tmp_path):
    ours, heal_run, foreign = tmp_path / "ours", tmp_path / "heal", tmp_path / "foreign"
    ours.mkdir()
    (ours / "mha2mla.json").write_text("{}")
    (heal_run / "checkpoints" / "step-3").mkdir(parents=True)
    (heal_run / "checkpoints" / "step-3" / "trainer_state.json").write_text("{}")
    (foreign / "checkpoints" / "step-3").mkdir(parents=True)
    assert is_our_output(str(ours)) and is_our_output(str(heal_run)) and not is_our_output(str(foreign))
    with pytest.raises(Mha2mlaError, match="already exists; pass --force to replace it"):
        check_output_path(ours)
    assert check_output_path(ours, force=True) == str(ours)
    with pytest.raises(Mha2mlaError, match="is a non-empty directory that mha2mla did not write"):
        check_output_path(foreign, force=True)


def test_atomic_output_dir_renames_into_place_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_output_dir(str(out)) as tmp:
            assert os.path.basename(tmp) == f".out.mha2mla-tmp-{os.getpid()}" and os.path.isdir(tmp)
            (tmp_path / tmp / "part").write_text("x")
            raise RuntimeError("midway")
    assert not out.exists() and leftovers(out) == []
    with atomic_output_dir(str(out)) as tmp:
        with open(os.path.join(tmp, "mha2mla.json"), "w") as f:
            f.write("{}")
    assert sorted(os.listdir(out)) == ["mha2mla.json"] and leftovers(out) == []
    stale = tmp_path / ".out.mha2mla-tmp-999999999"  # a killed run's leftover (no such process)
    stale.mkdir()
    with atomic_output_dir(str(out), force=True) as tmp:
        assert not stale.exists()  # cleaned up before the new run writes
        with open(os.path.join(tmp, "new.txt"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(out)) == ["new.txt"] and leftovers(out) == []


def test_shard_writer_fills_shards_in_order_and_indexes_them(tmp_path):
    writer = ShardWriter(str(tmp_path), max_shard_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each: two per shard
    tensors["big"] = torch.zeros(50)  # 200 bytes: a shard of its own, over the limit
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.close()
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 40 + 200
    assert index["weight_map"] == {"big": names[3], "t0": names[0], "t1": names[0], "t2": names[1], "t3": names[1],
                                   "t4": names[2]}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / shard))[name], tensors[name])
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["model.safetensors.index.json"])  # no .tmp left


def test_bad_max_shard_size(sources, tmp_path):
    # (the --max-shard-size half of test_bad_shapes_and_sizes; the other half is in tests/checkpoint/test_source.py)
    out = tmp_path / "out"
    assert_user_error(convert_cli(sources["src"], out, "--max-shard-size", "0"), "--max-shard-size must be a positive size", out)


def _ctrl_c_as_in_a_terminal() -> None:
    # a pytest started in the background (``pytest &`` without job control) hands its children SIGINT ignored;
    # the convert under test gets it as a terminal gives it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_slow_convert(src, out) -> tuple[subprocess.Popen, str]:
    """Start a convert whose layers take a minute each; return it once its temporary directory exists."""
    script = slow_cli("mha2mla.conversion.pipeline", "convert_layer")
    p = subprocess.Popen([sys.executable, "-c", script, "convert", str(src), "--output", str(out), "--rank", "8", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                         preexec_fn=_ctrl_c_as_in_a_terminal)
    parent, name = os.path.split(os.path.abspath(out))
    tmp = os.path.join(parent, f".{name}.mha2mla-tmp-{p.pid}")
    deadline = time.time() + 60
    while not os.path.isdir(tmp):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"convert never created {tmp}: {p.communicate()}")
        time.sleep(0.02)
    return p, tmp


def test_existing_output_needs_force(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    out = tmp_path / "mla"
    mha2mla.convert(source=src, output=str(out), rank=8, progress=False)
    (out / "extra.txt").write_text("from the first run")
    with pytest.raises(Mha2mlaError, match="already exists; pass --force"):
        mha2mla.convert(source=src, output=str(out), rank=8, progress=False)
    assert (out / "extra.txt").read_text() == "from the first run"
    mha2mla.convert(source=src, output=str(out), rank=4, progress=False, force=True)
    assert not (out / "extra.txt").exists() and json.load(open(out / "config.json"))["kv_lora_rank"] == 4


def test_failure_midway_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    import mha2mla.conversion.pipeline as pipeline

    src = tiny_source(n_kv=2, layers=3)
    calls = {"n": 0}
    real = pipeline.convert_layer

    def flaky(**kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(pipeline, "convert_layer", flaky)
    out = tmp_path / "mla"
    with pytest.raises(KeyboardInterrupt):
        mha2mla.convert(source=src, output=str(out), rank=8, progress=False)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_sharded_source_and_sharded_output(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, max_shard_size="20KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    out = tmp_path / "mla"
    mha2mla.convert(source=src, output=str(out), rank=24, rope_dim=8, max_shard_size="30KB", progress=False)
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert len(shards) > 1
    ids = token_ids()
    assert torch.isfinite(logits(str(out), ids)).all()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_existing_foreign_output_is_untouched(sources, tmp_path, force):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = convert_cli(sources["src"], out, *(["--force"] if force else []))
    assert_user_error(r, "is a non-empty directory that mha2mla did not write")
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert leftovers(out) == []


def test_existing_output_of_ours_needs_force(sources, tmp_path):
    out = tmp_path / "out"
    assert convert_cli(sources["src"], out).returncode == 0
    before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
    assert_user_error(convert_cli(sources["src"], out), "already exists; pass --force to replace it")
    assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before and leftovers(out) == []


def test_output_inside_the_source(sources, tmp_path):
    src = copy_source(sources, tmp_path)
    before = sorted(os.listdir(src))
    out = os.path.join(src, "mla")
    assert_user_error(convert_cli(src, out), "is inside the source directory", out)
    assert sorted(os.listdir(src)) == before


@pytest.mark.parametrize("output,phrase", [
    (".", "is the working directory"),
    ("", "--output is empty"),
    ("..", "a parent of the working directory"),
    ("src", "is inside the source directory"),
])
def test_convert_force_never_replaces_the_working_directory(sources, tmp_path, output, phrase):
    work = tmp_path / "work"
    work.mkdir()
    src = shutil.copytree(sources["src"], work / "src")
    (work / "notes.txt").write_text("user data")
    before = tree(tmp_path)
    r = run_cli("convert", src, "--output", output, "--rank", 8, "--force", "-q", cwd=work)
    assert_user_error(r, phrase)
    assert tree(tmp_path) == before


def test_convert_force_never_replaces_a_parent_of_the_source_home_or_root(sources, tmp_path):
    parent = tmp_path / "models"
    src = shutil.copytree(sources["src"], parent / "src")
    (parent / "mha2mla.json").write_text("{}")  # even one that looks like our output
    home = tmp_path / "home"
    home.mkdir()
    before = tree(tmp_path)
    assert_user_error(convert_cli(src, parent, "--force"), "contains the source")
    env_home = {**ENV, "HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "mha2mla", "convert", src, "--output", str(home), "--rank", "8",
                        "--force", "-q"], capture_output=True, text=True, env=env_home, cwd=ROOT, timeout=120)
    assert_user_error(r, "is the home directory")
    assert_user_error(convert_cli(src, "/", "--force"), "is a filesystem root")
    assert tree(tmp_path) == before


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["OSError", "SafetensorError"])
def test_disk_full_leaves_nothing(sources, tmp_path, monkeypatch, kind):
    import safetensors.torch
    from safetensors import SafetensorError
    from click.testing import CliRunner

    import mha2mla.checkpoint.writer as writer
    from mha2mla.cli import main

    calls = []
    real = writer.save_file

    def full_after_one_shard(tensors, filename, **kw):
        calls.append(filename)
        if len(calls) > 1:  # the first shard lands on disk, the second finds the disk full
            if kind == "SafetensorError":  # what safetensors' writer really raises
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                      'message: "No space left on device" })')
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, **kw)

    monkeypatch.setattr(writer, "save_file", full_after_one_shard)
    monkeypatch.setattr(safetensors.torch, "save_file", full_after_one_shard)
    out = tmp_path / "out"
    with pytest.raises(Mha2mlaError, match="no space left on the device while writing .*; nothing was written"):
        mha2mla.convert(source=sources["src"], output=str(out), rank=8, max_shard_size="20KB", progress=False)
    assert len(calls) == 2 and not out.exists() and leftovers(out) == []

    calls.clear()
    r = CliRunner().invoke(main, ["convert", sources["src"], "-o", str(out), "-r", "8", "--max-shard-size", "20KB", "-q"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().startswith("error: no space left on the device") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output and not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_convert_leaves_nothing(sources, tmp_path, sig):
    out = tmp_path / "out"
    p, tmp = _start_slow_convert(sources["src"], out)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    assert_user_error(r, "interrupted; no output was written", out)
    assert r.returncode == 130 and not os.path.exists(tmp)


def test_killed_convert_leftover_is_cleaned_by_the_next_run(sources, tmp_path):
    out = tmp_path / "out"
    p, tmp = _start_slow_convert(sources["src"], out)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert os.path.isdir(tmp) and not out.exists()  # kill -9 cannot clean up ...
    r = convert_cli(sources["src"], out)  # ... but the next run to the same output does
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(out / "config.json") and leftovers(out) == []
