"""The M2I2 chapter's experiments: plan, pre-training variants, fine-tuning, rank mode, figures.

A study is sized by a run profile (:func:`study_plan`). Pre-training runs once per variant of
Table 4 that needs it (the full model, w/o MIM, w/o ITC); "w/o pre-training" fine-tunes the
freshly built model. Fine-tuning then runs per dataset and seed, always selecting the epoch on
validation questions (:func:`~medvqa_lib.experiments.runs.finetune_and_test`).

Pre-training data: M2I2 pre-trains on image-caption pairs only (the paper: ImageCLEF 2022
captions). Here they are ROCO when the user has it (a ``roco/`` folder under the data root, or
the Hub on the ``gpu`` profile), else the synthetic generator's captions, a labelled stand-in
(:func:`pretraining_corpus`, the shared :func:`~medvqa_lib.experiments.corpus.caption_pairs`).

Answers are generated. The public code's *rank mode* is an extra evaluation: it picks the most
likely answer from a list, built here from the training split only (:func:`candidate_lists`);
the same list plus the test answers measures what such a leak is worth (:func:`rank_mode`).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvqa_lib.config import Profile
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.evaluation import (
    QuestionOnlyPrior,
    aggregate_seeds,
    ensure_splits,
    normalize_answer,
    paired_bootstrap,
    reported_row,
    score_predictions,
    summarize,
)
from medvqa_lib.experiments.corpus import caption_pairs
from medvqa_lib.experiments.generative import ImageCache, StageSettings, pretrain
from medvqa_lib.experiments.runs import RunRecord, snapshot
from medvqa_lib.experiments.tables import compare_to_prior, seed_mean_scores
from medvqa_lib.papers.m2i2.model import (
    M2I2,
    M2I2Config,
    build_m2i2,
    candidate_answers,
    load_pretrained_for_finetune,
    predict_ranked,
    with_test_answers,
)
from medvqa_lib.training import TrainResult, autocast_context, seed_everything

__all__ = ["FULL", "LoggedStage", "M2I2Study", "REPORTED", "ablation_configs", "candidate_lists", "compare_with_prior",
           "CPU_SPEEDS", "ablation_table", "estimated_seconds", "finetune_config", "finetune_factory", "free_para_scores", "gradcam_figure",
           "measured_rows", "pick_examples", "readable",
           "prior_scores", "pretrain_variant", "pretraining_corpus", "rank_mode", "rank_mode_table",
           "reconstruction_figure", "reported_rows", "restore_finetuned", "schedule_note",
           "seed_mean_scores", "seed_summary", "study_plan"]

#: the label of the full model in every table
FULL = "M2I2"


@dataclass
class LoggedStage(StageSettings):
    """:class:`StageSettings` whose runs log their losses every ``log_every`` optimizer steps
    (a one-epoch pre-training of a few hundred pairs has only ~13 steps)."""

    log_every: int = 20

    def train_config(self, select_metric: str) -> Any:
        config = super().train_config(select_metric)
        config.log_every = self.log_every
        return config


@dataclass
class M2I2Study:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    model: M2I2Config
    pretrain: StageSettings
    finetune: StageSettings
    #: fine-tuning epochs per dataset (small datasets get more); "default" for the others
    finetune_epochs: dict[str, int]
    #: image-caption pairs in the pre-training corpus
    pairs: int
    seeds: tuple[int, ...]
    #: real datasets to load (PathVQA only where the profile can afford it)
    datasets: tuple[str, ...] = ("vqa-rad", "slake")
    #: datasets of Table 4 (None: every loaded dataset); one seed each
    ablation_datasets: tuple[str, ...] | None = None
    #: fine-tuning epochs and training questions of the Table 4 runs (None: as the main
    #: runs); when either differs, the full model is fine-tuned again on the same schedule
    ablation_epochs: int | None = None
    ablation_train_limit: int | None = None
    #: rank mode: the public code's pre-selection of the k candidates with the likeliest first
    #: token (None: score every candidate) and the datasets it runs on (None: all)
    rank_k: int | None = None
    rank_datasets: tuple[str, ...] | None = None
    #: training questions per dataset (None: the profile's ``max_train_samples``)
    train_limit: int | None = None
    #: the paper's final learning rates of its cosine schedules (see ``schedule_note``)
    final_lr: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def epochs_for(self, dataset: str) -> int:
        return self.finetune_epochs.get(dataset, self.finetune_epochs.get("default", self.finetune.epochs))

    def finetune_settings(self, dataset: str) -> StageSettings:
        return dataclasses.replace(self.finetune, epochs=self.epochs_for(dataset))

    def split_limits(self, profile: Profile) -> dict[str, int | None]:
        """Questions kept per split (None: all): the study's training limit, else the
        profile's caps."""
        return {"train": self.train_limit or profile.max_train_samples, "val": profile.max_eval_samples,
                "test": profile.max_eval_samples}

    @property
    def finetune_image_size(self) -> int:
        return self.model.finetune_image_size or self.model.image_size

    def ablation_settings(self, dataset: str) -> StageSettings:
        """Fine-tuning settings of the Table 4 runs on ``dataset``."""
        return dataclasses.replace(self.finetune, epochs=self.ablation_epochs or self.epochs_for(dataset))

    def ablation_matches_main(self, dataset: str) -> bool:
        """Whether the Table 4 runs on ``dataset`` train like the main runs (then the full
        model's first-seed main run is their reference)."""
        return (self.ablation_settings(dataset).epochs == self.epochs_for(dataset)
                and self.ablation_train_limit is None)

    def ablation_splits(self, splits: Mapping[str, Sequence[VQASample]], seed: int = 0
                        ) -> dict[str, Sequence[VQASample]]:
        """``splits`` with the training questions capped at ``ablation_train_limit`` (a seeded
        random subset; validation and test untouched)."""
        from medvqa_lib.data.suite import cap

        return {**splits, "train": cap(list(splits["train"]), self.ablation_train_limit, seed)}

    def ablation_sets(self, available: Sequence[str]) -> list[str]:
        """The datasets of Table 4 among ``available`` (in their order)."""
        wanted = self.ablation_datasets
        return [d for d in available if wanted is None or d in wanted]

    def rank_sets(self, available: Sequence[str]) -> list[str]:
        wanted = self.rank_datasets
        return [d for d in available if wanted is None or d in wanted]


