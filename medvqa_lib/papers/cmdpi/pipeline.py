"""The CMDPI chapter's runs: the pre-training corpus, pre-training, and fine-tune → test.

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

Fine-tuning (:func:`finetune_cmdpi`) runs the shared seeds loop
(:func:`~medvqa_lib.experiments.runs.finetune_and_test`) with CMDPI's pieces: each seed starts
from the same pre-trained weights, similar training images come from the pre-trained image
encoder (once per variant and dataset), training uses difference reconstruction and head mixup,
keeps the epoch with the best *validation* accuracy and answers the test split once.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset

from medvqa_lib.config import Profile
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.data.suite import cap
from medvqa_lib.evaluation import AnswerVocabulary, ensure_splits
from medvqa_lib.experiments.corpus import caption_pairs
from medvqa_lib.experiments.generative import (
    CachedCaptionDataset,
    CachedVQADataset,
    StageSettings,
    validation_fn,
)
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.experiments.runs import RunRecord, finetune_and_test, slug, snapshot
from medvqa_lib.papers.cmdpi.answers import build_answer_vocab, load_pretrained_for_finetune
from medvqa_lib.papers.cmdpi.config import CMDPIConfig, CMDPIStudy
from medvqa_lib.papers.cmdpi.data import (
    CMDPICollator,
    CMDPIPretrainCollator,
    CMDPIVQADataset,
    answer_heads,
    predict_samples,
)
from medvqa_lib.papers.cmdpi.model import CMDPI, build_cmdpi
from medvqa_lib.papers.cmdpi.similar import SimilarImages, SimilarityIndex
from medvqa_lib.training import Trainer, TrainResult, seed_everything

__all__ = ["CMDPIRun", "PretrainCorpus", "finetune_cmdpi", "freeze", "pretrain_variant", "pretraining_corpus"]


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
                       study: CMDPIStudy, seed: int = 0, root: Path | None = None, *, real: bool = False,
                       hub: bool = False, verbose: bool = False) -> PretrainCorpus:
    """The pre-training corpus of ``study``: ``study.captions`` caption pairs (ROCO under the
    data folder ``root`` or from the Hub when ``hub``, else synthetic) and VQA rows chosen by
    ``study.pretrain_vqa`` (training splits only; at most ``pretrain_vqa_limit`` per dataset,
    a seeded subset). ``real``: the chapter runs on real VQA data (then only as many synthetic
    images are drawn as stand-in captions need)."""
    captions: list[CaptionSample] = []
    sources: dict[str, str] = {}
    if study.captions > 0:
        captions, sources["captions"] = caption_pairs(_caption_profile(profile, study.captions, real),
                                                      study.captions, seed, root, hub=hub, verbose=verbose)
    vqa: list[VQASample] = []
    if study.pretrain_vqa == "train":
        for splits in suite.values():
            vqa += cap(list(splits["train"]), study.pretrain_vqa_limit, seed)
        sources["vqa"] = "training questions of " + ", ".join(suite)
    elif study.pretrain_vqa == "synthetic":
        from medvqa_lib.data.synthetic import load_synthetic_vqa

        synthetic = load_synthetic_vqa("train", n_images=profile.synthetic_images, image_size=profile.synthetic_image_size,
                                       seed=seed)
        vqa = cap(synthetic, study.pretrain_vqa_limit, seed)
        sources["vqa"] = "synthetic template questions (stand-in for PMC-VQA)"
    ensure_splits(vqa, {"train"}, "pre-training")
    vocab = build_answer_vocab(vqa) if vqa else None
    return PretrainCorpus(captions, vqa, vocab, sources)


# ----------------------------------------------------------------------------- pre-training


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
    encoders: fine-tuning rebuilds them as copies) and the training record (``out_dir`` =
    ``settings.out_dir / slug(label)``). ``frozen``: parameter-name prefixes that get no gradient."""
    seed_everything(seed)
    model = build_cmdpi(config, backbone, corpus.vocab).set_stage("pretrain")
    freeze(model, frozen)
    out = Path(settings.out_dir) / slug(label)
    stage = dataclasses.replace(settings, seed=seed, out_dir=out)
    collate = CMDPIPretrainCollator(tokenizer, corpus.vocab, min(settings.max_text_len, config.max_text_len))
    trainer = Trainer(model, stage.train_config("train_loss").replace(save_last=False),
                      corpus.dataset(cache), collate_fn=collate, evaluate_fn=None)
    result = trainer.fit()
    _clean(out, keep_checkpoints)
    return {k: v for k, v in snapshot(model).items() if "_encoder_m." not in k}, result


# ----------------------------------------------------------------------------- fine-tuning


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


