"""Pre-train, fine-tune and answer with a generative VQA model (MISS, M2I2).

A model here is any ``nn.Module`` that

* takes a batch dict in ``model(batch)`` and returns ``{"loss": ..., "loss_*": ...}``
  (VQA batches have ``answer_ids``; caption batches have ``caption_ids``), and
* has ``generate(images, question_ids, question_mask, max_new_tokens, num_beams)``
  returning answer token ids.

Images are decoded and resized once per distinct image (:class:`ImageCache`), which makes
CPU epochs over VQA-RAD (314 images) and SLAKE (642) cheap. Answers are free text: there is no
answer list anywhere in this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from medvqa_lib.data.dataset import CaptionCollator, VQACollator, group_by_image
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.evaluation import ensure_splits, score_predictions, summarize
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.training import TrainConfig, Trainer, TrainResult, autocast_context


class CachedVQADataset(Dataset):
    """VQA samples as the dicts :class:`~medvqa_lib.data.dataset.VQACollator` expects."""

    def __init__(self, samples: Sequence[VQASample], cache: ImageCache) -> None:
        self.samples, self.cache = list(samples), cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"image": self.cache.get(s), "question": s.question, "answer": s.answer,
                "qid": s.qid, "image_id": s.image_id, "answer_type": s.answer_type,
                "question_type": s.question_type}


class GroupedVQADataset(Dataset):
    """Groups of up to ``group_size`` questions about one image (one item = one group),
    regrouped for every epoch by :meth:`set_epoch`."""

    def __init__(self, samples: Sequence[VQASample], cache: ImageCache, group_size: int,
                 seed: int = 0) -> None:
        self.items = CachedVQADataset(samples, cache)
        self.group_size, self.seed = group_size, seed
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            index = [{"i": i, "image_id": s.image_id} for i, s in enumerate(self.items.samples)]
            self.groups = [[m["i"] for m in g]
                           for g in group_by_image(index, self.group_size, self.seed * 100_003 + epoch)]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.items[j] for j in self.groups[i]]


class CachedCaptionDataset(Dataset):
    """Caption samples as the dicts :class:`~medvqa_lib.data.dataset.CaptionCollator` expects.

    ``captions`` is a sequence of :class:`CaptionSample`; if it has ``set_epoch`` (TransCap's
    re-sampled captions) each epoch sees new wording.
    """

    def __init__(self, captions: Any, cache: ImageCache) -> None:
        self.captions, self.cache, self.epoch = captions, cache, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch and hasattr(self.captions, "set_epoch"):
            self.captions.set_epoch(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.captions[i]
        return {"image": self.cache.get(s), "caption": s.caption, "image_id": s.image_id}


@dataclass
class StageSettings:
    """One training stage (pre-training or fine-tuning).

    ``group_size > 1`` (fine-tuning, models with ``supports_image_index``): batches are made of
    groups of up to ``group_size`` questions about the same image (:func:`group_by_image`,
    regrouped every epoch), and each image is encoded once per batch. ``batch_size`` still
    counts questions.
    """

    epochs: int
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    max_text_len: int = 32
    max_answer_len: int = 10
    num_beams: int = 3
    #: with ``num_beams > 1``: answer the test with beam search only if it beats greedy
    #: decoding on the validation questions (see :func:`choose_decoding`)
    select_decoding: bool = True
    max_new_tokens: int = 10
    eval_limit: int | None = 256
    group_size: int = 1
    precision: str = "auto"
    seed: int = 0
    out_dir: str | Path = "runs/stage"
    progress: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def train_config(self, select_metric: str) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                           schedule=self.schedule, precision=self.precision, seed=self.seed,
                           out_dir=str(self.out_dir), select_metric=select_metric,
                           progress=self.progress, log_every=20)


def decode_answers(tokenizer: Any, token_ids: list[list[int]]) -> list[str]:
    """Generated ids → answer strings (special tokens dropped, WordPiece joined)."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]


@torch.no_grad()
def predict(model: torch.nn.Module, samples: Sequence[VQASample], tokenizer: Any,
            cache: ImageCache, *, batch_size: int = 32, num_beams: int = 3,
            max_new_tokens: int = 10, max_question_len: int = 32,
            precision: str = "auto") -> dict[str, str]:
    """Generated answers keyed by question id (free text; no answer list).

    Questions are batched in image order, so a model with ``supports_image_index`` encodes
    each image once per batch; answers do not depend on the batching.
    """
    device = next(model.parameters()).device
    dedupe = bool(getattr(model, "supports_image_index", False))
    collate = VQACollator(tokenizer, max_question_len=max_question_len, dedupe_images=dedupe)
    order = sorted(samples, key=lambda s: str(s.image_id)) if dedupe else list(samples)
    dataset = CachedVQADataset(order, cache)
    answers: dict[str, str] = {}
    model.eval()
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        extra = {"image_index": batch["image_index"].to(device)} if dedupe else {}
        with autocast_context(device, precision):
            ids = model.generate(batch["images"].to(device), batch["question_ids"].to(device),
                                 batch["question_mask"].to(device), max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, **extra)
        answers.update(zip(batch["qids"], decode_answers(tokenizer, ids), strict=True))
    return answers


