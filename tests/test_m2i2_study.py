"""The M2I2 chapter's study helpers: plan sizes, rank-mode lists, the leak list, tables."""

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from medvqa_lib.config import get_profile
from medvqa_lib.data.schema import VQASample
from medvqa_lib.data.synthetic import load_synthetic_vqa
from medvqa_lib.errors import ConfigError, DataError
from medvqa_lib.evaluation import REPORTED as REPORTED_SOURCE
from medvqa_lib.evaluation import normalize_answer, results_table
from medvqa_lib.experiments.tables import compare_to_prior
from medvqa_lib.papers.m2i2.config import (
    CPU_SPEEDS,
    FULL,
    PLANS,
    M2I2Config,
    ablation_configs,
    estimated_seconds,
    finetune_config,
    study_plan,
)
from medvqa_lib.papers.m2i2.figures import pick_examples
from medvqa_lib.papers.m2i2.pipeline import free_para_scores, measured_rows, readable
from medvqa_lib.papers.m2i2.rank import candidate_lists
from medvqa_lib.papers.m2i2.reported import REPORTED, reported_rows
from medvqa_lib.text import minilm_dir

SYN = dict(n_images=30, image_size=64, seed=0)
needs_vocab = pytest.mark.skipif(minilm_dir() is None, reason="the WordPiece vocabulary ships with MiniLM")
#: (train, val, test) English questions of the real datasets (the data chapter's split table)
REAL_SIZES = {"vqa-rad": (2742, 300, 451), "slake": (4919, 1053, 1061)}


def sample(qid, answer, split, answer_type="open", image="im0", **extra):
    return VQASample(qid=str(qid), image_id=image, image=None, question=f"question {qid}?", answer=answer,
                     answer_type=answer_type, question_type="other", split=split, extra=extra)


# ----------------------------------------------------------------------------- plan


def test_gpu_plan_is_the_papers_schedule(tmp_path):
    plan = study_plan(get_profile("gpu"), tmp_path)
    pre, fine = plan.pretrain, plan.finetune
    assert (pre.epochs, pre.batch_size, pre.lr, pre.weight_decay, pre.schedule) == (40, 32, 1e-4, 0.002, "cosine")
    assert (fine.epochs, fine.batch_size, fine.lr) == (40, 8, 2e-5)
    assert plan.final_lr == {"pretrain": 1e-5, "finetune": 1e-6}
    assert plan.epochs_for("vqa-rad") == plan.epochs_for("pathvqa") == 40
    assert (plan.model.image_size, plan.finetune_image_size, plan.model.vision_depth) == (256, 384, 12)
    assert plan.model.mask_ratio == 0.15 and plan.model.use_mim and plan.model.use_itc
    assert "pathvqa" in plan.datasets and fine.eval_limit is None
    assert plan.seeds == tuple(get_profile("gpu").seeds)
    assert str(pre.out_dir).startswith(str(tmp_path)) and str(fine.out_dir).startswith(str(tmp_path))
    assert pre.train_config("train_loss").log_every == pre.log_every == 50


def test_short_runs_log_every_step_and_copies_keep_it(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path, pretrain={"log_every": 3})
    assert plan.pretrain.train_config("train_loss").log_every == 3
    assert study_plan(get_profile("cpu"), tmp_path).pretrain.log_every == 1
    copy = dataclasses.replace(plan.finetune_settings("slake"), seed=4)  # as finetune_and_test does
    assert copy.train_config("val_acc").log_every == plan.finetune.log_every and copy.seed == 4


