"""Seeds × datasets loops shared by the chapters: fine-tune, answer the test set, score;
and the shuffled-image control (does a model's answer depend on the image at all?)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medvqa_lib.data.schema import VQASample
from medvqa_lib.evaluation import paired_bootstrap, score_predictions, summarize_with_ci
from medvqa_lib.experiments.generative import (
    ImageCache,
    StageSettings,
    choose_decoding,
    finetune_vqa,
    predict,
)
from medvqa_lib.training import TrainResult, seed_everything


@dataclass
class RunRecord:
    """One fine-tuning run: its scores per test question and its training record."""

    label: str
    dataset: str
    seed: int
    scored: pd.DataFrame
    train: TrainResult
    predictions: dict[str, str] = field(default_factory=dict)
    #: the same test questions answered about another image (see :func:`shuffled_images`)
    shuffled: pd.DataFrame | None = None
    #: beams the test was answered with (1: greedy), chosen on validation when the settings ask
    num_beams: int | None = None
    #: validation accuracy of each decoding tried (empty when none was chosen)
    decoding_val: dict[str, float] = field(default_factory=dict)


def slug(label: str) -> str:
    """A run label as one folder name (``"w/o JTM (50%)"`` → ``"wo_JTM_50pc"``)."""
    text = label.replace("%", "pc").replace("/", "").replace("+", "plus")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's weights (to restart each seed from)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def shuffled_images(samples: Sequence[VQASample], seed: int = 0) -> list[VQASample]:
    """The same questions, each asked about another image: the distinct images are permuted
    in one cycle, so that every image hands all its questions to a different image. A model
    that answers as well this way does not use the image."""
    ids = sorted({s.image_id for s in samples})
    if len(ids) < 2:
        raise ValueError("shuffling images needs questions about at least two distinct images")
    order = ids[:]
    random.Random(seed).shuffle(order)
    moved = dict(zip(order, order[1:] + order[:1], strict=True))
    image_of = {s.image_id: s.image for s in samples}
    return [replace(s, image_id=moved[s.image_id], image=image_of[moved[s.image_id]]) for s in samples]


def _answer(model: torch.nn.Module, test: Sequence[VQASample], tokenizer: Any, cache: ImageCache,
            settings: StageSettings, num_beams: int | None = None) -> dict[str, str]:
    return predict(model, test, tokenizer, cache, num_beams=num_beams or settings.num_beams,
                   max_new_tokens=settings.max_new_tokens, max_question_len=settings.max_text_len)


def finetune_and_test(label: str, make_model: Callable[[], torch.nn.Module],
                      datasets: Mapping[str, Mapping[str, Sequence[VQASample]]], seeds: Sequence[int],
                      tokenizer: Any, settings: StageSettings, out_dir: str | Path,
                      cache: ImageCache, test_filter: Callable[[VQASample], bool] | None = None,
                      verbose: bool = True, image_control: bool = False) -> list[RunRecord]:
    """For each dataset and seed: fresh model → fine-tune (best epoch on val) → answer test.

    ``make_model()`` must return a new model each call (e.g. from pre-trained weights).
    ``image_control``: also answer the test questions about shuffled images
    (:func:`shuffled_images`, kept in ``RunRecord.shuffled``). With beam search in ``settings``
    the decoding (beam or greedy) is chosen per run on validation (:func:`choose_decoding`).
    """
    records = []
    for name, splits in datasets.items():
        for seed in seeds:
            seed_everything(seed)
            model = make_model()
            stage = replace(settings, seed=seed, out_dir=Path(out_dir) / slug(label) / name / f"seed{seed}")
            result = finetune_vqa(model, splits["train"], splits["val"], tokenizer, cache, stage)
            beams, tried = choose_decoding(model, splits["val"], tokenizer, cache, stage, result.best_metric)
            test = [s for s in splits["test"] if test_filter is None or test_filter(s)]
            preds = _answer(model, test, tokenizer, cache, settings, beams)
            scored = score_predictions(test, preds)
            shuffled = None
            if image_control:
                moved = shuffled_images(test, seed)
                shuffled = score_predictions(moved, _answer(model, moved, tokenizer, cache, settings, beams))
            records.append(RunRecord(label, name, seed, scored, result, preds, shuffled, beams, tried))
            if verbose:
                acc = scored.groupby("answer_type")["exact"].mean().mul(100).round(1).to_dict()
                print(f"{label:<24} {name:<10} seed {seed}: closed {acc.get('closed', float('nan'))}"
                      f" · open {acc.get('open', float('nan'))} · best epoch {result.best_epoch}"
                      f" · {'greedy' if beams == 1 else f'{beams} beams'}"
                      f" · {result.time_s:.0f} s · {result.samples_per_s:.1f} samples/s")
            del model
    return records


def seed_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Per (label, dataset): closed / open / open recall / overall as mean ± std over seeds."""
    rows = []
    for rec in records:
        s = summarize_with_ci(rec.scored, n_resamples=200, seed=rec.seed).iloc[0]
        rows.append({"label": rec.label, "dataset": rec.dataset, "seed": rec.seed,
                     "closed": s["closed_acc"], "open": s["open_acc"],
                     "open_recall": s["open_recall"], "overall": s["overall_acc"]})
    frame = pd.DataFrame(rows)
    agg = frame.groupby(["label", "dataset"], sort=False)[["closed", "open", "open_recall", "overall"]]
    out = agg.mean().round(1).astype(str) + " ± " + agg.std(ddof=1).round(1).fillna(0).astype(str)
    out["seeds"] = frame.groupby(["label", "dataset"], sort=False)["seed"].count()
    return out


