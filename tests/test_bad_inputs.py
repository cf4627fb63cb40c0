"""Reliability: bad inputs, interruptions and hostile sources through the real command line.

Every case runs ``python -m mha2mla ...`` as a subprocess (so a traceback would show on stderr) and asserts a non-zero
exit, exactly one ``error: ...`` line on stderr naming the problem, no traceback, and nothing at the output path
(neither the directory nor a ``.OUTPUT.mha2mla-tmp-*`` sibling).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CORPUS, build_source, load_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per process: tiny matrices, two shared cores (threads only add contention), and no hub access.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}
# The CLI with every layer's conversion slowed down, so that a signal reliably lands mid-write.
SLOW_CLI = (
    "import time\n"
    "import mha2mla.conversion as c\n"
    "real = c.convert_attention\n"
    "def slow(**kw):\n"
    "    time.sleep(60)\n"
    "    return real(**kw)\n"
    "c.convert_attention = slow\n"
    "from mha2mla.cli import main\n"
    "main(prog_name='mha2mla')\n"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Sources built once; tests copy what they damage."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text.txt").write_text(CORPUS * 20)
    return {
        "root": root,
        "src": build_source(root / "src", n_kv=2),
        "sharded": build_source(root / "sharded", n_kv=2, max_shard_size="20KB"),
        "text": str(root / "text.txt"),
    }


@pytest.fixture(scope="module")
def mla(base):
    """A converted (MLA) checkpoint of ``base["src"]``, for heal and eval."""
    import mha2mla

    out = base["root"] / "mla"
    mha2mla.convert(source=base["src"], output=str(out), rank=16, progress=False)
    return str(out)


def _copy(base, tmp_path, which="src") -> str:
    dst = tmp_path / which
    shutil.copytree(base[which], dst)
    return str(dst)


def _cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mha2mla", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd or ROOT, timeout=timeout)


def _leftovers(out) -> list[str]:
    parent, name = os.path.split(os.path.abspath(out))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def _assert_user_error(r: subprocess.CompletedProcess, phrase: str, out=None) -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: ") and phrase in line, line
    if out is not None:
        assert not os.path.exists(out), os.listdir(out)
        assert _leftovers(out) == []
    return line


def _convert(src, out, *extra):
    return _cli("convert", src, "--output", out, "--rank", 8, "-q", *extra)


# --- sources -------------------------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    _assert_user_error(_convert(tmp_path / "nope", out), "does not exist", out)


@pytest.mark.parametrize("model_type,arch,phrase", [
    ("gpt2", "GPT2LMHeadModel", "learned absolute positions"),
    ("gemma", "GemmaForCausalLM", "(1+γ) norms"),
    ("qwen3", "Qwen3ForCausalLM", "q_norm/k_norm"),
])
def test_unsupported_architectures(base, tmp_path, model_type, arch, phrase):
    src = tmp_path / model_type
    src.mkdir()
    if model_type == "gpt2":
        cfg = {"model_type": "gpt2", "architectures": [arch], "n_embd": 64, "n_head": 4, "n_layer": 2,
               "vocab_size": 97, "n_positions": 256, "activation_function": "gelu_new"}
    else:
        cfg = {**load_json(os.path.join(base["src"], "config.json")), "model_type": model_type, "architectures": [arch]}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    line = _assert_user_error(_convert(src, out), f"{arch} is not supported", out)
    assert phrase in line and "mha2mla converts LlamaForCausalLM, MistralForCausalLM" in line


def test_malformed_config(base, tmp_path):
    src = _copy(base, tmp_path)
    with open(os.path.join(src, "config.json"), "w") as f:
        f.write('{"model_type": "llama", "hidden_size": 64,')
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out), "config.json is not valid JSON", out)


def test_missing_config(base, tmp_path):
    src = _copy(base, tmp_path)
    os.remove(os.path.join(src, "config.json"))
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out), "no config.json", out)


def test_truncated_shard(base, tmp_path):
    src = _copy(base, tmp_path)
    f = os.path.join(src, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)
    out = tmp_path / "out"
    line = _assert_user_error(_convert(src, out), "truncated or corrupt", out)
    assert "model.safetensors" in line


def test_index_names_a_missing_shard(base, tmp_path):
    src = _copy(base, tmp_path, "sharded")
    index = load_json(os.path.join(src, "model.safetensors.index.json"))["weight_map"]
    shard = index["model.layers.1.self_attn.k_proj.weight"]
    os.remove(os.path.join(src, shard))
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out), f"the index names shard {shard!r}, which is missing", out)


@pytest.mark.parametrize("tensor,value", [
    ("model.layers.1.self_attn.q_proj.weight", float("nan")),
    ("model.embed_tokens.weight", float("inf")),
])
def test_non_finite_weights(base, tmp_path, tensor, value):
    from safetensors.torch import load_file, save_file

    src = _copy(base, tmp_path)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd[tensor][3, 5] = value
    save_file(sd, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out), f"source tensor {tensor!r} contains NaN or Inf values", out)


def test_pickle_only_weights_are_never_opened(base, tmp_path):
    """An invalid pickle gives the refusal (not an unpickling error), and a malicious one never runs."""
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(os.path.join(base["src"], "config.json"), src)
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (src / "pytorch_model.bin").write_bytes(b"\x80\x05this is not a pickle")
    (src / "training_args.pt").write_bytes(pickle.dumps(Payload()))
    out = tmp_path / "out"
    line = _assert_user_error(_convert(src, out), "weights only in pickle files (pytorch_model.bin, training_args.pt); "
                                                  "mha2mla never unpickles", out)
    assert "unpickl" not in line.replace("never unpickles", "") and not marker.exists()


# --- options and output --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,phrase", [
    (["--rank", 0], "--rank must be in 1..64"),
    (["--rank", 65], "--rank must be in 1..64"),
    (["--rank", 8, "--rope-dim", 3], "--rope-dim must be a positive even number that divides head_dim 16"),
    (["--rank", 8, "--rope-dim", 6], "--rope-dim must be a positive even number that divides head_dim 16"),
    (["--rank", 8, "--rope-dim", 32], "--rope-dim must be a positive even number that divides head_dim 16"),
])
def test_bad_rank_and_rope_dim(base, tmp_path, args, phrase):
    out = tmp_path / "out"
    r = _cli("convert", base["src"], "--output", out, "-q", *args)
    line = _assert_user_error(r, phrase, out)
    assert line.endswith(f"got {args[-1]}")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_existing_foreign_output_is_untouched(base, tmp_path, force):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = _convert(base["src"], out, *(["--force"] if force else []))
    _assert_user_error(r, "is a non-empty directory that mha2mla did not write")
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert _leftovers(out) == []


def test_existing_output_of_ours_needs_force(base, tmp_path):
    out = tmp_path / "out"
    assert _convert(base["src"], out).returncode == 0
    before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
    _assert_user_error(_convert(base["src"], out), "already exists; pass --force to replace it")
    assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before and _leftovers(out) == []


def test_output_inside_the_source(base, tmp_path):
    src = _copy(base, tmp_path)
    before = sorted(os.listdir(src))
    out = os.path.join(src, "mla")
    _assert_user_error(_convert(src, out), "is inside the source directory", out)
    assert sorted(os.listdir(src)) == before


@pytest.mark.parametrize("device,phrase", [
    ("mps", "only cpu and cuda are supported"),
    ("tpu", "is not a torch device"),
    pytest.param("cuda", "torch sees no CUDA device here", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a CUDA device is present")),
])
def test_bad_calibration_device(base, tmp_path, device, phrase):
    data = tmp_path / "calib.txt"
    data.write_text("the cat sat on the mat. " * 400)
    out = tmp_path / "out"
    _assert_user_error(_convert(base["src"], out, "--calibration", data, "--device", device), phrase, out)


# --- calibration, heal and eval data -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,phrase", [
    ("binary", "not UTF-8 text"),
    ("directory", "cannot read (Is a directory)"),
    ("empty", "is empty: no text found"),
])
def test_bad_calibration_data(base, tmp_path, kind, phrase):
    data = tmp_path / "calib"
    if kind == "binary":
        data = tmp_path / "calib.txt"
        data.write_bytes(bytes(range(128, 256)) * 8)
    elif kind == "directory":  # a directory where a text file is expected (unreadable as text)
        (data / "part-1.txt").mkdir(parents=True)
    else:
        data.write_text("  \n\n ")
    out = tmp_path / "out"
    _assert_user_error(_convert(base["src"], out, "--calibration", data), phrase, out)


def test_heal_with_empty_data(mla, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    out = tmp_path / "healed"
    r = _cli("heal", mla, "--output", out, "--data", empty, "--seq-len", 16, "-q")
    _assert_user_error(r, f"data {str(empty)!r} is empty", out)


def test_heal_recipe_with_unknown_key(base, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# mha2mla heal ...\nseq_len: 16\nlearning_rate: 1.0e-3\n")
    out = tmp_path / "healed"
    r = _cli("heal", base["src"], "--output", out, "--data", base["text"], "--recipe", recipe, "-q")
    _assert_user_error(r, "unknown key 'learning_rate'", out)


def test_eval_with_an_unknown_task(base, tmp_path):
    out = tmp_path / "results.json"
    r = _cli("eval", base["src"], "--tasks", "no_such_task_xyz", "--no-cache", "--output", out, "-q")
    _assert_user_error(r, "unknown task 'no_such_task_xyz'", out)


# --- disk full (in-process: a monkeypatch cannot cross a subprocess) -----------------------------------------------


@pytest.mark.parametrize("kind", ["OSError", "SafetensorError"])
def test_disk_full_leaves_nothing(base, tmp_path, monkeypatch, kind):
    import safetensors.torch
    from safetensors import SafetensorError
    from click.testing import CliRunner

    import mha2mla
    import mha2mla.writer as writer
    from mha2mla.cli import main
    from mha2mla.errors import Mha2mlaError

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
        mha2mla.convert(source=base["src"], output=str(out), rank=8, max_shard_size="20KB", progress=False)
    assert len(calls) == 2 and not out.exists() and _leftovers(out) == []

    calls.clear()
    r = CliRunner().invoke(main, ["convert", base["src"], "-o", str(out), "-r", "8", "--max-shard-size", "20KB", "-q"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().startswith("error: no space left on the device") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output and not out.exists() and _leftovers(out) == []


def test_error_mid_conversion_erases_the_progress_bar(base, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import mha2mla.conversion as conversion
    from mha2mla.cli import main
    from mha2mla.errors import Mha2mlaError

    real = conversion.convert_attention
    seen = []

    def fail_on_second_layer(**kw):
        seen.append(1)
        if len(seen) == 2:
            raise Mha2mlaError("a problem found at layer 1")
        return real(**kw)

    monkeypatch.setattr(conversion, "convert_attention", fail_on_second_layer)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", base["src"], "-o", str(out), "-r", "8"])
    assert r.exit_code == 2 and "converting layers" in r.stderr  # the bar was drawn ...
    shown = [line.split("\r")[-1] for line in r.stderr.split("\n")]  # ... and erased: what a terminal shows
    assert [line for line in shown if line.strip()] == ["error: a problem found at layer 1"], r.stderr
    assert not out.exists() and _leftovers(out) == []


# --- interruptions -------------------------------------------------------------------------------------------------


def _start_slow_convert(src, out) -> tuple[subprocess.Popen, str]:
    """Start a convert whose layers take a minute each; return it once its temporary directory exists."""
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "convert", str(src), "--output", str(out), "--rank", "8",
                          "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    parent, name = os.path.split(os.path.abspath(out))
    tmp = os.path.join(parent, f".{name}.mha2mla-tmp-{p.pid}")
    deadline = time.time() + 60
    while not os.path.isdir(tmp):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"convert never created {tmp}: {p.communicate()}")
        time.sleep(0.02)
    return p, tmp


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_convert_leaves_nothing(base, tmp_path, sig):
    out = tmp_path / "out"
    p, tmp = _start_slow_convert(base["src"], out)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    _assert_user_error(r, "interrupted; no output was written", out)
    assert r.returncode == 130 and not os.path.exists(tmp)


def test_killed_convert_leftover_is_cleaned_by_the_next_run(base, tmp_path):
    out = tmp_path / "out"
    p, tmp = _start_slow_convert(base["src"], out)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert os.path.isdir(tmp) and not out.exists()  # kill -9 cannot clean up ...
    r = _convert(base["src"], out)  # ... but the next run to the same output does
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(out / "config.json") and _leftovers(out) == []


def _kill_heal_after_a_checkpoint(common: list, out) -> str:
    """Run ``mha2mla heal`` (``common`` + 200 steps), kill -9 it once a checkpoint is saved; return the states' glob."""
    p = subprocess.Popen([sys.executable, "-m", "mha2mla", *map(str, common), "--max-steps", "200"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    states = os.path.join(out, "checkpoints", "step-*", "trainer_state.json")
    deadline = time.time() + 120
    while not glob.glob(states):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"heal never saved a checkpoint: {p.communicate()}")
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    return states


def test_heal_killed_with_sigkill_resumes_from_its_last_checkpoint(mla, base, tmp_path):
    out = tmp_path / "healed"
    common = ["heal", mla, "--output", out, "--data", base["text"], "--seq-len", 16, "--micro-batch-size", 2,
              "--save-every", 1, "-q"]
    states = _kill_heal_after_a_checkpoint(common, out)
    done = {int(re.search(r"step-(\d+)", s).group(1)): s for s in glob.glob(states)}
    last = max(done)
    saved = json.load(open(done[last]))
    assert not os.path.exists(os.path.join(out, "mha2mla.json"))  # killed: no final model

    r = _cli(*common, "--max-steps", last + 2, "--resume")
    assert r.returncode == 0, r.stderr
    rec = load_json(os.path.join(out, "mha2mla.json"))["heal"]
    assert rec["resumed_from"] == [last] and rec["steps"] == last + 2 and len(rec["losses"]) == last + 2
    assert rec["losses"][:last] == saved["history"]["losses"]  # the killed run's history came from the checkpoint
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and not os.path.exists(os.path.join(out, "checkpoints"))
    assert _leftovers(out) == []


# --- security ------------------------------------------------------------------------------------------------------


def _call_text(source: str, start: int) -> str:
    """The text of the call whose ``(`` is at or after ``start``, up to its matching ``)``."""
    i, depth = source.index("(", start), 0
    for j in range(i, len(source)):
        depth += {"(": 1, ")": -1}.get(source[j], 0)
        if depth == 0:
            return source[start : j + 1]
    return source[start:]


def test_package_never_trusts_remote_code_nor_unpickles():
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "mha2mla", "*.py"))):
        text = open(path, encoding="utf-8").read()
        name = os.path.basename(path)
        bad += [f"{name}: trust_remote_code=True" for _ in re.finditer(r"trust_remote_code\s*=\s*True", text)]
        bad += [f"{name}: {m.group(0)}" for m in re.finditer(
            r"^\s*(import\s+(c?pickle|dill|joblib|_pickle)\b|from\s+(c?pickle|dill|joblib|_pickle)\s+import)", text, re.M)]
        bad += [f"{name}: {m.group(0)}" for m in re.finditer(r"\b(c?pickle|dill|joblib)\.(load|loads|Unpickler)\b", text)]
        for m in re.finditer(r"\btorch\.load\s*\(", text):
            if not re.search(r"weights_only\s*=\s*True", _call_text(text, m.start())):
                bad.append(f"{name}: torch.load without weights_only=True")
    assert bad == []


