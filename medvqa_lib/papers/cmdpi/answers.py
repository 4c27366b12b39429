"""FFN_A's answer set: CMDPI answers by classifying over the training answers (Eq. 4's
``Ans'``), so the answer vocabulary, its ceiling on a test set and the carry-over of answer rows
from pre-training to fine-tuning live here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from medvqa_lib.evaluation.answers import AnswerVocabulary
from medvqa_lib.evaluation.normalize import normalize_answer
from medvqa_lib.nn import LMHead, load_matching_weights

if TYPE_CHECKING:
    from medvqa_lib.papers.cmdpi.model import CMDPI

__all__ = ["answer_class", "answer_coverage", "build_answer_vocab", "load_pretrained_for_finetune",
           "remap_answer_head"]


def build_answer_vocab(train_samples: Sequence[Any], min_count: int = 1) -> AnswerVocabulary:
    """FFN_A's answer set: normalised answers of the *training split only* (refuses others)."""
    return AnswerVocabulary.from_samples(train_samples, min_count, splits=("train",))


def answer_class(vocab: AnswerVocabulary, answer: str) -> int:
    """FFN_A's class of ``answer``; -100 (no answer loss) when it is outside ``vocab``."""
    j = vocab.encode(answer)
    return -100 if j == vocab.unk_index else j


def answer_coverage(vocab: AnswerVocabulary, samples: Sequence[Any]) -> dict[str, float]:
    """Share of ``samples`` (per answer type and overall) whose answer is in ``vocab``: the
    highest accuracy a classifier over the training answers can reach (the rest is wrong)."""
    out = {}
    for kind in ("closed", "open", "overall"):
        rows = [s for s in samples if kind == "overall" or s.answer_type == kind]
        out[kind] = (sum(normalize_answer(s.answer) in vocab.index for s in rows) / len(rows)
                     if rows else float("nan"))
    return out


def _head_rows(head: LMHead, old: AnswerVocabulary | None, new: AnswerVocabulary, dim: int) -> tuple[LMHead, int]:
    fresh = LMHead(dim, len(new)).to(head.decoder.weight.device)
    fresh.dense.load_state_dict(head.dense.state_dict())
    fresh.norm.load_state_dict(head.norm.state_dict())
    copied = 0
    if old is not None:
        with torch.no_grad():
            for answer, j in new.index.items():
                i = old.index.get(answer)
                if i is not None and i < head.decoder.weight.shape[0]:
                    fresh.decoder.weight[j] = head.decoder.weight[i]
                    fresh.decoder.bias[j] = head.decoder.bias[i]
                    copied += 1
    return fresh, copied


def remap_answer_head(model: CMDPI, vocab: AnswerVocabulary) -> int:
    """Give FFN_A the classes of ``vocab``: rows of answers the current vocabulary shares are
    kept, the others start fresh. Returns how many rows were carried over."""
    model.ffn_a, copied = _head_rows(model.ffn_a, model.answer_vocab, vocab, model.config.dim)
    model.answer_vocab = vocab
    model.config = model.config.replace(num_answers=len(vocab))
    return copied


@torch.no_grad()
def load_pretrained_for_finetune(model: CMDPI, state_dict: Mapping[str, Tensor],
                                 pretrained_vocab: AnswerVocabulary | None = None) -> dict[str, Any]:
    """Load pre-trained weights into ``model`` (which holds the fine-tuning answer set): all
    entries of matching shape, and FFN_A's output rows by answer string via
    ``pretrained_vocab``. Returns ``loaded``, ``skipped``, ``missing`` keys and ``answer_rows``."""
    report = load_matching_weights(model, state_dict)
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    rows = 0
    if pretrained_vocab is not None and model.answer_vocab is not None and "ffn_a.decoder.weight" in sd:
        old = LMHead(model.config.dim, sd["ffn_a.decoder.weight"].shape[0])
        old.load_state_dict({k.removeprefix("ffn_a."): v for k, v in sd.items() if k.startswith("ffn_a.")})
        new, rows = _head_rows(old, pretrained_vocab, model.answer_vocab, model.config.dim)
        model.ffn_a.load_state_dict(new.state_dict())
        head = {k for k in sd if k.startswith("ffn_a.")}
        report = {"loaded": sorted({*report["loaded"], *head}), "skipped": sorted(set(report["skipped"]) - head),
                  "missing": sorted(set(report["missing"]) - head)}
    return {**report, "answer_rows": rows}
