"""MISS's training objectives, numbered as in the paper (Chen et al., Sec. 3.3 and 3.5).

* ITC, Eqs. 2-3: the shared :func:`medvqa_lib.nn.itc_loss`; MISS's targets (captions of the
  same image are positives, in the batch and in the queue) come from :func:`itc_targets`;
* ITM, Eq. 4: :func:`itm_loss`;
* MLM through the decoder, Eq. 5: :func:`mlm_loss`;
* LM, Sec. 3.5 (VQA fine-tuning, and the ``"lm"`` pre-training variant): :func:`lm_loss`.

Pre-training minimises ITC + ITM + the decoder loss (Eq. 5, or LM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["itc_targets", "itm_loss", "lm_loss", "mlm_loss"]


@torch.no_grad()
def itc_targets(image_ids: Tensor | None, queued_ids: Tensor) -> Tensor | None:
    """The ground truth ``y^{i2t}``, ``y^{t2i}`` of Eq. 3 over the batch and the queue.

    Row i spreads probability 1 evenly over every column (batch, then queue) whose image id is
    its own: a caption of the same image counts as a positive. ``queued_ids`` holds the ids of
    the queued features (-1 for none). Without ids: None (pair i is the only positive of row i).
    """
    if image_ids is None:
        return None
    pos = (image_ids[:, None] == torch.cat([image_ids, queued_ids])[None]).float()
    return pos / pos.sum(1, keepdim=True)


def itm_loss(itm_logits: Tensor, n_matched: int) -> Tensor:
    """Eq. 4 of the paper: ``L_ITM = E H(L, P_IT)``, the cross-entropy of the matching head.

    ``itm_logits`` (N, 2) are the head's scores on the multimodal [ENC] states; the first
    ``n_matched`` rows are matched image-text pairs (label 1), the others hard negatives (0).
    """
    labels = (torch.arange(itm_logits.shape[0], device=itm_logits.device) < n_matched).long()
    return F.cross_entropy(itm_logits, labels)


def mlm_loss(hidden: Tensor, labels: Tensor, lm_head: Callable[[Tensor], Tensor]) -> Tensor:
    """Eq. 5 of the paper: ``L_MLM = E H(y^msk, p^msk(I, T^))``.

    The decoder read the caption with 15 % of its tokens masked BERT-style (80 % [MASK], 10 %
    random, 10 % kept; :func:`medvqa_lib.nn.mask_tokens`) while attending to the image.
    ``hidden`` holds its states, ``labels`` the original token where one was masked and -100
    elsewhere; each masked token is predicted at its own position.
    """
    return _labelled_cross_entropy(hidden, labels, lm_head)


def lm_loss(hidden: Tensor, labels: Tensor, lm_head: Callable[[Tensor], Tensor]) -> Tensor:
    """``L_LM`` of Sec. 3.5: causal language modelling, the state at position t predicts token
    t+1 (positions labelled -100, e.g. padding, are ignored).

    In VQA fine-tuning the decoder reads ``[DEC] answer [SEP]`` while attending to the JTM
    states of the question (which attended to the image through the cross-attention of Eq. 1),
    so this is ``-log p(A | Q, I)``. With ``decoder_objective="lm"`` it replaces Eq. 5 in
    pre-training on the unmasked caption (BLIP, and the authors' public code).
    """
    return _labelled_cross_entropy(hidden[:, :-1], labels[:, 1:], lm_head)


def _labelled_cross_entropy(hidden: Tensor, labels: Tensor, lm_head: Callable[[Tensor], Tensor]) -> Tensor:
    """Cross-entropy of ``lm_head`` on the labelled positions only (the head runs on those)."""
    keep = labels != -100
    logits = lm_head(hidden[keep])
    if logits.shape[0] == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(logits.float(), labels[keep])