def test_auto_map_code_is_never_imported(base, tmp_path):
    src = _copy(base, tmp_path)
    marker = tmp_path / "EVIL_CODE_RAN"
    evil = f"open({str(marker)!r}, 'w').write('imported')\nraise RuntimeError('remote code was imported')\n"
    for n in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (tmp_path / "src" / n).write_text(evil)
    cfg = load_json(os.path.join(src, "config.json"))
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    tok_cfg = load_json(os.path.join(src, "tokenizer_config.json"))
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = tmp_path / "out"
    r = _convert(src, out, "--calibration", base["text"], "--calibration-samples", 2, "--calibration-length", 16)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert not [n for n in os.listdir(out) if n.endswith(".py")]
    assert "auto_map" not in load_json(out / "config.json")
    assert load_json(out / "mha2mla.json")["source"]["ignored_auto_map"] == cfg["auto_map"]


# --- paths a command must never replace (data loss) ----------------------------------------------------------------


def _tree(root) -> dict:
    """Every file under ``root`` with its size and mtime: 'the same files on disk as before'."""
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("output,phrase", [
    (".", "is the working directory"),
    ("", "--output is empty"),
    ("..", "a parent of the working directory"),
    ("src", "is inside the source directory"),
])
def test_convert_force_never_replaces_the_working_directory(base, tmp_path, output, phrase):
    work = tmp_path / "work"
    work.mkdir()
    src = shutil.copytree(base["src"], work / "src")
    (work / "notes.txt").write_text("user data")
    before = _tree(tmp_path)
    r = _cli("convert", src, "--output", output, "--rank", 8, "--force", "-q", cwd=work)
    _assert_user_error(r, phrase)
    assert _tree(tmp_path) == before


