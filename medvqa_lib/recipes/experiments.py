"""Seeds × datasets loops shared by the chapters: fine-tune, answer the test set, score."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medvqa_lib.data.schema import VQASample
from medvqa_lib.evaluation import score_predictions, summarize_with_ci
from medvqa_lib.recipes.generative_vqa import ImageCache, StageSettings, finetune_vqa, predict
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


def slug(label: str) -> str:
    """A run label as one folder name (``"w/o JTM (50%)"`` → ``"wo_JTM_50pc"``)."""
    text = label.replace("%", "pc").replace("/", "").replace("+", "plus")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's weights (to restart each seed from)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def finetune_and_test(label: str, make_model: Callable[[], torch.nn.Module],
                      datasets: Mapping[str, Mapping[str, Sequence[VQASample]]], seeds: Sequence[int],
                      tokenizer: Any, settings: StageSettings, out_dir: str | Path,
                      cache: ImageCache, test_filter: Callable[[VQASample], bool] | None = None,
                      verbose: bool = True) -> list[RunRecord]:
    """For each dataset and seed: fresh model → fine-tune (best epoch on val) → answer test.

    ``make_model()`` must return a new model each call (e.g. from pre-trained weights).
    """
    records = []
    for name, splits in datasets.items():
        for seed in seeds:
            seed_everything(seed)
            model = make_model()
            stage = replace(settings, seed=seed, out_dir=Path(out_dir) / slug(label) / name / f"seed{seed}")
            result = finetune_vqa(model, splits["train"], splits["val"], tokenizer, cache, stage)
            test = [s for s in splits["test"] if test_filter is None or test_filter(s)]
            preds = predict(model, test, tokenizer, cache, num_beams=settings.num_beams,
                            max_new_tokens=settings.max_new_tokens,
                            max_question_len=settings.max_text_len)
            scored = score_predictions(test, preds)
            records.append(RunRecord(label, name, seed, scored, result, preds))
            if verbose:
                acc = scored.groupby("answer_type")["exact"].mean().mul(100).round(1).to_dict()
                print(f"{label:<24} {name:<10} seed {seed}: closed {acc.get('closed', float('nan'))}"
                      f" · open {acc.get('open', float('nan'))} · best epoch {result.best_epoch}"
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