def test_cpu_plan_is_small_and_sized_from_the_measured_speeds(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path)
    m = plan.model
    assert (m.image_size, m.vision_depth, m.vision_width, m.text_backbone) == (96, 4, 384, "minilm")
    assert plan.finetune_image_size == 96 and plan.finetune.group_size == 4 and plan.finetune.batch_size == 64
    assert plan.pairs == 400 and plan.pretrain.epochs == 1
    assert plan.epochs_for("vqa-rad") >= plan.epochs_for("slake") >= 1
    assert len(plan.seeds) >= 2  # mean ± std needs two
    assert plan.datasets == ("vqa-rad", "slake")
    # Table 4 on SLAKE only: VQA-RAD's answers do not use the image at this scale
    assert plan.ablation_sets(["vqa-rad", "slake"]) == ["slake"]
    cost = estimated_seconds(plan, REAL_SIZES)
    assert 0 < cost["pre-training"] < 150
    # the whole chapter must fit 20 min; rank mode, figures and loading took ~4.5 min on top
    assert cost["total"] < 15.5 * 60
    # Table 4: 3 variants + the full model again, 1 epoch on 1,000 questions each
    assert not plan.ablation_matches_main("slake") and plan.ablation_settings("slake").epochs == 1
    one = 1000 / CPU_SPEEDS["finetune"] + 256 / CPU_SPEEDS["answer"] + 1061 / CPU_SPEEDS["answer"]
    assert cost["ablations"] == pytest.approx(4 * one)
    assert estimated_seconds(plan, REAL_SIZES, ablations=False)["total"] < 13 * 60


def test_ablation_splits_cap_only_the_training_questions(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path, ablation_train_limit=5)
    splits = {"train": [f"t{i}" for i in range(20)], "val": ["v"] * 7, "test": ["x"] * 9}
    small = plan.ablation_splits(splits, seed=0)
    assert len(small["train"]) == 5 and set(small["train"]) <= set(splits["train"])
    assert small["val"] == splits["val"] and small["test"] == splits["test"]
    assert small == plan.ablation_splits(splits, seed=0)  # seeded
    full = study_plan(get_profile("gpu"), tmp_path)
    assert full.ablation_matches_main("vqa-rad") and full.ablation_splits(splits)["train"] == splits["train"]


def test_smoke_plan_takes_seconds(tmp_path):
    plan = study_plan(get_profile("smoke"), tmp_path)
    assert plan.model.text_backbone == "tiny" and plan.model.image_size == 64
    assert plan.pairs <= 64 and plan.pretrain.epochs == 1 and plan.epochs_for("synthetic") == 1
    assert plan.finetune.eval_limit <= 32 and plan.rank_k <= 8
    assert estimated_seconds(plan, {"synthetic": (500, 100, 150)})["total"] < 60
    smoke = get_profile("smoke")
    assert plan.split_limits(smoke) == {"train": 128, "val": smoke.max_eval_samples, "test": smoke.max_eval_samples}
    cpu = study_plan(get_profile("cpu"), tmp_path)
    assert set(cpu.split_limits(get_profile("cpu")).values()) == {None}  # the cpu profile uses every question


def test_overrides_reach_every_part_and_none_keeps_the_plan(tmp_path):
    plan = study_plan(get_profile("cpu"), tmp_path, model={"vision_depth": 2, "mask_ratio": 0.5, "text_depth": None},
                      pretrain={"lr": 3e-4, "epochs": None}, finetune={"batch_size": 8},
                      finetune_epochs={"slake": 5}, pairs=10, seeds=[3, 4], datasets="vqa-rad",
                      rank_k=None, ablation_datasets=["slake"])
    assert plan.model.vision_depth == 2 and plan.model.mask_ratio == 0.5 and plan.model.image_size == 96
    assert plan.pretrain.lr == 3e-4 and plan.pretrain.epochs == 1 and plan.finetune.batch_size == 8
    assert plan.finetune_settings("slake").epochs == 5
    assert plan.epochs_for("vqa-rad") == 2  # the other datasets keep the plan's epochs
    assert plan.finetune_settings("elsewhere").epochs == plan.finetune.epochs
    assert plan.pairs == 10 and plan.seeds == (3, 4) and plan.datasets == ("vqa-rad",)
    assert plan.rank_k == 16  # None keeps the plan's value
    assert plan.ablation_sets(["vqa-rad", "slake"]) == ["slake"]
    fresh = study_plan(get_profile("cpu"), tmp_path)  # the plans are not mutated by overrides
    assert fresh.model.vision_depth == 4 and fresh.pretrain.lr == 1e-4 and fresh.pairs == 400


def test_variants_switch_off_one_objective_and_finetuning_drops_both():
    base = study_plan(get_profile("smoke"), "runs").model
    variants = ablation_configs(base)
    assert list(variants) == [FULL, "w/o MIM", "w/o ITC"]
    assert variants[FULL] == base
    assert not variants["w/o MIM"].use_mim and variants["w/o MIM"].use_itc
    assert variants["w/o ITC"].use_mim and not variants["w/o ITC"].use_itc
    assert {(c.use_mim, c.use_itc) for c in map(finetune_config, variants.values())} == {(False, False)}


