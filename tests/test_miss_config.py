"""MISS's settings (medvqa_lib.papers.miss.config) and the package's boundaries."""

import ast
import re
from pathlib import Path

import pytest

from medvqa_lib.config import get_profile
from medvqa_lib.errors import ConfigError
from medvqa_lib.papers.miss import config
from medvqa_lib.papers.miss.config import PLANS, MISSConfig, study_plan

PACKAGE = Path(config.__file__).parent
SHARED = {"config", "errors", "io", "text", "plots", "data", "evaluation", "training", "transcap", "nn",
          "experiments", "notebook"}


def test_study_plan_drops_none_overrides(tmp_path):
    plain = study_plan(get_profile("smoke"), tmp_path)
    plan = study_plan(get_profile("smoke"), tmp_path, pairs=None, seeds=None, untie_decoder=None,
                      model={"image_size": None, "decoder_objective": None}, pretrain={"epochs": None},
                      finetune={"lr": None, "num_beams": None})
    assert plan == plain
    assert plan.pairs == PLANS["smoke"]["pairs"] and plan.seeds == (0,)
    assert plan.model == MISSConfig.from_profile("smoke")


def test_study_plan_rejects_an_unknown_key_naming_the_valid_ones(tmp_path):
    prof = get_profile("smoke")
    with pytest.raises(ConfigError, match=r"unknown MISS study parameter.*'pair'.*valid ones are: .*pairs"):
        study_plan(prof, tmp_path, pair=10)
    with pytest.raises(ConfigError, match=r"unknown MISS model parameter.*'depth'.*vision_depth"):
        study_plan(prof, tmp_path, model={"depth": 2})
    with pytest.raises(ConfigError, match=r"unknown finetune setting.*'epoch'.*epochs"):
        study_plan(prof, tmp_path, finetune={"epoch": 2})
    with pytest.raises(ConfigError, match=r"unknown MISS model parameter.*'depth'"):
        study_plan(prof, tmp_path, {"model": {"depth": None}})
    with pytest.raises(ConfigError, match="choose one of smoke, cpu, gpu"):
        MISSConfig.from_profile("laptop")


def test_overrides_merge_into_the_named_fields(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path,
                      {"model": {"vision_depth": 2, "image_size": None}, "finetune": {"batch_size": 8},
                       "ablation_epochs": 3, "seeds": [4, 5]},
                      model={"image_size": 64, "decoder_objective": "lm"}, finetune={"lr": 1e-3},
                      transcap_fractions=[0.25, 1.0])
    m = plan.model
    assert (m.vision_depth, m.image_size, m.decoder_objective, m.text_depth) == (2, 64, "lm", 3)
    assert (plan.finetune.batch_size, plan.finetune.lr, plan.finetune.group_size) == (8, 1e-3, 4)
    assert plan.ablation_epochs == 3 and plan.seeds == (4, 5) and plan.transcap_fractions == (0.25, 1.0)
    assert plan.finetune.out_dir == tmp_path / "finetune" and plan.pretrain.out_dir == tmp_path / "pretrain"
    assert PLANS["cpu"]["model"]["text_depth"] == 3 and "batch_size" not in PLANS["cpu"]["model"]  # untouched


def test_the_model_presets_live_in_plans():
    for name, plan in PLANS.items():
        assert MISSConfig.from_profile(name) == MISSConfig(**plan["model"])
        assert MISSConfig.from_profile(get_profile(name)) == MISSConfig.from_profile(name)
    assert set(PLANS) == {"smoke", "cpu", "gpu"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("medvqa_lib")}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_the_package_imports_only_the_shared_core_and_itself(path):
    for module in _imports(path):
        parts = module.split(".")
        assert parts[1] in SHARED or parts[:3] == ["medvqa_lib", "papers", "miss"], f"{path.name} imports {module}"
    assert not re.search(r"os\.environ|getenv", path.read_text()), f"{path.name} reads the environment"
