"""PyTorch datasets and collators over the shared sample schema."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from medvqa_lib.data.schema import CaptionSample, VQASample

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def default_image_transform(image_size: int, train: bool) -> Callable[[Any], torch.Tensor]:
    """RGB ``PIL.Image`` → ``3 x image_size x image_size`` tensor normalised to mean/std 0.5.

    With ``train=True`` a light augmentation is added: a random resized crop covering 85–100 %
    of the image with near-square aspect ratio. There is deliberately no horizontal flip:
    flipping a radiograph swaps the patient's left and right, which changes the correct
    answer to position questions ("which side is the effusion on?").
    """
    from torchvision import transforms as T

    if train:
        geometry = T.RandomResizedCrop(image_size, scale=(0.85, 1.0), ratio=(0.95, 1.05),
                                       antialias=True)
    else:
        geometry = T.Resize((image_size, image_size), antialias=True)
    return T.Compose([geometry, T.ToTensor(), T.Normalize(MEAN, STD)])


def _image(sample: Any, transform: Callable[[Any], Any] | None) -> Any:
    image = sample.load_image()
    return transform(image) if transform is not None else image


class VQADataset(Dataset):
    """A list of :class:`VQASample` as a map-style dataset of dicts.

    Items have ``image`` (the transform's output, or the RGB ``PIL.Image`` when ``transform``
    is None), ``question``, ``answer``, ``qid``, ``answer_type`` and ``question_type``.
    """

    def __init__(self, samples: Sequence[VQASample],
                 transform: Callable[[Any], Any] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        return {
            "image": _image(s, self.transform),
            "question": s.question,
            "answer": s.answer,
            "qid": s.qid,
            "image_id": s.image_id,
            "answer_type": s.answer_type,
            "question_type": s.question_type,
        }


class CaptionDataset(Dataset):
    """A list of :class:`CaptionSample` as a dataset of ``{image, caption, image_id}`` dicts."""

    def __init__(self, samples: Sequence[CaptionSample],
                 transform: Callable[[Any], Any] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        return {"image": _image(s, self.transform), "caption": s.caption, "image_id": s.image_id}


def stack_images(images: Sequence[Any]) -> Any:
    """A batch tensor if every image is a tensor, else the list unchanged (PIL images)."""
    if images and all(isinstance(im, torch.Tensor) for im in images):
        return torch.stack(list(images))
    return list(images)


def _tokenize(tokenizer: Any, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_len,
                     return_tensors="pt")


def group_by_image(samples: Sequence[Any], group_size: int, seed: int = 0) -> list[list[Any]]:
    """Split the questions of each image into groups of at most ``group_size`` (in a seeded
    random order), so that a batch of groups holds several questions per image. Items with an
    ``image_id`` attribute or key are grouped by it."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    by_image: dict[Any, list[Any]] = {}
    for s in samples:
        key = s["image_id"] if isinstance(s, dict) else s.image_id
        by_image.setdefault(key, []).append(s)
    rng = random.Random(seed)
    groups = []
    for key in sorted(by_image, key=str):
        members = by_image[key]
        rng.shuffle(members)
        groups += [members[i:i + group_size] for i in range(0, len(members), group_size)]
    return groups


class VQACollator:
    """Batches :class:`VQADataset` items for a model with a Hugging Face tokenizer.

    Returns ``images`` (stacked tensor), ``question_ids``/``question_mask`` and
    ``answer_ids``/``answer_mask`` (padded to the longest in the batch, truncated to
    ``max_question_len``/``max_answer_len`` tokens), ``closed`` (bool tensor) and the lists
    ``qids``, ``questions``, ``answers``, ``answer_types``, ``question_types``.
    ``answer_prefix`` (e.g. ``"answer: "``) is put before each answer before tokenising.

    ``dedupe_images=True`` stacks each distinct image (by ``image_id``) once: ``images`` is then
    (U, ...) and ``image_index`` (B,) gives each question's row, so a model can encode every
    image once per batch. Items may also be lists of items (a group of questions, e.g. about
    one image; see :func:`group_by_image`); they are flattened.
    """

    def __init__(self, tokenizer: Any, max_question_len: int = 32, max_answer_len: int = 10,
                 answer_prefix: str | None = None, dedupe_images: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_question_len = max_question_len
        self.max_answer_len = max_answer_len
        self.answer_prefix = answer_prefix or ""
        self.dedupe_images = dedupe_images

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if items and isinstance(items[0], list):
            items = [it for group in items for it in group]
        questions = [it["question"] for it in items]
        answers = [it["answer"] for it in items]
        q = _tokenize(self.tokenizer, questions, self.max_question_len)
        a = _tokenize(self.tokenizer, [self.answer_prefix + x for x in answers],
                      self.max_answer_len)
        extra: dict[str, Any] = {}
        images = [it["image"] for it in items]
        if self.dedupe_images:
            if any("image_id" not in it for it in items):
                raise ValueError("dedupe_images=True needs an 'image_id' in every item")
            rows: dict[Any, int] = {}
            index = [rows.setdefault(it["image_id"], len(rows)) for it in items]
            first = {row: i for i, row in reversed(list(enumerate(index)))}
            images = [items[first[row]]["image"] for row in range(len(rows))]
            extra["image_index"] = torch.tensor(index)
        return {
            **extra,
            "images": stack_images(images),
            "question_ids": q["input_ids"],
            "question_mask": q["attention_mask"],
            "answer_ids": a["input_ids"],
            "answer_mask": a["attention_mask"],
            "closed": torch.tensor([it["answer_type"] == "closed" for it in items]),
            "qids": [it["qid"] for it in items],
            "questions": questions,
            "answers": answers,
            "answer_types": [it["answer_type"] for it in items],
            "question_types": [it["question_type"] for it in items],
        }


class CaptionCollator:
    """Batches :class:`CaptionDataset` items: ``images``, ``caption_ids``, ``caption_mask``,
    ``captions`` and ``image_ids``."""

    def __init__(self, tokenizer: Any, max_caption_len: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_caption_len = max_caption_len

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        captions = [it["caption"] for it in items]
        c = _tokenize(self.tokenizer, captions, self.max_caption_len)
        return {
            "images": stack_images([it["image"] for it in items]),
            "caption_ids": c["input_ids"],
            "caption_mask": c["attention_mask"],
            "captions": captions,
            "image_ids": [it["image_id"] for it in items],
        }