_PAPER_PRETRAIN = dict(epochs=40, batch_size=32, lr=1e-4, weight_decay=0.002, warmup_ratio=0.0,
                       schedule="cosine", log_every=50)
_PAPER_FINETUNE = dict(epochs=40, batch_size=8, lr=2e-5, weight_decay=0.002, warmup_ratio=0.0,
                       schedule="cosine", log_every=50)

_PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(model={},
                  pretrain=dict(epochs=1, batch_size=16, lr=1e-4, weight_decay=0.002, log_every=1),
                  finetune=dict(epochs=1, batch_size=16, lr=1e-4, weight_decay=0.002, eval_limit=32,
                                group_size=1, num_beams=1, max_new_tokens=6, log_every=2),
                  finetune_epochs={"default": 1}, pairs=48, rank_k=8, train_limit=128),
    # 2 cores, VQA-RAD + SLAKE: 3 pre-trainings (400 pairs, 1 epoch, ~25 s each), 2 seeds x
    # (VQA-RAD 2 epochs, ~2 min + SLAKE 2 epochs, ~3.5 min), and Table 4 on SLAKE with one seed:
    # the 3 variants and the full model, each 1 epoch on 1,000 training questions (~30 s).
    # VQA-RAD ablations and rank mode are left out: at this scale its answers do not use the
    # image (see the image control)
    "cpu": dict(model=dict(image_size=96, vision_depth=4),
                pretrain=dict(epochs=1, batch_size=32, lr=1e-4, weight_decay=0.002, log_every=1),
                finetune=dict(epochs=2, batch_size=64, lr=5e-4, weight_decay=0.002, eval_limit=256,
                              group_size=4, num_beams=1, max_new_tokens=10, log_every=5),
                finetune_epochs={"vqa-rad": 2, "slake": 2, "synthetic": 1, "default": 2},
                pairs=400, seeds=(0, 1), rank_k=16, ablation_datasets=("slake",), ablation_epochs=1,
                ablation_train_limit=1000, rank_datasets=("slake",)),
    # the paper (Sec. 3.2): pre-training 40 epochs, batch 32, AdamW (weight decay 0.002), lr 1e-4
    # -> 1e-5 cosine, 256 px; fine-tuning 40 epochs, batch 8, lr 2e-5 -> 1e-6, 384 px
    "gpu": dict(model={}, pretrain=dict(_PAPER_PRETRAIN),
                finetune=dict(_PAPER_FINETUNE, eval_limit=None, num_beams=3, max_new_tokens=10),
                finetune_epochs={"default": 40}, pairs=83_275,
                datasets=("vqa-rad", "slake", "pathvqa"), rank_k=128,
                final_lr={"pretrain": 1e-5, "finetune": 1e-6}),
}