# ----------------------------------------------------------------------------- rank-mode lists


def test_rank_list_comes_from_training_answers_only():
    train, test = load_synthetic_vqa("train", **SYN), load_synthetic_vqa("test", **SYN)
    lists = candidate_lists(train)
    assert list(lists) == ["train answers"]
    assert set(lists["train answers"]) == {normalize_answer(s.answer) for s in train}
    with pytest.raises(DataError, match="test"):
        candidate_lists(train + test[:1])
    with pytest.raises(DataError):
        candidate_lists(load_synthetic_vqa("val", **SYN))  # validation answers are not training answers


def test_leak_list_contains_the_test_answers_only_when_asked():
    train = [sample(1, "Yes", "train"), sample(2, "left lung", "train"), sample(3, "yes", "train")]
    test = [sample(4, "Right Lung", "test"), sample(5, "yes", "test")]
    honest = candidate_lists(train, test)
    assert list(honest) == ["train answers"] and "right lung" not in honest["train answers"]
    lists = candidate_lists(train, test, leak=True)
    assert lists["train answers"] == ["yes", "left lung"]
    assert lists["train + test answers"] == ["yes", "left lung", "right lung"]
    with pytest.raises(ValueError, match="test samples"):
        candidate_lists(train, leak=True)
    with pytest.raises(DataError):
        candidate_lists(train, train, leak=True)  # the "test" samples must be test samples


# ----------------------------------------------------------------------------- tables


def test_free_and_free_para_test_sets():
    test = [sample(i, "yes", "test", "closed", phrase_type="freeform" if i % 3 else "para") for i in range(9)]
    scored = pd.DataFrame({"qid": [s.qid for s in test], "exact": [True] * 9})
    sets = free_para_scores(scored, test)
    assert list(sets) == ["free", "free+para"] and len(sets["free+para"]) == 9
    assert set(sets["free"]["qid"]) == {s.qid for s in test if s.extra["phrase_type"] == "freeform"}
    no_phrase = [sample(i, "yes", "test", "closed") for i in range(3)]
    assert list(free_para_scores(scored.iloc[:3], no_phrase)) == ["free+para"]


def test_reported_rows_are_the_papers_numbers_and_labelled_reported():
    rows = reported_rows("table1", "free")
    assert len(rows) == 9 and all(r["source"].iloc[0] == REPORTED_SOURCE for r in rows.values())
    assert all("reported" in label for label in rows)
    m2i2 = rows["M2I2 (free), reported (M2I2 paper, Table 1)"].iloc[0]
    assert (m2i2.closed_acc, m2i2.open_acc, m2i2.overall_acc) == (81.6, 61.8, 73.7)
    para = reported_rows("table1", "free+para")["M2I2 (free+para), reported (M2I2 paper, Table 1)"]
    assert para.iloc[0].overall_acc == 76.8 and para.iloc[0].note == "free+para"
    assert len(reported_rows("table1")) == 14 and len(reported_rows("table4")) == 12  # labels unique
    assert next(iter(reported_rows("table3").values()))["dataset"].iloc[0] == "slake"
    slake4 = reported_rows("table4", dataset="slake")
    assert len(slake4) == 4 and {r["dataset"].iloc[0] for r in slake4.values()} == {"slake"}
    assert [t[2:] for t in REPORTED["table4"] if t[:2] == ("w/o pre-training", "vqa-rad")] == [(70.8, 36.6, 57.1)]
    table = results_table(reported_rows("table2"))
    assert (table["source"] == REPORTED_SOURCE).all() and len(table) == 7
    with pytest.raises(ValueError, match="unknown table"):
        reported_rows("table5")


def _scored(exact, types, qids=None):
    return pd.DataFrame({"qid": qids or [str(i) for i in range(len(exact))], "exact": exact,
                         "recall": [float(e) for e in exact], "answer_type": types})


