"""The CMDPI paper's equations as functions, numbered as in the paper (He et al., Sec. 3).

Pre-training (Sec. 3.2): Eq. 5 (:func:`image_rec_loss`, :func:`text_rec_loss`,
:func:`answer_loss`, :func:`reconstruction_loss`), Eq. 6 (:func:`contrastive_loss`) and Eq. 7
(:func:`contra_loss`). Fine-tuning (Sec. 3.3): Eq. 8 (:func:`deviate_features`), Eq. 10
(:func:`difference_reconstruction_loss`), Eq. 11 (:func:`head_mixup`, with
:func:`sample_lambda` and :func:`mixup_partners`), Eq. 12 (:func:`soft_cross_entropy`) and
Eq. 13 (:func:`finetune_loss`). Eqs. 1-4 and 9 are forward passes of the model
(:mod:`medvqa_lib.papers.cmdpi.model`), which calls these functions; Eq. 2's global and local
reconstruction are the two halves of one RecNet pass there (``CMDPI._pretrain_reconstruction``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medvqa_lib.nn import normalize_patches
from medvqa_lib.papers.cmdpi.config import LAMBDA_MODES

__all__ = [
    "answer_loss", "contra_loss", "contrastive_loss", "deviate_features", "difference_reconstruction_loss",
    "finetune_loss", "head_mixup", "image_rec_loss", "mixup_partners", "reconstruction_loss", "sample_lambda",
    "soft_cross_entropy", "text_rec_loss",
]


# ----------------------------------------------------------------------------- Eq. 5


def image_rec_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None,
                   norm_pix: bool = False) -> Tensor:
    """Eq. 5 of the paper: ``L_img = MSE(Output_I, Input_I)``, the squared error averaged over
    pixel values, then over the scored patches.

    ``pred``/``target`` (..., P); ``mask`` (...) bool picks the scored patches (None = all).
    ``norm_pix`` normalises each target patch to zero mean, unit variance (MAE). Zero when
    nothing is scored.
    """
    if norm_pix:
        target = normalize_patches(target)
    err = (pred.float() - target.float()).pow(2).mean(-1)
    if mask is not None:
        err = err[mask]
    return err.mean() if err.numel() else pred.sum() * 0.0


def _masked_ce(logits: Tensor, labels: Tensor) -> Tensor:
    keep = labels != -100
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), labels[keep])


def text_rec_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 5 of the paper: ``L_txt = CrossEntropy(Output_T, Input_T)`` over the vocabulary
    logits (..., V) on labelled positions (labels -100 elsewhere); zero when nothing is labelled."""
    return _masked_ce(logits, labels)


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 5 of the paper: ``L_ans = CrossEntropy(Ans', Ans)`` over the answer classes (B, A);
    rows labelled -100 (no answer: captions, or an answer outside the vocabulary) are skipped.
    Also the plain answer loss of the "w/o head mixup" fine-tuning ablation."""
    return _masked_ce(logits, labels)


def reconstruction_loss(l_img: Tensor, l_txt: Tensor, l_ans: Tensor, w_img: float = 1.0, w_txt: float = 1.0,
                        w_ans: float = 1.0) -> Tensor:
    """Eq. 5 of the paper: ``L_rec = L_img + L_txt + L_ans``, one per reconstruction (global
    and local, Eq. 2); the weights are appendix Table 3's (all 1 in the paper)."""
    return w_img * l_img + w_txt * l_txt + w_ans * l_ans


# ----------------------------------------------------------------------------- Eqs. 6-7


def contra_loss(a: Tensor, b: Tensor, temp: float) -> Tensor:
    """Eq. 7 of the paper: ``Contra(a, b) = -1/N sum_i log softmax_j(sim(a^i, b^j) / tau)[i]``
    with cosine similarity; pair i is the positive of row i. Zero for an empty batch."""
    if a.shape[0] == 0:
        return a.sum() * 0.0
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t() / temp
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def contrastive_loss(h_i: Tensor, h_t: Tensor, h_i_m: Tensor | None, h_t_m: Tensor | None,
                     temp: float, alpha: float = 0.5, alpha_prime: float = 1.0, *,
                     inter: bool = True, intra: bool = True) -> dict[str, Tensor]:
    """Eq. 6 of the paper: ``C_inter = Contra(h_I, h_T) + Contra(h_T, h_I)``, ``C_intra =
    Contra(h_I, h^_I) + Contra(h_T, h^_T)`` (momentum features, used without gradient) and
    ``C_total = alpha C_inter + alpha' C_intra``. A switched-off term is absent from the result."""
    out: dict[str, Tensor] = {}
    total = h_i.sum() * 0.0
    if inter:
        out["c_inter"] = contra_loss(h_i, h_t, temp) + contra_loss(h_t, h_i, temp)
        total = total + alpha * out["c_inter"]
    if intra:
        if h_i_m is None or h_t_m is None:
            raise ValueError("C_intra needs the momentum encoders' features")
        out["c_intra"] = contra_loss(h_i, h_i_m.detach(), temp) + contra_loss(h_t, h_t_m.detach(), temp)
        total = total + alpha_prime * out["c_intra"]
    out["c_total"] = total
    return out


# ----------------------------------------------------------------------------- Eqs. 8-10


def deviate_features(local: Tensor, similar: Tensor, eps: Tensor | float) -> Tensor:
    """Eq. 8 of the paper (feature deviation): ``H~_I = eps H_I + (1 - eps) H^_I``; ``eps``
    scalar or (B,)."""
    if torch.is_tensor(eps) and eps.dim() > 0:
        eps = eps.view(-1, *([1] * (local.dim() - 1))).to(local.dtype)
    return eps * local + (1 - eps) * similar


def difference_reconstruction_loss(l_img_d: Tensor, l_txt_d: Tensor) -> Tensor:
    """Eq. 10 of the paper: ``L_diff^d = L_img^d + L_txt^d``, the image and text reconstruction
    losses (Eq. 5's :func:`image_rec_loss` and :func:`text_rec_loss`) of the current sample
    rebuilt from its deviated features (Eq. 9)."""
    return l_img_d + l_txt_d


# ----------------------------------------------------------------------------- Eqs. 11-13


def sample_lambda(n: int, mode: str = "uniform", beta: tuple[float, float] = (1.0, 1.0),
                  fixed: float = 0.5, device: torch.device | str = "cpu") -> Tensor:
    """Eq. 11's mixing coefficients (n,): U[0, 1] (the paper), Beta(a, b) (appendix Table 5) or a
    constant (Figure 15). Uses the global torch RNG."""
    if mode == "uniform":
        return torch.rand(n, device=device)
    if mode == "beta":
        dist = torch.distributions.Beta(torch.tensor(float(beta[0])), torch.tensor(float(beta[1])))
        return dist.sample((n,)).to(device)
    if mode == "fixed":
        return torch.full((n,), float(fixed), device=device)
    raise ValueError(f"mix_lambda must be one of {LAMBDA_MODES}, got {mode!r}")


def mixup_partners(groups: Sequence[Hashable], valid: Sequence[bool] | Tensor | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """Eq. 11's other sample: for each row, a random *other* valid row of the same group (organ,
    question type, Sec. 4.2); the row itself when it has none (no mixing). Invalid rows get
    themselves."""
    n = len(groups)
    ok = [True] * n if valid is None else [bool(v) for v in valid]
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        if ok[i]:
            members.setdefault(g, []).append(i)
    out = list(range(n))
    for i, g in enumerate(groups):
        others = [j for j in members.get(g, []) if j != i] if ok[i] else []
        if others:
            out[i] = others[int(torch.randint(len(others), ()))]
    return torch.tensor(out, dtype=torch.long, device=device)


def head_mixup(heads: Tensor, labels: Tensor, partner: Tensor, lam: Tensor, num_classes: int
               ) -> tuple[Tensor, Tensor]:
    """Eq. 11 of the paper: ``h_mix = lam h_D + (1 - lam) h^_D`` and ``Ans_mix = lam Ans +
    (1 - lam) Ans^`` (one-hot answers). ``partner`` (B,) indexes the rows of ``heads``; ``lam``
    (B,). Labels must be valid (>= 0). Each mixed target sums to 1."""
    lam = lam.to(heads.dtype)
    h_mix = lam[:, None] * heads + (1 - lam[:, None]) * heads[partner]
    one_hot = F.one_hot(labels, num_classes).to(heads.dtype)
    target = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[partner]
    return h_mix, target


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Eq. 12 of the paper: ``L_mix = CrossEntropy(FFN_A(h_mix), Ans_mix) = -sum_k target_k
    log softmax(logits)_k``, averaged over rows."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -(target.float() * F.log_softmax(logits.float(), -1)).sum(-1).mean()


def finetune_loss(l_mix: Tensor, l_diff: Tensor | None = None, w_mix: float = 1.0, w_diff: float = 1.0) -> Tensor:
    """Eq. 13 of the paper: ``L_ft = L_mix + L_diff^d`` (weights: appendix Table 4, 1 in the
    paper). Without difference reconstruction (``l_diff`` None) it is ``w_mix L_mix``; without
    head mixup ``l_mix`` is the plain answer loss."""
    total = w_mix * l_mix if l_diff is None else w_diff * l_diff + w_mix * l_mix
    return total.float()
