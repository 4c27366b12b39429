"""Data efficiency: test accuracy against the amount of pre-training data, for each method.

For each method and each share of its chapter's pre-training corpus (0 = no pre-training), the
model is pre-trained on that share with the chapter's own functions, fine-tuned for a few
epochs on one dataset (SLAKE when it is loaded, else the first one) with capped training
questions, selected on validation, and tested once on the same capped test questions. One seed; the
generative models answer greedily here (their chapters use beam search where the paper does).

* MISS and M2I2: image–caption pairs (:func:`~medvqa_lib.experiments.corpus.caption_pairs`);
* CMDPI: its corpus of captions and training questions, both cut to the same share;
* PaliGemma-LoRA: the captions of the stand-in base model's pre-training
  (:func:`~medvqa_lib.papers.paligemma.pipeline.pretrain_base`), then LoRA on the dataset.

Each run's result is written atomically to ``<out_dir>/<method>_<share>.json`` and re-used by
a later call with the same settings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medvqa_lib.config import Profile
from medvqa_lib.data.suite import cap
from medvqa_lib.evaluation import score_predictions, summarize
from medvqa_lib.io import atomic_write_json
from medvqa_lib.papers.cmdpi.config import CPU_SECONDS_PER_1000 as CMDPI_SECONDS
from medvqa_lib.papers.comparison.config import ComparisonPlan
from medvqa_lib.papers.m2i2.config import CPU_SPEEDS as M2I2_SPEEDS
from medvqa_lib.training import seed_everything

__all__ = ["efficiency_dataset", "efficiency_splits", "run_efficiency", "estimate_seconds", "efficiency_figure"]

#: 2-core seconds per 1,000 samples at the cpu profile: pre-training, fine-tuning, answering.
#: M2I2 and CMDPI: their chapters' measured constants (``m2i2.config.CPU_SPEEDS``,
#: ``cmdpi.config.CPU_SECONDS_PER_1000``); MISS and PaliGemma: derived from their chapters'
#: measured cpu wall times (book/running.md), so rougher
CPU_SECONDS_PER_1000: dict[str, dict[str, float]] = {
    "MISS": {"pretrain": 60.0, "finetune": 25.0, "answer": 10.0},
    "M2I2": {k: 1000 / M2I2_SPEEDS[k] for k in ("pretrain", "finetune", "answer")},
    "CMDPI": {"pretrain": CMDPI_SECONDS["pretrain"], "finetune": CMDPI_SECONDS["finetune"],
              "answer": CMDPI_SECONDS["predict"]},
    "PaliGemma-LoRA": {"pretrain": 15.0, "finetune": 10.0, "answer": 10.0},
}


def efficiency_dataset(suite: Mapping[str, Any]) -> str:
    """SLAKE when loaded, else the first dataset of the suite."""
    return "slake" if "slake" in suite else next(iter(suite))


def efficiency_splits(suite: Mapping[str, Mapping[str, Sequence[Any]]], plan: ComparisonPlan,
                      seed: int = 0) -> dict[str, list[Any]]:
    """The capped train / val / test questions every data-efficiency run uses."""
    splits = suite[efficiency_dataset(suite)]
    return {"train": cap(list(splits["train"]), plan.efficiency_train, seed),
            "val": cap(list(splits["val"]), plan.efficiency_val, seed),
            "test": cap(list(splits["test"]), plan.efficiency_test, seed)}


def estimate_seconds(plan: ComparisonPlan, methods: Sequence[str] | None = None) -> dict[str, float]:
    """Expected 2-core time of the data-efficiency runs per method (from
    :data:`CPU_SECONDS_PER_1000`): pre-training on every share, fine-tuning, validation, test."""
    out = {}
    shares = sum(plan.efficiency_fractions)
    for m in methods or plan.methods:
        sp = CPU_SECONDS_PER_1000[m]
        pairs = plan.efficiency_pairs * (2 if m == "CMDPI" else 1)  # captions + as many questions
        pre = shares * pairs * plan.efficiency_pretrain_epochs * sp["pretrain"]
        per_run = plan.efficiency_finetune_epochs * (plan.efficiency_train * sp["finetune"]
                                                    + plan.efficiency_val * sp["answer"])
        out[m] = (pre + len(plan.efficiency_fractions) * (per_run + plan.efficiency_test * sp["answer"])) / 1000
    out["total"] = sum(out.values())
    return out


def _subset(items: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    from medvqa_lib.experiments.corpus import subset

    return subset(list(items), fraction, seed)


def _generative_shares(name: str, study_module: Any, study: Any, pairs: Sequence[Any], pre_cache: Any,
                       ft_cache: Any, plan: ComparisonPlan, splits: Mapping[str, list[Any]],
                       fractions: Sequence[float], out: Path, seed: int) -> dict[float, dict[str, Any]]:
    """MISS and M2I2 alike: for each share of ``pairs``, pre-train with ``study_module`` (none at
    share 0), fine-tune and answer greedily with :func:`~medvqa_lib.experiments.runs.finetune_and_test`."""
    from medvqa_lib.experiments.runs import finetune_and_test
    from medvqa_lib.text import select_text_backbone

    backbone = select_text_backbone(study.model.text_backbone)
    settings = dataclasses.replace(study.finetune, epochs=plan.efficiency_finetune_epochs,
                                   eval_limit=plan.efficiency_val, num_beams=1)
    results = {}
    for f in fractions:
        corpus = _subset(pairs, f, seed)
        t0 = time.perf_counter()
        state = study_module.pretrain_variant(f"pre{f:g}", study.model, corpus, backbone.tokenizer, pre_cache,
                                              study.pretrain, backbone, seed)[0] if corpus else None
        pre_s = time.perf_counter() - t0
        rec = finetune_and_test(f"{name} {f:g}", study_module.finetune_factory(study.model, state, backbone),
                                {"data": splits}, [seed], backbone.tokenizer, settings, out / name / "finetune",
                                ft_cache, verbose=False)[0]
        results[f] = _result(rec.scored, len(corpus), pre_s, rec.train.time_s)
    return results


def _miss(profile: Profile, plan: ComparisonPlan, splits: Mapping[str, list[Any]], fractions: Sequence[float],
          out: Path, seed: int, root: Path | None, hub: bool) -> dict[float, dict[str, Any]]:
    from medvqa_lib.experiments.corpus import caption_pairs
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.papers.miss import pipeline as ms
    from medvqa_lib.papers.miss.config import study_plan

    study = study_plan(profile, out / "MISS", pretrain=dict(epochs=plan.efficiency_pretrain_epochs))
    pairs, _ = caption_pairs(profile, plan.efficiency_pairs, seed, root, hub=hub, verbose=False)
    cache = ImageCache(study.model.image_size)
    return _generative_shares("MISS", ms, study, pairs, cache, cache, plan, splits, fractions, out, seed)


def _m2i2(profile: Profile, plan: ComparisonPlan, splits: Mapping[str, list[Any]], fractions: Sequence[float],
          out: Path, seed: int, root: Path | None, hub: bool) -> dict[float, dict[str, Any]]:
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.papers.m2i2 import pipeline as m2
    from medvqa_lib.papers.m2i2.config import study_plan

    study = study_plan(profile, out / "M2I2", pretrain=dict(epochs=plan.efficiency_pretrain_epochs))
    pairs, _, _ = m2.pretraining_corpus(profile, plan.efficiency_pairs, seed, root, hub=hub, verbose=False)
    pre_cache = ImageCache(study.model.image_size)
    ft_cache = pre_cache if study.finetune_image_size == study.model.image_size else ImageCache(
        study.finetune_image_size)
    return _generative_shares("M2I2", m2, study, pairs, pre_cache, ft_cache, plan, splits, fractions, out, seed)


def _cmdpi(profile: Profile, plan: ComparisonPlan, splits: Mapping[str, list[Any]], fractions: Sequence[float],
           out: Path, seed: int, root: Path | None, hub: bool) -> dict[float, dict[str, Any]]:
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.papers.cmdpi import pipeline as cm
    from medvqa_lib.papers.cmdpi.answers import build_answer_vocab
    from medvqa_lib.papers.cmdpi.config import study_plan
    from medvqa_lib.text import select_text_backbone

    study = study_plan(profile, out / "CMDPI", pretrain=dict(epochs=plan.efficiency_pretrain_epochs),
                          captions=plan.efficiency_pairs, pretrain_vqa_limit=plan.efficiency_pairs,
                          max_train=plan.efficiency_train)
    backbone = select_text_backbone(study.model.text_backbone)
    full = cm.pretraining_corpus(profile, {"data": splits}, study, seed, root, real=root is not None or hub, hub=hub)
    cache = ImageCache(study.model.image_size)
    settings = dataclasses.replace(study.finetune, epochs=plan.efficiency_finetune_epochs,
                                   eval_limit=plan.efficiency_val)
    results = {}
    for f in fractions:
        captions, vqa = _subset(full.captions, f, seed), _subset(full.vqa, f, seed)
        corpus = cm.PretrainCorpus(captions, vqa, build_answer_vocab(vqa) if vqa else None, full.sources)
        t0 = time.perf_counter()
        state = cm.pretrain_variant(f"pre{f:g}", study.model, corpus, backbone.tokenizer, cache, study.pretrain,
                                    backbone, seed, **study.pretrain_options())[0] if len(corpus) else None
        pre_s = time.perf_counter() - t0
        rec = cm.finetune_cmdpi(f"CMDPI {f:g}", study.model, state, corpus.vocab, "data", splits, [seed],
                                   backbone.tokenizer, cache, settings, out / "CMDPI" / "finetune", backbone,
                                   verbose=False, **study.finetune_options())[0]
        results[f] = _result(rec.scored, len(corpus), pre_s, rec.train.time_s)
    return results


def _paligemma(profile: Profile, plan: ComparisonPlan, splits: Mapping[str, list[Any]],
               fractions: Sequence[float], out: Path, seed: int, root: Path | None, hub: bool,
               ) -> dict[float, dict[str, Any]]:
    from medvqa_lib.data.synthetic import load_synthetic_captions
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.papers.paligemma import pipeline as pg
    from medvqa_lib.papers.paligemma.config import study_plan
    from medvqa_lib.papers.paligemma.model import add_adapters, build_model, reset_adapters

    study = study_plan(profile, base_epochs=plan.efficiency_pretrain_epochs)
    if not study.spec.is_tiny:
        raise ValueError("PaliGemma's pre-training amount can only be varied for the tiny stand-in model "
                         "(the Hub checkpoint comes pre-trained)")
    captions = [c for c in load_synthetic_captions(n_images=profile.synthetic_images, image_size=profile.synthetic_image_size,
                                                   seed=seed) if c.split == "train"]
    captions = cap(captions, plan.efficiency_pairs, seed)
    texts = [f"answer en {s.question}" for s in splits["train"]] + [str(s.answer) for s in splits["train"]] + \
            [f"caption en {c.caption}" for c in captions]
    cache = ImageCache(study.spec.image_size)
    seed_everything(seed)
    fresh = build_model(study, texts)  # the same initialisation (and tokenizer) for every share
    results = {}
    for f in fractions:
        seed_everything(seed)
        vqa = copy.deepcopy(fresh)
        corpus = _subset(captions, f, seed)
        t0 = time.perf_counter()
        if corpus:
            pg.pretrain_base(vqa, corpus, study, cache, out / "PaliGemma" / f"base{f:g}", seed)
        pre_s = time.perf_counter() - t0
        add_adapters(vqa, study)
        reset_adapters(vqa, seed)
        train = pg.train_stage(vqa, splits["train"], splits["val"], study, cache, plan.efficiency_finetune_epochs,
                               out / "PaliGemma" / f"lora{f:g}", seed)
        preds = pg.predict(vqa, splits["test"], cache, batch_size=study.batch_size,
                           max_new_tokens=study.max_new_tokens)
        results[f] = _result(score_predictions(splits["test"], preds), len(corpus), pre_s, train.time_s)
    return results


_RUNNERS = {"MISS": _miss, "M2I2": _m2i2, "CMDPI": _cmdpi, "PaliGemma-LoRA": _paligemma}


def _result(scored: pd.DataFrame, items: int, pre_s: float, fine_s: float) -> dict[str, Any]:
    s = summarize(scored).iloc[0]
    return {"pretrain items": items, "closed": float(s["closed_acc"]), "open": float(s["open_acc"]),
            "overall": float(s["overall_acc"]), "n test": int(s["n"]), "pretrain s": round(pre_s, 1),
            "finetune s": round(fine_s, 1)}


def _key(plan: ComparisonPlan, dataset: str, seed: int) -> dict[str, Any]:
    return {"dataset": dataset, "seed": seed, "pairs": plan.efficiency_pairs,
            "pretrain_epochs": plan.efficiency_pretrain_epochs, "finetune_epochs": plan.efficiency_finetune_epochs,
            "train": plan.efficiency_train, "val": plan.efficiency_val, "test": plan.efficiency_test}


def run_efficiency(profile: Profile, plan: ComparisonPlan, suite: Mapping[str, Mapping[str, Sequence[Any]]],
                   out_dir: str | Path, seed: int = 0, root: Path | None = None, *, hub: bool = False,
                   methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Every method × share of :class:`ComparisonPlan` (see the module docstring); one row per
    run with the share, pre-training items, accuracies and times. Results stored under
    ``out_dir`` by an earlier call with the same settings are read instead of re-run."""
    out = Path(out_dir)
    dataset = efficiency_dataset(suite)
    splits = efficiency_splits(suite, plan, seed)
    key = _key(plan, dataset, seed)
    rows = []
    for method in methods or plan.methods:
        paths = {f: out / f"{method}_{f:g}.json" for f in plan.efficiency_fractions}
        done = {f: json.loads(p.read_text()) for f, p in paths.items() if p.is_file()}
        done = {f: r for f, r in done.items() if r.get("settings") == key}
        todo = [f for f in plan.efficiency_fractions if f not in done]
        if todo:
            for f, r in _RUNNERS[method](profile, plan, splits, todo, out / "runs", seed, root, hub).items():
                done[f] = {**r, "settings": key}
                atomic_write_json(paths[f], done[f])
        for f in plan.efficiency_fractions:
            r = {k: v for k, v in done[f].items() if k != "settings"}
            rows.append({"method": method, "dataset": dataset, "share": f, **r})
    return pd.DataFrame(rows)


def efficiency_figure(table: pd.DataFrame, metric: str = "overall", title: str = ""):
    """Accuracy against the share of pre-training data, one line per method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for method, g in table.groupby("method", sort=False):
        ax.plot(100 * g["share"], g[metric], marker="o", label=method)
    ax.set_xlabel("share of the chapter's pre-training corpus (%)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