def study_plan(profile: Profile, out_dir: str | Path, **overrides: Any) -> M2I2Study:
    """The study of ``profile`` (``smoke``/``cpu``/``gpu``). ``overrides``: any
    :class:`M2I2Study` field, plus ``model`` overrides as a dict (on top of the profile's
    :meth:`M2I2Config.from_profile` preset and the study's own changes to it) and
    ``pretrain``/``finetune`` as dicts of :class:`StageSettings` fields; ``finetune_epochs``
    updates the plan's per-dataset epochs. A value of None keeps the plan's."""
    if profile.name not in _PLANS:
        raise ValueError(f"no M2I2 study for profile {profile.name!r}; choose one of {', '.join(_PLANS)}")
    plan = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _PLANS[profile.name].items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model = {**plan.pop("model"), **{k: v for k, v in (overrides.pop("model", None) or {}).items()
                                      if v is not None}}
    for stage in ("pretrain", "finetune"):
        plan[stage].update({k: v for k, v in (overrides.pop(stage, None) or {}).items() if v is not None})
    out = Path(out_dir)
    pre = LoggedStage(**plan.pop("pretrain"), out_dir=out / "pretrain", progress=None)
    fine = LoggedStage(**plan.pop("finetune"), out_dir=out / "finetune", progress=None)
    if "finetune_epochs" in overrides:  # per dataset, on top of the plan's
        plan["finetune_epochs"] = {**plan["finetune_epochs"], **overrides.pop("finetune_epochs")}
    plan.update(overrides)
    plan.setdefault("seeds", tuple(profile.seeds))
    for key in ("seeds", "datasets", "ablation_datasets", "rank_datasets"):
        if isinstance(plan.get(key), (list, int, str)):
            value = plan[key]
            plan[key] = (value,) if isinstance(value, (int, str)) else tuple(value)
    return M2I2Study(model=M2I2Config.from_profile(profile, **model), pretrain=pre, finetune=fine, **plan)


def schedule_note(study: M2I2Study) -> str:
    """One sentence on the learning-rate schedules of the study against the paper's."""
    lines = []
    for name, stage in (("pretrain", study.pretrain), ("finetune", study.finetune)):
        end = study.final_lr.get(name)
        target = f" (the paper: to {end:g})" if end else ""
        lines.append(f"{name}: AdamW lr {stage.lr:g}, weight decay {stage.weight_decay:g}, "
                     f"{stage.schedule} to 0{target}")
    return "; ".join(lines)


#: throughput of the ``cpu`` plan's model measured on a 2-core CPU with bf16 autocast in the
#: chapter's own run (pre-training pairs/s at batch 32, fine-tuning questions/s in image groups
#: of 4, greedy answers/s); :func:`estimated_seconds` sizes the plan with them
CPU_SPEEDS = {"pretrain": 17.0, "finetune": 47.0, "answer": 150.0}


