"""The healing loop (:mod:`mha2mla.heal.loop`) under `accelerate launch --num_processes 2` on the CPU (gloo): DDP and FSDP2.

Two processes with one sequence each must take the same steps as one process that accumulates two: the same rows of
data, the same mean loss, the same update. Each case launches the real command line, as a user would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mha2mla.heal.loop import heal
from tests.conftest import ENV, HEAL_SENTENCES, ROOT, tiny_mla

CONFIGS = os.path.join(ROOT, "recipes", "accelerate")
STEPS = 4
# A constant learning rate: a run stopped at step k and resumed to step n then takes the same steps as a run of n
# steps (a decaying schedule depends on max_steps).
COMMON = dict(seq_len=16, lr=3e-3, log_every=100, seed=3, schedule="constant")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    text = root / "train.txt"
    text.write_text(" ".join(HEAL_SENTENCES * 40))
    model = tiny_mla(root / "mla", tied_scale=0.3)  # a tied source's conversion: the one table is shared across processes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the reference: one process, two micro-batches of one sequence per step
        refs = {tie: heal(model=model, output=root / f"single-{tie}", data=str(text), max_steps=STEPS,
                          micro_batch_size=1, gradient_accumulation_steps=2, tie_embeddings=tie, **COMMON)
                for tie in (True, False)}
    finally:
        torch.set_num_threads(n)
    return {"root": root, "model": model, "text": str(text), "ref": refs[True], "ref_untied": refs[False]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, run: dict, out, *extra) -> dict:
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
            "--main_process_port", str(_free_port()), "-m", "mha2mla", "heal", run["model"], "--output", str(out),
            "--data", run["text"], "--micro-batch-size", "1", "--grad-accum", "1", "--seq-len", "16", "--lr", "3e-3",
            "--seed", "3", "--set", "schedule=constant", "-q", *map(str, extra)]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "mha2mla.json"), encoding="utf-8") as f:
        return json.load(f)["heal"]


def _tensors(path) -> dict:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _same_checkpoint(path, ref_path, atol: float) -> None:
    from transformers import AutoModelForCausalLM

    got, want = _tensors(path), _tensors(ref_path)
    assert sorted(got) == sorted(want)
    assert {k: t.dtype for k, t in got.items()} == {k: t.dtype for k, t in want.items()}
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in got)
    assert worst <= atol, worst
    model = AutoModelForCausalLM.from_pretrained(path)  # stock transformers, no remote code
    assert type(model).__name__ == "DeepseekV3ForCausalLM"


def test_ddp_two_processes_reproduce_one_with_accumulation(run, tmp_path):
    rec = _launch("cpu-ddp-2proc.yaml", run, tmp_path / "ddp", "--max-steps", STEPS)
    assert rec["num_processes"] == 2 and rec["tokens"] == run["ref"]["tokens"]
    assert rec["memory"]["tied_embedding"] == run["ref"]["memory"]["tied_embedding"] == [
        "model.embed_tokens.weight", "lm_head.weight", 0.3]
    assert rec["losses"] == pytest.approx(run["ref"]["losses"], abs=1e-5, rel=0)
    _same_checkpoint(tmp_path / "ddp", run["root"] / "single-True", atol=1e-4)


def test_fsdp_two_processes_reproduce_one_and_resume_from_sharded_checkpoints(run, tmp_path):
    out = tmp_path / "fsdp"
    first = _launch("cpu-fsdp-2proc.yaml", run, out, "--max-steps", STEPS // 2, "--save-every", 1,
                    "--set", "keep_checkpoints_at_end=true")
    shards = os.listdir(out / "checkpoints" / f"step-{STEPS // 2}")
    assert any(n.startswith("pytorch_model_fsdp") for n in shards), shards  # saved sharded, not gathered
    rec = _launch("cpu-fsdp-2proc.yaml", run, out, "--max-steps", STEPS, "--save-every", 1, "--resume")
    assert rec["num_processes"] == 2 and rec["resumed_from"] == [STEPS // 2]
    assert rec["memory"]["tied_embedding"] is None  # FSDP shards the head: the tie is DDP's and one process's
    assert rec["losses"][: STEPS // 2] == first["losses"]
    assert rec["losses"] == pytest.approx(run["ref_untied"]["losses"], abs=1e-4, rel=0)
    _same_checkpoint(out, run["root"] / "single-False", atol=1e-4)
