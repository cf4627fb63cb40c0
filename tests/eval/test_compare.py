"""Models side by side (:mod:`mha2mla.eval.compare`): models that do not load cleanly, and devices that are not
there, are refused in one line (through the command line); the results table and its cache are checked through
``mha2mla eval`` in tests/cli/test_eval.py."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import assert_user_error, load_json, run_cli


def test_eval_refuses_missing_weights(mla, sources, tmp_path):
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
    r = run_cli("eval", model, "--ppl-data", sources["text"], "--no-cache", "--output", res, "-q")
    line = assert_user_error(r, "does not load cleanly: 1 missing keys", res)
    assert name in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_eval_on_cuda_without_a_gpu(mla, sources, tmp_path):
    res = tmp_path / "res.json"
    r = run_cli("eval", mla, "--ppl-data", sources["text"], "--device", "cuda", "--no-cache", "--output", res, "-q")
    assert_user_error(r, "torch sees no CUDA device here", res)
