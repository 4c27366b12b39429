"""The CMDPI chapter's experiment helpers: plans, corpus routing, unseen answers, selection on
validation data, ablation tables, case study, a tiny pre-train → fine-tune → test run, and the
package's imports."""

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medvqa_lib.config import get_profile
from medvqa_lib.data.schema import VQASample
from medvqa_lib.data.synthetic import load_synthetic_vqa
from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation import normalize_answer
from medvqa_lib.experiments.generative import validation_fn
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.experiments.tables import ablation_table, compare_to_prior, seed_mean_scores
from medvqa_lib.papers.cmdpi.analysis import case_study, implied_overall, per_group, unseen_answers
from medvqa_lib.papers.cmdpi.config import (
    CPU_SECONDS_PER_1000,
    FINETUNE_VARIANTS,
    PRETRAIN_VARIANTS,
    estimate_seconds,
    study_plan,
)
from medvqa_lib.papers.cmdpi.pipeline import (
    CMDPIRun,
    finetune_cmdpi,
    pretrain_variant,
    pretraining_corpus,
)
from medvqa_lib.papers.cmdpi.readings import readings_of_the_paper
from medvqa_lib.papers.cmdpi.similar import SimilarityIndex
from medvqa_lib.text import minilm_dir

SYN = dict(n_images=30, image_size=64, seed=0)
needs_vocab = pytest.mark.skipif(minilm_dir() is None, reason="the WordPiece vocabulary ships with MiniLM")


def _sample(qid, answer, answer_type="open", split="test", qtype="organ", organ="chest", image="im0"):
    return VQASample(qid=qid, image_id=image, image=None, question=f"question {qid}?", answer=answer,
                     answer_type=answer_type, question_type=qtype, organ=organ, split=split, dataset="d")


def _run(label, exact, types=None, qtypes=None, organs=None, seed=0, preds=None):
    n = len(exact)
    types = types or ["closed"] * n
    scored = pd.DataFrame({"qid": [str(i) for i in range(n)], "exact": exact,
                           "recall": [float(e) for e in exact], "answer_type": types,
                           "question_type": qtypes or ["organ"] * n, "organ": organs or ["chest"] * n})
    return CMDPIRun(label, "d", seed, scored, None, preds or {str(i): "x" for i in range(n)})


# ----------------------------------------------------------------------------- plans


def test_study_plan_follows_the_profile_and_overrides(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path, model={"rec_depth": 2}, finetune={"lr": 3e-5},
                      finetune_epochs={"slake": 5}, captions=10, sweeps={"alpha": [[1.0, 0.5]]})
    assert plan.model.rec_depth == 2 and plan.finetune.lr == 3e-5 and plan.captions == 10
    assert plan.finetune_settings("slake").epochs == 5
    assert plan.finetune_settings("elsewhere").epochs == plan.finetune_epochs["default"]
    assert plan.seeds == (0, 1) and plan.ablation_seeds == (0,) and plan.run_ablations
    assert study_plan(get_profile("smoke"), tmp_path).seeds == get_profile("smoke").seeds
    assert study_plan(get_profile("smoke"), tmp_path).run_ablations
    assert plan.sweeps["alpha"] == [(1.0, 0.5)]  # lists from a parameters cell become tuples
    assert plan.pretrain.out_dir == tmp_path / "pretrain" and plan.pretrain_vqa == "train"
    gpu = study_plan(get_profile("gpu"), tmp_path)
    assert (gpu.pretrain.epochs, gpu.finetune.epochs, gpu.finetune.lr, gpu.finetune.batch_size) == (
        100, 300, 7.5e-6, 32)
    assert (gpu.model.rec_depth, gpu.model.dim, gpu.model.image_size, gpu.model.sim_threshold) == (4, 512, 224, 0.75)
    assert gpu.sweeps["threshold"] == [0.70, 0.75, 0.80, 0.85, 0.90, 0.95]
    assert len(gpu.sweeps["rec_weights"]) == 8 and len(gpu.sweeps["beta"]) == 5
    for key, points in plan.sweeps.items():  # the cpu profile runs fewer points
        assert 0 < len(points) <= len(gpu.sweeps[key])
    with pytest.raises(ValueError, match="pretrain_vqa"):
        study_plan(get_profile("cpu"), tmp_path, pretrain_vqa="all")
    with pytest.raises(ValueError, match="max_text_len"):
        study_plan(get_profile("cpu"), tmp_path, finetune={"max_text_len": 500})
    with pytest.raises(ValueError, match="no CMDPI plan"):
        study_plan(replace(get_profile("cpu"), name="tpu"), tmp_path)


