"""The PaliGemma chapter's experiments: training stages, evaluation, the chapter's tables.

* **Stand-in base** (tiny model only): the offline PaliGemma is random, so it is first trained
  in full on image captions (``"caption en"``), a small stand-in for PaliGemma's own
  multimodal pre-training (:func:`pretrain_base`). The Hub model skips this.
* **Stage 1**: LoRA on SLAKE (or the synthetic stand-in); the adapters are saved as an
  atomic safetensors checkpoint. **Stage 2**: every datamix run starts from that file
  (Table 2) or from fresh adapters (Table 1). Annealing is a final stage of the same run on
  the mix plus a small high-quality set. Each stage keeps the epoch of lowest
  :func:`validation_loss` (:func:`train_stage`).
* **Evaluation**: ROUGE/BLEU (``medvqa_lib.evaluation.text_metrics``), exact-match accuracy
  by answer type, and the paper's consistency rule over 5 sampled generations.

The model and adapters are in :mod:`~medvqa_lib.papers.paligemma.model`, the data in
:mod:`~medvqa_lib.papers.paligemma.data`, the objective and Eq. 1 in
:mod:`~medvqa_lib.papers.paligemma.losses`, the saliency in
:mod:`~medvqa_lib.papers.paligemma.saliency`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvqa_lib.data.schema import VQASample
from medvqa_lib.evaluation import (
    ensure_splits,
    normalize_answer,
    rouge_scores,
    score_predictions,
    sentence_bleu_scores,
)
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.papers.paligemma.config import PaliGemmaStudy
from medvqa_lib.papers.paligemma.data import ItemDataset, VQACollator
from medvqa_lib.papers.paligemma.losses import answer_token_nll
from medvqa_lib.papers.paligemma.model import PaliGemmaVQA
from medvqa_lib.training import TrainConfig, Trainer, TrainResult

__all__ = ["pretrain_base", "validation_loss", "train_stage", "predict", "consistency_docked", "evaluate",
           "METRICS", "table_row", "adapter_control"]


# ----------------------------------------------------------------------------- training


def _train_config(study: PaliGemmaStudy, epochs: int, lr: float, out_dir: Path, seed: int,
                  select: str) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=study.batch_size, lr=lr,
                       weight_decay=study.weight_decay, schedule=study.schedule,
                       grad_accum_steps=study.grad_accum, precision=study.precision, seed=seed,
                       out_dir=str(out_dir), select_metric=select, save_last=False, log_every=5)


def pretrain_base(vqa: PaliGemmaVQA, captions: Sequence[Any], study: PaliGemmaStudy, cache: ImageCache,
                  out_dir: Path, seed: int = 0) -> TrainResult | None:
    """Full-parameter captioning of the tiny random model (the stand-in for PaliGemma's own
    pre-training); nothing for a Hub model or ``base_epochs == 0``."""
    if not study.spec.is_tiny or study.base_epochs == 0:
        return None
    config = _train_config(study, study.base_epochs, study.base_lr, out_dir, seed, "train_loss")
    trainer = Trainer(vqa, config, ItemDataset(captions, cache), collate_fn=VQACollator(vqa.processor))
    return trainer.fit()


def _val_loss_fn(vqa: PaliGemmaVQA, val: Sequence[VQASample], cache: ImageCache, study: PaliGemmaStudy
                 ) -> Callable[[torch.nn.Module], dict[str, float]]:
    ensure_splits(val, {"val"}, "model selection")
    subset = list(val)[: study.val_limit]
    collate = VQACollator(vqa.processor)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return validation_loss(model, subset, cache, collate, study.batch_size)

    evaluate.split = "val"  # type: ignore[attr-defined]
    return evaluate


@torch.no_grad()
def validation_loss(model: torch.nn.Module, samples: Sequence[VQASample], cache: ImageCache,
                    collate: VQACollator, batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced answer-only loss per answer token (one pass over ``samples``), overall and
    for closed / open questions: ``val_loss``, ``val_loss_closed``, ``val_loss_open``."""
    from medvqa_lib.training import move_to_device

    device = next(model.parameters()).device
    data = ItemDataset(samples, cache)
    sums = {"all": [0.0, 0], "closed": [0.0, 0], "open": [0.0, 0]}
    for i in range(0, len(data), batch_size):
        batch = move_to_device(collate([data[j] for j in range(i, min(i + batch_size, len(data)))]), device)
        labels = batch.pop("labels")
        keep = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
        logits = model.model(**{k: v for k, v in batch.items() if k in keep}).logits
        per_row, counts = answer_token_nll(logits, labels)
        for k, s in enumerate(samples[i:i + batch_size]):
            for key in ("all", s.answer_type):
                sums[key][0] += float(per_row[k])
                sums[key][1] += int(counts[k])
    return {("val_loss" if k == "all" else f"val_loss_{k}"): (v[0] / v[1] if v[1] else float("nan"))
            for k, v in sums.items()}


