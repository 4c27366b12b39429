"""The CMDPI chapter's experiments: corpus, pre-training and fine-tuning runs, and analyses.

A study is sized by a run profile (:func:`study_plan`): the model preset
(:meth:`~medvqa_lib.papers.cmdpi.model.CMDPIConfig.from_profile`), the two training stages, the
pre-training corpus, the seeds, and the points of the appendix sweeps.

Pre-training corpus (Sec. 3.2.3 of the paper: captions go to reconstruction *and* contrastive
learning, VQA data to reconstruction only):

* **captions** — ROCO when the user has it (local ``roco/`` folder, or the Hub on ``gpu``);
  otherwise the synthetic generator's captions, a labelled stand-in
  (:func:`~medvqa_lib.experiments.corpus.caption_pairs`);
* **VQA data** — the paper uses automatically generated PMC-VQA questions. Offline there is no
  such set, so ``pretrain_vqa`` chooses: ``"train"`` (the *training* questions of the datasets
  the chapter fine-tunes on, never validation or test; the default), ``"synthetic"`` (the
  synthetic generator's template questions, an automatically generated stand-in) or ``"none"``.
  These rows carry their answer (``L_ans``) and are kept out of contrastive learning unless the
  model's ``contrastive_on_vqa`` ("Contra.QA", Figure 6) is on.

Fine-tuning (:func:`finetune_and_test`) starts each seed from the same pre-trained weights,
finds similar training images with the pre-trained image encoder (once per variant and
dataset), trains with difference reconstruction and head mixup, keeps the epoch with the best
*validation* accuracy and answers the test split once.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset

from medvqa_lib.config import Profile
from medvqa_lib.data.dataset import VQACollator
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.data.suite import cap
from medvqa_lib.evaluation import AnswerVocabulary, ensure_splits, score_predictions, summarize
from medvqa_lib.experiments.corpus import caption_pairs
from medvqa_lib.experiments.generative import (
    CachedCaptionDataset,
    CachedVQADataset,
    ImageCache,
    StageSettings,
)
from medvqa_lib.experiments.runs import RunRecord, shuffled_images
from medvqa_lib.experiments.tables import compare_to_prior, seed_mean_scores
from medvqa_lib.papers.cmdpi.model import (
    CMDPI,
    CMDPICollator,
    CMDPIConfig,
    CMDPIPretrainCollator,
    CMDPIVQADataset,
    SimilarImages,
    answer_coverage,
    build_answer_vocab,
    build_cmdpi,
    image_global_features,
    load_pretrained_for_finetune,
    predict_samples,
)
from medvqa_lib.training import Trainer, TrainResult, seed_everything

__all__ = [
    "REPORTED",
    "PRETRAIN_GROUP",
    "CMDPIRun", "CMDPIStudy", "PretrainCorpus", "PRETRAIN_VARIANTS", "FINETUNE_VARIANTS",
    "study_plan", "pretraining_corpus", "pretrain_variant", "SimilarityIndex", "finetune_and_test",
    "answer_heads", "unseen_answers", "compare_with_prior", "case_study", "per_group", "ablation_table",
    "variant_bars", "tsne_figure", "estimate_seconds", "implied_overall", "readings_of_the_paper",
    "validation_fn", "freeze",
]

#: the CMDPI paper's Tables 1 (VQA-RAD) and 2 (SLAKE): (model, closed, open, overall) in %
REPORTED: dict[str, list[tuple[str, float, float, float]]] = {
    "vqa-rad": [("MEVF", 76.5, 43.0, 63.2), ("VQA-MIX", 82.4, 63.1, 74.7), ("MLPs-Base", 81.3, 53.1, 70.2),
                ("VG-CALF", 85.5, 67.0, 76.1), ("ACMA-MAM", 84.4, 63.6, 76.1), ("CPCR", 80.4, 60.5, 72.5),
                ("WSRP", 82.7, 67.6, 76.7), ("VQA-Adapter", 82.3, 66.1, 75.8), ("MKGF", 81.7, 61.7, 71.7),
                ("VB-MVQA", 78.1, 61.3, 71.3), ("MITER", 80.5, 59.4, 72.1), ("CMDPI", 85.7, 74.3, 78.7),
                ("M3AE", 83.5, 67.2, 77.0), ("BiomedCLIP", 76.5, 67.0, 72.7), ("LLaVA-Med*", 84.2, 61.5, 75.2),
                ("UniMed-LVLM*", 75.4, 26.2, 55.8), ("PeFoMed*", 87.1, 62.6, 77.4)],
    "slake": [("MEVF", 81.7, 76.1, 78.3), ("VQA-MIX", 80.8, 77.2, 78.6), ("MLPs-Base", 88.5, 79.9, 82.9),
              ("VG-CALF", 83.8, 81.4, 83.3), ("ACMA-MAM", 86.7, 80.8, 83.1), ("CPCR", 84.1, 80.5, 81.9),
              ("WSRP", 83.9, 76.7, 79.5), ("VQA-Adapter", 83.7, 79.2, 81.0), ("MKGF", 82.0, 65.8, 74.3),
              ("VB-MVQA", 80.5, 77.0, 78.7), ("MITER", 84.4, 79.2, 81.2), ("CMDPI", 88.0, 80.6, 83.5),
              ("M3AE", 87.8, 80.3, 83.2), ("BiomedCLIP", 88.9, 84.3, 86.1), ("LLaVA-Med*", 85.3, 83.1, 84.0),
              ("UniMed-LVLM*", 84.4, 84.0, 84.2), ("PeFoMed*", 88.7, 77.8, 82.1)],
}
#: the compared models the paper groups as pre-trained on more than 200k samples
PRETRAIN_GROUP: set[str] = {"M3AE", "BiomedCLIP", "LLaVA-Med*", "UniMed-LVLM*", "PeFoMed*"}

#: Figures 6-7: pre-training variants as CMDPIConfig switches (the full model first)
PRETRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "CMDPI": {},
    "w/o global rec.": {"global_rec": False},
    "w/o local rec.": {"local_rec": False},
    "w/o inter-contrast": {"inter_contrastive": False},
    "w/o intra-contrast": {"intra_contrastive": False},
    "Contra.QA": {"contrastive_on_vqa": True},
}
#: Figure 8: fine-tuning variants (from the full model's pre-trained weights)
FINETUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "CMDPI": {},
    "w/o diff. rec.": {"difference_reconstruction": False},
    "w/o head mixup": {"head_mixup": False},
}
PRETRAIN_VQA = ("train", "synthetic", "none")


@dataclass
class CMDPIStudy:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    model: CMDPIConfig
    pretrain: StageSettings
    finetune: StageSettings
    #: fine-tuning epochs per dataset ("default" for the others)
    finetune_epochs: dict[str, int]
    #: image-caption pairs in the pre-training corpus
    captions: int
    #: where the pre-training VQA rows come from: "train", "synthetic" or "none"
    pretrain_vqa: str
    #: at most this many pre-training VQA questions per dataset (None: all training questions)
    pretrain_vqa_limit: int | None
    #: at most this many fine-tuning training questions per dataset (None: all)
    max_train: int | None
    seeds: tuple[int, ...]
    #: the dataset of the ablations and sweeps (VQA-RAD, as the paper's appendix; the first
    #: dataset loaded when it is not there)
    ablation_dataset: str = "vqa-rad"
    #: seeds of each ablation and sweep run
    ablation_seeds: tuple[int, ...] = (0,)
    #: fine-tuning epochs of the ablation and sweep runs (None: as the main runs); when it
    #: differs from the main runs, the full model is fine-tuned again with it for the comparison
    ablation_epochs: int | None = None
    #: training questions of each ablation and sweep run (None: as the main runs, ``max_train``)
    ablation_max_train: int | None = None
    #: the Figure 6-7 pre-training variants run as ablations (labels of
    #: :data:`PRETRAIN_VARIANTS`; None: all of them)
    pretrain_ablations: tuple[str, ...] | None = None
    #: points of the appendix sweeps: alpha (alpha, alpha'), rec_weights (w_img, w_txt, w_ans),
    #: ft_weights (w_mix, w_diff), threshold, beta (a, b), fixed (lambda)
    sweeps: dict[str, list] = field(default_factory=dict)
    #: parameter-name prefixes kept frozen in both stages (``cpu``: the text encoder's word
    #: embeddings, which saves a third of the optimizer's work; the paper trains everything)
    frozen: tuple[str, ...] = ()
    #: keep the ``best/`` checkpoint folders of every run (off: deleted once loaded)
    keep_checkpoints: bool = False
    #: run the ablations of Figures 6-8
    run_ablations: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pretrain_vqa not in PRETRAIN_VQA:
            raise ValueError(f"pretrain_vqa must be one of {PRETRAIN_VQA}, got {self.pretrain_vqa!r}")
        self.seeds = tuple(self.seeds)
        self.ablation_seeds = tuple(self.ablation_seeds)
        self.frozen = tuple(self.frozen)
        if self.pretrain_ablations is not None:
            self.pretrain_ablations = tuple(self.pretrain_ablations)
            unknown = [x for x in self.pretrain_ablations if x not in PRETRAIN_VARIANTS]
            if unknown:
                raise ValueError(f"unknown pre-training ablations {unknown}; choose from "
                                 f"{', '.join(k for k in PRETRAIN_VARIANTS if k != 'CMDPI')}")

    def epochs_for(self, dataset: str) -> int:
        return self.finetune_epochs.get(dataset, self.finetune_epochs.get("default", self.finetune.epochs))

    def finetune_settings(self, dataset: str) -> StageSettings:
        return dataclasses.replace(self.finetune, epochs=self.epochs_for(dataset))

    def ablation_settings(self, dataset: str) -> StageSettings:
        """Fine-tuning settings of the ablation and sweep runs on ``dataset``."""
        return dataclasses.replace(self.finetune, epochs=self.ablation_epochs or self.epochs_for(dataset))

    def ablation_matches_main(self, dataset: str) -> bool:
        """Whether the ablation runs on ``dataset`` train exactly like the main runs (then the
        full model's main runs serve as the ablations' reference; else it is run again)."""
        return (self.ablation_settings(dataset).epochs == self.finetune_settings(dataset).epochs
                and (self.ablation_max_train or self.max_train) == self.max_train)

    def pretrain_ablation_plan(self) -> dict[str, dict[str, Any]]:
        """The pre-training variants of the ablations (without the full model)."""
        wanted = self.pretrain_ablations
        return {k: v for k, v in PRETRAIN_VARIANTS.items()
                if k != "CMDPI" and (wanted is None or k in wanted)}

    def ablation_options(self) -> dict[str, Any]:
        """:meth:`finetune_options` of the ablation and sweep runs."""
        return dict(self.finetune_options(), max_train=self.ablation_max_train or self.max_train)

    def pretrain_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pretrain_variant` that every run of the study shares."""
        return {"keep_checkpoints": self.keep_checkpoints, "frozen": self.frozen}

    def finetune_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`finetune_and_test` that every run of the study shares."""
        return {"max_train": self.max_train, "keep_checkpoints": self.keep_checkpoints, "frozen": self.frozen}


_SWEEPS_FULL = {  # the paper's appendix grids (Figure 13's points are not listed: a 3 x 2 grid)
    "alpha": [(a, b) for a in (0.25, 0.5, 1.0) for b in (0.5, 1.0)],
    "rec_weights": [(i, t, a) for i in (0.5, 1.0) for t in (0.5, 1.0) for a in (0.5, 1.0)],
    "ft_weights": [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)],
    "threshold": [0.70, 0.75, 0.80, 0.85, 0.90, 0.95],
    "beta": [(0.2, 0.2), (0.4, 0.4), (2.0, 2.0), (0.2, 1.0), (1.0, 0.2)],
    "fixed": [0.1, 0.3, 0.5, 0.7, 0.9],
}
_SWEEPS_FEW = {  # fewer points (each figure says so)
    "alpha": [(0.5, 1.0), (1.0, 1.0), (0.5, 0.5)],
    "rec_weights": [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 1.0, 0.5)],
    "ft_weights": [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)],
    "threshold": [0.70, 0.75, 0.85, 0.95],
    "beta": [(0.2, 0.2), (2.0, 2.0), (0.2, 1.0)],
    "fixed": [0.3, 0.5, 0.7],
}
_SWEEPS_SMOKE = {"alpha": [(1.0, 1.0)], "rec_weights": [(0.5, 0.5, 0.5)], "ft_weights": [(0.5, 1.0)],
                 "threshold": [0.9], "beta": [(0.2, 0.2)], "fixed": [0.5]}

#: the text encoder's word embeddings (frozen on the small profiles)
_WORD_EMBEDDINGS = ("text_encoder.bert.embeddings.word.",)

_PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(model=dict(max_text_len=40),
                  pretrain=dict(epochs=1, batch_size=32, lr=1e-4, warmup_ratio=0.0, max_text_len=40),
                  finetune=dict(epochs=1, batch_size=16, lr=1e-4, eval_limit=32),
                  finetune_epochs={"default": 1}, captions=16, pretrain_vqa="train", pretrain_vqa_limit=16,
                  max_train=48, frozen=_WORD_EMBEDDINGS, sweeps=_SWEEPS_SMOKE),
    # 2 cores, bf16 autocast, VQA-RAD + SLAKE: the main results (Tables 1-2, Figures 5, 9-12,
    # the prior and the image control) and the main ablations: the two contrastive terms of
    # Figure 7, no pre-training, and Figure 8, each fine-tuned one epoch on 1,500 SLAKE
    # questions. They run on SLAKE: at this scale VQA-RAD's answers do not depend on the
    # image, so the variants could not be told apart there. The reconstruction removals and
    # Contra.QA (pretrain_ablations=None) add about 3 min
    "cpu": dict(model=dict(image_size=96, max_text_len=48),
                pretrain=dict(epochs=1, batch_size=32, lr=2e-4, warmup_ratio=0.05, max_text_len=48),
                finetune=dict(epochs=3, batch_size=32, lr=1e-4, warmup_ratio=0.05, eval_limit=None),
                finetune_epochs={"vqa-rad": 2, "slake": 2, "synthetic": 2, "default": 3},
                captions=300, pretrain_vqa="train", pretrain_vqa_limit=300, max_train=None,
                seeds=(0, 1), ablation_dataset="slake", ablation_epochs=1, ablation_max_train=1500,
                pretrain_ablations=("w/o inter-contrast", "w/o intra-contrast"), frozen=_WORD_EMBEDDINGS,
                sweeps=_SWEEPS_FEW, run_ablations=True),
    # the paper (Sec. 4.2): AdamW, pre-training up to 100 epochs, fine-tuning lr 7.5e-6 up to
    # 300 epochs, batch 32; pre-training lr and weight decay are not given (1e-4 / 0.05 here)
    "gpu": dict(model=dict(),
                pretrain=dict(epochs=100, batch_size=32, lr=1e-4, warmup_ratio=0.02, max_text_len=64),
                finetune=dict(epochs=300, batch_size=32, lr=7.5e-6, warmup_ratio=0.0, eval_limit=None),
                finetune_epochs={"default": 300}, captions=65_000, pretrain_vqa="train",
                pretrain_vqa_limit=None, max_train=None, sweeps=_SWEEPS_FULL),
}


def study_plan(profile: Profile, out_dir: str | Path, **overrides: Any) -> CMDPIStudy:
    """The study of ``profile`` (``smoke``/``cpu``/``gpu``). ``overrides``: any
    :class:`CMDPIStudy` field, plus ``model`` overrides as a dict (CMDPIConfig fields) and
    ``pretrain``/``finetune`` as dicts of :class:`StageSettings` fields; ``finetune_epochs`` and
    ``sweeps`` are merged into the profile's. ``seeds`` default to the
    profile's; ``ablation_seeds`` to its first seed."""
    if profile.name not in _PLANS:
        raise ValueError(f"no CMDPI study for profile {profile.name!r}; choose one of {', '.join(_PLANS)}")
    plan = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _PLANS[profile.name].items()}
    model_over = {**plan.pop("model"), **(overrides.pop("model", None) or {})}
    for stage in ("pretrain", "finetune"):
        plan[stage].update(overrides.pop(stage, None) or {})
    out = Path(out_dir)
    pre = StageSettings(**plan.pop("pretrain"), out_dir=out / "pretrain", progress=None)
    fine = StageSettings(**plan.pop("finetune"), out_dir=out / "finetune", progress=None)
    sweeps = {**plan.pop("sweeps"), **(overrides.pop("sweeps", None) or {})}
    sweeps = {k: [tuple(p) if isinstance(p, (list, tuple)) else p for p in v] for k, v in sweeps.items()}
    plan["finetune_epochs"] = {**plan["finetune_epochs"], **(overrides.pop("finetune_epochs", None) or {})}
    plan.update(overrides)
    plan.setdefault("seeds", tuple(profile.seeds))
    plan.setdefault("ablation_seeds", tuple(plan["seeds"])[:1])
    model = CMDPIConfig.from_profile(profile.name, **model_over)
    if pre.max_text_len > model.max_text_len or fine.max_text_len > model.max_text_len:
        raise ValueError(f"stage max_text_len must be <= the model's max_text_len ({model.max_text_len})")
    return CMDPIStudy(model=model, pretrain=pre, finetune=fine, sweeps=sweeps, **plan)