def test_cpu_plan_main_results_and_ablations_fit_25_minutes_at_the_measured_speed(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path)
    assert plan.run_ablations
    sizes = {"vqa-rad": {"train": 2742, "val": 300, "test": 451}, "slake": {"train": 4919, "val": 1053, "test": 1061}}
    corpus = plan.captions + 2 * plan.pretrain_vqa_limit
    est = estimate_seconds(plan, sizes, corpus, run_ablations=True)
    assert est["total"] <= 23 * 60  # leaves two minutes for figures, bootstraps and loading
    assert set(est) == {"pre-training", "fine-tuning", "ablations", "total"}
    with_sweeps = estimate_seconds(plan, sizes, corpus, run_sweeps=True)
    assert with_sweeps["total"] > est["total"]
    slower = estimate_seconds(plan, sizes, corpus, speed={k: 2 * v for k, v in CPU_SECONDS_PER_1000.items()})
    assert slower["total"] == pytest.approx(2 * est["total"])


def test_variant_switches_are_model_fields():
    from medvqa_lib.papers.cmdpi.config import CMDPIConfig

    base = CMDPIConfig.from_profile("smoke")
    for switches in [*PRETRAIN_VARIANTS.values(), *FINETUNE_VARIANTS.values()]:
        changed = base.replace(**switches)
        assert all(getattr(changed, k) == v != getattr(base, k) for k, v in switches.items())
    assert list(PRETRAIN_VARIANTS)[0] == list(FINETUNE_VARIANTS)[0] == "CMDPI"


# ----------------------------------------------------------------------------- corpus


def test_pretraining_corpus_uses_training_questions_only_and_routes_them(tmp_path):
    prof = get_profile("smoke")
    suite = {"synthetic": {s: load_synthetic_vqa(s, **SYN) for s in ("train", "val", "test")}}
    plan = study_plan(prof, tmp_path, captions=6, pretrain_vqa_limit=10)
    corpus = pretraining_corpus(prof, suite, plan, seed=0, real=False)
    assert len(corpus.captions) == 6 and len(corpus.vqa) == 10 and len(corpus) == 16
    assert {s.split for s in corpus.vqa} == {"train"}
    assert set(corpus.vocab.answers) == {normalize_answer(s.answer) for s in corpus.vqa}
    table = corpus.table()
    assert table.loc["captions", "used for"] == "reconstruction + contrastive"
    assert table.loc["VQA (synthetic)", "used for"] == "reconstruction (+ answer)"
    none = pretraining_corpus(prof, suite, replace(plan, pretrain_vqa="none"), real=False)
    assert none.vqa == [] and none.vocab is None and len(none.captions) == 6


@needs_vocab
def test_corpus_rows_reach_the_collator_as_captions_and_answered_questions(tmp_path):
    from medvqa_lib.papers.cmdpi.data import CMDPIPretrainCollator
    from medvqa_lib.text import select_text_backbone

    prof = get_profile("smoke")
    suite = {"synthetic": {s: load_synthetic_vqa(s, **SYN) for s in ("train", "val", "test")}}
    corpus = pretraining_corpus(prof, suite, study_plan(prof, tmp_path, captions=2, pretrain_vqa_limit=2), real=False)
    data = corpus.dataset(ImageCache(32))
    tok = select_text_backbone("tiny", verbose=False).tokenizer
    batch = CMDPIPretrainCollator(tok, corpus.vocab)([data[i] for i in range(4)])
    assert batch["is_caption"].tolist() == [True, True, False, False]
    assert (batch["answer_labels"][:2] == -100).all() and (batch["answer_labels"][2:] >= 0).all()


# ----------------------------------------------------------------------------- analyses