def test_measured_rows_and_readable_table():
    types = ["closed", "closed", "open", "open"]
    recs = [SimpleNamespace(scored=_scored([True, True, True, False], types)),
            SimpleNamespace(scored=_scored([True, False, False, False], types))]
    prior = _scored([False, True, False, False], types)
    rows = measured_rows("vqa-rad", recs, prior, qids={"0", "1", "2"}, note="free")
    label = f"{FULL}, this book (2 seeds), free"
    assert list(rows) == [label, "question-type prior, this book, free"]
    rows.update(reported_rows("table1", "free"))
    table = readable(results_table(rows))
    assert table.loc[label, "closed"] == "75.0 ± 35.4"  # per seed: 100 and 50
    assert table.loc[label, "open"] == "50.0 ± 70.7"  # question 3 is left out
    assert table.loc[label, "seeds"] == "2"
    assert table.loc["question-type prior, this book, free", "closed"] == "50.0"
    assert table.loc["M2I2 (free), reported (M2I2 paper, Table 1)", "source"] == REPORTED_SOURCE
    assert (table["test set"] == "free").all()


def test_compare_to_prior_names_the_model():
    types = ["closed"] * 30 + ["open"] * 30
    model = _scored([True] * 60, types)
    prior = _scored([i % 2 == 0 for i in range(60)], types)
    table = compare_to_prior({"d": model}, {"d": prior}, n_resamples=200, label=FULL)
    assert table.loc[("d", "closed"), f"{FULL} − prior (pp)"] == 50.0
    assert bool(table.loc[("d", "open"), "supported"])


def test_pick_examples_two_closed_two_open_on_distinct_images():
    test = load_synthetic_vqa("test", **SYN)
    picks = pick_examples(test, 2, 2, seed=1)
    assert [s.answer_type for s in picks] == ["closed", "closed", "open", "open"]
    assert len({s.image_id for s in picks}) == 4 and {s.split for s in picks} == {"test"}
    assert [s.qid for s in pick_examples(test, 2, 2, seed=1)] == [s.qid for s in picks]


# ----------------------------------------------------------------------------- with a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medvqa_lib.experiments.generative import ImageCache
    from medvqa_lib.text import select_text_backbone

    backbone = select_text_backbone("tiny", verbose=False)
    plan = study_plan(get_profile("smoke"), tmp_path_factory.mktemp("runs"),
                      model={"finetune_image_size": 80})
    return plan, backbone, ImageCache(80)


