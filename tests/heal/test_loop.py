"""The healing loop (:func:`mha2mla.heal.loop.heal`): a short fine-tune that starts where the conversion left,
distils from a teacher, resumes after a kill, stays within memory, and refuses what it must not overwrite."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mha2mla.data import load_texts, pack_tokens, token_blocks
from mha2mla.errors import Mha2mlaError
from mha2mla.heal.loop import heal
from mha2mla.heal.losses import SDPA, block_indices
from tests.conftest import (ENV, HEAL_FAST, HEAL_SENTENCES, ROOT, TINY_MLA_EPS, TINY_MLA_RANK, assert_user_error,
                            build_source, frozen_model, heal_tokenizer, leftovers, load_json, random_mla, run_cli,
                            slow_cli, tree)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ce_run_matches_step0_lowers_loss_and_writes_a_stock_checkpoint(heal_assets, tmp_path):
    out = tmp_path / "healed"
    rec = heal(model=heal_assets["model"], output=out, data=heal_assets["text"], max_steps=8, **HEAL_FAST)
    # step 0: the training loss is the converted model's loss on the same batch, computed independently here
    conv = frozen_model(heal_assets["model"])
    tok = heal_tokenizer()
    blocks = token_blocks(pack_tokens(tok, load_texts(heal_assets["text"])), seq_len=16)
    ids = blocks[block_indices(0, 2, n_blocks=blocks.shape[0], seed=0)]
    with torch.no_grad():
        ref = float(conv(input_ids=ids, labels=ids).loss)
    assert rec["step0"]["converted_loss"] == pytest.approx(ref, abs=1e-5)
    assert rec["losses"][0] == pytest.approx(ref, abs=1e-5)
    assert rec["losses"][-1] < rec["losses"][0] - 0.5
    assert all(b <= a * 1.05 for a, b in zip(rec["losses"], rec["losses"][1:4]))  # no early blow-up
    # the output: stock class, stock form (latent rows still tiny), record, plot, card; no leftovers
    healed = frozen_model(out)
    assert type(healed).__name__ == "DeepseekV3ForCausalLM"
    for layer, lc in zip(healed.model.layers, conv.model.layers):
        w, w0 = layer.self_attn.kv_a_proj_with_mqa.weight, lc.self_attn.kv_a_proj_with_mqa.weight
        assert 0.3 < float(w[:TINY_MLA_RANK].norm() / w0[:TINY_MLA_RANK].norm()) < 3  # trained at a scale, not blown up
        assert not torch.equal(w[:TINY_MLA_RANK], w0[:TINY_MLA_RANK])
        assert layer.self_attn.kv_a_layernorm.variance_epsilon == TINY_MLA_EPS
    with torch.no_grad():
        assert float(healed(input_ids=ids, labels=ids).loss) < ref - 0.5
    conv_rec = json.load(open(out / "mha2mla.json"))
    assert conv_rec["format"] == "test" and conv_rec["heal"]["steps"] == 8
    assert conv_rec["heal"]["tokens"] == 8 * 2 * 16 and len(conv_rec["heal"]["losses"]) == 8
    assert conv_rec["heal"]["recipe"]["lr"] == 3e-3
    assert (out / "loss.png").stat().st_size > 1000 and "## Healing" in (out / "README.md").read_text()
    assert not (out / ".heal-data").exists() and not (out / "checkpoints").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_distillation_attention_only(heal_assets, tmp_path):
    out = tmp_path / "kd"
    rec = heal(model=heal_assets["model"], output=out, data=heal_assets["text"], teacher=heal_assets["teacher"], max_steps=3,
               train="attention", distill_alpha=0.7, distill_temperature=2.0, **HEAL_FAST)
    assert len(rec["kd"]) == 3 and all(math.isfinite(x) and x > 0 for x in rec["kd"])
    assert rec["teacher"] == heal_assets["teacher"]
    for loss, ce, kd in zip(rec["losses"], rec["ce"], rec["kd"]):
        assert loss == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    a, b = frozen_model(heal_assets["model"]).state_dict(), frozen_model(out).state_dict()
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_teacher_with_another_vocabulary_is_refused(heal_assets, tmp_path):
    with pytest.raises(Mha2mlaError, match="vocabulary of 41 logits, the model 36"):
        heal(model=heal_assets["model"], output=tmp_path / "x", data=heal_assets["text"], teacher=heal_assets["bad_teacher"],
             max_steps=1, **HEAL_FAST)
    assert not (tmp_path / "x").exists()


def test_output_that_contains_the_model_is_refused_even_with_force(heal_assets):
    with pytest.raises(Mha2mlaError, match="contains the model"):
        heal(model=heal_assets["model"], output=heal_assets["root"], data=heal_assets["text"], force=True, max_steps=1, **HEAL_FAST)
    assert os.path.isfile(os.path.join(heal_assets["model"], "config.json"))


def test_resume_after_a_kill_gives_the_same_losses(heal_assets, tmp_path):
    kw = dict(model=heal_assets["model"], data=heal_assets["text"], max_steps=6, save_every=2, keep_checkpoints=2,
              gradient_accumulation_steps=2, warmup_steps=2, keep_checkpoints_at_end=True, **HEAL_FAST)
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
    a, b = frozen_model(tmp_path / "full").state_dict(), frozen_model(out).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert sorted(os.listdir(out / "checkpoints")) == ["step-4", "step-6"]
    more = heal(output=out, resume=True, **{**kw, "max_steps": 7})  # a finished run continues from its last checkpoint
    assert more["resumed_from"] == [2, 6] and len(more["losses"]) == 7 and more["losses"][:6] == res["losses"]


def test_bf16_autocast_with_gradient_checkpointing(heal_assets, tmp_path):
    out = tmp_path / "bf16"
    rec = heal(model=heal_assets["model"], output=out, data=heal_assets["text"], max_steps=2, mixed_precision="bf16",
               gradient_checkpointing=True, **HEAL_FAST)
    assert rec["losses"][0] == pytest.approx(rec["step0"]["converted_loss"], abs=1e-6)  # same autocast for both
    assert all(math.isfinite(x) for x in rec["losses"])
    cfg = json.load(open(out / "config.json"))
    assert cfg["dtype"] == "float32" and cfg["use_cache"] is True


# --- memory: the lean settings change nothing but the memory ----------------------------------------------------


@pytest.fixture(scope="module")
def memory_assets(tmp_path_factory):
    """Two random models (``model``, ``teacher``) of :func:`~tests.conftest.mla_config` with the heal tokenizer, and
    the training ``text``."""
    root = tmp_path_factory.mktemp("heal-memory")
    tok = heal_tokenizer()
    out = {}
    for name, seed in (("model", 0), ("teacher", 1)):
        m = random_mla(seed, vocab=len(tok), eos_token_id=tok.eos_token_id)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    (root / "train.txt").write_text(" ".join(HEAL_SENTENCES * 12))
    out["text"] = str(root / "train.txt")
    return out


def test_memory_settings_do_not_change_the_training_losses(memory_assets, tmp_path):
    kw = dict(model=memory_assets["model"], data=memory_assets["text"], teacher=memory_assets["teacher"], max_steps=3, distill_alpha=0.4,
              distill_temperature=2.0, **HEAL_FAST)
    base = heal(output=tmp_path / "a", gradient_checkpointing=False, attn_implementation="eager",
                loss_chunk_tokens=10_000, **kw)
    lean = heal(output=tmp_path / "b", gradient_checkpointing=True, attn_implementation="sdpa", loss_chunk_tokens=5, **kw)
    assert base["memory"]["gradient_checkpointing"] is False and base["memory"]["attn_implementation"] == "eager"
    assert lean["memory"]["gradient_checkpointing"] is True and lean["memory"]["attn_implementation"] == SDPA
    assert lean["memory"]["loss_chunk_tokens"] == 5 and lean["memory"]["fused_head"] is True
    for key in ("losses", "ce", "kd"):
        assert len(lean[key]) == 3 and all(math.isfinite(x) for x in lean[key])
        assert lean[key] == pytest.approx(base[key], abs=1e-5)
    assert lean["step0"]["training_loss"] == pytest.approx(lean["step0"]["converted_loss"], abs=1e-6)
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert SDPA not in json.dumps(cfg)  # the healed checkpoint loads without mha2mla
    from transformers import AutoModelForCausalLM

    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert healed.config._attn_implementation != SDPA


def test_auto_checkpointing_follows_the_activation_estimate(memory_assets, tmp_path):
    small = heal(model=memory_assets["model"], output=tmp_path / "s", data=memory_assets["text"], max_steps=1, **HEAL_FAST)
    mem = small["memory"]
    assert mem["estimated_activation_bytes"] < mem["training_state_bytes"] and mem["gradient_checkpointing"] is False
    big = heal(model=memory_assets["model"], output=tmp_path / "l", data=memory_assets["text"], max_steps=1,
               **{**HEAL_FAST, "seq_len": 64, "micro_batch_size": 8})
    mem = big["memory"]
    assert mem["estimated_activation_bytes"] > mem["training_state_bytes"] and mem["gradient_checkpointing"] is True
    assert mem["attn_implementation"] == SDPA and os.path.isdir(tmp_path / "l")


# --- the command line: refusals, kills and signals -----------------------------------------------------------------


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


def test_heal_with_empty_data(mla, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    out = tmp_path / "healed"
    r = run_cli("heal", mla, "--output", out, "--data", empty, "--seq-len", 16, "-q")
    assert_user_error(r, f"data {str(empty)!r} is empty", out)


def test_a_tied_source_heals_as_one_table_and_is_written_twice(mla, sources, tmp_path):
    """``mla`` converts a tied source with a residual scale s: its embedding is s × its head. Healed tied, the step-0
    loss is the converted model's, one table fewer is trained, and the output keeps embedding = s × head exactly."""
    from safetensors.torch import load_file

    scale = load_json(os.path.join(mla, "mha2mla.json"))["plan"]["residual_scale"]
    assert scale != 1.0
    runs = {}
    for tie in (True, False):
        out = tmp_path / f"tie-{tie}"
        runs[tie] = heal(model=mla, output=out, data=sources["text"], max_steps=3, tie_embeddings=tie, **HEAL_FAST)
        w = {}
        for f in glob.glob(str(out / "*.safetensors")):
            w.update(load_file(f))
        runs[tie]["same_table"] = torch.equal(w["model.embed_tokens.weight"], w["lm_head.weight"] * scale)
    tied, untied = runs[True], runs[False]
    assert tied["memory"]["tied_embedding"] == ["model.embed_tokens.weight", "lm_head.weight", scale]
    assert untied["memory"]["tied_embedding"] is None
    vocab, hidden = frozen_model(mla).lm_head.weight.shape
    assert untied["trainable_parameters"] - tied["trainable_parameters"] == vocab * hidden
    assert tied["losses"][0] == pytest.approx(tied["step0"]["converted_loss"], abs=1e-6)
    assert tied["losses"][0] == pytest.approx(untied["losses"][0], abs=1e-6)
    assert tied["losses"][-1] < tied["losses"][0]
    assert tied["same_table"] and not untied["same_table"]