def test_unseen_answers_measure_the_heads_ceiling():
    train = [_sample("a", "yes", "closed", "train"), _sample("b", "liver", "open", "train"),
             _sample("c", "lung", "open", "train")]
    test = [_sample("1", "yes", "closed"), _sample("2", "no", "closed"), _sample("3", "Liver", "open"),
            _sample("4", "kidney", "open"), _sample("5", "heart", "open"), _sample("6", "lung", "open")]
    table = unseen_answers({"d": {"train": train, "val": [], "test": test}})
    assert table.loc[("d", "closed"), "unseen answer (%)"] == 50.0
    assert table.loc[("d", "open"), "ceiling (%)"] == 50.0  # liver (case-folded) and lung are known
    assert table.loc[("d", "overall"), "n"] == 6 and table.loc[("d", "overall"), "training answers"] == 3
    with pytest.raises(DataError):
        unseen_answers({"d": {"train": test, "val": [], "test": test}})


def test_compare_to_prior_averages_seeds_and_names_cmdpi():
    types = ["closed"] * 40 + ["open"] * 40
    runs = [_run("CMDPI", [True] * 80, types, seed=0), _run("CMDPI", [True] * 40 + [False] * 40, types, seed=1)]
    prior = _run("prior", [i % 2 == 0 for i in range(80)], types).scored
    table = compare_to_prior({"d": seed_mean_scores(runs)}, {"d": prior}, n_resamples=300, label="CMDPI")
    assert "CMDPI − prior (pp)" in table and "MISS − prior (pp)" not in table
    assert table.loc[("d", "closed"), "CMDPI − prior (pp)"] == 50.0 and table.loc[("d", "closed"), "supported"]
    assert table.loc[("d", "open"), "CMDPI − prior (pp)"] == 0.0  # (1 + 0) / 2 per question vs 0.5 on average


def test_ablation_table_gives_paired_deltas_to_the_reference():
    full = _run("CMDPI", [True] * 30 + [False] * 10)
    worse = _run("w/o x", [True] * 20 + [False] * 20)
    table = ablation_table({"CMDPI": [full], "w/o x": [worse]}, n_resamples=300)
    assert table.loc["CMDPI", "overall"] == 75.0 and table.loc["w/o x", "overall"] == 50.0
    assert table.loc["w/o x", "Δ overall (pp)"] == -25.0
    assert pd.isna(table.loc["CMDPI", "Δ overall (pp)"])
    low, high = (float(x) for x in table.loc["w/o x", "Δ overall 95% CI"].strip("[]").split(","))
    assert low <= -25.0 <= high < 0
    flipped = ablation_table({"CMDPI": [full], "w/o x": [worse]}, reference="w/o x", n_resamples=300)
    assert flipped.loc["CMDPI", "Δ overall (pp)"] == 25.0


def test_per_group_means_over_seeds_and_drops_small_groups():
    organs = ["chest"] * 6 + ["head"] * 2
    a = _run("A", [True] * 6 + [False] * 2, organs=organs, seed=0)
    b = _run("A", [False] * 6 + [True] * 2, organs=organs, seed=1)
    c = _run("B", [True] * 8, organs=organs)
    table = per_group({"A": [a, b], "B": [c]}, "organ", min_n=3)
    assert list(table.index) == ["chest"] and table.loc["chest", "n"] == 6
    assert table.loc["chest", "A"] == 50.0 and table.loc["chest", "B"] == 100.0


def test_case_study_puts_full_right_ablation_wrong_first():
    samples = [_sample(str(i), "yes", "closed") for i in range(6)]
    full = _run("CMDPI", [True, True, False, False, True, True], preds={str(i): "p" for i in range(6)})
    abl = _run("w/o", [False, True, True, False, True, True], preds={str(i): "q" for i in range(6)})
    table, chosen = case_study({"CMDPI": full, "w/o": abl}, samples, k=3, seed=0)
    assert [s.qid for s in chosen][:2] == ["0", "2"]  # full ✓ / ablation ✗, then the reverse
    assert len(chosen) == 3 and chosen[2].qid == "3"  # then one the full model misses
    assert table.loc[0, "CMDPI"] == "p ✓" and table.loc[0, "w/o"] == "q ✗" and table.loc[0, "ground truth"] == "yes"


def test_implied_overall_and_the_papers_vqa_rad_row():
    assert implied_overall(80.0, 60.0, 1, 1) == 70.0
    assert round(implied_overall(85.7, 74.3, 272, 179), 1) == 81.2  # the paper reports 78.7


