"""lm-eval tasks (:mod:`mha2mla.eval.tasks`): local task files win over the built-in names."""

from __future__ import annotations

from mha2mla.eval.tasks import resolve_tasks
from tests.conftest import TASK_YAML


def test_local_tasks_win_over_builtin_names(tmp_path):
    """`arc_easy` resolves to a local `arc_easy_local` (offline) even though lm-eval has a built-in `arc_easy`."""
    (tmp_path / "arc_easy_local.yaml").write_text(TASK_YAML.replace("tiny_mc_local", "arc_easy_local").format(data="x"))
    mapping, tm = resolve_tasks(names=["arc_easy"], include_path=str(tmp_path))
    assert mapping == {"arc_easy": "arc_easy_local"} and tm.all_tasks == ["arc_easy_local"]
