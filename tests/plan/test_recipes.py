"""Every shipped recipe with a `# plan:` line is re-planned: the verdict its comment states must be the
planner's verdict now, or the recipe promises hardware it no longer fits (or wastes)."""

from __future__ import annotations

import contextlib
import io
import shlex

import pytest

from dpo_ds.config.shipped import comment_field, recipes
from dpo_ds.plan.planner import main as plan_main

PLANNED = [r for r in recipes() if comment_field(r.path.read_text(), "plan")]


def test_the_big_recipes_carry_a_plan():
    assert {r.name for r in PLANNED} >= {"llama3_8b_full_dpo", "llama3_70b_lora_dpo", "qwen2_5_7b_32k_sp",
                                         "small_gpu_lora_dpo"}  # fmt: skip


@pytest.mark.parametrize("recipe", PLANNED, ids=lambda r: r.name)
def test_the_recipe_verdict_is_the_planners(recipe):
    text = recipe.path.read_text()
    command = shlex.split(comment_field(text, "plan"))
    assert command[:2] == ["dpo-ds", "plan"] and f"--config {recipe.name}" in " ".join(command)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plan_main(command[2:]) == 0
    verdict = [line for line in out.getvalue().splitlines() if line.startswith("estimate: ")]
    assert verdict, out.getvalue()
    assert recipe.verdict == verdict[-1].removeprefix("estimate: "), (
        f"{recipe.path}: the comment says '# verdict: {recipe.verdict}', the planner now says "
        f"'{verdict[-1]}'; re-plan and update the recipe"
    )
    assert recipe.verdict.startswith("fits in"), f"{recipe.name} does not fit the hardware it is written for"


def test_a_hub_id_without_a_shipped_config_says_how_to_get_one(capsys):
    assert plan_main(["model.name_or_path=someorg/not-a-model", "--gpus", "1", "--gpu-mem", "24"]) == 2
    err = capsys.readouterr().err
    assert "someorg/not-a-model" in err and "hf download someorg/not-a-model config.json" in err