def test_heal_refusals(mla, sources, tmp_path):
    out = tmp_path / "healed"
    r = run_cli("heal", sources["src"], "--output", out, "--data", sources["text"], "-q")
    assert_user_error(r, "not an MLA one (no kv_lora_rank)", out)
    r = run_cli("heal", mla, "--output", out, "--data", sources["text"], "--resume", "-q")
    assert_user_error(r, "has no checkpoint (checkpoints/step-N) to resume from", out)
    r = run_cli("heal", mla, "--output", out, "--data", sources["text"], "--set", "seq_len=abc", "--seq-len", 16, "-q")
    assert_user_error(r, "--set seq_len='abc' and --seq-len both set seq_len", out)


def test_heal_killed_with_sigkill_resumes_from_its_last_checkpoint(mla, sources, tmp_path):
    out = tmp_path / "healed"
    common = ["heal", mla, "--output", out, "--data", sources["text"], "--seq-len", 16, "--micro-batch-size", 2,
              "--save-every", 1, "-q"]
    states = _kill_heal_after_a_checkpoint(common, out)
    done = {int(re.search(r"step-(\d+)", s).group(1)): s for s in glob.glob(states)}
    last = max(done)
    saved = json.load(open(done[last]))
    assert not os.path.exists(os.path.join(out, "mha2mla.json"))  # killed: no final model

    r = run_cli(*common, "--max-steps", last + 2, "--resume")
    assert r.returncode == 0, r.stderr
    rec = load_json(os.path.join(out, "mha2mla.json"))["heal"]
    assert rec["resumed_from"] == [last] and rec["steps"] == last + 2 and len(rec["losses"]) == last + 2
    assert rec["losses"][:last] == saved["history"]["losses"]  # the killed run's history came from the checkpoint
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and not os.path.exists(os.path.join(out, "checkpoints"))
    assert leftovers(out) == []