# ----------------------------------------------------------------------------- corpus


@dataclass
class PretrainCorpus:
    """Captions (reconstruction + contrast) and VQA rows (reconstruction + L_ans only)."""

    captions: list[CaptionSample]
    vqa: list[VQASample]
    #: FFN_A's classes in pre-training: the normalised answers of ``vqa`` (training split only)
    vocab: AnswerVocabulary | None
    sources: dict[str, str]

    def __len__(self) -> int:
        return len(self.captions) + len(self.vqa)

    def dataset(self, cache: ImageCache) -> Dataset:
        parts: list[Dataset] = []
        if self.captions:
            parts.append(CachedCaptionDataset(self.captions, cache))
        if self.vqa:
            parts.append(CachedVQADataset(self.vqa, cache))
        if not parts:
            raise ValueError("the pre-training corpus is empty")
        return ConcatDataset(parts)

    def table(self) -> pd.DataFrame:
        """Rows per source: count, images and what each kind of row is used for."""
        rows = [{"part": "captions", "source": self.sources.get("captions", ""), "rows": len(self.captions),
                 "images": len({c.image_id for c in self.captions}),
                 "used for": "reconstruction + contrastive"}]
        by_dataset: dict[str, list[VQASample]] = {}
        for s in self.vqa:
            by_dataset.setdefault(s.dataset or "vqa", []).append(s)
        for name, rows_ in by_dataset.items():
            rows.append({"part": f"VQA ({name})", "source": self.sources.get("vqa", ""), "rows": len(rows_),
                         "images": len({s.image_id for s in rows_}),
                         "used for": "reconstruction (+ answer)"})
        return pd.DataFrame(rows).set_index("part")