def estimated_seconds(study: M2I2Study, sizes: Mapping[str, tuple[int, int, int]],
                      speeds: Mapping[str, float] = CPU_SPEEDS, ablations: bool = True) -> dict[str, float]:
    """Seconds the study's training runs should take at ``speeds``, for datasets of ``sizes``
    (``{name: (train, val, test)}`` questions): pre-training of every variant, fine-tuning with
    validation and test answers per seed, and the Table 4 runs (one seed, three variants, and
    the full model again when their schedule differs from the main runs')."""
    n_pre = len(ablation_configs(study.model)) if ablations else 1
    pre = n_pre * study.pairs * study.pretrain.epochs / speeds["pretrain"]

    def run(name: str, ablation: bool = False) -> float:
        train, val, test = sizes[name]
        epochs = study.ablation_settings(name).epochs if ablation else study.epochs_for(name)
        if ablation:
            train = min(train, study.ablation_train_limit or train)
        val = min(val, study.finetune.eval_limit or val)
        beams = max(study.finetune.num_beams, 1)
        return epochs * (train / speeds["finetune"] + val / speeds["answer"]) + beams * test / speeds["answer"]

    main = len(study.seeds) * sum(run(n) for n in sizes)
    abl = sum((3 + (not study.ablation_matches_main(n))) * run(n, ablation=True)
              for n in study.ablation_sets(list(sizes))) if ablations else 0.0
    return {"pre-training": pre, "fine-tuning": main, "ablations": abl, "total": pre + main + abl}


# ----------------------------------------------------------------------------- corpora


def pretraining_corpus(profile: Profile, n: int, seed: int = 0, data_dir: Any = None,
                       n_held_out: int = 0, verbose: bool = True
                       ) -> tuple[list[CaptionSample], list[CaptionSample], str]:
    """``n`` image-caption pairs for pre-training, ``n_held_out`` more (other images) for
    figures, and where they came from (ROCO when given, else synthetic captions; see
    :func:`~medvqa_lib.experiments.corpus.caption_pairs`). M2I2 uses no other pre-training
    data."""
    pairs, source = caption_pairs(profile, n + n_held_out, seed, data_dir, verbose=False)
    train_images = {p.image_id for p in pairs[:n]}
    held = [p for p in pairs[n:] if p.image_id not in train_images][:n_held_out]
    if verbose:
        print(f"image-caption pairs: {len(pairs[:n])} for pre-training, {len(held)} held out, from {source}")
    return pairs[:n], held, source


# ----------------------------------------------------------------------------- variants and runs


def ablation_configs(config: M2I2Config) -> dict[str, M2I2Config]:
    """The pre-training variants of Table 4: the full model, w/o MIM, w/o ITC."""
    return {FULL: config, "w/o MIM": config.replace(use_mim=False),
            "w/o ITC": config.replace(use_itc=False)}