def test_convert_force_never_replaces_a_parent_of_the_source_home_or_root(base, tmp_path):
    parent = tmp_path / "models"
    src = shutil.copytree(base["src"], parent / "src")
    (parent / "mha2mla.json").write_text("{}")  # even one that looks like our output
    home = tmp_path / "home"
    home.mkdir()
    before = _tree(tmp_path)
    _assert_user_error(_convert(src, parent, "--force"), "contains the source")
    env_home = {**ENV, "HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "mha2mla", "convert", src, "--output", str(home), "--rank", "8",
                        "--force", "-q"], capture_output=True, text=True, env=env_home, cwd=ROOT, timeout=120)
    _assert_user_error(r, "is the home directory")
    _assert_user_error(_convert(src, "/", "--force"), "is a filesystem root")
    assert _tree(tmp_path) == before


def test_heal_force_never_replaces_the_working_directory(mla, base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("user data")
    before = _tree(tmp_path)
    for output, phrase in (("", "--output is empty"), (".", "is the working directory")):
        r = _cli("heal", mla, "--output", output, "--data", base["text"], "--force", "--seq-len", 16, "-q", cwd=work)
        _assert_user_error(r, phrase)
    assert _tree(tmp_path) == before


def test_heal_force_is_atomic(mla, base, tmp_path):
    """A user error found after --force was accepted (a teacher with another vocabulary) leaves the old output."""
    old = shutil.copytree(mla, tmp_path / "healed")  # a previous output of ours
    teacher = build_source(tmp_path / "teacher", n_kv=2, vocab=120)
    before = _tree(tmp_path)
    r = _cli("heal", mla, "--output", old, "--data", base["text"], "--teacher", teacher, "--force", "--seq-len", 16,
             "--max-steps", 1, "-q")
    _assert_user_error(r, "has a vocabulary of 120 logits")
    assert _tree(tmp_path) == before and _leftovers(old) == []


def test_heal_interrupted_by_sigterm_before_writing(mla, base, tmp_path):
    """SIGTERM while the data is read: exit 130, the one interruption line, and no OUTPUT (not even .heal-data)."""
    out = tmp_path / "healed"
    slow = SLOW_CLI.replace("import mha2mla.conversion as c", "import mha2mla.heal as c").replace(
        "real = c.convert_attention", "real = c.token_blocks").replace("c.convert_attention = slow", "c.token_blocks = slow")
    slow = slow.replace("def slow(**kw):", "def slow(*a, **kw):").replace("return real(**kw)", "return real(*a, **kw)")
    p = subprocess.Popen([sys.executable, "-c", slow, "heal", mla, "--output", str(out), "--data", base["text"],
                          "--seq-len", "16", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=ROOT)
    cache = out / ".heal-data" / "tokens.json"
    deadline = time.time() + 120
    while not cache.exists():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"heal never tokenised its data: {p.communicate()}")
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == "error: interrupted; no output was written"
    assert not out.exists() and _leftovers(out) == []


def test_convert_interrupted_by_sigterm_before_writing(base, tmp_path):
    out = tmp_path / "out"
    slow = SLOW_CLI.replace("real = c.convert_attention", "real = c.load_source").replace(
        "c.convert_attention = slow", "c.load_source = slow").replace("def slow(**kw):", "def slow(*a, **kw):").replace(
        "return real(**kw)", "return real(*a, **kw)").replace("time.sleep(60)", "open(%r, 'w').close(); time.sleep(60)"
                                                              % str(tmp_path / "started"))
    p = subprocess.Popen([sys.executable, "-c", slow, "convert", base["src"], "--output", str(out), "--rank", "8", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"convert never started: {p.communicate()}")
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    _assert_user_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr),
                       "interrupted; no output was written", out)
    assert p.returncode == 130