def _caption_profile(profile: Profile, n: int, real: bool) -> Profile:
    """Synthetic captions exist for training images only (about 70 % of them): without real data
    the profile is kept (the suite's cached images are reused), with real data only as many
    images are drawn as ``n`` captions need."""
    if not real:
        return profile
    return profile.replace(synthetic_images=max(8, min(profile.synthetic_images, math.ceil(n / 0.6) + 8)))


def pretraining_corpus(profile: Profile, suite: Mapping[str, Mapping[str, Sequence[VQASample]]],
                       study: CMDPIStudy, seed: int = 0, data_dir: Any = None,
                       real: bool = True, verbose: bool = False) -> PretrainCorpus:
    """The pre-training corpus of ``study``: ``study.captions`` caption pairs and VQA rows
    chosen by ``study.pretrain_vqa`` (training splits only; at most ``pretrain_vqa_limit`` per
    dataset, a seeded subset)."""
    captions: list[CaptionSample] = []
    sources: dict[str, str] = {}
    if study.captions > 0:
        captions, sources["captions"] = caption_pairs(_caption_profile(profile, study.captions, real),
                                                      study.captions, seed, data_dir if real else None,
                                                      verbose=verbose)
    vqa: list[VQASample] = []
    if study.pretrain_vqa == "train":
        for splits in suite.values():
            vqa += cap(list(splits["train"]), study.pretrain_vqa_limit, seed)
        sources["vqa"] = "training questions of " + ", ".join(suite)
    elif study.pretrain_vqa == "synthetic":
        from medvqa_lib.data.synthetic import load_synthetic_vqa

        synthetic = load_synthetic_vqa("train", n_images=profile.synthetic_images, image_size=profile.image_size,
                                       seed=seed)
        vqa = cap(synthetic, study.pretrain_vqa_limit, seed)
        sources["vqa"] = "synthetic template questions (stand-in for PMC-VQA)"
    ensure_splits(vqa, {"train"}, "pre-training")
    vocab = build_answer_vocab(vqa) if vqa else None
    return PretrainCorpus(captions, vqa, vocab, sources)


