"""Rank mode: the public code's evaluation, an extra beside M2I2's generated answers.

The authors' code scores a list of candidate answers by the answer decoder's log-likelihood
(after keeping the ``k`` candidates with the likeliest first token) and returns the best.
:func:`score_answers` computes those log-likelihoods, :func:`rank_answers` /
:func:`predict_ranked` pick the best, :func:`candidate_lists` builds the list from the training
split only (and, only for measuring the leak of pitfall 1, the same list plus the test answers),
:func:`rank_mode` and :func:`rank_mode_table` run and tabulate it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from medvqa_lib.data.dataset import VQACollator
from medvqa_lib.data.schema import VQASample
from medvqa_lib.evaluation import (
    AnswerVocabulary,
    ensure_splits,
    normalize_answer,
    paired_bootstrap,
    score_predictions,
    summarize,
)
from medvqa_lib.experiments.generative import CachedVQADataset
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.nn import with_start
from medvqa_lib.papers.m2i2.model import M2I2
from medvqa_lib.training import autocast_context

__all__ = ["candidate_answers", "candidate_lists", "predict_ranked", "rank_answers", "rank_mode", "rank_mode_table",
           "score_answers", "with_test_answers"]


@torch.no_grad()
def score_answers(model: M2I2, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                  candidate_ids: Tensor, candidate_mask: Tensor, k: int | None = None,
                  chunk_tokens: int = 2048, image_index: Tensor | None = None) -> Tensor:
    """Log-likelihood (B, C) of each candidate answer (tokenised ``[CLS] a [SEP]``) given
    each question: the sum of the decoder's log-probabilities of the answer tokens and
    [SEP]. With ``k`` only each question's ``k`` candidates with the most likely first token
    are scored in full (the public code's pre-selection), the others get ``-inf``.
    ``chunk_tokens`` bounds the answer tokens whose vocabulary logits exist at once;
    ``image_index``: see :meth:`M2I2.encode_question`."""
    q, q_mask = model.encode_question(images, question_ids, question_mask, image_index)
    b, n_cand, dev = q.shape[0], candidate_ids.shape[0], q.device
    candidate_ids, candidate_mask = with_start(candidate_ids, candidate_mask, model.ids.dec, model.ids.cls)
    kv: dict = {}
    if k is None or k >= n_cand:
        q_idx = torch.arange(b, device=dev).repeat_interleave(n_cand)
        c_idx = torch.arange(n_cand, device=dev).repeat(b)
    else:
        start = torch.full((b, 1), model.ids.dec, dtype=torch.long, device=dev)
        first = F.log_softmax(model._next_logits(start, q, q_mask, kv), -1)[:, candidate_ids[:, 1]]
        c_idx = first.topk(k, dim=1).indices.flatten()
        q_idx = torch.arange(b, device=dev).repeat_interleave(k)
    scores = torch.full((b, n_cand), float("-inf"), device=dev)
    length = candidate_ids.shape[1]
    step = max(1, chunk_tokens // max(length - 1, 1))
    for s in range(0, q_idx.shape[0], step):
        qi, ci = q_idx[s:s + step], c_idx[s:s + step]
        out = model.text_decoder(candidate_ids, candidate_mask, q, q_mask.index_select(0, qi),
                                 rows=ci, enc_index=qi, kv_cache=kv)
        targets, valid = candidate_ids[ci, 1:], candidate_mask[ci, 1:].bool()
        logp = F.log_softmax(model.lm_head(out[:, :-1][valid]).float(), -1)
        tok = logp.gather(1, targets[valid][:, None]).squeeze(1)
        row = torch.arange(ci.shape[0], device=dev)[:, None].expand_as(valid)[valid]
        scores[qi, ci] = torch.zeros(ci.shape[0], device=dev).index_add_(0, row, tok)
    return scores


def candidate_answers(samples: Iterable[Any], splits: Iterable[str] = ("train",),
                      min_count: int = 1) -> list[str]:
    """The candidate list of rank mode: normalised answers of ``samples``, most frequent first.

    Built with :meth:`~medvqa_lib.evaluation.AnswerVocabulary.from_samples`, so it raises if
    ``splits`` names ``"test"`` (:class:`~medvqa_lib.errors.ConfigError`) or if any sample is
    from a split outside ``splits`` (:class:`~medvqa_lib.errors.DataError`). The default is the
    training split only; pass ``splits=("train", "val")`` for train+validation.
    """
    return list(AnswerVocabulary.from_samples(list(samples), min_count, splits=splits).answers)


def with_test_answers(candidates: Sequence[str], test_samples: Iterable[Any]) -> list[str]:
    """``candidates`` plus the normalised answers of ``test_samples`` that are not yet in it.

    Only for *measuring* the leak of pitfall 1 (a rank-mode list that contains test answers);
    never use such a list for a reported score.
    """
    out, seen = list(candidates), set(candidates)
    for s in test_samples:
        a = normalize_answer(s.answer)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


@torch.no_grad()
def rank_answers(model: M2I2, batch: Mapping[str, Any], candidate_answers: Sequence[str],
                 tokenizer: Any, *, k: int | None = None, return_scores: bool = False
                 ) -> list[str] | tuple[list[str], Tensor]:
    """Rank mode: the candidate with the highest answer log-likelihood for each question of
    ``batch`` (``images``, ``question_ids``, ``question_mask``, optional ``image_index``); ties
    go to the earlier candidate. ``k``: see :func:`score_answers`. With ``return_scores`` also the (B, C)
    log-likelihoods."""
    if not candidate_answers:
        raise ValueError("rank mode needs a non-empty candidate list")
    dev = next(model.parameters()).device
    cand = tokenizer(list(candidate_answers), padding="longest", return_tensors="pt")
    index = batch.get("image_index")
    was_training = model.training
    model.eval()
    try:
        scores = score_answers(model, batch["images"].to(dev), batch["question_ids"].to(dev),
                               batch["question_mask"].to(dev), cand["input_ids"].to(dev),
                               cand["attention_mask"].to(dev), k=k,
                               image_index=None if index is None else index.to(dev))
    finally:
        model.train(was_training)
    best = [candidate_answers[i] for i in scores.argmax(1).tolist()]
    return (best, scores) if return_scores else best


@torch.no_grad()
def predict_ranked(model: M2I2, samples: Sequence[Any], candidates: Sequence[str], tokenizer: Any,
                   cache: Any, *, batch_size: int = 32, max_question_len: int = 32,
                   k: int | None = None) -> dict[str, str]:
    """Rank-mode answers keyed by question id (the counterpart of
    :func:`medvqa_lib.experiments.generative.predict`)."""
    collate = VQACollator(tokenizer, max_question_len=max_question_len)
    dataset = CachedVQADataset(samples, cache)
    answers: dict[str, str] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        best = rank_answers(model, batch, candidates, tokenizer, k=k)
        answers.update(zip(batch["qids"], best, strict=True))
    return answers


# ----------------------------------------------------------------------------- the chapter's rank-mode runs


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