# --- user errors that used to be tracebacks or silent ---------------------------------------------------------------


def test_calibration_without_a_tokenizer(base, tmp_path):
    src = _copy(base, tmp_path)
    for n in os.listdir(src):
        if n.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(src, n))
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out, "--calibration", base["text"]), "has no tokenizer", out)


def test_calibration_file_is_checked_before_the_tokenizer(base, tmp_path):
    src = _copy(base, tmp_path)
    (tmp_path / "src" / "tokenizer.json").write_text("{ not json")
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out, "--calibration", tmp_path / "missing.txt"), "does not exist", out)
    _assert_user_error(_convert(src, out, "--calibration", base["text"]), "its tokenizer cannot be loaded", out)


def test_tokenizer_larger_than_the_vocabulary(base, tmp_path, mla):
    small = build_source(tmp_path / "small", n_kv=2, vocab=20)  # the corpus tokenizer has more than 20 words
    out = tmp_path / "out"
    _assert_user_error(_convert(small, out, "--calibration", base["text"]), "the tokenizer has", out)
    res = tmp_path / "res.json"
    r = _cli("eval", small, "--ppl-data", base["text"], "--no-cache", "--output", res, "-q")
    _assert_user_error(r, "does not belong to this model", res)


def test_eval_refuses_missing_weights(mla, base, tmp_path):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(mla, tmp_path / "broken")
    index = load_json(model / "model.safetensors.index.json")
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    shard = model / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    res = tmp_path / "res.json"
    r = _cli("eval", model, "--ppl-data", base["text"], "--no-cache", "--output", res, "-q")
    line = _assert_user_error(r, "does not load cleanly: 1 missing keys", res)
    assert name in line


