"""M2I2's losses, numbered as in the paper (Li et al., ISBI 2023, Sec. 2.2-2.3).

* Eq. 1 :func:`mim_loss`: masked image modelling, L2 on the masked patches only.
* Eq. 2 :func:`mlm_loss`: masked language modelling, cross-entropy at the masked tokens.
* Eq. 3 :func:`itm_loss`: image-text matching, a two-way cross-entropy.
* ITC (Sec. 2.2.4; the paper gives it no number): ALBEF's contrastive loss, the shared
  :func:`medvqa_lib.nn.itc_loss`, re-exported here as :func:`itc_loss`.
* Eq. 4 :func:`pretraining_loss`: the plain sum of the four.
* Eq. 5 :func:`answer_loss`: the answer decoder's conditional language-modelling loss.

:class:`~medvqa_lib.papers.m2i2.model.M2I2` calls each of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from medvqa_lib.nn import itc_loss, normalize_patches

__all__ = ["answer_loss", "itc_loss", "itm_loss", "mim_loss", "mlm_loss", "pretraining_loss"]


def mim_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """Eq. 1: ``L_mim = 1/n * sum_i (P_i - P^_i)^2`` over the n masked patches, where a
    patch's squared error is the mean over its pixel values. ``pred``/``target`` are
    (B, N, p*p*C) (target: :func:`~medvqa_lib.nn.patchify` of the image), ``mask`` (B, N) is
    True at the masked patches; unmasked patches do not enter the loss. ``norm_pix``: regress
    per-patch normalised pixels (MAE's ``norm_pix_loss``)."""
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 2: ``L_mlm = E_(V, T^) H(y_mlm, p_mlm(V, T^))``: cross-entropy of the multimodal
    encoder's predictions ``logits`` (M, vocab) at the M masked caption tokens (given the rest
    of the caption and the image) against the original tokens ``labels`` (M,), averaged over
    the masked tokens of the batch."""
    return F.cross_entropy(logits.float(), labels)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 3: ``L_itm = E_(V, T) H(y_itm, p_itm(V, T))``: cross-entropy of the two-way head on
    the multimodal [CLS] state, ``logits`` (P, 2) for P image-text pairs (matched pairs and
    in-batch hard negatives), against ``labels`` (P,) (1 = matched)."""
    return F.cross_entropy(logits.float(), labels)


def pretraining_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """Eq. 4: ``L = L_mim + L_mlm + L_itm + L_itc``: the plain sum of the terms ``losses``
    holds (a Table 4 ablation leaves its term out)."""
    return sum(losses.values())  # type: ignore[return-value]


def answer_loss(logits: Tensor, targets: Tensor, batch_size: int) -> Tensor:
    """Eq. 5: ``L_theta = -sum_j log P_theta(y_j | y_<j, x, c)``: the answer decoder's
    teacher-forced negative log-likelihood of each answer token, ``logits`` (T, vocab) at the T
    real answer tokens of the batch (answer tokens and [SEP], padding left out) against
    ``targets`` (T,), summed over each answer's tokens and averaged over the ``batch_size``
    answers."""
    return F.cross_entropy(logits.float(), targets, reduction="sum") / batch_size
