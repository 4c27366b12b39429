"""Similar images for difference reconstruction (Sec. 3.3, Sec. 4.2): other *training* images
whose global feature ``h_I`` from the model before fine-tuning has a cosine similarity above
the threshold (0.75 in the paper)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medvqa_lib.evaluation.guards import ensure_splits

if TYPE_CHECKING:
    from medvqa_lib.papers.cmdpi.model import CMDPI

__all__ = ["SimilarImages", "SimilarityIndex", "build_similar_images", "image_global_features", "similar_pairs"]


def similar_pairs(features: Tensor, threshold: float = 0.75, max_similarity: float | None = None
                  ) -> list[list[int]]:
    """For each row, the other rows with cosine similarity ``> threshold`` (and ``<=
    max_similarity`` when given); a row is never its own partner."""
    f = F.normalize(features.float(), dim=-1)
    sim = f @ f.t()
    ok = sim > threshold
    if max_similarity is not None:
        ok &= sim <= max_similarity
    ok.fill_diagonal_(False)
    return [row.nonzero().squeeze(1).tolist() for row in ok]


@dataclass
class SimilarImages:
    """Similar training images per image id (Sec. 4.2), computed once and serialisable."""

    threshold: float
    partners: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_features(cls, image_ids: Sequence[str], features: Tensor, threshold: float = 0.75,
                      max_similarity: float | None = None) -> SimilarImages:
        ids = list(image_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("image ids must be distinct")
        pairs = similar_pairs(features, threshold, max_similarity)
        return cls(threshold, {ids[i]: [ids[j] for j in js] for i, js in enumerate(pairs)})

    def sample(self, image_id: str) -> str:
        """A random similar image (global torch RNG), or ``image_id`` itself when there is none."""
        options = self.partners.get(image_id, [])
        return options[int(torch.randint(len(options), ()))] if options else image_id

    def restricted_to(self, image_ids: Iterable[str]) -> SimilarImages:
        """The same pairs among ``image_ids`` only (e.g. a capped training subset): a partner
        outside the set is dropped, so difference reconstruction never reads an unseen image."""
        keep = set(image_ids)
        return SimilarImages(self.threshold, {k: [p for p in v if p in keep]
                                              for k, v in self.partners.items() if k in keep})

    def share_with_partner(self) -> float:
        """Fraction of images that have at least one similar image."""
        return sum(bool(v) for v in self.partners.values()) / max(len(self.partners), 1)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "partners": self.partners}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarImages:
        return cls(float(data["threshold"]), {k: list(v) for k, v in data["partners"].items()})


@torch.no_grad()
def image_global_features(model: CMDPI, images: Iterable[Tensor], batch_size: int = 64) -> Tensor:
    """Global image features h_I (n, d) of single images (3, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    feats, chunk = [], []
    try:
        for image in images:
            chunk.append(image)
            if len(chunk) == batch_size:
                feats.append(model.image_encoder(torch.stack(chunk).to(dev))[:, 0].float().cpu())
                chunk = []
        if chunk:
            feats.append(model.image_encoder(torch.stack(chunk).to(dev))[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats) if feats else torch.zeros(0, model.config.dim)


class SimilarityIndex:
    """Global image features ``h_I`` of a dataset's *training* images from one pre-trained
    model, computed once; :meth:`table` thresholds them (Figure 14 re-uses the features).
    ``cache.get(sample)`` gives the image tensor (:class:`~medvqa_lib.experiments.images.ImageCache`)."""

    def __init__(self, model: CMDPI, train: Sequence[Any], cache: Any, batch_size: int = 64) -> None:
        ensure_splits(train, {"train"}, "finding similar images for difference reconstruction")
        first: dict[str, Any] = {}
        for s in train:
            first.setdefault(s.image_id, s)
        self.image_ids = list(first)
        self.features = image_global_features(model, (cache.get(s) for s in first.values()), batch_size)

    def table(self, threshold: float, max_similarity: float | None = None) -> SimilarImages:
        return SimilarImages.from_features(self.image_ids, self.features, threshold, max_similarity)

    def similarity_quantiles(self, qs: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[float, float]:
        """Quantiles of the off-diagonal cosine similarities (how the threshold cuts them)."""
        f = F.normalize(self.features.float(), dim=-1)
        sim = f @ f.t()
        off = sim[~torch.eye(len(f), dtype=torch.bool)]
        if off.numel() == 0:
            return {q: float("nan") for q in qs}
        return {q: float(torch.quantile(off[:1_000_000], q)) for q in qs}


def build_similar_images(model: CMDPI, train_samples: Sequence[Any], cache: Any,
                         threshold: float | None = None, batch_size: int = 64,
                         max_similarity: float | None = None) -> SimilarImages:
    """Similar-image table over the distinct images of the *training* samples, from the
    (pre-trained) model's global image features at ``threshold`` (the model's
    ``sim_threshold`` by default)."""
    thr = model.config.sim_threshold if threshold is None else threshold
    return SimilarityIndex(model, train_samples, cache, batch_size).table(thr, max_similarity)