def test_eval_without_a_tokenizer(mla, base, tmp_path):
    model = shutil.copytree(mla, tmp_path / "notok")
    for n in os.listdir(model):
        if n.startswith(("tokenizer", "special_tokens")):
            os.remove(model / n)
    res = tmp_path / "res.json"
    r = _cli("eval", model, "--ppl-data", base["text"], "--no-cache", "--output", res, "-q")
    line = _assert_user_error(r, "has no tokenizer (none of tokenizer.json, tokenizer_config.json); copy the", res)
    assert line.endswith("into it")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_eval_on_cuda_without_a_gpu(mla, base, tmp_path):
    res = tmp_path / "res.json"
    r = _cli("eval", mla, "--ppl-data", base["text"], "--device", "cuda", "--no-cache", "--output", res, "-q")
    _assert_user_error(r, "torch sees no CUDA device here", res)


def test_heal_resume_from_a_truncated_checkpoint(mla, base, tmp_path):
    out = tmp_path / "healed"
    common = ["heal", mla, "--output", out, "--data", base["text"], "--seq-len", 16, "--micro-batch-size", 2,
              "--save-every", 1, "-q"]
    _kill_heal_after_a_checkpoint(common, out)
    for ckpt in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        for n in os.listdir(ckpt):
            if n.endswith((".safetensors", ".bin")):
                path = os.path.join(ckpt, n)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
    before = _tree(out)
    r = _cli(*common, "--max-steps", 300, "--resume")
    _assert_user_error(r, "cannot be read")
    assert _tree(out) == before