def train_stage(vqa: PaliGemmaVQA, train: Sequence[VQASample], val: Sequence[VQASample],
                study: PaliGemmaStudy, cache: ImageCache, epochs: int, out_dir: Path, seed: int
                ) -> TrainResult:
    """LoRA training on ``train`` for ``epochs``; the epoch with the lowest validation answer
    loss is kept (``history`` has val_loss / val_loss_closed / val_loss_open per epoch)."""
    ensure_splits(train, {"train"}, "training")
    config = _train_config(study, epochs, study.lr, out_dir, seed, "val_loss")
    trainer = Trainer(vqa, config, ItemDataset(train, cache), collate_fn=VQACollator(vqa.processor),
                      evaluate_fn=_val_loss_fn(vqa, val, cache, study))
    result = trainer.fit()
    trainer.load_best()
    return result


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(vqa: PaliGemmaVQA, samples: Sequence[VQASample], cache: ImageCache, *, batch_size: int = 32,
            max_new_tokens: int = 10, do_sample: bool = False, temperature: float = 1.0,
            seed: int = 0) -> dict[str, str]:
    """Generated answers keyed by question id (greedy, or sampled with ``seed``)."""
    torch.manual_seed(seed)
    out: dict[str, str] = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        answers = vqa.answer([cache.pil(s) for s in chunk], [s.question for s in chunk],
                             max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)
        out.update({s.qid: a for s, a in zip(chunk, answers, strict=True)})
    return out


def consistency_docked(reference: Sequence[str], sampled: Sequence[Sequence[str]],
                       min_differ: int = 3) -> list[bool]:
    """The paper's consistency rule, per question: docked when at least ``min_differ`` of the
    sampled answers differ (after normalisation) from the answer being scored."""
    if len(reference) != len(sampled):
        raise ValueError("one set of sampled answers per question is needed")
    return [sum(normalize_answer(a) != normalize_answer(ref) for a in runs) >= min_differ
            for ref, runs in zip(reference, sampled, strict=True)]


def evaluate(vqa: PaliGemmaVQA, test: Sequence[VQASample], cache: ImageCache, study: PaliGemmaStudy,
             seed: int = 0) -> pd.DataFrame:
    """Per test question: exact match (greedy answer), ROUGE-1/2/L, BLEU, and the consistency
    rule over ``study.consistency_runs`` sampled generations."""
    preds = predict(vqa, test, cache, max_new_tokens=study.max_new_tokens, batch_size=study.batch_size)
    scored = score_predictions(test, preds)
    answers = [str(s.answer) for s in test]
    greedy = [preds[s.qid] for s in test]
    rouge = rouge_scores(greedy, answers)
    runs = [predict(vqa, test, cache, max_new_tokens=study.max_new_tokens, do_sample=True,
                    temperature=study.sample_temperature, seed=seed * 1000 + r, batch_size=study.batch_size)
            for r in range(study.consistency_runs)]
    docked = consistency_docked(greedy, [[r[s.qid] for r in runs] for s in test])
    frame = pd.DataFrame({"qid": [s.qid for s in test]})
    frame = frame.merge(scored, on="qid")
    frame["rouge1"], frame["rouge2"], frame["rougeL"] = (rouge[k].to_numpy() for k in ("rouge1", "rouge2", "rougeL"))
    frame["bleu"] = sentence_bleu_scores(greedy, answers)
    frame["docked"] = docked
    frame["consistent_exact"] = frame["exact"].astype(bool) & ~frame["docked"]
    return frame


METRICS = ("rouge1", "rouge2", "rougeL", "bleu")


def table_row(frames: Sequence[pd.DataFrame]) -> dict[str, str]:
    """One column of Tables 1–2 from the runs (seeds) of one setting: ROUGE/BLEU as mean ± std
    over test questions (the paper's ±), accuracies as mean ± std over seeds, in percent."""
    allq = pd.concat(frames)
    row = {k: f"{allq[k].mean():.1f} ± {allq[k].std(ddof=0):.1f}" for k in METRICS}
    for name, col, kind in (("closed acc", "exact", "closed"), ("open acc", "exact", "open"),
                            ("accuracy", "exact", None), ("consistent acc", "consistent_exact", None)):
        vals = [100 * f[col if kind is None else col][f["answer_type"] == kind if kind else slice(None)].mean()
                for f in frames]
        vals = [v for v in vals if v == v]
        row[name] = f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if vals else "–"
    n = len(frames[0])
    row["docked"] = f"{np.mean([f['docked'].sum() for f in frames]):.0f}/{n}"
    return row


# ----------------------------------------------------------------------------- the adapter control


def adapter_control(full: pd.DataFrame, lora: pd.DataFrame, prior: pd.DataFrame, n_resamples: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Full fine-tuning vs LoRA vs the question-only prior on the same test questions, per
    answer type: accuracies (%) and paired-bootstrap 95 % intervals of full − prior and
    full − LoRA (``lora``: per-question accuracy, e.g. a mean over seeds)."""
    from medvqa_lib.evaluation import paired_bootstrap

    rows = []
    for kind in ("closed", "open"):
        if not (full["answer_type"] == kind).any():
            continue
        acc = {name: round(100 * frame.loc[frame["answer_type"] == kind, "exact"].astype(float).mean(), 1)
               for name, frame in (("full fine-tuning (%)", full), ("LoRA (%)", lora), ("prior (%)", prior))}
        vs_prior = paired_bootstrap(full, prior, n_resamples=n_resamples, seed=seed, answer_type=kind)
        vs_lora = paired_bootstrap(full, lora, n_resamples=n_resamples, seed=seed, answer_type=kind)
        rows.append({"questions": kind, "n": vs_prior["n"], **acc,
                     "full − prior (pp)": round(vs_prior["delta"], 1),
                     "full − prior 95% CI": f"[{vs_prior['low']:.1f}, {vs_prior['high']:.1f}]",
                     "full − LoRA (pp)": round(vs_lora["delta"], 1),
                     "full − LoRA 95% CI": f"[{vs_lora['low']:.1f}, {vs_lora['high']:.1f}]"})
    return pd.DataFrame(rows).set_index("questions")
