"""A checkpoint's config and tensor shapes without its weights (:mod:`mha2mla.checkpoint.meta`). The ``check``
command's refusals of broken checkpoints are in tests/cli/test_check.py."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from mha2mla.checkpoint.meta import read_checkpoint_meta, read_checkpoint_tensors
from mha2mla.errors import Mha2mlaError
from tests.conftest import save_small_mla


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_shapes_come_from_the_headers_of_every_shard(tmp_path, shard_size):
    path = save_small_mla(tmp_path / "m", max_shard_size=shard_size)
    tensors = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    assert (len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 1) == (shard_size is not None)
    config, shapes = read_checkpoint_tensors(path)
    assert config == json.load(open(os.path.join(path, "config.json")))
    assert shapes == {name: tuple(t.shape) for name, t in tensors.items()}
    assert shapes["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (16 + 8, 32)
    config2, names = read_checkpoint_meta(path)
    assert config2 == config and sorted(names) == sorted(tensors)


def test_a_tensor_in_two_shards_and_a_bad_directory_are_refused(tmp_path):
    path = save_small_mla(tmp_path / "m")
    extra = {"model.norm.weight": load_file(os.path.join(path, "model.safetensors"))["model.norm.weight"]}
    save_file(extra, os.path.join(path, "extra.safetensors"))
    with pytest.raises(Mha2mlaError, match="tensor 'model.norm.weight' is in both extra.safetensors and model.safetensors"):
        read_checkpoint_tensors(path)
    with pytest.raises(Mha2mlaError, match="is not a directory"):
        read_checkpoint_tensors(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("[1, 2]")
    with pytest.raises(Mha2mlaError, match="config.json is not a JSON object"):
        read_checkpoint_tensors(str(tmp_path / "empty"))