@needs_vocab
def test_finetune_factory_and_restore(tiny, tmp_path):
    from medvqa_lib.papers.m2i2.model import build_m2i2
    from medvqa_lib.papers.m2i2.pipeline import finetune_factory, restore_finetuned
    from medvqa_lib.training.checkpoint import MODEL_FILE, save_model_weights

    plan, backbone, _ = tiny
    torch.manual_seed(0)
    pre = build_m2i2(plan.model, backbone)  # 64 px, with MIM and ITC
    scratch = finetune_factory(plan.model, None, backbone)()
    tuned = finetune_factory(plan.model, pre.state_dict(), backbone)()
    for model in (scratch, tuned):
        assert model.visual_encoder.patch_embed.img_size[0] == 80
        assert model.mae_decoder is None and not hasattr(model, "visual_encoder_m")
    # pre-trained weights arrive (the patch embedding keeps its shape), the decoder follows the
    # pre-trained multimodal layers, not the backbone's
    torch.testing.assert_close(tuned.visual_encoder.patch_embed.proj.weight, pre.visual_encoder.patch_embed.proj.weight)
    with torch.no_grad():
        pre.text_encoder.layers[pre.n_text_layers].ffn.fc1.weight.add_(1.0)
    moved = finetune_factory(plan.model, pre.state_dict(), backbone)()
    assert torch.equal(moved.text_decoder.layers[0].ffn.fc1.weight,
                       pre.text_encoder.layers[pre.n_text_layers].ffn.fc1.weight)
    save_model_weights(tuned, tmp_path / "best" / MODEL_FILE)
    record = SimpleNamespace(train=SimpleNamespace(out_dir=tmp_path))
    back = restore_finetuned(plan.model, record, backbone)
    assert not back.training
    for (k, a), (_, b) in zip(sorted(tuned.state_dict().items()), sorted(back.state_dict().items()), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        restore_finetuned(plan.model, SimpleNamespace(train=SimpleNamespace(out_dir=tmp_path / "none")), backbone)


@needs_vocab
def test_rank_mode_answers_from_the_list_and_reports_the_leak(tiny):
    from medvqa_lib.papers.m2i2.pipeline import finetune_factory
    from medvqa_lib.papers.m2i2.rank import rank_mode, rank_mode_table

    plan, backbone, cache = tiny
    torch.manual_seed(0)
    model = finetune_factory(plan.model, None, backbone)().eval()
    train = load_synthetic_vqa("train", **SYN)[:40]
    test = load_synthetic_vqa("test", **SYN)[:12]
    i = next(j for j, s in enumerate(test) if s.answer_type == "open")
    test[i] = dataclasses.replace(test[i], answer="an answer nobody trained on")
    lists = candidate_lists(train, test, leak=True)
    ranked = rank_mode(model, test, lists, backbone.tokenizer, cache, k=3, batch_size=5)
    assert set(ranked) == set(lists)
    for name, result in ranked.items():
        assert set(result["predictions"]) == {s.qid for s in test}
        assert set(result["predictions"].values()) <= set(lists[name])
        assert result["size"] == len(lists[name])
    generated = ranked["train answers"]["scored"]
    table = rank_mode_table(generated, ranked, test, n_resamples=50)
    assert list(table.index) == ["generated (free text)", "ranked: train answers", "ranked: train + test answers"]
    assert table.loc["ranked: train + test answers", "open answers in list %"] == 100.0
    assert table.loc["ranked: train answers", "open answers in list %"] < 100.0
    assert isinstance(table.loc["ranked: train + test answers", "Δ overall vs train list (pp)"], str)
    assert pd.isna(table.loc["ranked: train answers", "Δ overall vs train list (pp)"])


def test_unknown_profile_is_refused(tmp_path):
    from medvqa_lib.config import Profile

    odd = Profile(**{**get_profile("smoke").__dict__, "name": "tpu"})
    with pytest.raises(ValueError, match="no M2I2 plan"):
        study_plan(odd, tmp_path)


def test_study_plan_drops_none_and_names_the_valid_keys(tmp_path):
    smoke = get_profile("smoke")
    base = study_plan(smoke, tmp_path)
    same = study_plan(smoke, tmp_path, pairs=None, seeds=None, rank_k=None, model={"image_size": None},
                      pretrain={"epochs": None, "lr": None}, finetune=None)
    assert same == base
    with pytest.raises(ConfigError, match="unknown M2I2 study key.*pairz.*valid ones are:.*pairs") as err:
        study_plan(smoke, tmp_path, pairz=10)
    assert "ablation_epochs" in str(err.value) and "model" in str(err.value)
    with pytest.raises(ConfigError, match="unknown M2I2 model key.*vision_dept\\b.*valid ones are:.*vision_depth"):
        study_plan(smoke, tmp_path, model={"vision_dept": 2})
    with pytest.raises(ConfigError, match="unknown M2I2 finetune key.*beams.*valid ones are:.*num_beams"):
        study_plan(smoke, tmp_path, finetune={"beams": 2})


def test_plans_are_the_one_home_of_the_model_sizes(tmp_path):
    for name in ("smoke", "cpu", "gpu"):
        profile = get_profile(name)
        model = study_plan(profile, tmp_path).model
        assert model == M2I2Config.from_profile(profile)
        assert {k: getattr(model, k) for k in PLANS[name]["model"] if k != "text_backbone"} == {
            k: v for k, v in PLANS[name]["model"].items() if k != "text_backbone"}
        assert model.text_backbone == profile.text_backbone


def test_comparison_chapter_names_stay_in_the_pipeline_module():
    from medvqa_lib.papers.m2i2 import pipeline as m2

    for name in ("study_plan", "pretraining_corpus", "pretrain_variant", "finetune_factory", "CPU_SPEEDS",
                 "REPORTED"):
        assert hasattr(m2, name), name


def test_package_imports_no_other_paper_package():
    import ast
    from pathlib import Path

    import medvqa_lib.papers.m2i2 as package

    folder = Path(package.__file__).parent
    allowed = {"config", "errors", "io", "text", "plots", "data", "evaluation", "training", "transcap", "nn",
               "experiments", "notebook"}
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if not name.startswith("medvqa_lib"):
                    continue
                parts = name.split(".")
                if parts[:3] == ["medvqa_lib", "papers", "m2i2"]:
                    continue
                assert len(parts) > 1 and parts[1] in allowed, f"{path.name} imports {name}"
