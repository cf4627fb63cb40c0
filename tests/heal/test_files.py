"""The healing run's files (:mod:`mha2mla.heal.files`): which checkpoint a resume starts from, the final directory
put in place, and the model card. Saving and resuming end to end are in tests/heal/test_loop.py."""

from __future__ import annotations

import json
import os

import pytest

from mha2mla.errors import Mha2mlaError
from mha2mla.heal.files import finish_output, latest_checkpoint, model_card, read_trainer_state


def _checkpoint(output, name, state=None):
    path = output / "checkpoints" / name
    path.mkdir(parents=True)
    if state is not None:
        (path / "trainer_state.json").write_text(json.dumps(state))
    return str(path)


def test_a_resume_starts_from_the_complete_checkpoint_with_the_highest_step(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    _checkpoint(tmp_path, "step-2", {"step": 2})
    best = _checkpoint(tmp_path, "step-10", {"step": 10})  # numerically, not by name: 10 > 9
    _checkpoint(tmp_path, "step-9", {"step": 9})
    _checkpoint(tmp_path, "step-12")  # no trainer state: a save that did not finish
    _checkpoint(tmp_path, ".tmp-step-14", {"step": 14})  # a save interrupted before its rename
    assert latest_checkpoint(str(tmp_path)) == best
    assert read_trainer_state(best) == {"step": 10}
    with pytest.raises(Mha2mlaError, match="step-12: cannot read trainer_state.json"):
        read_trainer_state(str(tmp_path / "checkpoints" / "step-12"))


@pytest.mark.parametrize("keep", [False, True])
def test_the_final_directory_replaces_the_run_directory_in_one_rename(tmp_path, keep):
    out = tmp_path / "healed"
    _checkpoint(out, "step-3", {"step": 3})
    (out / ".heal-data").mkdir()
    finish_output(str(out), lambda tmp: open(os.path.join(tmp, "model.safetensors"), "w").close(),
                  keep_checkpoints=keep)
    assert sorted(os.listdir(out)) == (["checkpoints", "model.safetensors"] if keep else ["model.safetensors"])
    assert sorted(os.listdir(tmp_path)) == ["healed"]  # no temporary or old directory left

    def fail(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        finish_output(str(out), fail, keep_checkpoints=keep)
    assert "model.safetensors" in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["healed"]


def test_model_card_appends_the_healing_section():
    record = {"steps": 8, "tokens": 4096, "data": "train.txt", "losses": [3.5, 2.25], "teacher": "big-model",
              "recipe": {"distill_alpha": 0.5, "train": "attention"}}
    card = model_card("# Converted\n\nsome text\n", record)
    assert card.startswith("# Converted\n\nsome text\n\n## Healing\n\n")
    assert "for 8 steps (4,096 tokens) on `train.txt`, distilled from `big-model` (alpha 0.5)" in card
    assert "trained parameters: attention. Training loss 3.5000 → 2.2500." in card
    plain = model_card(None, {**record, "teacher": None, "losses": []})
    assert plain.startswith("# Healed MLA checkpoint\n\n## Healing") and "distilled" not in plain and "nan → nan" in plain
