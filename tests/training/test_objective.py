"""Objectives are recipes: the job's sections pick one class, and the training loop, the driver and the export name
none of them (a new objective is a new module plus its config section). Each recipe trains for real in
test_train.py (SFT), test_preference.py and test_grpo.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hone.config import load_job
from hone.training import objective_class
from hone.training.grpo import GRPOObjective
from hone.training.objective import RECIPES
from hone.training.preference import PreferenceObjective
from hone.training.sft import SFTObjective

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("recipe", "cls", "label"), [("tiny-smoke", SFTObjective, "sft"), ("dpo-tiny", PreferenceObjective, "dpo"),
                                                      ("grpo-tiny", GRPOObjective, "grpo")])
def test_the_job_s_section_picks_its_recipe(recipe, cls, label):
    job = load_job(REPO / "jobs" / f"{recipe}.yaml")
    assert objective_class(job) is cls and cls.label(job) == label


def test_the_loop_driver_and_export_name_no_objective():
    sections = set(RECIPES) | {"sft", "dpo", "kto", "ipo", "simpo", "orpo"}
    for module in ("loop.py", "driver.py", "export.py"):
        text = (REPO / "platform" / "hone" / "training" / module).read_text().lower()
        named = sorted(s for s in sections if re.search(rf"\b{s}\b", text))
        assert not named, f"training/{module} names objectives {named}: that belongs in the recipe"
