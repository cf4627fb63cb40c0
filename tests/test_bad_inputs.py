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


def test_heal_with_empty_data(base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    out = tmp_path / "healed"
    r = _cli("heal", base["src"], "--output", out, "--data", empty, "--seq-len", 16, "-q")
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


def test_disk_full_leaves_nothing(base, tmp_path, monkeypatch):
    import safetensors.torch
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


def test_heal_killed_with_sigkill_resumes_from_its_last_checkpoint(base, tmp_path):
    import mha2mla

    model = tmp_path / "mla"
    mha2mla.convert(source=base["src"], output=str(model), rank=16, progress=False)
    out = tmp_path / "healed"
    common = ["heal", model, "--output", out, "--data", base["text"], "--seq-len", 16, "--micro-batch-size", 2,
              "--save-every", 1, "-q"]
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
