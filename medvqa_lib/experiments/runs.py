"""Seeds × datasets loops shared by the chapters: fine-tune, answer the test set, score;
and the shuffled-image control (does a model's answer depend on the image at all?)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medvqa_lib.data.schema import VQASample
from medvqa_lib.evaluation import score_predictions
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


#: ``fit(model, splits, stage) -> TrainResult``: fine-tune ``model`` on ``splits["train"]``,
#: selecting on ``splits["val"]``, with ``stage``'s settings (its seed and run folder)
Fit = Callable[[torch.nn.Module, Mapping[str, Sequence[VQASample]], StageSettings], TrainResult]
#: ``answer(model, questions) -> {qid: answer}``
Answer = Callable[[torch.nn.Module, Sequence[VQASample]], dict[str, str]]


def _answer(model: torch.nn.Module, test: Sequence[VQASample], tokenizer: Any, cache: ImageCache,
            settings: StageSettings, num_beams: int | None = None) -> dict[str, str]:
    return predict(model, test, tokenizer, cache, num_beams=num_beams or settings.num_beams,
                   max_new_tokens=settings.max_new_tokens, max_question_len=settings.max_text_len)


def finetune_and_test(label: str, make_model: Callable[[], torch.nn.Module],
                      datasets: Mapping[str, Mapping[str, Sequence[VQASample]]], seeds: Sequence[int],
                      tokenizer: Any, settings: StageSettings, out_dir: str | Path,
                      cache: ImageCache, test_filter: Callable[[VQASample], bool] | None = None,
                      verbose: bool = True, image_control: bool = False, *, fit: Fit | None = None,
                      answer: Answer | None = None,
                      finish: Callable[[RunRecord, torch.nn.Module], RunRecord] | None = None) -> list[RunRecord]:
    """For each dataset and seed: fresh model → fine-tune (best epoch on val) → answer test.

    ``make_model()`` must return a new model each call (e.g. from pre-trained weights); it is
    called right after the seed is set. ``image_control``: also answer the test questions about
    shuffled images (:func:`shuffled_images`, kept in ``RunRecord.shuffled``).

    The defaults fine-tune and answer a generative model (:func:`finetune_vqa`, :func:`predict`);
    with beam search in ``settings`` the decoding (beam or greedy) is chosen per run on
    validation (:func:`choose_decoding`). Another kind of model brings its own ``fit`` (see
    :data:`Fit`) and ``answer`` (:data:`Answer`, used for the test and the image control; no
    decoding is chosen then); ``finish(record, model)`` may return a richer record (a
    :class:`RunRecord` subclass with the paper's own fields).
    """
    records = []
    for name, splits in datasets.items():
        for seed in seeds:
            seed_everything(seed)
            model = make_model()
            stage = replace(settings, seed=seed, out_dir=Path(out_dir) / slug(label) / name / f"seed{seed}")
            if fit is None:
                result = finetune_vqa(model, splits["train"], splits["val"], tokenizer, cache, stage)
            else:
                result = fit(model, splits, stage)
            if answer is None:
                beams, tried = choose_decoding(model, splits["val"], tokenizer, cache, stage, result.best_metric)
                respond: Answer = partial(_answer, tokenizer=tokenizer, cache=cache, settings=settings,
                                          num_beams=beams)
            else:
                beams, tried, respond = None, {}, answer
            test = [s for s in splits["test"] if test_filter is None or test_filter(s)]
            preds = respond(model, test)
            scored = score_predictions(test, preds)
            shuffled = None
            if image_control:
                moved = shuffled_images(test, seed)
                shuffled = score_predictions(moved, respond(model, moved))
            record = RunRecord(label, name, seed, scored, result, preds, shuffled, beams, tried)
            records.append(record if finish is None else finish(record, model))
            if verbose:
                acc = scored.groupby("answer_type")["exact"].mean().mul(100).round(1).to_dict()
                decoding = "" if beams is None else f" · {'greedy' if beams == 1 else f'{beams} beams'}"
                print(f"{label:<24} {name:<10} seed {seed}: closed {acc.get('closed', float('nan'))}"
                      f" · open {acc.get('open', float('nan'))} · best epoch {result.best_epoch}"
                      f"{decoding} · {result.time_s:.0f} s · {result.samples_per_s:.1f} samples/s")
            del model
    return records