def seed_mean_scores(records: Sequence[Any], which: str = "scored") -> pd.DataFrame:
    """One scored table whose ``exact``/``recall`` are each question's mean over the seeds
    (``which``: the records' ``scored`` or ``shuffled`` tables)."""
    if not records:
        raise ValueError("no runs to average")
    frames = [getattr(r, which).set_index("qid") for r in records]
    qids = frames[0].index
    for f in frames[1:]:
        if set(f.index) != set(qids):
            raise ValueError("runs to average cover different test questions")
    out = frames[0].copy()
    for col in ("exact", "recall"):
        if col in out:
            out[col] = sum(f.loc[qids, col].astype(float) for f in frames) / len(frames)
    return out.reset_index()


def image_reliance(records: Sequence[RunRecord], n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy with each question's own image vs with another image (runs made with
    ``image_control``; seeds averaged per question), per dataset and answer type, with the
    paired-bootstrap 95 % interval of the difference. ``uses the image`` when the whole
    interval is above zero."""
    rows = []
    for name in dict.fromkeys(r.dataset for r in records):
        runs = [r for r in records if r.dataset == name]
        if any(r.shuffled is None for r in runs):
            raise ValueError(f"runs on {name} were made without image_control=True")
        own, other = seed_mean_scores(runs), seed_mean_scores(runs, "shuffled")
        for answer_type in ("closed", "open"):
            if not (own["answer_type"] == answer_type).any():
                continue
            r = paired_bootstrap(own, other, n_resamples=n_resamples, seed=seed, answer_type=answer_type)
            mask = own["answer_type"] == answer_type
            rows.append({"dataset": name, "questions": answer_type, "n": r["n"],
                         "own image (%)": round(100 * own.loc[mask, "exact"].mean(), 1),
                         "another image (%)": round(100 * other.loc[other["answer_type"] == answer_type,
                                                                   "exact"].mean(), 1),
                         "difference (pp)": round(r["delta"], 1),
                         "95% CI": f"[{r['low']:.1f}, {r['high']:.1f}]",
                         "uses the image": bool(r["low"] > 0)})
    return pd.DataFrame(rows).set_index(["dataset", "questions"])


def compare_to_prior(model_scored: Mapping[str, pd.DataFrame], prior_scored: Mapping[str, pd.DataFrame],
                     n_resamples: int = 1000, seed: int = 0, label: str = "MISS") -> pd.DataFrame:
    """Paired bootstrap of model − prior accuracy per dataset and answer type (percentage
    points, 95 % interval, column ``"<label> − prior (pp)"``); ``supported`` when the whole
    interval is above zero."""
    rows = []
    for name, scored in model_scored.items():
        if name not in prior_scored:
            continue
        for answer_type in ("closed", "open"):
            r = paired_bootstrap(scored, prior_scored[name], n_resamples=n_resamples, seed=seed,
                                 answer_type=answer_type)
            rows.append({"dataset": name, "questions": answer_type, "n": r["n"],
                         f"{label} − prior (pp)": round(r["delta"], 1),
                         "95% CI": f"[{r['low']:.1f}, {r['high']:.1f}]",
                         "supported": bool(r["low"] > 0)})
    return pd.DataFrame(rows).set_index(["dataset", "questions"])