def test_readings_come_from_the_readings_module():
    text = readings_of_the_paper()
    assert text.startswith("There is no public code") and "**One width d.**" in text
    assert "Readings of the paper" not in text


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medvqa_lib.papers.cmdpi.config import CMDPIConfig
    from medvqa_lib.text import select_text_backbone

    if minilm_dir() is None:
        pytest.skip("the WordPiece vocabulary ships with MiniLM")
    backbone = select_text_backbone("tiny", verbose=False)
    config = CMDPIConfig.from_profile("smoke", image_size=32, patch_size=8, vision_width=32, dim=32,
                                      rec_depth=1, max_text_len=40)
    splits = {s: load_synthetic_vqa(s, **SYN) for s in ("train", "val", "test")}
    splits = {"train": splits["train"][:24], "val": splits["val"][:8], "test": splits["test"][:10]}
    return backbone, config, splits, ImageCache(32)


def test_validation_fn_refuses_test_questions(tiny):
    backbone, _, splits, cache = tiny
    settings = study_plan(get_profile("smoke"), "unused").finetune
    with pytest.raises(DataError):
        validation_fn(None, splits["test"], backbone.tokenizer, cache, settings, answer=lambda m, qs: {})
    assert validation_fn(None, splits["val"], backbone.tokenizer, cache, settings).split == "val"


def test_similarity_index_uses_training_images_and_thresholds_them(tiny):
    from medvqa_lib.papers.cmdpi.model import build_cmdpi

    backbone, config, splits, cache = tiny
    torch.manual_seed(0)
    model = build_cmdpi(config, backbone)
    with pytest.raises(DataError):
        SimilarityIndex(model, splits["val"], cache)
    index = SimilarityIndex(model, splits["train"], cache)
    assert len(index.image_ids) == len({s.image_id for s in splits["train"]}) == index.features.shape[0]
    loose, strict = index.table(-1.0), index.table(1.01)
    assert all(i not in js and len(js) == len(index.image_ids) - 1 for i, js in loose.partners.items())
    assert strict.share_with_partner() == 0.0
    q = index.similarity_quantiles((0.5,))
    assert -1.0 <= q[0.5] <= 1.0


def test_pretrain_then_finetune_selects_on_validation_and_answers_test_once(tiny, tmp_path):
    backbone, config, splits, cache = tiny
    prof = get_profile("smoke")
    plan = study_plan(prof, tmp_path, captions=4, pretrain_vqa_limit=8)
    corpus = pretraining_corpus(prof, {"synthetic": splits}, plan, real=False)
    state, result = pretrain_variant("CMDPI", config, corpus, backbone.tokenizer, cache, plan.pretrain, backbone)
    assert result.steps == 1 and not any("_encoder_m." in k for k in state)
    assert not (result.out_dir / "best").exists()  # checkpoints are cleaned unless kept
    runs = finetune_cmdpi("CMDPI", config, state, corpus.vocab, "synthetic", splits, [0], backbone.tokenizer,
                             cache, plan.finetune, tmp_path / "ft", backbone, heads_for=splits["test"][:5],
                             verbose=False)
    (run,) = runs
    assert run.train.select_metric == "val_acc" and run.train.best_epoch == 1
    assert {"val_acc", "val_closed", "val_open"} <= set(run.train.history[0])
    assert set(run.predictions) == {s.qid for s in splits["test"]} and len(run.scored) == len(splits["test"])
    vocab_answers = {normalize_answer(s.answer) for s in splits["train"]}
    assert all(p in vocab_answers for p in run.predictions.values())  # the head knows training answers only
    assert run.heads.shape == (5, config.dim) and np.isfinite(run.heads).all()
    assert run.answers == len(vocab_answers) and 0 <= run.similar_share <= 1
    no_pre = finetune_cmdpi("w/o", config.replace(difference_reconstruction=False), None, None, "synthetic", splits,
                               [0], backbone.tokenizer, cache, plan.finetune, tmp_path / "ft", backbone, verbose=False)
    assert no_pre[0].answer_rows == 0 and np.isnan(no_pre[0].similar_share)


def _every_ablation(plan, **changes):
    """All pre-training ablations, each on every training question (None cannot be passed
    through study_plan, which keeps the plan's value for None)."""
    return replace(plan, pretrain_ablations=None, ablation_max_train=None, **changes)


