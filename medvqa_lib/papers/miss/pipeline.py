"""The MISS chapter's experiments: the TransCap pool, pre-training variants, fine-tuning
factories, retrieval, and the paper's reported numbers.

A study is sized by a run profile (:func:`~medvqa_lib.papers.miss.config.study_plan`).
Pre-training runs once per variant (full model, w/o TransCap, w/o JTM, TransCap at increasing
amounts); fine-tuning then runs per dataset and seed from that variant's weights, always
selecting the epoch on validation data.

Pre-training data (the paper: ROCO-style image-caption pairs + TransCap captions):

* **image-caption pairs** — ROCO when the user has it (local folder or the Hub); otherwise the
  synthetic generator's captions, a labelled stand-in;
* **TransCap** — captions written from the attributes of a single-modality labelled image set:
  SLAKE's own organ/lesion boxes of *training* images when SLAKE is available, else the
  synthetic RSNA-like chest X-rays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medvqa_lib.config import Profile
from medvqa_lib.data.schema import CaptionSample, LabelledImage
from medvqa_lib.experiments.generative import ImageCache, StageSettings, pretrain
from medvqa_lib.experiments.runs import slug, snapshot
from medvqa_lib.papers.miss.config import MISSConfig, MISSStudy, study_plan
from medvqa_lib.papers.miss.model import MISS, build_miss, load_pretrained_for_finetune
from medvqa_lib.training import TrainResult, seed_everything

# (``MISSStudy`` and ``study_plan`` live in config.py; they are importable from here too)
__all__ = ["REPORTED", "MISSStudy", "study_plan", "transcap_pool", "pretrain_variant",
           "finetune_factory", "retrieval_recall"]

#: the MISS paper's own numbers per dataset: (row label, closed, open, overall) in %
REPORTED: dict[str, list[tuple[str, float, float, float]]] = {  # Table 1 ("OURS (w/o TransCap)"), Table 3
    "vqa-rad": [("MISS (w/o TransCap), paper Table 1", 80.35, 71.81, 76.05)],
    "slake": [("MISS (w/o TransCap), paper Table 1", 82.91, 81.47, 82.0),
              ("MISS (JTM + TransCap, 90k), paper Table 3", 84.51, 81.19, 83.0)],
}


# ----------------------------------------------------------------------------- corpora


def transcap_pool(profile: Profile, suite: Mapping[str, Any], root: Path | None = None, seed: int = 0,
                  split: str = "train") -> tuple[list[LabelledImage], str]:
    """The labelled single-modality images TransCap captions: SLAKE's boxes of ``split``
    images when SLAKE is loaded, else the synthetic RSNA-like chest X-rays of ``split``
    (``"train"`` for pre-training, ``"val"`` for held-out checks; never ``"test"``)."""
    if "slake" in suite and root is not None:
        from medvqa_lib.data.slake import load_slake_detection

        return load_slake_detection(split, root=root), f"SLAKE detection boxes ({split} images)"
    from medvqa_lib.data.synthetic import load_synthetic_labelled
    from medvqa_lib.transcap import pretraining_items

    items = load_synthetic_labelled(n_labelled=profile.synthetic_labelled, image_size=profile.synthetic_image_size,
                                    seed=seed)
    return pretraining_items(items, (split,)), f"synthetic RSNA-like chest X-rays ({split} images)"


# ----------------------------------------------------------------------------- runs


def pretrain_variant(label: str, config: MISSConfig, corpus: Sequence[CaptionSample], tokenizer: Any,
                     cache: ImageCache, settings: StageSettings, backbone: Any = None,
                     seed: int = 0) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Pre-train a fresh model on ``corpus``; returns its weights (CPU copy) and the record."""
    seed_everything(seed)
    model = build_miss(config, backbone)
    stage = dataclasses.replace(settings, seed=seed, out_dir=Path(settings.out_dir) / slug(label))
    result = pretrain(model, corpus, tokenizer, cache, stage)
    return snapshot(model), result


def finetune_factory(config: MISSConfig, state: Mapping[str, torch.Tensor] | None, backbone: Any = None,
                     untie_decoder: bool = False) -> Callable[[], MISS]:
    """``make_model()`` for :func:`~medvqa_lib.experiments.runs.finetune_and_test`: a fresh
    model at the fine-tuning image size, from pre-trained ``state`` (or none: w/o pre-training);
    ``untie_decoder`` gives the answer decoder its own weights, as the public VQA code does."""

    def make() -> MISS:
        model = build_miss(config, backbone)
        if state is not None:
            load_pretrained_for_finetune(model, state)
        if untie_decoder:
            model.untie_decoder()
        return model

    return make


@torch.no_grad()
def retrieval_recall(model: MISS, captions: Sequence[CaptionSample], tokenizer: Any, cache: ImageCache,
                     ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, max_len: int = 32) -> pd.DataFrame:
    """Image→text and text→image recall@k of the ITC embeddings on held-out pairs (one caption
    per image; a hit when the paired item is among the top k), with the chance level k/N."""
    model.eval()
    image_feats, text_feats = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        images = torch.stack([cache.get(c) for c in chunk])
        tok = tokenizer([c.caption for c in chunk], padding="longest", truncation=True,
                        max_length=max_len, return_tensors="pt")
        i, t = model.itc_features(images, tok["input_ids"], tok["attention_mask"])
        image_feats.append(i.float())
        text_feats.append(t.float())
    sim = torch.cat(image_feats) @ torch.cat(text_feats).T
    n = sim.shape[0]
    truth = torch.arange(n)
    rows = []
    for k in ks:
        k_ = min(k, n)
        i2t = (sim.topk(k_, dim=1).indices == truth[:, None]).any(1).float().mean().item()
        t2i = (sim.T.topk(k_, dim=1).indices == truth[:, None]).any(1).float().mean().item()
        rows.append({"k": k, "image→text R@k": 100 * i2t, "text→image R@k": 100 * t2i,
                     "chance": 100 * k_ / n})
    return pd.DataFrame(rows).set_index("k").round(1)