@dataclass
class _Finetuning:
    """CMDPI's pieces of the shared fine-tune → test loop on one dataset: ``make_model``,
    ``fit``, ``answer`` and ``finish`` (see :func:`~medvqa_lib.experiments.runs.finetune_and_test`)."""

    config: CMDPIConfig
    state: Mapping[str, torch.Tensor] | None
    pretrained_vocab: AnswerVocabulary | None
    vocab: AnswerVocabulary
    tokenizer: Any
    cache: ImageCache
    settings: StageSettings
    backbone: Any
    similarity: SimilarityIndex | None
    heads_for: Sequence[VQASample] | None
    keep_checkpoints: bool
    frozen: Sequence[str]
    answer_rows: int = 0
    similar: SimilarImages | None = None

    def make_model(self) -> CMDPI:
        """A fresh model with the pre-trained weights (FFN_A rows carried over by answer)."""
        model = build_cmdpi(self.config, self.backbone, self.vocab)
        self.answer_rows = 0
        if self.state is not None:
            self.answer_rows = load_pretrained_for_finetune(model, self.state, self.pretrained_vocab)["answer_rows"]
            model.copy_momentum()
        return model

    def fit(self, model: CMDPI, splits: Mapping[str, Sequence[VQASample]], stage: StageSettings) -> TrainResult:
        """Similar images from the model before fine-tuning, then difference reconstruction and
        head mixup with the best epoch on validation accuracy."""
        train = splits["train"]
        self.similar = None
        if self.config.difference_reconstruction:
            if self.similarity is None:  # the pre-trained model, before any fine-tuning step
                self.similarity = SimilarityIndex(model, train, self.cache)
            self.similar = self.similarity.table(self.config.sim_threshold).restricted_to(s.image_id for s in train)
        model.set_stage("finetune")
        freeze(model, self.frozen)
        trainer = Trainer(model, stage.train_config("val_acc").replace(save_last=False),
                          CMDPIVQADataset(train, self.cache, self.vocab, self.similar),
                          collate_fn=CMDPICollator(self.tokenizer, stage.max_text_len),
                          evaluate_fn=validation_fn(model, splits["val"], self.tokenizer, self.cache, stage,
                                                    answer=self.answer))
        result = trainer.fit()
        trainer.load_best()
        _clean(Path(stage.out_dir), self.keep_checkpoints)
        return result

    def answer(self, model: CMDPI, questions: Sequence[VQASample]) -> dict[str, str]:
        return predict_samples(model, questions, self.tokenizer, self.cache, batch_size=64,
                               max_question_len=self.settings.max_text_len)

    def finish(self, record: RunRecord, model: CMDPI) -> CMDPIRun:
        heads = None
        if self.heads_for:
            heads = answer_heads(model, self.heads_for, self.tokenizer, self.cache,
                                 max_question_len=self.settings.max_text_len)
        return CMDPIRun(**{f.name: getattr(record, f.name) for f in dataclasses.fields(RunRecord)},
                        answers=len(self.vocab), answer_rows=self.answer_rows,
                        similar_share=self.similar.share_with_partner() if self.similar else float("nan"),
                        heads=heads)


def finetune_cmdpi(label: str, config: CMDPIConfig, state: Mapping[str, torch.Tensor] | None,
                   pretrained_vocab: AnswerVocabulary | None, dataset: str,
                   splits: Mapping[str, Sequence[VQASample]], seeds: Sequence[int], tokenizer: Any,
                   cache: ImageCache, settings: StageSettings, out_dir: str | Path, backbone: Any = None,
                   similarity: SimilarityIndex | None = None, heads_for: Sequence[VQASample] | None = None,
                   max_train: int | None = None, keep_checkpoints: bool = False,
                   frozen: Sequence[str] = (), verbose: bool = True,
                   image_control: bool = False) -> list[CMDPIRun]:
    """For each seed: the pre-trained ``state`` (None: no pre-training) → fine-tune on the
    training split (at most ``max_train`` questions; best epoch on *validation* accuracy) →
    answer the test split once, through the shared
    :func:`~medvqa_lib.experiments.runs.finetune_and_test`.

    FFN_A covers the training answers only (:func:`build_answer_vocab`); rows of answers the
    pre-training vocabulary shares are carried over. Similar images come from the model
    *before* fine-tuning (``similarity`` re-uses features computed earlier) at
    ``config.sim_threshold``. ``heads_for``: questions whose answer heads ``h_D`` each run
    keeps (Figure 9). ``image_control``: also answer the test questions about shuffled images.
    """
    train = cap(list(splits["train"]), max_train, seed=0)
    ensure_splits(train, {"train"}, "training")
    vocab = build_answer_vocab(train)
    run = _Finetuning(config, state, pretrained_vocab, vocab, tokenizer, cache, settings, backbone, similarity,
                      heads_for, keep_checkpoints, frozen)
    data = {dataset: {"train": train, "val": list(splits["val"]), "test": list(splits["test"])}}
    return finetune_and_test(label, run.make_model, data, seeds, tokenizer, settings, out_dir, cache,
                             verbose=verbose, image_control=image_control, fit=run.fit, answer=run.answer,
                             finish=run.finish)