def test_heal_refusals(mla, base, tmp_path):
    out = tmp_path / "healed"
    r = _cli("heal", base["src"], "--output", out, "--data", base["text"], "-q")
    _assert_user_error(r, "not an MLA one (no kv_lora_rank)", out)
    r = _cli("heal", mla, "--output", out, "--data", base["text"], "--resume", "-q")
    _assert_user_error(r, "has no checkpoint (checkpoints/step-N) to resume from", out)
    r = _cli("heal", mla, "--output", out, "--data", base["text"], "--set", "seq_len=abc", "--seq-len", 16, "-q")
    _assert_user_error(r, "--set seq_len='abc' and --seq-len both set seq_len", out)


@pytest.mark.parametrize("content,phrase", [
    ('{"body": "the cat sat"}\n', "no 'text' field (found ['body']); put each document's text under 'text'"),
    ('{"text": 5}\n', "the 'text' field is a int, not a string"),
])
def test_jsonl_without_text(base, tmp_path, content, phrase):
    data = tmp_path / "calib.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    line = _assert_user_error(_convert(base["src"], out, "--calibration", data), phrase, out)
    assert "--text-field" not in line  # convert has no such option


def test_bad_shapes_and_sizes(base, tmp_path):
    src = _copy(base, tmp_path)
    cfg = load_json(os.path.join(src, "config.json"))
    out = tmp_path / "out"
    _assert_user_error(_convert(base["src"], out, "--max-shard-size", "0"), "--max-shard-size must be a positive size", out)
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3, "num_key_value_heads": 3,
                                                              "head_dim": None}))
    _assert_user_error(_convert(src, out), "hidden_size 64 is not a multiple of num_attention_heads 3", out)


def test_unknown_source_tensor_is_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(base, tmp_path)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_user_error(_convert(src, out), "'model.layers.0.self_attn.q_norm.weight'; converting would drop them", out)


def test_usage_errors_are_one_line(tmp_path):
    for args, phrase in ((["convert"], "Missing argument 'SOURCE'"),
                         (["convert", "x", "-o", tmp_path / "o", "--rank", "abc"], "'abc' is not a valid integer"),
                         (["no-such-command"], "No such command")):
        r = _cli(*args)
        assert r.returncode == 2
        _assert_user_error(r, phrase)


def test_model_card_names_no_local_path(mla):
    card = open(os.path.join(mla, "README.md"), encoding="utf-8").read()
    assert "base_model: src\n" in card and str(os.path.dirname(mla)) not in card and "pypi.org" not in card