def validation_fn(model: torch.nn.Module, val: Sequence[VQASample], tokenizer: Any,
                  cache: ImageCache, settings: StageSettings, *,
                  answer: Callable[[torch.nn.Module, Sequence[VQASample]], dict[str, str]] | None = None
                  ) -> Callable[[torch.nn.Module], dict]:
    """An ``evaluate_fn`` for the training loop: accuracy on validation questions.

    ``answer(model, questions) -> {qid: answer}`` answers them; the default is greedy
    generation (:func:`predict`), a classifier passes its own. It refuses test questions (model
    selection on validation data only) and carries ``split = "val"`` so the loop can check it.
    """
    ensure_splits(val, {"val"}, "model selection")
    subset = list(val)[: settings.eval_limit] if settings.eval_limit else list(val)

    def greedy(m: torch.nn.Module, questions: Sequence[VQASample]) -> dict[str, str]:
        return predict(m, questions, tokenizer, cache, num_beams=1, precision=settings.precision,
                       max_new_tokens=settings.max_new_tokens, max_question_len=settings.max_text_len)

    respond = answer or greedy

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        row = summarize(score_predictions(subset, respond(m, subset))).iloc[0]
        return {"val_acc": float(row["overall_acc"]), "val_closed": float(row["closed_acc"]),
                "val_open": float(row["open_acc"])}

    evaluate.split = "val"  # type: ignore[attr-defined]
    return evaluate


def choose_decoding(model: torch.nn.Module, val: Sequence[VQASample], tokenizer: Any, cache: ImageCache,
                    settings: StageSettings, greedy_acc: float | None) -> tuple[int, dict[str, float]]:
    """The number of beams to answer the test with, chosen on validation data only.

    ``greedy_acc`` is the validation accuracy (%) of greedy decoding on the selected epoch (what
    :func:`validation_fn` measured); beam search with ``settings.num_beams`` beams is scored on
    the same validation questions and kept only when it is at least as accurate. Returns the
    beams and both accuracies.
    """
    ensure_splits(val, {"val"}, "choosing the decoding")
    subset = list(val)[: settings.eval_limit] if settings.eval_limit else list(val)
    if settings.num_beams <= 1 or not settings.select_decoding or not subset:
        return settings.num_beams, {}
    if greedy_acc is None:
        preds = predict(model, subset, tokenizer, cache, num_beams=1, precision=settings.precision,
                        max_new_tokens=settings.max_new_tokens, max_question_len=settings.max_text_len)
        greedy_acc = float(summarize(score_predictions(subset, preds)).iloc[0]["overall_acc"])
    preds = predict(model, subset, tokenizer, cache, num_beams=settings.num_beams, precision=settings.precision,
                    max_new_tokens=settings.max_new_tokens, max_question_len=settings.max_text_len)
    beam_acc = float(summarize(score_predictions(subset, preds)).iloc[0]["overall_acc"])
    beams = settings.num_beams if beam_acc >= greedy_acc else 1
    return beams, {"val_greedy": greedy_acc, f"val_beam{settings.num_beams}": beam_acc}


def finetune_vqa(model: torch.nn.Module, train: Sequence[VQASample], val: Sequence[VQASample],
                 tokenizer: Any, cache: ImageCache, settings: StageSettings,
                 on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Fine-tune with the LM loss on answers; keep the best epoch by validation accuracy."""
    ensure_splits(train, {"train"}, "training")
    grouped = settings.group_size > 1 and bool(getattr(model, "supports_image_index", False))
    config = settings.train_config("val_acc")
    if grouped:
        dataset: Dataset = GroupedVQADataset(train, cache, settings.group_size, settings.seed)
        config.batch_size = max(1, settings.batch_size // settings.group_size)
    else:
        dataset = CachedVQADataset(train, cache)
    collate = VQACollator(tokenizer, settings.max_text_len, settings.max_answer_len, dedupe_images=grouped)
    trainer = Trainer(model, config, dataset, collate_fn=collate,  # regrouped per epoch
                      evaluate_fn=validation_fn(model, val, tokenizer, cache, settings),
                      on_step=on_step)
    result = trainer.fit()
    trainer.load_best()
    return result


def pretrain(model: torch.nn.Module, captions: Any, tokenizer: Any, cache: ImageCache,
             settings: StageSettings) -> TrainResult:
    """Pre-train on image–caption pairs with the model's own objectives (lowest loss kept).

    There is no validation signal for pre-training here: the last epoch is kept.
    """
    dataset = CachedCaptionDataset(captions, cache)  # the Trainer sets its epoch
    trainer = Trainer(model, settings.train_config("train_loss"), dataset,
                      collate_fn=CaptionCollator(tokenizer, settings.max_text_len), evaluate_fn=None)
    return trainer.fit()


class CaptionMix:
    """Several caption sources as one sequence (e.g. image–caption pairs + TransCap)."""

    def __init__(self, *sources: Any) -> None:
        self.sources = [s for s in sources if len(s)]
        self._offsets = [0]
        for s in self.sources:
            self._offsets.append(self._offsets[-1] + len(s))

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> CaptionSample:
        for k, source in enumerate(self.sources):
            if i < self._offsets[k + 1]:
                return source[i - self._offsets[k]]
        raise IndexError(i)

    def set_epoch(self, epoch: int) -> None:
        for s in self.sources:
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
