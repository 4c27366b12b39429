"""The paper's objective and equations as functions.

* :func:`answer_only_loss` — the fine-tuning objective: next-token cross-entropy on the
  answer tokens only (Section 4.2; the paper fine-tunes PaliGemma's causal LM on the suffix).
  :func:`answer_token_nll` is the same masked loss summed per sample (the validation loss).
* :func:`scaling_law` — Eq. 1, the fine-tuning scaling law, and :func:`fit_scaling_law`, its
  least-squares fit.

Eq. 2 (attention from response tokens to image patches, the saliency) lives with the other
saliency code in :mod:`medvqa_lib.papers.paligemma.saliency`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

__all__ = ["IGNORE_INDEX", "answer_mask", "answer_only_loss", "answer_token_nll", "scaling_law",
           "fit_scaling_law"]

#: label of every position that is not an answer token (image, <bos>, prompt, padding)
IGNORE_INDEX = -100


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """The answer-only loss mask over next-token targets: True where position ``t + 1`` is an
    answer token (or the final ``<eos>``), i.e. where ``labels[:, 1:]`` is not ``-100``."""
    return labels[:, 1:] != IGNORE_INDEX


def answer_only_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fine-tuning objective, the mean over answer tokens of

    ``L = -sum_{t in answer} log p(y_t | y_<t, image, prompt)``.

    ``labels`` are the input ids with ``-100`` everywhere but the answer (the processor's
    ``suffix``); logits at position ``t`` predict token ``t + 1``. Computed as Hugging Face's
    causal-LM loss is (float32 logits, labels padded by one ``-100`` and shifted, mean
    reduction), so it equals the model's own ``loss`` bit for bit.
    """
    logits = logits.float()
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="mean")


def answer_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer-only loss summed per sample: ``(negative log-likelihood, answer tokens)``,
    each of shape ``(batch,)`` (the validation loss of Figures 7-8 is their ratio)."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.sum(1), answer_mask(labels).sum(1)


def scaling_law(xd: np.ndarray, a: float, alpha: float, beta: float, e: float) -> np.ndarray:
    """Eq. 1 of the paper, the fine-tuning scaling law:
    ``L~(X, D_f) = A · X^-alpha · D_f^-beta + E`` for ``xd = (X, D_f)``
    (``X`` the epochs, ``D_f`` the fine-tuning data volume)."""
    x, d = xd
    return a * np.power(x, -alpha) * np.power(d, -beta) + e


def fit_scaling_law(points: pd.DataFrame, x: str = "epoch", d: str = "tokens", loss: str = "val_loss"
                    ) -> dict[str, float]:
    """Least-squares fit of Eq. 1 (``scipy.optimize.curve_fit``, non-negative parameters):
    ``A``, ``alpha``, ``beta``, ``E``, the fit's ``R2`` and the number of ``points``."""
    from scipy.optimize import curve_fit

    data = points[[x, d, loss]].dropna()
    if len(data) < 5:
        raise ValueError(f"Eq. 1 has 4 parameters; {len(data)} points are too few to fit")
    xd = np.vstack([data[x].to_numpy(float), data[d].to_numpy(float)])
    y = data[loss].to_numpy(float)
    p0 = (max(y.max() - y.min(), 1e-3), 0.5, 0.1, max(y.min() * 0.9, 0.0))
    params, _ = curve_fit(scaling_law, xd, y, p0=p0, bounds=(0, np.inf), maxfev=20_000)
    pred = scaling_law(xd, *params)
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    return {"A": params[0], "alpha": params[1], "beta": params[2], "E": params[3], "R2": r2, "points": len(y)}