def pretrain_variant(label: str, config: M2I2Config, corpus: Sequence[CaptionSample], tokenizer: Any,
                     cache: ImageCache, settings: StageSettings, backbone: Any = None,
                     seed: int = 0) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Pre-train a freshly built model (MIM + MLM + ITM + ITC, minus what ``config`` switches
    off) on ``corpus``; returns its weights (CPU copy) and the training record."""
    seed_everything(seed)
    model = build_m2i2(config, backbone)
    safe = label.replace(" ", "_").replace("/", "")
    stage = dataclasses.replace(settings, seed=seed, out_dir=Path(settings.out_dir) / safe)
    result = pretrain(model, corpus, tokenizer, cache, stage)
    return snapshot(model), result


def finetune_config(config: M2I2Config) -> M2I2Config:
    """The fine-tuning model: no image decoder, momentum encoders or queues (VQA uses neither;
    every Table 4 variant is fine-tuned with the same architecture)."""
    return config.replace(use_mim=False, use_itc=False)


def finetune_factory(config: M2I2Config, state: Mapping[str, torch.Tensor] | None, backbone: Any = None):
    """``make_model()`` for :func:`~medvqa_lib.experiments.runs.finetune_and_test`: a fresh
    model at the fine-tuning image size, from pre-trained ``state`` (positional embeddings
    interpolated, answer decoder initialised from the multimodal layers), or from the text
    backbone and a new image encoder when ``state`` is None (w/o pre-training)."""
    size = config.finetune_image_size or config.image_size

    def make() -> M2I2:
        if state is None:
            return build_m2i2(finetune_config(config).replace(image_size=size), backbone)
        model = build_m2i2(finetune_config(config), backbone)
        load_pretrained_for_finetune(model, state, new_image_size=size)
        return model

    return make


def restore_finetuned(config: M2I2Config, record: RunRecord, backbone: Any = None) -> M2I2:
    """The fine-tuned model of ``record`` (its selected epoch's weights, read back from disk),
    in eval mode."""
    from medvqa_lib.training.checkpoint import MODEL_FILE, load_model_weights, resolve_dir

    found = resolve_dir(Path(record.train.out_dir) / "best")
    if found is None:
        raise FileNotFoundError(f"no selected checkpoint under {record.train.out_dir}")
    size = config.finetune_image_size or config.image_size
    model = build_m2i2(finetune_config(config).replace(image_size=size, finetune_image_size=None), backbone)
    return load_model_weights(model, found / MODEL_FILE).eval()


# ----------------------------------------------------------------------------- scoring


def prior_scores(suite: Mapping[str, Mapping[str, Sequence[VQASample]]]) -> dict[str, pd.DataFrame]:
    """The data chapter's question-type prior, fitted on each training split, scored on test."""
    out = {}
    for name, splits in suite.items():
        prior = QuestionOnlyPrior(key="question_type").fit(splits["train"])
        out[name] = score_predictions(splits["test"], prior.predict(splits["test"]))
    return out


def free_para_scores(scored: pd.DataFrame, test: Sequence[VQASample]) -> dict[str, pd.DataFrame]:
    """VQA-RAD's two test sets of Table 1: ``"free"`` (free-form questions only, where the
    phrase type is known) and ``"free+para"`` (all)."""
    from medvqa_lib.data import vqa_rad_subset
    from medvqa_lib.errors import DataError

    out = {}
    try:
        free = {s.qid for s in vqa_rad_subset(list(test), "free")}
        out["free"] = scored[scored["qid"].isin(free)].reset_index(drop=True)
    except DataError:
        pass
    out["free+para"] = scored
    return out


def seed_summary(records: Sequence[RunRecord], qids: set[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds of each record's summary (on the questions ``qids`` if given)."""
    tables = [summarize(r.scored if qids is None else r.scored[r.scored["qid"].isin(qids)])
              for r in records]
    return aggregate_seeds(tables)


def compare_with_prior(model_scored: Mapping[str, pd.DataFrame], prior_scored: Mapping[str, pd.DataFrame],
                       n_resamples: int = 1000, seed: int = 0, label: str = FULL) -> pd.DataFrame:
    """Paired bootstrap of model − prior accuracy per dataset and answer type (percentage
    points, 95 % interval; ``supported`` when the whole interval is above zero)."""
    return compare_to_prior(model_scored, prior_scored, n_resamples=n_resamples, seed=seed, label=label)


def measured_rows(dataset: str, records: Sequence[RunRecord], prior_scored: pd.DataFrame,
                  qids: set[str] | None = None, note: str = "") -> dict[str, pd.DataFrame]:
    """This book's rows of a results table: the model's mean ± std over the seeds of
    ``records`` and the question-type prior, on the test questions ``qids`` (all if None)."""
    n = len(records)
    suffix = f", {note}" if note else ""
    prior = prior_scored if qids is None else prior_scored[prior_scored["qid"].isin(qids)]
    return {f"{FULL}, this book ({n} seed{'' if n == 1 else 's'}){suffix}":
            seed_summary(records, qids).assign(dataset=dataset, note=note),
            f"question-type prior, this book{suffix}": summarize(prior).assign(dataset=dataset, note=note)}


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`~medvqa_lib.evaluation.results_table` for reading: one row per label,
    accuracies as ``mean ± std`` (std only where there are several seeds), seeds and source."""
    from medvqa_lib.evaluation import format_mean_std

    out = pd.DataFrame(index=pd.Index(table["label"], name=None))
    if table["dataset"].nunique() > 1:
        out["dataset"] = table["dataset"].to_numpy()
    for col in ("closed", "open", "overall"):
        out[col] = [format_mean_std(m, s) for m, s in zip(table[col], table[f"{col}_std"], strict=True)]
    out["open recall"] = [format_mean_std(m, s) for m, s in zip(table["open_recall"], table["open_recall_std"],
                                                                 strict=True)]
    out["seeds"] = [("" if pd.isna(n) else str(int(n))) for n in table["n_seeds"]]
    out["source"] = table["source"].to_numpy()
    if "note" in table and table["note"].astype(str).str.len().any():
        out["test set"] = table["note"].to_numpy()
    return out


def ablation_table(records: Mapping[str, RunRecord], full: str = FULL, n_resamples: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """Table 4 on one dataset: each variant's accuracies with 95 % bootstrap intervals, and
    the paired-bootstrap change of overall accuracy against ``full`` (same questions)."""
    from medvqa_lib.evaluation import format_ci_table, summarize_with_ci

    rows = {label: summarize_with_ci(rec.scored, n_resamples=n_resamples, seed=seed)
            for label, rec in records.items()}
    table = format_ci_table(pd.concat(rows, names=["variant"]).droplevel(1))
    deltas = []
    for label, rec in records.items():
        if label == full or full not in records:
            deltas.append("")
            continue
        r = paired_bootstrap(rec.scored, records[full].scored, n_resamples=n_resamples, seed=seed)
        deltas.append(f"{r['delta']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]")
    table[f"Δ overall vs {full} (pp)"] = deltas
    return table


# ----------------------------------------------------------------------------- reported numbers

#: the paper's Tables 1-4 (accuracy in %: closed, open, overall), copied as printed
REPORTED: dict[str, list[tuple[str, str, float, float, float]]] = {
    # Table 1, VQA-RAD: (method, test set, closed, open, overall)
    "table1": [
        ("SAN-MEVF", "free", 74.1, 40.7, 60.8), ("BAN-MEVF", "free", 75.1, 43.9, 62.6),
        ("SAN-MMQ", "free", 73.0, 46.3, 62.3), ("BAN-MMQ", "free", 72.4, 52.0, 64.3),
        ("SAN-VQAMix", "free", 74.0, 53.8, 65.9), ("BAN-VQAMix", "free", 79.6, 56.6, 70.4),
        ("CMSA-MTPT", "free", 77.3, 56.1, 68.8), ("FITS", "free", 80.0, 61.0, 72.4),
        ("M2I2", "free", 81.6, 61.8, 73.7),
        ("MMBERT", "free+para", 77.9, 63.1, 72.0), ("PubMedCLIP", "free+para", 80.0, 60.1, 72.1),
        ("CMSA-MTPT", "free+para", 80.9, 61.5, 73.2), ("FITS", "free+para", 82.0, 68.2, 76.5),
        ("M2I2", "free+para", 83.5, 66.5, 76.8),
    ],
    # Table 2, PathVQA
    "table2": [
        ("SAN-MEVF", "", 81.0, 6.0, 43.6), ("BAN-MEVF", "", 81.4, 8.1, 44.8),
        ("SAN-MMQ", "", 83.7, 9.6, 46.8), ("BAN-MMQ", "", 82.1, 11.8, 47.1),
        ("SAN-VQAMix", "", 84.4, 12.1, 48.4), ("BAN-VQAMix", "", 83.5, 13.4, 48.6),
        ("M2I2", "", 88.0, 36.3, 62.2),
    ],
    # Table 3, SLAKE
    "table3": [
        ("VGG+SAN", "", 76.1, 70.3, 72.7), ("VGGseg+SAN", "", 75.4, 72.2, 75.4),
        ("PubMedCLIP", "", 82.5, 78.4, 80.1), ("M2I2", "", 91.1, 74.7, 81.2),
    ],
    # Table 4, ablations: (variant, dataset, closed, open, overall)
    "table4": [
        ("w/o pre-training", "vqa-rad", 70.8, 36.6, 57.1), ("w/o MIM", "vqa-rad", 74.1, 52.0, 65.3),
        ("w/o ITC", "vqa-rad", 73.5, 45.5, 62.3), ("M2I2", "vqa-rad", 81.6, 61.8, 73.7),
        ("w/o pre-training", "pathvqa", 87.4, 26.8, 57.2), ("w/o MIM", "pathvqa", 87.9, 34.8, 61.4),
        ("w/o ITC", "pathvqa", 88.0, 36.1, 62.1), ("M2I2", "pathvqa", 88.0, 36.3, 62.2),
        ("w/o pre-training", "slake", 83.2, 67.3, 73.5), ("w/o MIM", "slake", 87.0, 72.6, 78.2),
        ("w/o ITC", "slake", 86.5, 72.7, 78.1), ("M2I2", "slake", 91.1, 74.7, 81.2),
    ],
}
_TABLE_DATASET = {"table1": "vqa-rad", "table2": "pathvqa", "table3": "slake"}


def reported_rows(table: str, subset: str | None = None, dataset: str | None = None
                  ) -> dict[str, pd.DataFrame]:
    """The paper's rows of ``table`` (``"table1"`` … ``"table4"``) as :func:`reported_row`
    tables, keyed by a label that says they are reported. ``subset``: Table 1's test set
    (``"free"``/``"free+para"``); ``dataset``: Table 4's dataset."""
    if table not in REPORTED:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(REPORTED)}")
    out = {}
    number = table.removeprefix("table")
    for name, key, closed, open_, overall in REPORTED[table]:
        if table == "table4":
            if dataset is not None and key != dataset:
                continue
            ds, note = key, ""
        else:
            if subset is not None and key != subset:
                continue
            ds, note = _TABLE_DATASET[table], key
        label = f"{name}{f' ({key})' if key else ''}, reported (M2I2 paper, Table {number})"
        out[label] = reported_row(f"M2I2 paper, Table {number}: {name}", ds, closed, open_, overall, note=note)
    return out


# ----------------------------------------------------------------------------- rank mode


def candidate_lists(train: Sequence[VQASample], test: Sequence[VQASample] | None = None,
                    leak: bool = False) -> dict[str, list[str]]:
    """Rank-mode answer lists: ``"train answers"`` (normalised answers of the training split,
    most frequent first; raises on any non-training sample) and, only with ``leak``, ``"train
    + test answers"``: the same list with the test answers appended, the public code's kind of
    list, for measuring the leak — never for a reported score."""
    lists = {"train answers": candidate_answers(train)}
    if leak:
        if test is None:
            raise ValueError("the leak list needs the test samples")
        ensure_splits(list(test), {"test"}, "the leak demonstration")
        lists["train + test answers"] = with_test_answers(lists["train answers"], test)
    return lists


def rank_mode(model: M2I2, test: Sequence[VQASample], lists: Mapping[str, Sequence[str]], tokenizer: Any,
              cache: ImageCache, *, k: int | None = None, batch_size: int = 32, max_question_len: int = 32,
              precision: str = "auto") -> dict[str, dict[str, Any]]:
    """Answer ``test`` in rank mode once per candidate list; per list its ``size``, the
    ``predictions`` and the ``scored`` table."""
    device = next(model.parameters()).device
    out = {}
    for name, cands in lists.items():
        with autocast_context(device, precision):
            preds = predict_ranked(model, list(test), list(cands), tokenizer, cache, batch_size=batch_size,
                                   max_question_len=max_question_len, k=k)
        out[name] = {"size": len(cands), "predictions": preds, "scored": score_predictions(test, preds),
                     "candidates": list(cands)}
    return out


def rank_mode_table(generated: pd.DataFrame, ranked: Mapping[str, Mapping[str, Any]],
                    test: Sequence[VQASample], n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Generated answers vs rank mode with each list: list size, share of test questions whose
    answer is in the list (closed/open), accuracies, and the paired-bootstrap change of open
    and overall accuracy against the training-only list."""
    answer = {s.qid: normalize_answer(s.answer) for s in test}
    kind = {s.qid: s.answer_type for s in test}
    base = ranked.get("train answers")
    rows = []
    for name, scored in [("generated (free text)", generated)] + [(f"ranked: {k}", v["scored"])
                                                                   for k, v in ranked.items()]:
        row: dict[str, Any] = {"answers": name}
        source = ranked.get(name.removeprefix("ranked: "))
        if source is not None:
            listed = set(source["candidates"])
            row["list size"] = source["size"]
            for t in ("closed", "open"):
                q = [qid for qid in answer if kind[qid] == t]
                row[f"{t} answers in list %"] = 100 * np.mean([answer[x] in listed for x in q]) if q else np.nan
        s = summarize(scored).iloc[0]
        row.update(closed=s["closed_acc"], open=s["open_acc"], overall=s["overall_acc"])
        if base is not None and source is not None and source is not base:
            for t, col in (("open", "Δ open vs train list (pp)"), (None, "Δ overall vs train list (pp)")):
                r = paired_bootstrap(scored, base["scored"], n_resamples=n_resamples, seed=seed, answer_type=t)
                row[col] = f"{r['delta']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]"
        rows.append(row)
    return pd.DataFrame(rows).set_index("answers").round(1)


# ----------------------------------------------------------------------------- figures


def pick_examples(test: Sequence[VQASample], n_closed: int = 2, n_open: int = 2, seed: int = 0) -> list[VQASample]:
    """Seeded random test questions for a figure (closed first, then open), on distinct images
    where possible. Chosen without looking at any model's answers."""
    rng = np.random.default_rng(seed)
    chosen: list[VQASample] = []
    for kind, n in (("closed", n_closed), ("open", n_open)):
        pool = [s for s in test if s.answer_type == kind]
        order = rng.permutation(len(pool))
        used = {s.image_id for s in chosen}
        picks = [pool[i] for i in order if pool[i].image_id not in used][:n]
        picks += [pool[i] for i in order if pool[i] not in picks][: n - len(picks)]
        chosen += picks
    return chosen


def _wrap(text: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _show(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) image normalised to mean/std 0.5 as an RGB array in [0, 1]."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def gradcam_figure(model: M2I2, samples: Sequence[VQASample], tokenizer: Any, cache: ImageCache,
                   layer: int | None = None, max_question_len: int = 32) -> tuple[Any, pd.DataFrame]:
    """Figure 3: Grad-CAM of the multimodal encoder's cross-attention for each question, for
    the log-likelihood of the model's own greedy answer, overlaid on the image. Returns the
    figure and a table of question, reference and generated answer."""
    import matplotlib.pyplot as plt

    from medvqa_lib.data.dataset import VQACollator
    from medvqa_lib.experiments.generative import CachedVQADataset, decode_answers
    from medvqa_lib.papers.m2i2.gradcam import cross_attention_gradcam, default_layer, overlay

    data = CachedVQADataset(list(samples), cache)
    batch = VQACollator(tokenizer, max_question_len=max_question_len)([data[i] for i in range(len(data))])
    device = next(model.parameters()).device
    args = [batch[k].to(device) for k in ("images", "question_ids", "question_mask")]
    model.eval()
    with torch.no_grad():
        answers = decode_answers(tokenizer, model.generate(*args, num_beams=1))
    maps = cross_attention_gradcam(model, *args, layer=layer)
    layer = default_layer(model) if layer is None else layer
    fig, axes = plt.subplots(1, len(samples), figsize=(3.4 * len(samples), 4.4), squeeze=False)
    for ax, s, image, cam, pred in zip(axes[0], samples, batch["images"], maps, answers, strict=True):
        ax.imshow(overlay(image, cam))
        ax.axis("off")
        ax.set_title(_wrap(f"Q: {s.question}") + f"\nA: {s.answer} · Pred: {pred}\n({s.answer_type})",
                     fontsize=8, loc="left")
    fig.suptitle(f"Grad-CAM of the cross-attention of text layer {layer} (the model's own answer)", y=1.0)
    fig.tight_layout()
    table = pd.DataFrame({"question": [s.question for s in samples], "answer type": [s.answer_type for s in samples],
                          "reference": [s.answer for s in samples], "generated": answers})
    return fig, table


def reconstruction_figure(models: Mapping[str, M2I2], images: torch.Tensor, seed: int = 0) -> Any:
    """MAE reconstructions (the MIM head) of ``images`` by each model, with the same random
    masks for every model: original, masked input, reconstruction of every patch, and the
    visible patches with the reconstructed masked ones pasted in."""
    import matplotlib.pyplot as plt

    cols = ("original", "masked input", "reconstruction", "visible + reconstructed")
    rows = [(label, i) for i in range(images.shape[0]) for label in models]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.6, 2.5 * len(rows)), squeeze=False)
    outs = {}
    for label, model in models.items():
        model.eval()
        torch.manual_seed(seed)
        outs[label] = model.reconstruct(images.to(next(model.parameters()).device))
    for r, (label, i) in enumerate(rows):
        out = outs[label]
        panels = (images[i], out["masked"][i], out["reconstruction"][i], out["pasted"][i])
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            ax.imshow(_show(panel))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r][0].set_ylabel(f"{label}\nimage {i + 1}", fontsize=8)
    fig.tight_layout()
    return fig

