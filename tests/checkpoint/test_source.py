"""Reading a source checkpoint (:mod:`mha2mla.checkpoint.source`): what is supported, what is refused (in one line,
before anything is written), and what is never trusted (pickles, remote code)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import TOKENIZER_FILES, copy_tokenizer_files, load_source
from mha2mla.errors import Mha2mlaError, UnsupportedSourceError
from tests.conftest import assert_user_error, convert_cli, copy_source, load_json


@pytest.mark.parametrize("arch,bias", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_a_source_reads_its_geometry_and_tensors_lazily(tiny_source, arch, bias):
    path = tiny_source(arch=arch, n_heads=4, n_kv=2, head_dim=16, hidden=64, layers=3, eps=1e-6, tied=not bias,
                       dtype=torch.bfloat16)
    src = load_source(path)
    assert (src.name, src.path) == (path, path) and src.gguf is None
    assert (src.n_layers, src.hidden, src.n_heads, src.n_kv, src.head_dim, src.eps) == (3, 64, 4, 2, 16, 1e-6)
    assert src.bias == {"q": bias, "k": bias, "v": bias, "o": False} and src.tied == (not bias)
    assert src.rope["rope_type"] == "default" and src.dtype == torch.bfloat16
    assert src.config["model_type"] == arch
    name = "model.layers.2.self_attn.k_proj.weight"
    assert src.has(name) and not src.has("model.layers.3.self_attn.k_proj.weight") and name in src.keys()
    k = src.get(name)
    assert k.dtype == torch.bfloat16 and k.shape == (2 * 16, 64)  # as stored
    assert ("lm_head.weight" in src.keys()) == bias
    with pytest.raises(Mha2mlaError, match="has no tensor 'model.layers.9.mlp.up_proj.weight'; the checkpoint is incomplete"):
        src.get("model.layers.9.mlp.up_proj.weight")


def test_missing_and_unknown_tensors_are_named(tiny_source):
    from safetensors.torch import load_file, save_file

    path = tiny_source(n_kv=2)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.gate_proj.weight"}, f,
              metadata={"format": "pt"})
    with pytest.raises(Mha2mlaError, match=r"lacks 1 tensor\(s\) it needs, e.g. 'model.layers.1.mlp.gate_proj.weight'"):
        load_source(path)


def test_unsupported_sources_raise_the_unsupported_error(tiny_source):
    path = tiny_source(n_kv=2)
    cfg = load_json(os.path.join(path, "config.json"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, f)
    with pytest.raises(UnsupportedSourceError, match="GemmaForCausalLM is not supported"):
        load_source(path)


def test_tokenizer_files_are_copied_without_auto_map(tiny_source, tmp_path):
    path = tiny_source(n_kv=2)
    tok_cfg = load_json(os.path.join(path, "tokenizer_config.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**tok_cfg, "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}, f)
    (tmp_path / "src" / "tokenization_evil.py").write_text("raise RuntimeError('remote code')\n")
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer_files(load_source(path), str(out))
    copied = sorted(os.listdir(out))
    assert copied == sorted(n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n)))
    assert "tokenizer.json" in copied and "tokenization_evil.py" not in copied
    assert "auto_map" not in load_json(out / "tokenizer_config.json")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "src" / "tokenizer.json").read_bytes()


def test_unsupported_and_broken_sources(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    cfg = load_json(os.path.join(src, "config.json"))
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(Mha2mlaError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(Mha2mlaError, match="Qwen3ForCausalLM is not supported.*q_norm"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(Mha2mlaError, match="not valid JSON"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 4096}))
    with pytest.raises(Mha2mlaError, match="sliding-window"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(Mha2mlaError, match="pickle files.*never unpickles"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    with pytest.raises(Mha2mlaError, match="does not exist"):
        mha2mla.convert(source=str(tmp_path / "nope"), output=str(tmp_path / "o1"), rank=8)
    with pytest.raises(Mha2mlaError, match="inside the source directory"):
        mha2mla.convert(source=src, output=os.path.join(src, "mla"), rank=8)
    assert not (tmp_path / "o1").exists()


def test_nan_weights_refused(tiny_source, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_source(n_kv=2)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(Mha2mlaError, match="layers.1.mlp.up_proj.*NaN or Inf"):
        mha2mla.convert(source=src, output=str(tmp_path / "mla"), rank=8, progress=False)
    assert not (tmp_path / "mla").exists()


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_user_error(convert_cli(tmp_path / "nope", out), "does not exist", out)


@pytest.mark.parametrize("model_type,arch,phrase", [
    ("gpt2", "GPT2LMHeadModel", "learned absolute positions"),
    ("gemma", "GemmaForCausalLM", "(1+γ) norms"),
    ("qwen3", "Qwen3ForCausalLM", "q_norm/k_norm"),
])
def test_unsupported_architectures(sources, tmp_path, model_type, arch, phrase):
    src = tmp_path / model_type
    src.mkdir()
    if model_type == "gpt2":
        cfg = {"model_type": "gpt2", "architectures": [arch], "n_embd": 64, "n_head": 4, "n_layer": 2,
               "vocab_size": 97, "n_positions": 256, "activation_function": "gelu_new"}
    else:
        cfg = {**load_json(os.path.join(sources["src"], "config.json")), "model_type": model_type, "architectures": [arch]}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    line = assert_user_error(convert_cli(src, out), f"{arch} is not supported", out)
    assert phrase in line and "mha2mla converts LlamaForCausalLM, MistralForCausalLM" in line


def test_malformed_config(sources, tmp_path):
    src = copy_source(sources, tmp_path)
    with open(os.path.join(src, "config.json"), "w") as f:
        f.write('{"model_type": "llama", "hidden_size": 64,')
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out), "config.json is not valid JSON", out)


def test_missing_config(sources, tmp_path):
    src = copy_source(sources, tmp_path)
    os.remove(os.path.join(src, "config.json"))
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out), "no config.json", out)


def test_truncated_shard(sources, tmp_path):
    src = copy_source(sources, tmp_path)
    f = os.path.join(src, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)
    out = tmp_path / "out"
    line = assert_user_error(convert_cli(src, out), "truncated or corrupt", out)
    assert "model.safetensors" in line


def test_index_names_a_missing_shard(sources, tmp_path):
    src = copy_source(sources, tmp_path, "sharded")
    index = load_json(os.path.join(src, "model.safetensors.index.json"))["weight_map"]
    shard = index["model.layers.1.self_attn.k_proj.weight"]
    os.remove(os.path.join(src, shard))
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out), f"the index names shard {shard!r}, which is missing", out)


@pytest.mark.parametrize("tensor,value", [
    ("model.layers.1.self_attn.q_proj.weight", float("nan")),
    ("model.embed_tokens.weight", float("inf")),
])
def test_non_finite_weights(sources, tmp_path, tensor, value):
    from safetensors.torch import load_file, save_file

    src = copy_source(sources, tmp_path)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd[tensor][3, 5] = value
    save_file(sd, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out), f"source tensor {tensor!r} contains NaN or Inf values", out)


def test_pickle_only_weights_are_never_opened(sources, tmp_path):
    """An invalid pickle gives the refusal (not an unpickling error), and a malicious one never runs."""
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(os.path.join(sources["src"], "config.json"), src)
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (src / "pytorch_model.bin").write_bytes(b"\x80\x05this is not a pickle")
    (src / "training_args.pt").write_bytes(pickle.dumps(Payload()))
    out = tmp_path / "out"
    line = assert_user_error(convert_cli(src, out), "weights only in pickle files (pytorch_model.bin, training_args.pt); "
                                                  "mha2mla never unpickles", out)
    assert "unpickl" not in line.replace("never unpickles", "") and not marker.exists()


def test_auto_map_code_is_never_imported(sources, tmp_path):
    src = copy_source(sources, tmp_path)
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
    r = convert_cli(src, out, "--calibration", sources["text"], "--calibration-samples", 2, "--calibration-length", 16)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert not [n for n in os.listdir(out) if n.endswith(".py")]
    assert "auto_map" not in load_json(out / "config.json")
    assert load_json(out / "mha2mla.json")["source"]["ignored_auto_map"] == cfg["auto_map"]


def test_unknown_source_tensor_is_refused(sources, tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy_source(sources, tmp_path)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out), "'model.layers.0.self_attn.q_norm.weight'; converting would drop them", out)


def test_heads_that_do_not_divide_the_hidden_size(sources, tmp_path):
    # (test_bad_shapes_and_sizes before; its --max-shard-size half is in tests/checkpoint/test_writer.py)
    src = copy_source(sources, tmp_path)
    cfg = load_json(os.path.join(src, "config.json"))
    out = tmp_path / "out"
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3, "num_key_value_heads": 3,
                                                              "head_dim": None}))
    assert_user_error(convert_cli(src, out), "hidden_size 64 is not a multiple of num_attention_heads 3", out)
