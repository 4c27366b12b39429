"""CMDPI's data plumbing: the fine-tuning dataset (with a similar image per question), the two
collators (fine-tuning; captions and questions together for pre-training) and the loops that
answer questions and read the downstream heads ``h_D``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medvqa_lib.data.dataset import VQACollator, stack_images
from medvqa_lib.evaluation.answers import AnswerVocabulary
from medvqa_lib.experiments.generative import CachedVQADataset
from medvqa_lib.papers.cmdpi.answers import answer_class

if TYPE_CHECKING:
    from medvqa_lib.papers.cmdpi.model import CMDPI
    from medvqa_lib.papers.cmdpi.similar import SimilarImages

__all__ = ["CMDPICollator", "CMDPIPretrainCollator", "CMDPIVQADataset", "answer_heads", "predict_samples"]


class CMDPIVQADataset(CachedVQADataset):
    """VQA samples as dicts for :class:`CMDPICollator`: the
    :class:`~medvqa_lib.experiments.generative.CachedVQADataset` fields plus ``organ``,
    ``answer_label`` (-100 outside ``vocab``) and ``similar_image`` (a similar training image
    drawn from ``similar``, the image itself when there is none or ``similar`` is None).

    The similar image is drawn with the global torch RNG, which the Trainer seeds: runs repeat
    exactly with ``num_workers=0`` (with loader workers the draws depend on the worker seeds).
    ``similar_pool`` adds samples whose images may serve as similar images."""

    def __init__(self, samples: Sequence[Any], cache: Any, vocab: AnswerVocabulary | None = None,
                 similar: SimilarImages | None = None, similar_pool: Sequence[Any] | None = None) -> None:
        super().__init__(samples, cache)
        self.vocab, self.similar = vocab, similar
        self.by_image: dict[str, Any] = {}
        for s in list(similar_pool or []) + self.samples:
            self.by_image.setdefault(s.image_id, s)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        s, image = self.samples[i], item["image"]
        item["organ"] = s.organ
        if self.vocab is not None:
            item["answer_label"] = answer_class(self.vocab, s.answer)
        if self.similar is not None:
            other = self.similar.sample(s.image_id)
            item["similar_image"] = image if other == s.image_id else self.cache.get(self.by_image[other])
        else:
            item["similar_image"] = image
        return item


class CMDPICollator(VQACollator):
    """:class:`~medvqa_lib.data.dataset.VQACollator` plus ``organs``, ``image_ids``,
    ``answer_labels`` and ``similar_images`` when the items have them."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if items and isinstance(items[0], list):  # groups of items
            items = [it for group in items for it in group]
        batch = super().__call__(items)
        for key, plural in (("organ", "organs"), ("image_id", "image_ids")):
            if all(key in it for it in items):
                batch[plural] = [it[key] for it in items]
        if all("answer_label" in it for it in items):
            batch["answer_labels"] = torch.tensor([it["answer_label"] for it in items], dtype=torch.long)
        if all("similar_image" in it for it in items):
            batch["similar_images"] = stack_images([it["similar_image"] for it in items])
        return batch


class CMDPIPretrainCollator:
    """Batches caption items (``image``, ``caption``) and VQA items (``image``, ``question``,
    ``answer``) together for :meth:`CMDPI.forward_pretrain`: ``images``, ``text_ids``/
    ``text_mask`` (caption or question), ``answer_labels`` (-100 for captions and answers
    outside ``vocab``) and ``is_caption``."""

    def __init__(self, tokenizer: Any, vocab: AnswerVocabulary | None = None, max_text_len: int = 64) -> None:
        self.tokenizer, self.vocab, self.max_text_len = tokenizer, vocab, max_text_len

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        is_caption = ["caption" in it for it in items]
        texts = [it["caption"] if cap else it["question"] for it, cap in zip(items, is_caption, strict=True)]
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        labels = [answer_class(self.vocab, it["answer"]) if not cap and self.vocab is not None else -100
                  for it, cap in zip(items, is_caption, strict=True)]
        return {"images": stack_images([it["image"] for it in items]), "text_ids": tok["input_ids"],
                "text_mask": tok["attention_mask"], "answer_labels": torch.tensor(labels, dtype=torch.long),
                "is_caption": torch.tensor(is_caption)}


def _vqa_batches(samples: Sequence[Any], tokenizer: Any, cache: Any, batch_size: int,
                 max_question_len: int) -> Iterator[dict[str, Any]]:
    """``samples`` in order, as :class:`~medvqa_lib.data.dataset.VQACollator` batches."""
    collate, items = VQACollator(tokenizer, max_question_len), CachedVQADataset(samples, cache)
    for start in range(0, len(items), batch_size):
        yield collate([items[i] for i in range(start, min(start + batch_size, len(items)))])


@torch.no_grad()
def predict_samples(model: CMDPI, samples: Sequence[Any], tokenizer: Any, cache: Any,
                    batch_size: int = 32, max_question_len: int = 32) -> dict[str, str]:
    """``{qid: predicted answer}`` for ``samples`` (answers from the training answer set)."""
    dev = next(model.parameters()).device
    out: dict[str, str] = {}
    for batch in _vqa_batches(samples, tokenizer, cache, batch_size, max_question_len):
        answers = model.predict_answers({k: batch[k].to(dev) for k in ("images", "question_ids", "question_mask")})
        out.update(zip(batch["qids"], answers, strict=True))
    return out


@torch.no_grad()
def answer_heads(model: CMDPI, samples: Sequence[Any], tokenizer: Any, cache: Any,
                 batch_size: int = 64, max_question_len: int = 32) -> np.ndarray:
    """The downstream heads ``h_D = H_o[:, -1]`` (Eq. 11) on undeviated inputs, (n, d)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for b in _vqa_batches(samples, tokenizer, cache, batch_size, max_question_len):
            mask = b["question_mask"].to(dev)
            h_o = model.difference_reconstruct(b["images"].to(dev), b["question_ids"].to(dev), mask)
            out.append(model.downstream_heads(h_o, mask).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.dim), dtype=np.float32)
