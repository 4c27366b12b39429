"""PaliGemma's plan (config.study_plan), the shared image cache, and the package's layout rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from PIL import Image

from medvqa_lib.config import get_profile
from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import ConfigError, UnknownNameError
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.papers.paligemma.config import PLANS, PaliGemmaSpec, study_plan
from medvqa_lib.papers.paligemma.data import CAPTION_PREFIX, ItemDataset

PACKAGE = Path(__file__).resolve().parents[1] / "medvqa_lib" / "papers" / "paligemma"


def test_study_plan_drops_none_overrides_and_takes_nested_model_dicts(tmp_path):
    plain = study_plan(get_profile("smoke"))
    same = study_plan("smoke", None, lr=None, seeds=None, model={"image_size": None, "vision_lora": None})
    assert same == plain
    study = study_plan("smoke", tmp_path, lr=1e-4, seeds=[3, 4], datamixes=["target"],
                       model={"image_size": 48, "vision_lora": "literal"})
    assert study.lr == 1e-4 and study.seeds == (3, 4) and study.datamixes == ("target",)
    assert study.spec.image_size == 48 and study.spec.vision_lora == "literal"
    assert study.spec.patch_size == plain.spec.patch_size  # the rest of the plan's model stays
    assert study.run_dir("stage1") == tmp_path / "runs" / "stage1"
    with pytest.raises(ConfigError, match="out_dir"):
        plain.run_dir("stage1")


def test_study_plan_rejects_unknown_keys_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown PaliGemma study key.*learning_rate.*valid ones are.*lr"):
        study_plan("smoke", learning_rate=1e-3)
    with pytest.raises(ConfigError, match="unknown PaliGemma model key.*width.*valid ones are.*vision_width"):
        study_plan("smoke", model={"width": 32})
    with pytest.raises(ConfigError, match="unknown profile 'laptop'.*choose one of smoke, cpu, gpu"):
        study_plan("laptop")


def test_plans_hold_every_profile_and_the_spec_validates_itself():
    assert set(PLANS) == {"smoke", "cpu", "gpu"}
    assert study_plan("smoke").spec.is_tiny and study_plan("cpu").spec.is_tiny
    gpu = study_plan("gpu")
    assert not gpu.spec.is_tiny and gpu.spec.image_size == 448 and gpu.lr == 1e-5
    assert (gpu.batch_size, gpu.grad_accum) == (6, 16)  # the paper's appendix
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        study_plan("smoke", model={"image_size": 30})
    with pytest.raises(UnknownNameError, match="vision_lora"):
        PaliGemmaSpec(vision_lora="all")


def test_item_dataset_uses_the_shared_image_cache():
    sample = VQASample(qid="q", image_id="i", image=Image.new("RGB", (40, 30), (10, 20, 30)), question="what?",
                       answer="x", answer_type="open", question_type="other", split="train")
    cache = ImageCache(16)
    item = ItemDataset([sample], cache)[0]
    assert item["image"] is cache.pil(sample) and item["image"].size == (16, 16)

    class Caption:
        image_id, caption = "c", "a chest x-ray"

        def load_image(self):
            return Image.new("L", (8, 8))

    caption_item = ItemDataset([Caption()], cache)[0]
    assert caption_item["prefix"] == CAPTION_PREFIX and caption_item["image"].mode == "RGB"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_package_imports_no_other_paper_package_and_reads_no_environment():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "config.py", "model.py", "losses.py", "data.py",
                                       "pipeline.py", "saliency.py", "synthetic_qa.py"}
    for path in files:
        for name in _imports(path):
            if name.startswith("medvqa_lib.papers."):
                assert name.startswith("medvqa_lib.papers.paligemma"), f"{path.name} imports {name}"
            assert not name.startswith("medvqa_lib.reproduce"), f"{path.name} imports {name}"
        text = path.read_text()
        reads = text.count("os.environ")
        allowed = text.count('os.environ.get("HF_TOKEN")') if path.name == "model.py" else 0
        assert reads == allowed, f"{path.name} reads the environment"
        assert len(text.splitlines()) <= 600, f"{path.name} is over 600 lines"
