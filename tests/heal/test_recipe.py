"""Heal recipes (:mod:`mha2mla.heal.recipe`): the shipped YAML files, the checks on every key and value, overrides,
and the learning-rate schedules."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from mha2mla.errors import Mha2mlaError
from mha2mla.heal.recipe import RESUMABLE_CHANGES, HealRecipe, load_recipe, lr_factor
from tests.conftest import ROOT, assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))))
def test_every_recipe_loads_and_opens_with_its_command(path):
    r = load_recipe(path)
    assert isinstance(r, HealRecipe) and r.max_steps > 0
    first = open(path).readline()
    assert first.startswith("#")
    assert "mha2mla heal" in open(path).read().split("\n\n")[0]
    assert lr_factor(r, 0) > 0


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml"))))
def test_every_accelerate_config_parses(path):
    cfg = yaml.safe_load(open(path))
    assert open(path).readline().startswith("#") and "accelerate launch" in open(path).read()
    assert cfg["num_processes"] >= 1 and "distributed_type" in cfg


def test_recipe_names_all_three_required():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)}
    assert {"smollm2-135m-cpu.yaml", "smollm2-135m-1gpu.yaml", "llama2-7b-8gpu.yaml", "fsdp-8gpu.yaml",
            "ddp-8gpu.yaml", "cpu.yaml"} <= names


@pytest.mark.parametrize(
    "values, words",
    [
        ({"lrr": 1e-4}, ["unknown key 'lrr'", "did you mean 'lr'"]),
        ({"lr": -1.0}, ["lr", "-1.0"]),
        ({"lr": "fast"}, ["lr", "'fast'"]),
        ({"train": "mlp"}, ["train", "'mlp'", "attention"]),
        ({"micro_batch_size": 0}, ["micro_batch_size", "0"]),
        ({"seq_len": 2.5}, ["seq_len", "2.5"]),
        ({"latent_rescale": "yes"}, ["latent_rescale", "'yes'"]),
        ({"distill_alpha": 1.5}, ["distill_alpha", "1.5"]),
        ({"mixed_precision": "fp16"}, ["mixed_precision", "'fp16'"]),
        ({"schedule": "wsd"}, ["decay_steps"]),
    ],
)
def test_recipe_rejects_bad_keys_and_values(tmp_path, values, words):
    p = tmp_path / "r.yaml"
    p.write_text("# test\n" + yaml.safe_dump(values))
    with pytest.raises(Mha2mlaError) as e:
        load_recipe(str(p))
    for w in words:
        assert w in str(e.value)
    assert str(p) in str(e.value) or "recipe" in str(e.value)


def test_overrides_win_and_are_checked():
    r = load_recipe({"lr": 1e-3, "max_steps": 5}, lr=2e-3, max_steps=None)
    assert (r.lr, r.max_steps) == (2e-3, 5)
    with pytest.raises(Mha2mlaError, match="override: unknown key 'stepz'"):
        load_recipe(None, stepz=3)
    with pytest.raises(Mha2mlaError, match="max_steps must be ≥ 0, got -3"):
        load_recipe(None, max_steps=-3)


def test_lr_schedules():
    r = load_recipe(None, max_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(r, s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(r, 10) == pytest.approx(0.1)
    w = load_recipe(None, max_steps=10, warmup_steps=1, schedule="wsd", decay_steps=4)
    assert [lr_factor(w, s) for s in (1, 5)] == [1.0, 1.0] and lr_factor(w, 10) == 0.0


@pytest.mark.parametrize(
    "values, words",
    [
        ({"gradient_checkpointing": "yes"}, ["gradient_checkpointing", "auto, true or false", "'yes'"]),
        ({"attn_implementation": "flash"}, ["attn_implementation", "'flash'", "sdpa"]),
        ({"loss_chunk_tokens": -1}, ["loss_chunk_tokens", "-1"]),
        ({"loss_chunk_tokens": 2.5}, ["loss_chunk_tokens", "2.5"]),
    ],
)
def test_recipe_checks_the_memory_keys(values, words):
    with pytest.raises(Mha2mlaError) as e:
        load_recipe(values)
    assert all(w in str(e.value) for w in words)


def test_recipe_memory_defaults_are_automatic_and_resumable():
    r = load_recipe(None)
    assert (r.gradient_checkpointing, r.attn_implementation, r.loss_chunk_tokens) == ("auto", "auto", 0)
    assert load_recipe({"gradient_checkpointing": True}).gradient_checkpointing is True
    assert {"gradient_checkpointing", "attn_implementation", "loss_chunk_tokens"} <= RESUMABLE_CHANGES


def test_heal_recipe_with_unknown_key(sources, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# mha2mla heal ...\nseq_len: 16\nlearning_rate: 1.0e-3\n")
    out = tmp_path / "healed"
    r = run_cli("heal", sources["src"], "--output", out, "--data", sources["text"], "--recipe", recipe, "-q")
    assert_user_error(r, "unknown key 'learning_rate'", out)
