"""`mha2mla heal` on tiny random DeepseekV3 checkpoints made to look converted (latent norm made linear)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from mha2mla.cli import main
from mha2mla.data import load_texts, pack_tokens, token_blocks
from mha2mla.errors import Mha2mlaError
from mha2mla.heal import heal
from mha2mla.heal_ops import block_indices, measure_latent_scales
from mha2mla.recipe import HealRecipe, load_recipe, lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA, EPS, RANK = 2.0**-12, 1e-6, 16
SENTENCES = [
    "the quick brown fox jumps over the lazy dog .",
    "a latent attention model compresses keys and values into a small cache .",
    "healing a converted model recovers most of the lost quality .",
    "multi head latent attention caches one latent vector per token .",
]
FAST = dict(seq_len=16, micro_batch_size=2, lr=3e-3, log_every=100)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and contention on shared CPUs)
    yield
    torch.set_num_threads(n)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _tiny_mla(path, *, seed: int = 0, vocab_extra: int = 0) -> str:
    """A random tiny DeepseekV3 with the converter's linear latent norm: latent rows × α, norm weight sqrt(eps)/α."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tok = _tokenizer()
    cfg = DeepseekV3Config(
        vocab_size=len(tok) + vocab_extra, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=RANK,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, rms_norm_eps=EPS,
        max_position_embeddings=1024, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.weight[:RANK] *= ALPHA
            layer.self_attn.kv_a_layernorm.weight.fill_(math.sqrt(EPS) / ALPHA)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("# tiny converted model\n")
    with open(os.path.join(path, "mha2mla.json"), "w") as f:
        json.dump({"format": "test", "options": {"rank": RANK}}, f)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    text = root / "train.txt"
    text.write_text(" ".join(SENTENCES * 12))
    (root / "empty.txt").write_text("   \n")
    return {
        "root": root,
        "model": _tiny_mla(root / "mla"),
        "teacher": _tiny_mla(root / "teacher", seed=1),
        "bad_teacher": _tiny_mla(root / "bad_teacher", seed=2, vocab_extra=5),
        "text": str(text),
        "empty": str(root / "empty.txt"),
    }


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


# --- recipes -----------------------------------------------------------------------------------------------------


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


def test_block_order_is_a_seeded_permutation_per_epoch():
    a = block_indices(0, 10, n_blocks=5, seed=3)
    assert sorted(a[:5].tolist()) == list(range(5)) and sorted(a[5:].tolist()) == list(range(5))
    assert torch.equal(block_indices(4, 3, n_blocks=5, seed=3), a[4:7])


# --- training ----------------------------------------------------------------------------------------------------


def test_latent_scale_is_measured_as_a_power_of_two(assets):
    scales = measure_latent_scales(_load(assets["model"]))
    assert set(scales) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for s in scales.values():
        assert s == 2.0 ** round(math.log2(s)) and 2**-14 <= s <= 2**-10


def test_ce_run_matches_step0_lowers_loss_and_writes_a_stock_checkpoint(assets, tmp_path):
    out = tmp_path / "healed"
    rec = heal(model=assets["model"], output=out, data=assets["text"], max_steps=8, **FAST)
    # step 0: the training loss is the converted model's loss on the same batch, computed independently here
    conv = _load(assets["model"])
    tok = _tokenizer()
    blocks = token_blocks(pack_tokens(tok, load_texts(assets["text"])), seq_len=16)
    ids = blocks[block_indices(0, 2, n_blocks=blocks.shape[0], seed=0)]
    with torch.no_grad():
        ref = float(conv(input_ids=ids, labels=ids).loss)
    assert rec["step0"]["converted_loss"] == pytest.approx(ref, abs=1e-5)
    assert rec["losses"][0] == pytest.approx(ref, abs=1e-5)
    assert rec["losses"][-1] < rec["losses"][0] - 0.5
    assert all(b <= a * 1.05 for a, b in zip(rec["losses"], rec["losses"][1:4]))  # no early blow-up
    # the output: stock class, stock form (latent rows still tiny), record, plot, card; no leftovers
    healed = _load(out)
    assert type(healed).__name__ == "DeepseekV3ForCausalLM"
    for layer, lc in zip(healed.model.layers, conv.model.layers):
        w, w0 = layer.self_attn.kv_a_proj_with_mqa.weight, lc.self_attn.kv_a_proj_with_mqa.weight
        assert 0.3 < float(w[:RANK].norm() / w0[:RANK].norm()) < 3  # trained at a scale, not blown up
        assert not torch.equal(w[:RANK], w0[:RANK])
        assert layer.self_attn.kv_a_layernorm.variance_epsilon == EPS
    with torch.no_grad():
        assert float(healed(input_ids=ids, labels=ids).loss) < ref - 0.5
    conv_rec = json.load(open(out / "mha2mla.json"))
    assert conv_rec["format"] == "test" and conv_rec["heal"]["steps"] == 8
    assert conv_rec["heal"]["tokens"] == 8 * 2 * 16 and len(conv_rec["heal"]["losses"]) == 8
    assert conv_rec["heal"]["recipe"]["lr"] == 3e-3
    assert (out / "loss.png").stat().st_size > 1000 and "## Healing" in (out / "README.md").read_text()
    assert not (out / ".heal-data").exists() and not (out / "checkpoints").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_distillation_attention_only(assets, tmp_path):
    out = tmp_path / "kd"
    rec = heal(model=assets["model"], output=out, data=assets["text"], teacher=assets["teacher"], max_steps=3,
               train="attention", distill_alpha=0.7, distill_temperature=2.0, **FAST)
    assert len(rec["kd"]) == 3 and all(math.isfinite(x) and x > 0 for x in rec["kd"])
    assert rec["teacher"] == assets["teacher"]
    for loss, ce, kd in zip(rec["losses"], rec["ce"], rec["kd"]):
        assert loss == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    a, b = _load(assets["model"]).state_dict(), _load(out).state_dict()
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_teacher_with_another_vocabulary_is_refused(assets, tmp_path):
    with pytest.raises(Mha2mlaError, match="vocabulary of 41 logits, the model 36"):
        heal(model=assets["model"], output=tmp_path / "x", data=assets["text"], teacher=assets["bad_teacher"],
             max_steps=1, **FAST)
    assert not (tmp_path / "x").exists()


def test_output_that_contains_the_model_is_refused_even_with_force(assets):
    with pytest.raises(Mha2mlaError, match="contains the model"):
        heal(model=assets["model"], output=assets["root"], data=assets["text"], force=True, max_steps=1, **FAST)
    assert os.path.isfile(os.path.join(assets["model"], "config.json"))


def test_resume_after_a_kill_gives_the_same_losses(assets, tmp_path):
    kw = dict(model=assets["model"], data=assets["text"], max_steps=6, save_every=2, keep_checkpoints=2,
              gradient_accumulation_steps=2, warmup_steps=2, keep_checkpoints_at_end=True, **FAST)
    full = heal(output=tmp_path / "full", **kw)

    class Killed(Exception):
        pass

    def kill_at_3(step, info):
        if step == 3:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        heal(output=out, on_step=kill_at_3, **kw)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"]
    (out / "checkpoints" / ".tmp-step-4").mkdir()  # a save interrupted by the kill
    with pytest.raises(Mha2mlaError, match="exists; pass --force"):
        heal(output=out, **kw)
    with pytest.raises(Mha2mlaError, match="lr: 0.003 then, 0.001 now"):
        heal(output=out, resume=True, **{**kw, "lr": 1e-3})
    res = heal(output=out, resume=True, **kw)
    assert res["resumed_from"] == [2] and len(res["losses"]) == 6
    assert res["losses"] == pytest.approx(full["losses"], abs=1e-6)
    assert res["grad_norm"] == pytest.approx(full["grad_norm"], abs=1e-5)
    a, b = _load(tmp_path / "full").state_dict(), _load(out).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert sorted(os.listdir(out / "checkpoints")) == ["step-4", "step-6"]
    more = heal(output=out, resume=True, **{**kw, "max_steps": 7})  # a finished run continues from its last checkpoint
    assert more["resumed_from"] == [2, 6] and len(more["losses"]) == 7 and more["losses"][:6] == res["losses"]


def test_bf16_autocast_with_gradient_checkpointing(assets, tmp_path):
    out = tmp_path / "bf16"
    rec = heal(model=assets["model"], output=out, data=assets["text"], max_steps=2, mixed_precision="bf16",
               gradient_checkpointing=True, **FAST)
    assert rec["losses"][0] == pytest.approx(rec["step0"]["converted_loss"], abs=1e-6)  # same autocast for both
    assert all(math.isfinite(x) for x in rec["losses"])
    cfg = json.load(open(out / "config.json"))
    assert cfg["dtype"] == "float32" and cfg["use_cache"] is True


# --- command line ------------------------------------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, ["heal", *map(str, args)])


def test_cli_runs_and_refuses_an_existing_output(assets, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# mha2mla heal ...\nseq_len: 16\nmicro_batch_size: 2\nmax_steps: 5\nlr: 1.0e-3\n")
    out = tmp_path / "cli"
    r = _cli(assets["model"], "--output", out, "--data", assets["text"], "--recipe", recipe, "--max-steps", 2,
             "--save-every", 1, "--set", "log_every=1", "-q")
    assert r.exit_code == 0, r.output
    assert json.load(open(out / "mha2mla.json"))["heal"]["steps"] == 2
    assert not (out / "checkpoints").exists()  # resumable state is dropped once the run is finished
    r = _cli(assets["model"], "--output", out, "--data", assets["text"], "--recipe", recipe)
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
def test_cli_errors_are_one_clear_line(assets, tmp_path, args, words):
    args = [a.format(**assets) for a in args]
    r = _cli(*args, "--output", tmp_path / "o")
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