def test_heal_resume_from_a_truncated_checkpoint(mla, sources, tmp_path):
    out = tmp_path / "healed"
    common = ["heal", mla, "--output", out, "--data", sources["text"], "--seq-len", 16, "--micro-batch-size", 2,
              "--save-every", 1, "-q"]
    _kill_heal_after_a_checkpoint(common, out)
    for ckpt in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        for n in os.listdir(ckpt):
            if n.endswith((".safetensors", ".bin")):
                path = os.path.join(ckpt, n)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
    before = tree(out)
    r = run_cli(*common, "--max-steps", 300, "--resume")
    assert_user_error(r, "cannot be read")
    assert tree(out) == before


def test_heal_force_never_replaces_the_working_directory(mla, sources, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("user data")
    before = tree(tmp_path)
    for output, phrase in (("", "--output is empty"), (".", "is the working directory")):
        r = run_cli("heal", mla, "--output", output, "--data", sources["text"], "--force", "--seq-len", 16, "-q", cwd=work)
        assert_user_error(r, phrase)
    assert tree(tmp_path) == before


def test_heal_force_is_atomic(mla, sources, tmp_path):
    """A user error found after --force was accepted (a teacher with another vocabulary) leaves the old output."""
    old = shutil.copytree(mla, tmp_path / "healed")  # a previous output of ours
    teacher = build_source(tmp_path / "teacher", n_kv=2, vocab=120)
    before = tree(tmp_path)
    r = run_cli("heal", mla, "--output", old, "--data", sources["text"], "--teacher", teacher, "--force", "--seq-len", 16,
             "--max-steps", 1, "-q")
    assert_user_error(r, "has a vocabulary of 120 logits")
    assert tree(tmp_path) == before and leftovers(old) == []


def test_heal_interrupted_by_sigterm_before_writing(mla, sources, tmp_path):
    """SIGTERM while the data is read: exit 130, the one interruption line, and no OUTPUT (not even .heal-data)."""
    out = tmp_path / "healed"
    slow = slow_cli("mha2mla.heal.loop", "token_blocks")
    p = subprocess.Popen([sys.executable, "-c", slow, "heal", mla, "--output", str(out), "--data", sources["text"],
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
    assert not out.exists() and leftovers(out) == []
