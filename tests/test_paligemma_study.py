"""The PaliGemma study: curriculum checkpoint, consistency rule, datamixes, QA curation, saliency."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medvqa_lib.config import get_profile
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.errors import HubUnavailableError, UnknownNameError
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.papers.paligemma import data as pgdata
from medvqa_lib.papers.paligemma import losses
from medvqa_lib.papers.paligemma import model as pgmodel
from medvqa_lib.papers.paligemma import pipeline as pg
from medvqa_lib.papers.paligemma.config import study_plan
from medvqa_lib.papers.paligemma.saliency import saliency_for
from medvqa_lib.papers.paligemma.synthetic_qa import CurationCounts, QAGenerator, curate, parse_qa


def _sample(i: int, split: str, answer: str = "yes", value: int = 0) -> VQASample:
    return VQASample(qid=f"{split}{i}", image_id=f"img{i % 3}{split}", image=Image.new("RGB", (16, 16), (value,) * 3),
                     question="is there a lesion?", answer=answer,
                     answer_type="closed" if answer in ("yes", "no") else "open",
                     question_type="presence", split=split)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    study = study_plan(get_profile("smoke"), stage1_epochs=1, batch_size=4, max_new_tokens=2,
                       consistency_runs=2, model={"image_size": 16, "patch_size": 8})
    vqa = pgmodel.build_model(study, ["answer en is there a lesion?", "yes", "no", "left lung"] * 5)
    pgmodel.add_adapters(vqa, study)
    return study, vqa, ImageCache(16), tmp_path_factory.mktemp("pg")


def test_stage2_starts_from_stage1_weights(setup):
    study, vqa, cache, tmp = setup
    train = [_sample(i, "train", "yes" if i % 2 else "no", 40 * i) for i in range(8)]
    val = [_sample(i, "val") for i in range(4)]
    pgmodel.reset_adapters(vqa, 0)
    pg.train_stage(vqa, train, val, study, cache, 1, tmp / "stage1", 0)
    stage1 = vqa.trainable_state()
    path = pgmodel.save_adapters(vqa, tmp / "stage1.safetensors", {"epochs": 1})
    pgmodel.reset_adapters(vqa, 1)  # a fresh run of stage 2 ...
    assert any(not torch.equal(stage1[k], v) for k, v in vqa.trainable_state().items())
    pgmodel.load_adapters(vqa, path)  # ... starts from the saved stage-1 adapters
    assert all(torch.equal(stage1[k], v) for k, v in vqa.trainable_state().items())
    # and the stage-1 adapters are not a no-op: lora_B moved away from its zero init
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in stage1.items())


def test_load_adapters_refuses_a_foreign_file(setup, tmp_path):
    from safetensors.torch import save_file

    _, vqa, _, _ = setup
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="adapters"):
        pgmodel.load_adapters(vqa, tmp_path / "other.safetensors")


def test_consistency_rule_on_hand_made_answer_sets():
    reference = ["yes", "left lung", "no", "ct"]
    sampled = [["yes", "no", "no", "yes", "yes"],  # 2 of 5 differ: kept
               ["right lung", "liver", "lung", "left lung", "Left lung."],  # 3 differ: docked
               ["yes", "yes", "yes", "yes", "yes"],  # all 5 differ: docked
               ["CT", "ct", "mri", "ct", "x-ray"]]  # 2 differ after normalisation: kept
    assert pg.consistency_docked(reference, sampled) == [False, True, True, False]
    with pytest.raises(ValueError):
        pg.consistency_docked(reference, sampled[:2])


def test_unknown_datamix_and_offline_hub_mix(monkeypatch):
    with pytest.raises(UnknownNameError, match="roco-qa"):
        pgdata.load_datamix("roco", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(HubUnavailableError, match="Fix"):
        pgdata.load_datamix("roco-qa", {})
    main, anneal = pgdata.load_datamix("captions-qa+anneal", {"captions-qa": [1, 2], "anneal": [3]})
    assert (main, anneal) == ([1, 2], [3])


def test_saliency_grid_matches_the_models_patch_count(setup):
    _, vqa, _, _ = setup
    sal = saliency_for(vqa, Image.new("RGB", (20, 20)), "is there a lesion?", max_new_tokens=2)
    vision = vqa.config.vision_config
    grid = vision.image_size // vision.patch_size
    assert sal.raw_map.shape == sal.rollout_map.shape == (grid, grid)
    assert grid * grid == vqa.config.text_config.num_image_tokens
    assert len(sal.top_tokens) <= 7 and 0 <= sal.patch < grid * grid


def test_qa_parsing_rejects_and_counts_malformed_pairs():
    text = "Q: Is there a mass?\nA: yes\nQ: Describe it\nA: big\nQ: What is mentioned in the caption?\n" \
           "A: a nodule\nQ: Where?\nQ: Which side?\nA: left"
    pairs, rejected = parse_qa(text)
    assert pairs == [("Is there a mass?", "yes"), ("Which side?", "left")]
    assert rejected == {"not_a_question": 1, "leaks_text": 1, "no_answer": 1}


def test_rule_generation_is_cached_and_curated(tmp_path):
    caps = [CaptionSample("c1", Image.new("RGB", (8, 8)), "Chest X-ray (frontal): a small nodule in the left lung."),
            CaptionSample("c1", Image.new("RGB", (8, 8)), "Chest X-ray (frontal): a small nodule in the left lung.")]
    gen = QAGenerator("rule", cache_dir=tmp_path)
    samples = gen.samples(caps)
    assert {(s.question, s.answer) for s in samples} >= {("What modality is used to take this image?", "x-ray"),
                                                          ("Where is the abnormality located?", "left lung")}
    assert gen.hits == 1  # the second, identical caption came from the cache
    counts = CurationCounts()
    kept = curate(samples, counts)
    assert len(kept) == len(samples) // 2  # duplicates of the same image removed
    assert counts.as_dict()["generated pairs"] == len(samples)
    with pytest.raises(ValueError, match="training captions"):
        gen.samples([CaptionSample("t", Image.new("RGB", (8, 8)), "CT", split="test")])


def test_scaling_law_fit_recovers_known_parameters():
    x, d = np.meshgrid([1.0, 2.0, 3.0, 4.0], [100.0, 400.0, 1600.0])
    y = losses.scaling_law(np.vstack([x.ravel(), d.ravel()]), 3.0, 0.5, 0.3, 0.4)
    fit = losses.fit_scaling_law(pd.DataFrame({"epoch": x.ravel(), "tokens": d.ravel(), "val_loss": y}))
    assert fit["alpha"] == pytest.approx(0.5, rel=1e-3) and fit["E"] == pytest.approx(0.4, rel=1e-3)
    with pytest.raises(ValueError, match="too few"):
        losses.fit_scaling_law(pd.DataFrame({"epoch": [1, 2], "tokens": [1, 1], "val_loss": [1, 0.5]}))
