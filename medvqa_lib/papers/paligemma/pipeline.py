"""The PaliGemma chapter's experiments: plan, curriculum, datamixes, evaluation, scaling, saliency.

* **Stand-in base** (tiny model only): the offline PaliGemma is random, so it is first trained
  in full on image captions (``"caption en"``), a small stand-in for PaliGemma's own
  multimodal pre-training. The Hub model skips this.
* **Stage 1**: LoRA on SLAKE (or the synthetic stand-in); the adapters are saved as an
  atomic safetensors checkpoint. **Stage 2**: every datamix run starts from that file
  (Table 2) or from fresh adapters (Table 1). Annealing is a final stage of the same run on
  the mix plus a small high-quality set.
* **Evaluation**: ROUGE/BLEU (``medvqa_lib.evaluation.text_metrics``), exact-match accuracy
  by answer type, and the paper's consistency rule over 5 sampled generations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import HubUnavailableError, unknown_name
from medvqa_lib.evaluation import (
    ensure_splits,
    normalize_answer,
    rouge_scores,
    score_predictions,
    sentence_bleu_scores,
)
from medvqa_lib.papers.paligemma.model import (
    CAPTION_PREFIX,
    PaliGemmaSpec,
    PaliGemmaVQA,
    VQACollator,
    apply_lora,
    build_paligemma,
)
from medvqa_lib.training import TrainConfig, Trainer, TrainResult

__all__ = ["PaliGemmaStudy", "study_plan", "DATAMIXES", "load_datamix", "ImageCache", "build_model",
           "pretrain_base", "reset_adapters", "save_adapters", "load_adapters", "train_stage",
           "predict", "consistency_docked", "evaluate", "table_row", "eq1", "fit_scaling_law",
           "saliency_for", "compare_to_prior", "adapter_control"]


@dataclass
class PaliGemmaStudy:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    spec: PaliGemmaSpec
    base_epochs: int
    stage1_epochs: int
    stage2_epochs: int
    anneal_epochs: int
    base_lr: float
    lr: float
    batch_size: int
    grad_accum: int
    schedule: str
    weight_decay: float
    max_train: int | None
    max_eval: int | None
    val_limit: int
    seeds: tuple[int, ...]
    datamixes: tuple[str, ...]
    anneal_size: int
    scaling_fractions: tuple[float, ...]
    #: epochs of each scaling-law run (points = fractions x epochs; Eq. 1 needs >= 5)
    scaling_epochs: int = 3
    consistency_runs: int = 5
    sample_temperature: float = 1.0
    max_new_tokens: int = 10
    precision: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


OFFLINE_MIXES = ("target", "captions-qa", "captions-qa+anneal")
_PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(base_epochs=1, stage1_epochs=1, stage2_epochs=1, anneal_epochs=1, base_lr=2e-3,
                  lr=2e-3, batch_size=16, grad_accum=1, schedule="constant", weight_decay=0.0,
                  max_train=48, max_eval=16, val_limit=16, seeds=(0,), datamixes=OFFLINE_MIXES,
                  anneal_size=8, scaling_fractions=(0.5, 1.0), scaling_epochs=3),
    # ~20 min on 2 cores (see the chapter's closing note for the measured time)
    "cpu": dict(base_epochs=3, stage1_epochs=3, stage2_epochs=4, anneal_epochs=1, base_lr=1e-3,
                lr=1e-3, batch_size=32, grad_accum=1, schedule="constant", weight_decay=0.0,
                max_train=1500, max_eval=300, val_limit=128, seeds=(0, 1), datamixes=OFFLINE_MIXES,
                anneal_size=100, scaling_fractions=(0.25, 0.5, 1.0), scaling_epochs=3),
    # the paper's appendix: lr 1e-5 constant, no weight decay, batch 6 x accumulation 16;
    # stage 1 is five SLAKE epochs
    "gpu": dict(base_epochs=0, stage1_epochs=5, stage2_epochs=3, anneal_epochs=1, base_lr=1e-5,
                lr=1e-5, batch_size=6, grad_accum=16, schedule="constant", weight_decay=0.0,
                max_train=None, max_eval=200, val_limit=256, seeds=(0, 1, 2),
                datamixes=("roco-qa", "medpix-shortqa", "roco-qa+medpix", "pmc-vqa"),
                anneal_size=500, scaling_fractions=(0.25, 0.5, 1.0), scaling_epochs=3,
                precision="bf16"),
}


def study_plan(profile: Any, **overrides: Any) -> PaliGemmaStudy:
    """The study of ``profile``; ``overrides`` are :class:`PaliGemmaStudy` fields (``None``
    keeps the profile's value) and ``spec`` a dict of :class:`PaliGemmaSpec` fields."""
    name = getattr(profile, "name", profile)
    if name not in _PLANS:
        raise unknown_name("PaliGemma study profile", name, _PLANS)
    plan = dict(_PLANS[name])
    spec = PaliGemmaSpec.from_profile(name, **(overrides.pop("spec", None) or {}))
    plan.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
    return PaliGemmaStudy(spec=spec, **plan)


# ----------------------------------------------------------------------------- data


class ImageCache:
    """Each distinct image decoded once and resized to the model's input size (PIL, RGB)."""

    def __init__(self, size: int) -> None:
        self.size, self._images = size, {}

    def get(self, sample: Any) -> Any:
        key = str(sample.image_id)
        if key not in self._images:
            self._images[key] = sample.load_image().convert("RGB").resize((self.size, self.size))
        return self._images[key]


class ItemDataset(Dataset):
    """VQA (or caption) samples as collator items; ``prefix`` is the PaliGemma task."""

    def __init__(self, samples: Sequence[Any], cache: ImageCache, prefix: str | None = None) -> None:
        self.samples, self.cache, self.prefix = list(samples), cache, prefix

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        if hasattr(s, "caption"):
            return {"image": self.cache.get(s), "question": "", "answer": s.caption,
                    "qid": s.image_id, "prefix": CAPTION_PREFIX}
        item = {"image": self.cache.get(s), "question": s.question, "answer": s.answer, "qid": s.qid}
        if self.prefix:
            item["prefix"] = self.prefix
        return item


#: datamix name → (where it comes from, Hub dataset id or None)
DATAMIXES: dict[str, tuple[str, str | None]] = {
    "target": ("the target dataset's human-written training QA (VQA-RAD, or synthetic)", None),
    "captions-qa": ("QA generated from training captions, curated", None),
    "captions-qa+anneal": ("captions-qa, annealed with a small human-written set", None),
    "roco-qa": ("ROCO v2 synthetic QA (Hub)", "adishourya/ROCO-QA-Train"),
    "medpix-shortqa": ("MedPix 2.0 short QA (Hub)", "adishourya/MEDPIX-ShortQA"),
    "roco-qa+medpix": ("ROCO-QA annealed with MedPix short QA (Hub)", "adishourya/ROCO-QA-Train"),
    "pmc-vqa": ("PMC-VQA (Hub)", "xmcmic/PMC-VQA"),
}


def _hub_mix(repo: str, limit: int | None) -> list[VQASample]:
    """A Hub QA datamix as training samples (column names guessed; needs the Hub)."""
    from medvqa_lib.data.hub import ensure_hub, load_hub_dataset
    from medvqa_lib.data.question_types import infer_answer_type

    ensure_hub(repo)  # HubUnavailableError with the fix when offline
    ds = load_hub_dataset(repo, "train")
    cols = set(ds.column_names)
    pick = lambda *names: next((n for n in names if n in cols), None)  # noqa: E731
    qcol, acol, icol = pick("question", "Question"), pick("answer", "Answer"), pick("image", "Figure_path")
    if not (qcol and acol and icol):
        raise HubUnavailableError(f"{repo}: unexpected columns {sorted(cols)}")
    n = len(ds) if limit is None else min(limit, len(ds))
    return [VQASample(qid=f"{repo}-{i}", image_id=f"{repo}-{i}", image=ds[i][icol],
                      question=str(ds[i][qcol]), answer=str(ds[i][acol]),
                      answer_type=infer_answer_type(ds[i][acol]), question_type="other",
                      split="train", dataset=repo) for i in range(n)]


def load_datamix(name: str, parts: Mapping[str, Sequence[VQASample]], limit: int | None = None
                 ) -> tuple[list[VQASample], list[VQASample]]:
    """``(main mix, annealing set)`` for datamix ``name``. ``parts`` holds the offline pieces:
    ``target`` (human QA), ``captions-qa`` and ``anneal``. Hub mixes raise
    :class:`HubUnavailableError` offline."""
    if name not in DATAMIXES:
        raise unknown_name("datamix", name, DATAMIXES)
    if name == "target":
        return list(parts["target"]), []
    if name == "captions-qa":
        return list(parts["captions-qa"]), []
    if name == "captions-qa+anneal":
        return list(parts["captions-qa"]), list(parts["anneal"])
    repo = DATAMIXES[name][1]
    main = _hub_mix(str(repo), limit)
    anneal = _hub_mix("adishourya/MEDPIX-ShortQA", limit) if name == "roco-qa+medpix" else []
    return main, anneal


# ----------------------------------------------------------------------------- model


def build_model(study: PaliGemmaStudy, texts: Sequence[str], token: str | None = None) -> PaliGemmaVQA:
    """The base PaliGemma (tiny: tokenizer trained on ``texts``) without adapters yet."""
    model, processor = build_paligemma(study.spec, texts, token)
    return PaliGemmaVQA(model, processor)


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


def add_adapters(vqa: PaliGemmaVQA, study: PaliGemmaStudy) -> dict[str, float]:
    """Freeze the base and add the LoRA adapters; returns the trainable share."""
    from medvqa_lib.papers.paligemma.model import trainable_share

    vqa.model = apply_lora(vqa.model, study.spec)
    return trainable_share(vqa)


def reset_adapters(vqa: PaliGemmaVQA, seed: int) -> None:
    """Fresh LoRA weights (A random, B zero: the adapted model equals the base)."""
    torch.manual_seed(seed)
    for module in vqa.modules():
        if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
            module.reset_lora_parameters("default", True)


def save_adapters(vqa: PaliGemmaVQA, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """The trainable (adapter) tensors as one safetensors file, written atomically."""
    from medvqa_lib.io import atomic_save_safetensors

    path = Path(path)
    atomic_save_safetensors(vqa.trainable_state(), path,
                            metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
    return path


def load_adapters(vqa: PaliGemmaVQA, path: str | Path) -> None:
    """Load adapter tensors saved by :func:`save_adapters` (every trainable tensor must match)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = {n for n, p in vqa.named_parameters() if p.requires_grad}
    if set(state) != own:
        raise ValueError(f"{path} does not hold this model's adapters "
                         f"({len(set(state) ^ own)} names differ)")
    vqa.load_state_dict(state, strict=False)


def _val_loss_fn(vqa: PaliGemmaVQA, val: Sequence[VQASample], cache: ImageCache, study: PaliGemmaStudy
                 ) -> Callable[[torch.nn.Module], dict[str, float]]:
    ensure_splits(val, {"val"}, "model selection")
    subset = list(val)[: study.val_limit]
    collate = VQACollator(vqa.processor)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return answer_loss(model, subset, cache, collate, study.batch_size)

    evaluate.split = "val"  # type: ignore[attr-defined]
    return evaluate


@torch.no_grad()
def answer_loss(model: torch.nn.Module, samples: Sequence[VQASample], cache: ImageCache,
                collate: VQACollator, batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced loss per answer token (one pass): overall and for closed / open questions."""
    from medvqa_lib.training import move_to_device

    device = next(model.parameters()).device
    data = ItemDataset(samples, cache)
    sums = {"all": [0.0, 0], "closed": [0.0, 0], "open": [0.0, 0]}
    for i in range(0, len(data), batch_size):
        batch = move_to_device(collate([data[j] for j in range(i, min(i + batch_size, len(data)))]), device)
        labels = batch.pop("labels")
        keep = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
        logits = model.model(**{k: v for k, v in batch.items() if k in keep}).logits.float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target,
                                                ignore_index=-100, reduction="none")
        per_row, counts = nll.sum(1), (target != -100).sum(1)
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
        answers = vqa.answer([cache.get(s) for s in chunk], [s.question for s in chunk],
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


# ----------------------------------------------------------------------------- scaling law


def eq1(xd: np.ndarray, a: float, alpha: float, beta: float, e: float) -> np.ndarray:
    """Eq. 1: ``L = A · X^-alpha · D_f^-beta + E`` for ``xd = (X, D_f)``."""
    x, d = xd
    return a * np.power(x, -alpha) * np.power(d, -beta) + e


def fit_scaling_law(points: pd.DataFrame, x: str = "epoch", d: str = "tokens", loss: str = "val_loss"
                    ) -> dict[str, float]:
    """Least-squares fit of Eq. 1 (``scipy.optimize.curve_fit``, non-negative parameters)."""
    from scipy.optimize import curve_fit

    data = points[[x, d, loss]].dropna()
    if len(data) < 5:
        raise ValueError(f"Eq. 1 has 4 parameters; {len(data)} points are too few to fit")
    xd = np.vstack([data[x].to_numpy(float), data[d].to_numpy(float)])
    y = data[loss].to_numpy(float)
    p0 = (max(y.max() - y.min(), 1e-3), 0.5, 0.1, max(y.min() * 0.9, 0.0))
    params, _ = curve_fit(eq1, xd, y, p0=p0, bounds=(0, np.inf), maxfev=20_000)
    pred = eq1(xd, *params)
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    return {"A": params[0], "alpha": params[1], "beta": params[2], "E": params[3], "R2": r2, "points": len(y)}


# ----------------------------------------------------------------------------- saliency


@dataclass
class Saliency:
    """Saliency of one (image, question): maps over the model's patch grid and response tokens."""

    answer: str
    tokens: list[str]
    raw_map: torch.Tensor
    rollout_map: torch.Tensor
    patch: int
    patch_weights: torch.Tensor
    top_tokens: list[int]
    layer: int
    head: int


@torch.no_grad()
def saliency_for(vqa: PaliGemmaVQA, image: Any, question: str, *, layer: int = -2, head: int = 0,
                 head_fusion: str = "mean", discard_ratio: float = 0.9, top_k: int = 7,
                 max_new_tokens: int = 10) -> Saliency:
    """Answer ``question`` about ``image`` greedily, then read the language model's attention:
    one head of ``layer`` from the response tokens to the image patches (Figure 10), the
    response tokens most attending to the brightest patch (Figure 11), and attention rollout
    over all layers (Figure 14), all on the model's own patch grid."""
    from medvqa_lib.papers.paligemma.saliency import (
        patch_to_tokens,
        raw_attention_map,
        rollout,
        to_grid,
    )

    vqa.eval()
    image = image.convert("RGB")
    answer = vqa.answer([image], [question], max_new_tokens=max_new_tokens)[0]
    tok = vqa.processor.tokenizer
    inputs = vqa.encode([image], [question])
    prompt_len = inputs["input_ids"].shape[1]
    answer_ids = tok(answer, add_special_tokens=False, return_tensors="pt")["input_ids"].to(inputs["input_ids"].device)
    if answer_ids.shape[1] == 0:
        answer_ids = torch.tensor([[tok.eos_token_id]], device=answer_ids.device)
    ids = torch.cat([inputs["input_ids"], answer_ids], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(answer_ids)], 1)
    types = torch.cat([torch.zeros_like(inputs["input_ids"]), torch.ones_like(answer_ids)], 1)
    out = vqa.model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                    pixel_values=inputs["pixel_values"], output_attentions=True)
    layers = [a[0] for a in out.attentions]
    image_pos = (ids[0] == vqa.processor.image_token_id).nonzero().flatten().tolist()
    response = list(range(prompt_len, ids.shape[1]))
    grid = vqa.grid
    n_layers = len(layers)
    layer_i = layer % n_layers
    head_i = head % layers[layer_i].shape[0]
    raw = raw_attention_map(layers[layer_i], head_i, response, image_pos)
    patch = image_pos[int(raw.argmax())]
    weights, top = patch_to_tokens(layers[layer_i], head_i, patch, response, k=top_k)
    roll = rollout(layers, head_fusion, discard_ratio)
    roll_map = roll[response][:, image_pos].mean(0)
    return Saliency(answer=answer, tokens=tok.convert_ids_to_tokens(answer_ids[0].tolist()),
                    raw_map=to_grid(raw, grid), rollout_map=to_grid(roll_map, grid),
                    patch=image_pos.index(patch), patch_weights=weights, top_tokens=top,
                    layer=layer_i, head=head_i)


# ----------------------------------------------------------------------------- prior


def compare_to_prior(model_scored: Mapping[str, pd.DataFrame], prior_scored: Mapping[str, pd.DataFrame],
                     n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap of PaliGemma − prior accuracy (percentage points, 95 % interval)."""
    from medvqa_lib.experiments.tables import compare_to_prior as paired

    return paired(model_scored, prior_scored, n_resamples=n_resamples, seed=seed, label="PaliGemma")


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


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