def test_ablation_epochs_change_only_the_ablation_schedule(tmp_path):
    plan = _every_ablation(study_plan(get_profile("cpu"), tmp_path, ablation_epochs=1))
    assert plan.ablation_settings("slake").epochs == 1
    assert plan.finetune_settings("slake").epochs == plan.epochs_for("slake") == 2
    same = _every_ablation(study_plan(get_profile("cpu"), tmp_path), ablation_epochs=None)
    assert same.ablation_settings("vqa-rad").epochs == same.epochs_for("vqa-rad")
    sizes = {"slake": {"train": 1000, "val": 100, "test": 100}}
    speed = {"pretrain": 40.0, "finetune": 12.0, "predict": 3.0}
    pre = 5 * 10 * 40.0 / 1000  # the five pre-trained variants on 10 rows
    # seconds of one fine-tuning run: epochs x (train x 12 + val x 3) + test x 3, per 1,000
    # 1 epoch: 8 variants + the full model again at the ablation schedule = 9 runs
    assert estimate_seconds(plan, sizes, 10, speed=speed)["ablations"] - pre == pytest.approx(9 * 12.6)
    # 2 epochs = SLAKE's main schedule: the main run is reused, 8 runs
    two = _every_ablation(study_plan(get_profile("cpu"), tmp_path, ablation_epochs=2))
    assert two.ablation_matches_main("slake")
    assert estimate_seconds(two, sizes, 10, speed=speed)["ablations"] - pre == pytest.approx(8 * 24.9)


def test_ablation_subset_and_training_cap(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path, ablation_epochs=2, ablation_max_train=500,
                      pretrain_ablations=["w/o inter-contrast"])
    assert list(plan.pretrain_ablation_plan()) == ["w/o inter-contrast"]
    assert plan.ablation_options()["max_train"] == 500 and plan.finetune_options()["max_train"] is None
    # same epochs but fewer training questions: the full model is run again for the ablations
    assert not plan.ablation_matches_main("slake")
    sizes = {"slake": {"train": 1000, "val": 100, "test": 100}}
    speed = {"pretrain": 40.0, "finetune": 12.0, "predict": 3.0}
    pre = 1 * 10 * 40.0 / 1000
    # 1 pre-training variant + w/o pre-training + 2 fine-tuning variants + the full model = 5 runs
    # of 2 x (500 x 12 + 100 x 3) + 100 x 3 per 1,000 = 12.9 s
    assert estimate_seconds(plan, sizes, 10, speed=speed)["ablations"] - pre == pytest.approx(5 * 12.9)
    with pytest.raises(ValueError, match="unknown pre-training ablations"):
        study_plan(get_profile("cpu"), tmp_path, pretrain_ablations=["w/o everything"])


# ----------------------------------------------------------------------------- study_plan and imports


def test_study_plan_drops_none_and_names_the_valid_keys(tmp_path):
    prof = get_profile("cpu")
    plan = study_plan(prof, tmp_path)
    given = study_plan(prof, tmp_path, captions=None, max_train=None, ablation_epochs=None, seeds=None,
                       model={"dim": None, "image_size": None}, finetune={"lr": None}, sweeps=None)
    assert given == plan  # None keeps every value of the plan, at both levels
    assert plan.model.image_size == 96  # the one cpu image size, in PLANS
    assert study_plan(prof, tmp_path, pretrain_ablations="all").pretrain_ablations is None
    for bad, words in (({"epochs": 3}, "study parameter(s) 'epochs'; valid ones are: ablation_dataset"),
                       ({"model": {"width": 3}}, "model parameter(s) 'width'; valid ones are: alpha"),
                       ({"finetune": {"learning_rate": 1}}, "finetune setting(s) 'learning_rate'; valid ones"),
                       ({"sweeps": {"gamma": [1]}}, "sweep(s) 'gamma'; valid ones are: alpha, beta")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            study_plan(prof, tmp_path, **bad)


def test_the_package_imports_no_other_paper_package():
    package = Path(__file__).resolve().parent.parent / "medvqa_lib" / "papers" / "cmdpi"
    others = ("miss", "m2i2", "paligemma", "comparison")
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert not any(name.startswith(f"medvqa_lib.papers.{o}") for o in others), (path.name, name)
                assert not name.startswith("medvqa_lib.reproduce"), (path.name, name)