# ----------------------------------------------------------------------------- runs


def _drop_momentum(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights without the momentum encoders (fine-tuning rebuilds them as copies)."""
    return {k: v.detach().cpu().clone() for k, v in state.items() if "_encoder_m." not in k}


def freeze(model: torch.nn.Module, prefixes: Sequence[str]) -> int:
    """Switch off gradients of the parameters whose name starts with one of ``prefixes``;
    returns how many parameters (elements) were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
            n += p.numel()
    return n


def _clean(out_dir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(out_dir / "best", ignore_errors=True)
        shutil.rmtree(out_dir / "last", ignore_errors=True)


def pretrain_variant(label: str, config: CMDPIConfig, corpus: PretrainCorpus, tokenizer: Any,
                     cache: ImageCache, settings: StageSettings, backbone: Any = None, seed: int = 0,
                     keep_checkpoints: bool = False, frozen: Sequence[str] = ()
                     ) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Co-regularised pre-training of a fresh model on ``corpus`` (the last epoch is kept:
    there is no validation signal). Returns its weights (CPU copy, without the momentum
    encoders) and the training record (``out_dir`` = ``settings.out_dir / label``). ``frozen``:
    parameter-name prefixes that get no gradient."""
    seed_everything(seed)
    model = build_cmdpi(config, backbone, corpus.vocab).set_stage("pretrain")
    freeze(model, frozen)
    out = Path(settings.out_dir) / _slug(label)
    stage = dataclasses.replace(settings, seed=seed, out_dir=out)
    collate = CMDPIPretrainCollator(tokenizer, corpus.vocab, min(settings.max_text_len, config.max_text_len))
    trainer = Trainer(model, stage.train_config("train_loss").replace(save_last=False),
                      corpus.dataset(cache), collate_fn=collate, evaluate_fn=None)
    result = trainer.fit()
    _clean(out, keep_checkpoints)
    return _drop_momentum(model.state_dict()), result


class SimilarityIndex:
    """Global image features ``h_I`` of a dataset's *training* images from one pre-trained
    model, computed once; :meth:`table` thresholds them (Figure 14 re-uses the features)."""

    def __init__(self, model: CMDPI, train: Sequence[VQASample], cache: ImageCache, batch_size: int = 64) -> None:
        ensure_splits(train, {"train"}, "finding similar images for difference reconstruction")
        first: dict[str, VQASample] = {}
        for s in train:
            first.setdefault(s.image_id, s)
        self.image_ids = list(first)
        self.features = image_global_features(model, (cache.get(s) for s in first.values()), batch_size)

    def table(self, threshold: float, max_similarity: float | None = None) -> SimilarImages:
        return SimilarImages.from_features(self.image_ids, self.features, threshold, max_similarity)

    def similarity_quantiles(self, qs: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[float, float]:
        """Quantiles of the off-diagonal cosine similarities (how the threshold cuts them)."""
        f = torch.nn.functional.normalize(self.features.float(), dim=-1)
        sim = f @ f.t()
        off = sim[~torch.eye(len(f), dtype=torch.bool)]
        if off.numel() == 0:
            return {q: float("nan") for q in qs}
        return {q: float(torch.quantile(off[:1_000_000], q)) for q in qs}


@dataclass
class CMDPIRun(RunRecord):
    """A :class:`~medvqa_lib.experiments.runs.RunRecord` plus what CMDPI adds."""

    #: FFN_A classes (training answers of the dataset)
    answers: int = 0
    #: pre-trained FFN_A rows carried over by answer string
    answer_rows: int = 0
    #: share of training images with at least one similar image
    similar_share: float = float("nan")
    #: ``h_D`` of ``heads_for`` samples (Figure 9), when asked for
    heads: np.ndarray | None = None


def validation_fn(val: Sequence[VQASample], tokenizer: Any, cache: ImageCache, settings: StageSettings):
    """``evaluate_fn`` for the Trainer: accuracy on validation questions (refuses others)."""
    ensure_splits(val, {"val"}, "model selection")
    subset = list(val)[: settings.eval_limit] if settings.eval_limit else list(val)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        preds = predict_samples(model, subset, tokenizer, cache, batch_size=64, max_question_len=settings.max_text_len)
        row = summarize(score_predictions(subset, preds)).iloc[0]
        return {"val_acc": float(row["overall_acc"]), "val_closed": float(row["closed_acc"]),
                "val_open": float(row["open_acc"])}

    evaluate.split = "val"  # type: ignore[attr-defined]
    return evaluate


def finetune_and_test(label: str, config: CMDPIConfig, state: Mapping[str, torch.Tensor] | None,
                      pretrained_vocab: AnswerVocabulary | None, dataset: str,
                      splits: Mapping[str, Sequence[VQASample]], seeds: Sequence[int], tokenizer: Any,
                      cache: ImageCache, settings: StageSettings, out_dir: str | Path, backbone: Any = None,
                      similarity: SimilarityIndex | None = None, heads_for: Sequence[VQASample] | None = None,
                      max_train: int | None = None, keep_checkpoints: bool = False,
                      frozen: Sequence[str] = (), verbose: bool = True,
                      image_control: bool = False) -> list[CMDPIRun]:
    """For each seed: the pre-trained ``state`` (None: no pre-training) → fine-tune on the
    training split (best epoch on *validation* accuracy) → answer the test split once.

    FFN_A covers the training answers only (:func:`build_answer_vocab`); rows of answers the
    pre-training vocabulary shares are carried over. Similar images come from the model
    *before* fine-tuning (``similarity`` re-uses features computed earlier) at
    ``config.sim_threshold``. ``image_control``: also answer the test questions about shuffled
    images (:func:`~medvqa_lib.experiments.runs.shuffled_images`).
    """
    train = cap(list(splits["train"]), max_train, seed=0)
    val, test = list(splits["val"]), list(splits["test"])
    ensure_splits(train, {"train"}, "training")
    vocab = build_answer_vocab(train)
    records: list[CMDPIRun] = []
    for seed in seeds:
        seed_everything(seed)
        model = build_cmdpi(config, backbone, vocab)
        rows = 0
        if state is not None:
            rows = load_pretrained_for_finetune(model, state, pretrained_vocab)["answer_rows"]
            model.copy_momentum()
        similar = None
        if config.difference_reconstruction:
            if similarity is None:  # the pre-trained model, before any fine-tuning step
                similarity = SimilarityIndex(model, train, cache)
            similar = similarity.table(config.sim_threshold).restricted_to(s.image_id for s in train)
        model.set_stage("finetune")
        freeze(model, frozen)
        out = Path(out_dir) / _slug(label) / dataset / f"seed{seed}"
        stage = dataclasses.replace(settings, seed=seed, out_dir=out)
        trainer = Trainer(model, stage.train_config("val_acc").replace(save_last=False),
                          CMDPIVQADataset(train, cache, vocab, similar),
                          collate_fn=CMDPICollator(tokenizer, settings.max_text_len),
                          evaluate_fn=validation_fn(val, tokenizer, cache, settings))
        result = trainer.fit()
        trainer.load_best()
        _clean(out, keep_checkpoints)
        preds = predict_samples(model, test, tokenizer, cache, batch_size=64, max_question_len=settings.max_text_len)
        scored = score_predictions(test, preds)
        shuffled = None
        if image_control:
            moved = shuffled_images(test, seed)
            shuffled = score_predictions(moved, predict_samples(model, moved, tokenizer, cache, batch_size=64,
                                                                max_question_len=settings.max_text_len))
        heads = answer_heads(model, heads_for, tokenizer, cache, max_question_len=settings.max_text_len) \
            if heads_for else None
        records.append(CMDPIRun(label, dataset, seed, scored, result, preds, shuffled, answers=len(vocab),
                                answer_rows=rows,
                                similar_share=similar.share_with_partner() if similar else float("nan"),
                                heads=heads))
        if verbose:
            acc = scored.groupby("answer_type")["exact"].mean().mul(100).round(1).to_dict()
            print(f"{label:<22} {dataset:<9} seed {seed}: closed {acc.get('closed', float('nan'))}"
                  f" · open {acc.get('open', float('nan'))} · best epoch {result.best_epoch}/{result.epochs}"
                  f" · {result.time_s:.0f} s · {result.samples_per_s:.1f} q/s")
        del model, trainer
    return records


@torch.no_grad()
def answer_heads(model: CMDPI, samples: Sequence[VQASample], tokenizer: Any, cache: ImageCache,
                 batch_size: int = 64, max_question_len: int = 32) -> np.ndarray:
    """The downstream heads ``h_D = H_o[:, -1]`` (Eq. 11) on undeviated inputs, (n, d)."""
    collate = VQACollator(tokenizer, max_question_len)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            b = collate([{"image": cache.get(s), "question": s.question, "answer": s.answer, "qid": s.qid,
                          "answer_type": s.answer_type, "question_type": s.question_type} for s in chunk])
            mask = b["question_mask"].to(dev)
            h_o = model.difference_reconstruct(b["images"].to(dev), b["question_ids"].to(dev), mask)
            pos = model.answer_positions(mask)
            out.append(h_o[torch.arange(len(chunk), device=dev), pos].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.dim), dtype=np.float32)


# ----------------------------------------------------------------------------- analyses


def unseen_answers(suite: Mapping[str, Mapping[str, Sequence[VQASample]]]) -> pd.DataFrame:
    """Per dataset and answer type: test questions, the share whose answer never occurs among
    the training answers (FFN_A cannot output it) and the resulting accuracy ceiling (%)."""
    rows = []
    for name, splits in suite.items():
        vocab = build_answer_vocab(splits["train"])
        test = list(splits["test"])
        ceiling = answer_coverage(vocab, test)
        for kind in ("closed", "open", "overall"):
            n = sum(1 for s in test if kind == "overall" or s.answer_type == kind)
            rows.append({"dataset": name, "questions": kind, "n": n, "training answers": len(vocab),
                         "unseen answer (%)": round(100 * (1 - ceiling[kind]), 1) if n else float("nan"),
                         "ceiling (%)": round(100 * ceiling[kind], 1) if n else float("nan")})
    return pd.DataFrame(rows).set_index(["dataset", "questions"])


def compare_with_prior(records: Sequence[RunRecord], prior_scored: Mapping[str, pd.DataFrame],
                       n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap of CMDPI − prior accuracy per dataset and answer type, CMDPI's accuracy
    on a question being its mean over the seeds (percentage points, 95 % interval;
    ``supported`` when the whole interval is above zero)."""
    by_dataset: dict[str, list[RunRecord]] = {}
    for r in records:
        by_dataset.setdefault(r.dataset, []).append(r)
    return compare_to_prior({k: seed_mean_scores(v) for k, v in by_dataset.items()}, prior_scored,
                            n_resamples=n_resamples, seed=seed, label="CMDPI")


def per_group(records: Mapping[str, Sequence[RunRecord]], by: str, min_n: int = 1) -> pd.DataFrame:
    """Accuracy (%) per ``by`` group (``"organ"``, ``"question_type"``) for each variant, mean
    over its seeds: one row per group, one column per variant, plus the group's size ``n``."""
    cols, sizes = {}, None
    for label, recs in records.items():
        parts = [summarize(r.scored, by=by).set_index(by) for r in recs]
        cols[label] = sum(p["overall_acc"] for p in parts) / len(parts)
        sizes = parts[0]["n"]
    if sizes is None:
        return pd.DataFrame()
    table = pd.DataFrame(cols)
    table.insert(0, "n", sizes)
    return table[table["n"] >= min_n].sort_values("n", ascending=False).round(1)


def case_study(records: Mapping[str, RunRecord], samples: Sequence[VQASample], k: int = 6,
               seed: int = 0) -> tuple[pd.DataFrame, list[VQASample]]:
    """Figure 12: up to ``k`` test questions where the variants disagree — first those the first
    variant (the full model) answers right and another variant wrong, then the reverse, then
    any others — with every variant's answer and the ground truth."""
    labels = list(records)
    preds = {lab: rec.predictions for lab, rec in records.items()}
    by_qid = {s.qid: s for s in samples}
    rng = np.random.default_rng(seed)
    right = {lab: set(rec.scored.loc[rec.scored["exact"].astype(bool), "qid"].astype(str))
             for lab, rec in records.items()}
    full, others = labels[0], labels[1:]
    tiers = [
        [q for q in by_qid if q in right[full] and any(q not in right[o] for o in others)],
        [q for q in by_qid if q not in right[full] and any(q in right[o] for o in others)],
        [q for q in by_qid if q not in right[full]],
    ]
    chosen: list[str] = []
    for tier in tiers:
        tier = [q for q in tier if q not in chosen]
        for i in rng.permutation(len(tier)):
            if len(chosen) >= k:
                break
            chosen.append(tier[i])
    rows = []
    for q in chosen:
        s = by_qid[q]
        row = {"qid": q, "question": s.question, "answer type": s.answer_type}
        for lab in labels:
            row[lab] = f"{preds[lab].get(q, '—')} {'✓' if q in right[lab] else '✗'}"
        row["ground truth"] = s.answer
        rows.append(row)
    return pd.DataFrame(rows), [by_qid[q] for q in chosen]


def ablation_table(records: Mapping[str, Sequence[RunRecord]], reference: str | None = None,
                   n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy (%) of each variant (mean over its seeds) and its difference to ``reference``
    (the first variant by default) with a paired-bootstrap 95 % interval over test questions,
    overall and per answer type. A difference whose interval contains 0 is not evidence."""
    from medvqa_lib.evaluation import paired_bootstrap

    labels = list(records)
    reference = reference or labels[0]
    means = {lab: seed_mean_scores(list(recs)) for lab, recs in records.items()}
    rows = []
    for lab in labels:
        s = summarize(means[lab]).iloc[0]
        row = {"variant": lab, "seeds": len(records[lab]), "closed": s["closed_acc"], "open": s["open_acc"],
               "overall": s["overall_acc"]}
        if lab != reference:
            for kind, name in ((None, "overall"), ("closed", "closed"), ("open", "open")):
                r = paired_bootstrap(means[lab], means[reference], n_resamples=n_resamples, seed=seed,
                                     answer_type=kind)
                row[f"Δ {name} (pp)"] = r["delta"]
                row[f"Δ {name} 95% CI"] = f"[{r['low']:.1f}, {r['high']:.1f}]"
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant").round(1)


def variant_bars(table: pd.DataFrame, title: str, note: str = ""):
    """Grouped bars (closed / open / overall accuracy) per variant, as the paper's Figures 6-8
    and 13-15; ``note`` goes under the title (e.g. "one seed, VQA-RAD test, cpu profile")."""
    import matplotlib.pyplot as plt

    metrics = [m for m in ("open", "closed", "overall") if m in table]
    x = np.arange(len(table))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(table) + 1.5), 3.4))
    for i, m in enumerate(metrics):
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, table[m], width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    finite = table[metrics].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size:
        ax.set_ylim(max(0.0, finite.min() - 10), min(100.0, finite.max() + 8))
    ax.legend(fontsize=8, ncol=len(metrics), loc="lower right")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    return fig


def tsne_figure(heads: Mapping[str, np.ndarray], groups: Sequence[str], seed: int = 0, title: str = ""):
    """Figure 9: a 2-d t-SNE of the answer heads of each model (one panel each), points
    coloured by ``groups`` (the question type of each row)."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    kinds = sorted(set(groups))
    cmap = plt.get_cmap("tab20", max(len(kinds), 1))
    fig, axes = plt.subplots(1, len(heads), figsize=(4.6 * len(heads), 4.2), squeeze=False)
    for ax, (label, h) in zip(axes[0], heads.items(), strict=True):
        n = len(h)
        emb = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca",
                   random_state=seed).fit_transform(np.asarray(h, dtype=np.float32))
        for k, kind in enumerate(kinds):
            sel = np.array([g == kind for g in groups])
            ax.scatter(emb[sel, 0], emb[sel, 1], s=7, color=cmap(k), label=kind, alpha=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, y=1.02, fontsize=10)
    fig.tight_layout()
    return fig


def implied_overall(closed: float, open_: float, n_closed: int, n_open: int) -> float:
    """The overall accuracy that closed and open accuracies imply on a test set of that make-up."""
    return (closed * n_closed + open_ * n_open) / (n_closed + n_open)


def readings_of_the_paper() -> str:
    """The 'Readings of the paper' section of the model's docstring (Markdown-ready)."""
    from medvqa_lib.papers.cmdpi import model as cmdpi

    doc = cmdpi.__doc__ or ""
    start = doc.find("Readings of the paper")
    if start < 0:
        return ""
    body = doc[start:].split("\n", 2)[2] if doc[start:].count("\n") >= 2 else ""
    return body.strip()


#: seconds per 1,000 training samples on the 2-core reference machine (bf16 autocast), measured
#: with the cpu preset at 96 px: pre-training (captions + questions, both reconstructions and
#: both contrasts), fine-tuning (difference reconstruction + head mixup), and answering
CPU_SECONDS_PER_1000 = {"pretrain": 62.0, "finetune": 27.0, "predict": 3.0}


def estimate_seconds(study: CMDPIStudy, datasets: Mapping[str, Mapping[str, int]], corpus: int, *,
                     run_ablations: bool = True, run_sweeps: bool = False,
                     speed: Mapping[str, float] | None = None) -> dict[str, float]:
    """Expected training time of the chapter's runs (seconds, by part) from throughput per
    1,000 samples (default :data:`CPU_SECONDS_PER_1000`). ``datasets``: ``{name: {"train": n,
    "val": n, "test": n}}``; ``corpus``: pre-training rows."""
    sp = dict(CPU_SECONDS_PER_1000, **(speed or {}))

    def pre(n_runs: int) -> float:
        return n_runs * study.pretrain.epochs * corpus * sp["pretrain"] / 1000

    def fine(name: str, n_runs: int, ablation: bool = False) -> float:
        d = datasets[name]
        limit = (study.ablation_max_train or study.max_train) if ablation else study.max_train
        n_train = min(d["train"], limit or d["train"])
        val = min(d["val"], study.finetune.eval_limit or d["val"])
        epochs = (study.ablation_settings if ablation else study.finetune_settings)(name).epochs
        per_run = epochs * (n_train * sp["finetune"] + val * sp["predict"]) + d["test"] * sp["predict"]
        return n_runs * per_run / 1000

    out = {"pre-training": pre(1), "fine-tuning": sum(fine(n, len(study.seeds)) for n in datasets)}
    abl = study.ablation_dataset if study.ablation_dataset in datasets else next(iter(datasets))
    n_abl = len(study.ablation_seeds)
    if run_ablations:
        n_pre = len(study.pretrain_ablation_plan())
        runs = n_pre + len(FINETUNE_VARIANTS) - 1 + 1  # + w/o pre-training
        if not study.ablation_matches_main(abl):
            runs += 1  # the full model again, at the ablation schedule
        out["ablations"] = pre(n_pre) + fine(abl, n_abl * runs, ablation=True)
    if run_sweeps:
        s = study.sweeps
        n_pre = len(s.get("alpha", [])) + len(s.get("rec_weights", []))
        n_fine = n_pre + sum(len(s.get(k, [])) for k in ("ft_weights", "threshold", "beta", "fixed"))
        out["sweeps"] = pre(n_pre) + fine(abl, n_abl * n_fine, ablation=True)
    out["total"] = sum(out.values())
    return out


def _slug(label: str) -> str:
    keep = [c if c.isalnum() or c in "-_." else "_" for c in label.replace("/", "").replace(" ", "_")]
    return "".join(keep).strip("_") or "run"
