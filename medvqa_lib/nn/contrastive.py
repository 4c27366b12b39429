"""Contrastive pre-training helpers (ALBEF/BLIP): momentum encoders, feature queues, the
image-text contrastive loss and hard-negative mining for image-text matching."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _param_pairs(model: nn.Module, momentum_model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    src = dict(model.named_parameters())
    names = [n for n, _ in momentum_model.named_parameters()]
    missing = [n for n in names if n not in src]
    if missing:
        raise KeyError(f"momentum parameters without a counterpart in the model: {missing[:5]}")
    return [src[n] for n in names], [p for _, p in momentum_model.named_parameters()]


@torch.no_grad()
def copy_params(model: nn.Module, momentum_model: nn.Module) -> None:
    """Copy ``model``'s parameters into ``momentum_model`` (matched by name) and freeze them."""
    for p, p_m in zip(*_param_pairs(model, momentum_model), strict=True):
        p_m.copy_(p)
        p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(model: nn.Module, momentum_model: nn.Module, m: float) -> None:
    """EMA: ``p_m <- m * p_m + (1 - m) * p`` for every parameter of ``momentum_model``."""
    params, params_m = _param_pairs(model, momentum_model)
    torch._foreach_lerp_(params_m, params, 1.0 - m)


class FeatureQueue(nn.Module):
    """A ring buffer of the ``size`` most recent rows (features, or ids with ``dim=None``).

    ``enqueue`` writes at ``ptr`` and wraps around; ``get`` returns the filled rows.
    """

    def __init__(self, dim: int | None, size: int, dtype: torch.dtype = torch.float32,
                 fill: float = 0.0) -> None:
        super().__init__()
        shape = (size,) if dim is None else (size, dim)
        self.size = size
        self.register_buffer("data", torch.full(shape, fill, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, feats: Tensor) -> None:
        """Add ``feats`` (oldest entries are overwritten)."""
        feats = feats.detach()[-self.size:].to(self.data.dtype)
        n = feats.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.data.device)) % self.size
        self.data.index_copy_(0, idx, feats)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.clamp_(max=self.size - n).add_(n)

    def get(self) -> Tensor:
        """The filled rows (all ``size`` once the queue has wrapped)."""
        return self.data[: int(self.count)]


def itc_loss(image_feat: Tensor, text_feat: Tensor, image_feat_all: Tensor, text_feat_all: Tensor,
             temp: Tensor | float, sim_targets: Tensor | None = None, alpha: float = 0.0,
             image_feat_m: Tensor | None = None, text_feat_m: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Image-text contrastive loss (ALBEF's ITC; MISS's Eqs. 2-3, M2I2's ITC): softmax
    similarities of each image to all texts (batch + queue) and of each text to all images,
    cross-entropy against the targets, averaged over both directions:
    ``L = 1/2 E[H(y_i2t, p_i2t) + H(y_t2i, p_t2i)]``.

    ``*_feat`` are the (B, E) online features, ``*_feat_all`` the (B+M, E) momentum features of
    the batch followed by the queue. ``sim_targets`` (B, B+M) defaults to the diagonal (pair i
    is the positive of row i). With ``alpha > 0`` the targets are mixed with the momentum
    model's own softmax similarities (momentum distillation); the momentum batch features
    default to the first B rows of ``*_feat_all``. Returns (loss, sim_i2t, sim_t2i).
    """
    b = image_feat.shape[0]
    sim_i2t = image_feat @ text_feat_all.t() / temp  # S(I, T) / tau
    sim_t2i = text_feat @ image_feat_all.t() / temp  # S(T, I) / tau
    with torch.no_grad():
        if sim_targets is None:
            sim_targets = torch.zeros_like(sim_i2t)
            sim_targets[:, :b].fill_diagonal_(1.0)
        t_i2t = t_t2i = sim_targets
        if alpha > 0:
            image_feat_m = image_feat_all[:b] if image_feat_m is None else image_feat_m
            text_feat_m = text_feat_all[:b] if text_feat_m is None else text_feat_m
            t_i2t = alpha * F.softmax(image_feat_m @ text_feat_all.t() / temp, 1) + (1 - alpha) * sim_targets
            t_t2i = alpha * F.softmax(text_feat_m @ image_feat_all.t() / temp, 1) + (1 - alpha) * sim_targets
    loss_i2t = -(F.log_softmax(sim_i2t, 1) * t_i2t).sum(1).mean()  # H(y^{i2t}, p^{i2t})
    loss_t2i = -(F.log_softmax(sim_t2i, 1) * t_t2i).sum(1).mean()  # H(y^{t2i}, p^{t2i})
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


def hard_negative_indices(sim_i2t: Tensor, sim_t2i: Tensor, generator: torch.Generator | None = None,
                          image_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One in-batch hard negative per row, sampled with softmax(similarity) probabilities.

    Uses the first B columns of the (B, B+M) similarities. The positive (diagonal) and, given
    ``image_ids``, every pair of the same image get probability zero. Returns
    (negative image index for each text, negative text index for each image). A row with no
    valid negative (a batch of one image) falls back to a uniform off-diagonal choice.
    """
    b = sim_i2t.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
    same = eye if image_ids is None else eye | (image_ids[:, None] == image_ids[None, :])

    def sample(sim: Tensor) -> Tensor:
        logits = sim[:, :b].detach().float().masked_fill(same, float("-inf"))
        empty = same.all(1, keepdim=True)
        logits = torch.where(empty, torch.zeros_like(logits).masked_fill(eye, float("-inf")), logits)
        if b == 1:
            return torch.zeros(1, dtype=torch.long, device=sim.device)
        probs = F.softmax(logits, dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample(sim_t2i), sample(sim_i2t)


# ----------------------------------------------------------------------------- generative VQA helpers


def image_id_tensor(image_ids: Any, device: torch.device) -> Tensor | None:
    """Image ids as int64 (strings are hashed stably so ids match across batches)."""
    if image_ids is None:
        return None
    if torch.is_tensor(image_ids):
        return image_ids.to(device=device, dtype=torch.long)
    vals = [v if isinstance(v, int) else
            int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=7).digest(), "little")
            for v in image_ids]
    return torch.tensor(vals, dtype=torch.long, device=device)
