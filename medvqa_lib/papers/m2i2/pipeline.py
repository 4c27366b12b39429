"""The M2I2 chapter's experiments: pre-training variants, fine-tuning, scoring and result rows.

A study is sized by a run profile (:func:`~medvqa_lib.papers.m2i2.config.study_plan`).
Pre-training runs once per variant of Table 4 that needs it (the full model, w/o MIM, w/o ITC);
"w/o pre-training" fine-tunes the freshly built model. Fine-tuning then runs per dataset and seed,
always selecting the epoch on validation questions
(:func:`~medvqa_lib.experiments.runs.finetune_and_test`).

Pre-training data: M2I2 pre-trains on image-caption pairs only (the paper: ImageCLEF 2022
captions). Here they are ROCO when the user has it (a ``roco/`` folder under the data root, or
the Hub), else the synthetic generator's captions, a labelled stand-in
(:func:`pretraining_corpus`, the shared :func:`~medvqa_lib.experiments.corpus.caption_pairs`).

The rest of the package: ``config.py`` (plans and study), ``rank.py`` (rank mode),
``reported.py`` (the paper's tables), ``figures.py`` (Figure 3, reconstructions). The plan, the
measured CPU speeds and the reported numbers are re-exported here, the names the comparison
chapter uses from this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medvqa_lib.config import Profile
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.evaluation import QuestionOnlyPrior, aggregate_seeds, score_predictions, summarize
from medvqa_lib.experiments.corpus import caption_pairs
from medvqa_lib.experiments.generative import StageSettings, pretrain
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.experiments.runs import RunRecord, snapshot
from medvqa_lib.papers.m2i2.config import (
    CPU_SPEEDS,
    FULL,
    M2I2Config,
    finetune_config,
    study_plan,
)
from medvqa_lib.papers.m2i2.model import M2I2, build_m2i2, load_pretrained_for_finetune
from medvqa_lib.papers.m2i2.reported import REPORTED
from medvqa_lib.training import TrainResult, seed_everything

__all__ = ["CPU_SPEEDS", "FULL", "REPORTED", "finetune_factory", "free_para_scores", "measured_rows",
           "pretrain_variant", "pretraining_corpus", "prior_scores", "readable", "restore_finetuned",
           "seed_summary", "study_plan"]


def pretraining_corpus(profile: Profile, n: int, seed: int = 0, root: Path | None = None, *,
                       hub: bool = False, n_held_out: int = 0, verbose: bool = True
                       ) -> tuple[list[CaptionSample], list[CaptionSample], str]:
    """``n`` image-caption pairs for pre-training, ``n_held_out`` more (other images) for
    figures, and where they came from: ROCO under the data folder ``root`` or from the Hub
    (``hub``), else synthetic captions (see
    :func:`~medvqa_lib.experiments.corpus.caption_pairs`). M2I2 uses no other pre-training
    data."""
    pairs, source = caption_pairs(profile, n + n_held_out, seed, root, hub=hub, verbose=False)
    train_images = {p.image_id for p in pairs[:n]}
    held = [p for p in pairs[n:] if p.image_id not in train_images][:n_held_out]
    if verbose:
        print(f"image-caption pairs: {len(pairs[:n])} for pre-training, {len(held)} held out, from {source}")
    return pairs[:n], held, source


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




def finetune_factory(config: M2I2Config, state: Mapping[str, torch.Tensor] | None,
                     backbone: Any = None) -> Callable[[], M2I2]:
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
