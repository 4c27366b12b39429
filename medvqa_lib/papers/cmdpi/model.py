"""CMDPI: Cross-Modality Discriminative Pattern Identification (He et al., "Rethinking Medical
VQA Models: Towards Data-Efficient Learning").

Three modules (Sec. 3.1, Fig. 2), all Transformers:

* **image encoder** — a ViT plus a linear map to the shared width ``d``: the head token gives
  the global vector ``h_I``, the patch tokens the local features ``H_I`` (N x d);
* **text encoder** — a BERT-family stack plus a linear map to ``d``: [CLS] gives ``h_T``, the
  other tokens ``H_T`` (M x d); ``GlobalFusion`` (an FFN over ``[h_I; h_T]``) gives ``h_F``
  (Eq. 1);
* **reconstruction network** (:class:`RecNet`) — post-LN GELU Transformer over
  ``[h, H_I, H_T] + pos`` (Eq. 3) with three heads (Eq. 4): ``FFN_I`` (pixels of each patch),
  ``FFN_T`` (text vocabulary) and ``FFN_A`` (answer classes, the training answer set).

Co-regularised pre-training (Sec. 3.2): global reconstruction (head vector ``h_F`` of the
*unmasked* input) and local reconstruction (a shared trainable vector ``h~``) of the *masked*
image and text (Eqs. 2-5), plus inter-modality (``h_I`` <-> ``h_T``) and intra-modality (each
encoder vs its momentum encoder) contrastive learning, ``C = alpha C_inter + alpha' C_intra``
(Eqs. 6-7). Captions go to reconstruction and contrast, VQA data to reconstruction only
(Sec. 3.2.3; ``contrastive_on_vqa=True`` is Figure 6's "Contra.QA" variant).

Fine-tuning (Sec. 3.3): difference reconstruction (Eqs. 8-10) — the local image features are
mixed with those of a similar training image, ``H~_I = eps H_I + (1 - eps) H^_I``, and RecNet
must still rebuild the current image and text — and head mixup (Eqs. 11-12) on the answer
head ``h_D``; ``L_ft = w_mix L_mix + w_diff L_diff`` (Eq. 13, Table 4). Inference reads
``FFN_A`` on the undeviated features: CMDPI is a classifier over the training answers, so a test
answer that never occurs in training is always counted wrong (:func:`answer_coverage` gives
that ceiling per answer type).

``model(batch)`` runs :meth:`CMDPI.forward_pretrain` or :meth:`CMDPI.forward_finetune`
depending on ``model.stage`` (``"pretrain"`` or ``"finetune"``) and returns ``{"loss": ...,
"loss_*": ...}``, so :class:`~medvqa_lib.training.Trainer` drives both stages.

Readings of the paper
---------------------
There is no public code; where the text leaves a choice, this module takes the reading below.

1. **One width d.** Eq. 1 gives ``H_I`` and ``H_T`` the same width d, so each encoder ends in a
   linear map from its backbone width to d (the paper's RecNet width, 512). ``h_I``/``h_T`` in
   Eqs. 6-7 are these d-dimensional head vectors; there are no extra projection heads.
2. **Eq. 4's indices** are read 1-based and inclusive over ``[h, I_1..I_N, T_1..T_M]``: image
   outputs at 1..N, text outputs at N+1..N+M (Python slices ``1:N+1`` and ``N+1:``).
   ``Ans' = FFN_A(H_o[:, -1])`` reads the *last* position of that sequence, i.e. the text's
   last token; with BERT tokenisation that is the closing [SEP] (never masked), taken per row
   at the last non-padding position. No extra answer token is added (Eq. 3's v_0 has none).
3. **Masking (rho).** The paper names one mask ratio rho without a value. The image and text
   ratios are separate settings, defaulting to MAE's 0.75 for patches and BERT's 0.15 for tokens
   (set both equal for a single rho). Images are masked MAE-style: masked patches are dropped
   from the image encoder's input and RecNet receives a learned mask vector at their slots
   (RecNet reads N image positions, Eq. 4). Text is masked BERT-style (80 % [MASK], 10 %
   random, 10 % kept). Global and local reconstruction share the same masked inputs.
4. **Scored positions.** Pre-training losses score the masked patches and masked tokens only
   (MAE/BERT practice; Eq. 5 literally compares whole outputs: ``rec_masked_only=False``
   scores every patch and every non-special token). Image targets are the input pixels as the
   model sees them (normalised to [-1, 1]), optionally per-patch normalised (``norm_pix_loss``).
5. **L_rec** of Eq. 5 is computed for the global and for the local reconstruction and the two
   are summed; ``L_ans`` exists only for rows that have an answer (VQA rows), captions have none.
   Pre-training VQA answers are classes of the same answer head (:func:`remap_answer_head` and
   :func:`load_pretrained_for_finetune` carry rows over to the fine-tuning answer set).
6. **Contrastive.** Eq. 7 exactly: in-batch negatives only (no MoCo queue), cosine
   similarity, fixed temperature tau = 0.07 (not given). ``C_inter`` is the *sum* of both
   directions. The momentum encoders (EMA, m = 0.995, not given) are copies of the image and
   text encoders including their maps to d, see the same unmasked inputs and get no gradient.
   The reported ``loss_inter``/``loss_intra`` are unscaled; the total uses alpha, alpha'.
7. **Fine-tuning text** is unmasked (Eq. 8 uses ``H_T``), so ``L_txt^d`` scores every
   non-special question token; ``L_img^d`` scores every patch of the *current* image.
8. **eps and lambda** are drawn per sample (U[0, 1]; lambda may be Beta(a, b) or fixed,
   appendix Table 5 / Figure 15).
9. **Similar images** are other *training* images whose global feature ``h_I`` (from the model
   before fine-tuning) has cosine similarity strictly above the threshold (0.75); computed once
   (:class:`SimilarImages`, serialisable). The appendix also says the threshold "filters out
   highly redundant samples", which a lower bound cannot do; an optional upper bound
   ``max_similarity`` exists, off by default. An image without a similar partner uses itself
   (no deviation). The similar image is encoded by the online encoder (with gradient) and is
   only a source of features: it is neither reconstructed nor answered — our reading of
   "feature deviation ... exclusively to the current sample, excluding the sampled similar
   image".
10. **Head-mixup partner**: another row of the same batch with the same organ and question type
    whose ``h^_D = H^d_o[:, -1]`` comes from its own difference reconstruction (the paper's
    ``H^d_o``); a row without such a partner in the batch is not mixed (``lambda`` has no
    effect). Partners can also be given explicitly (``mix_index``).
11. **Ablations.** "w/o difference reconstruction" = no deviation and no ``L_diff`` (the answer
    head reads ``RecNet(h_F, H_I, H_T)``); "w/o head mixup" = plain cross-entropy on ``h_D``.
12. **Inference** uses no deviation (eps = 1) and takes the arg-max over the training answers.
13. **Unstated sizes.** GlobalFusion = Linear(2d, d)-GELU-Linear(d, d); FFN_I/T/A =
    dense-GELU-LayerNorm-linear (BERT's prediction-head shape); RecNet has learned positional
    embeddings, 8 heads, 4d MLP, dropout 0.1 and no input LayerNorm (Eq. 3 has none).
14. **Text side.** The paper initialises both encoders from CLIP. The library's text side is
    BERT-family (``medvqa_lib.text``), so the ``gpu`` profile uses CLIP's image tower (timm
    ``vit_base_patch16_clip_224.openai``) with bert-base-uncased (or MiniLM offline) as text
    encoder; head_T is [CLS].
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from medvqa_lib.data.dataset import VQACollator, stack_images
from medvqa_lib.evaluation.answers import AnswerVocabulary
from medvqa_lib.evaluation.guards import ensure_splits
from medvqa_lib.evaluation.normalize import normalize_answer
from medvqa_lib.nn import (
    LMHead,
    Packing,
    SpecialIds,
    TextTransformer,
    TransformerLayer,
    build_vit,
    copy_params,
    init_bert_weights,
    load_bert_weights,
    mask_tokens,
    momentum_update,
    normalize_patches,
    padding_mask,
    patchify,
    random_patch_mask,
)

__all__ = [
    "CMDPI",
    "PAPER_TRAINING",
    "CMDPICollator",
    "CMDPIConfig",
    "CMDPIPretrainCollator",
    "CMDPIVQADataset",
    "RecNet",
    "SimilarImages",
    "answer_coverage",
    "answer_loss",
    "build_answer_vocab",
    "build_cmdpi",
    "build_similar_images",
    "contra_loss",
    "contrastive_loss",
    "deviate_features",
    "head_mixup",
    "image_global_features",
    "image_rec_loss",
    "load_pretrained_for_finetune",
    "mixup_partners",
    "predict_samples",
    "remap_answer_head",
    "sample_lambda",
    "similar_pairs",
    "soft_cross_entropy",
    "text_rec_loss",
]

#: the training settings the paper states (Sec. 4.2); what it leaves out is absent
PAPER_TRAINING: dict[str, Any] = {
    "optimizer": "AdamW", "pretrain_epochs": 100, "finetune_epochs": 300, "finetune_lr": 7.5e-6,
    "batch_size": 32, "rec_depth": 4, "rec_width": 512, "sim_threshold": 0.75,
    "alpha": 0.5, "alpha_prime": 1.0, "pretrain_data": "ROCO train 65k + PMC-VQA 49k",
}

LAMBDA_MODES = ("uniform", "beta", "fixed")
STAGES = ("pretrain", "finetune")


@dataclass
class CMDPIConfig:
    """Sizes, loss weights and ablation switches of a :class:`CMDPI` (see :meth:`from_profile`)."""

    # image encoder
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    #: timm weights for the ViT, loaded only when the Hub is reachable
    vit_pretrained: str | None = None
    drop_path: float = 0.0
    # text encoder
    #: "tiny", "minilm", "bert-base-uncased" or "auto" (see medvqa_lib.text)
    text_backbone: str = "auto"
    #: text layers; None = all layers of the backbone
    text_depth: int | None = None
    #: dropout of the text stack; None = the backbone's
    dropout: float | None = None
    attn_dropout: float = 0.0
    #: longest text (with [CLS]/[SEP]) RecNet has positions for
    max_text_len: int = 64
    # shared width d and the reconstruction network (Eq. 3)
    dim: int = 512
    rec_depth: int = 4
    rec_heads: int = 8
    rec_mlp_ratio: float = 4.0
    rec_dropout: float = 0.1
    #: outputs of FFN_A; build_cmdpi(answer_vocab=...) sets it to the vocabulary size
    num_answers: int = 2
    # pre-training (Sec. 3.2)
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.15
    #: score masked patches/tokens only (False: every patch and non-special token, Eq. 5 literally)
    rec_masked_only: bool = True
    norm_pix_loss: bool = False
    #: Eq. 5 / appendix Table 3 weights of L_img, L_txt, L_ans
    w_img: float = 1.0
    w_txt: float = 1.0
    w_ans: float = 1.0
    #: Eq. 6 scaling of C_inter (alpha) and C_intra (alpha')
    alpha: float = 0.5
    alpha_prime: float = 1.0
    temp: float = 0.07
    momentum: float = 0.995
    # pre-training ablations (Figures 6-7)
    global_rec: bool = True
    local_rec: bool = True
    inter_contrastive: bool = True
    intra_contrastive: bool = True
    contrastive_on_vqa: bool = False
    # fine-tuning (Sec. 3.3) and its ablations (Figure 8, Table 4, Figure 14, Table 5, Figure 15)
    difference_reconstruction: bool = True
    head_mixup: bool = True
    w_mix: float = 1.0
    w_diff: float = 1.0
    sim_threshold: float = 0.75
    mix_lambda: str = "uniform"
    mix_beta: tuple[float, float] = (1.0, 1.0)
    mix_fixed: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.mix_lambda not in LAMBDA_MODES:
            raise ValueError(f"mix_lambda must be one of {LAMBDA_MODES}, got {self.mix_lambda!r}")
        for name in ("image_mask_ratio", "text_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.mix_fixed <= 1.0:
            raise ValueError(f"mix_fixed must be in [0, 1], got {self.mix_fixed}")
        if self.num_answers < 1:
            raise ValueError("num_answers must be >= 1")
        self.mix_beta = tuple(self.mix_beta)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_profile(cls, profile: Any, **overrides: Any) -> CMDPIConfig:
        """The preset of a run profile (``"smoke"``, ``"cpu"``, ``"gpu"`` or a
        :class:`~medvqa_lib.config.Profile`, whose image size and text backbone are used).

        ``gpu`` has the paper's sizes (ViT-B/16 from CLIP when online, RecNet 4 x 512). ``cpu``
        keeps RecNet's 4 layers at width 192 with a 4-layer 192-d ViT on 128 px images and the
        full MiniLM: measured ~3.8 s CPU time per pre-training step of 32 captions and ~2.2 s per
        fine-tuning step of 32 questions on one core (fp32).
        """
        name = getattr(profile, "name", profile)
        presets = {
            "smoke": dict(image_size=64, vision_width=128, vision_depth=2, vision_heads=4,
                          text_backbone="tiny", dim=128, rec_depth=2, rec_heads=4),
            "cpu": dict(image_size=128, vision_width=192, vision_depth=4, vision_heads=3,
                        text_backbone="minilm", dim=192, rec_depth=4, rec_heads=4),
            "gpu": dict(image_size=224, vision_width=768, vision_depth=12, vision_heads=12,
                        vit_pretrained="vit_base_patch16_clip_224.openai", text_backbone="auto",
                        dim=512, rec_depth=4, rec_heads=8),
        }
        if name not in presets:
            raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(presets)}")
        values = dict(presets[name])
        if not isinstance(profile, str):
            values.update(image_size=profile.image_size, text_backbone=profile.text_backbone)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> CMDPIConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- losses and ops






def image_rec_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None,
                   norm_pix: bool = False) -> Tensor:
    """L_img (Eq. 5): squared error averaged over pixel values, then over the scored patches.

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
    """L_txt (Eq. 5): cross-entropy of the vocabulary logits (..., V) on labelled positions
    (labels -100 elsewhere); zero when nothing is labelled."""
    return _masked_ce(logits, labels)


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_ans (Eq. 5): cross-entropy over the answer classes (B, A); rows labelled -100 (no
    answer: captions, or an answer outside the vocabulary) are skipped."""
    return _masked_ce(logits, labels)


def contra_loss(a: Tensor, b: Tensor, temp: float) -> Tensor:
    """Contra(a, b) of Eq. 7: ``-1/N sum_i log softmax_j(sim(a^i, b^j) / tau)[i]`` with cosine
    similarity; pair i is the positive of row i. Zero for an empty batch."""
    if a.shape[0] == 0:
        return a.sum() * 0.0
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t() / temp
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def contrastive_loss(h_i: Tensor, h_t: Tensor, h_i_m: Tensor | None, h_t_m: Tensor | None,
                     temp: float, alpha: float = 0.5, alpha_prime: float = 1.0, *,
                     inter: bool = True, intra: bool = True) -> dict[str, Tensor]:
    """Eq. 6: ``C_inter = Contra(h_I, h_T) + Contra(h_T, h_I)``, ``C_intra = Contra(h_I, h^_I)
    + Contra(h_T, h^_T)`` (momentum features, used without gradient) and ``C_total = alpha
    C_inter + alpha' C_intra``. A switched-off term is absent from the result."""
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


def deviate_features(local: Tensor, similar: Tensor, eps: Tensor | float) -> Tensor:
    """Feature deviation (Eq. 8): ``eps * H_I + (1 - eps) * H^_I``; ``eps`` scalar or (B,)."""
    if torch.is_tensor(eps) and eps.dim() > 0:
        eps = eps.view(-1, *([1] * (local.dim() - 1))).to(local.dtype)
    return eps * local + (1 - eps) * similar


def sample_lambda(n: int, mode: str = "uniform", beta: tuple[float, float] = (1.0, 1.0),
                  fixed: float = 0.5, device: torch.device | str = "cpu") -> Tensor:
    """Head-mixup coefficients (n,): U[0, 1] (the paper), Beta(a, b) (Table 5) or a constant
    (Figure 15). Uses the global torch RNG."""
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
    """For each row, a random *other* valid row of the same group (organ, question type);
    the row itself when it has none (no mixing). Invalid rows get themselves."""
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
    """Eq. 11: ``h_mix = lam h_D + (1 - lam) h^_D`` and ``Ans_mix = lam Ans + (1 - lam) Ans^``
    (one-hot answers). ``partner`` (B,) indexes the rows of ``heads``; ``lam`` (B,). Labels must
    be valid (>= 0). Each mixed target sums to 1."""
    lam = lam.to(heads.dtype)
    h_mix = lam[:, None] * heads + (1 - lam[:, None]) * heads[partner]
    one_hot = F.one_hot(labels, num_classes).to(heads.dtype)
    target = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[partner]
    return h_mix, target


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """L_mix (Eq. 12): ``-sum_k target_k log softmax(logits)_k``, averaged over rows."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -(target.float() * F.log_softmax(logits.float(), -1)).sum(-1).mean()


# ----------------------------------------------------------------------------- modules


class ImageEncoder(nn.Module):
    """ViT + linear map to d: (B, 1+n, d) with the head token first. ``keep`` (B, n_keep)
    encodes only these patches (MAE-style masking, Eq. 2)."""

    def __init__(self, vit: nn.Module, width: int, dim: int) -> None:
        super().__init__()
        self.vit = vit
        self.proj = nn.Linear(width, dim)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        v = self.vit
        p = v.num_prefix_tokens
        x = v._pos_embed(v.patch_embed(images))
        if keep is not None:
            patches = x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :p], patches], 1)
        x = v.norm(v.blocks(v.norm_pre(v.patch_drop(x))))
        if p > 1:  # register tokens are not features
            x = torch.cat([x[:, :1], x[:, p:]], 1)
        return self.proj(x)


class TextEncoder(nn.Module):
    """BERT-style stack + linear map to d: (B, L, d), [CLS] first (zeros-mapped at padding)."""

    def __init__(self, bert: TextTransformer, dim: int) -> None:
        super().__init__()
        self.bert = bert
        self.proj = nn.Linear(bert.dim, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, first_only: bool = False) -> Tensor:
        return self.proj(self.bert(input_ids, attention_mask, first_only=first_only))


class RecNet(nn.Module):
    """Eq. 3: ``v_0 = [h, H_I, H_T] + pos``; post-LN self-attention/GELU-FFN layers.

    Padding text positions are masked out as keys (and skipped, see
    :class:`~medvqa_lib.nn.Packing`); their outputs are zeros.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, n_image: int,
                 max_text_len: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_image = n_image
        self.pos = nn.Parameter(torch.zeros(1, 1 + n_image + max_text_len, dim))
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, mlp_dim, cross_attention=False, causal=False, dropout=dropout,
                             layer_norm_eps=1e-6)
            for _ in range(depth))
        self.apply(init_bert_weights)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, head: Tensor, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """``head`` (B, d), ``image_tokens`` (B, N, d), ``text_tokens`` (B, M, d), ``text_mask``
        (B, M) 0/1 -> ``H_o`` (B, 1+N+M, d)."""
        b, n, m = head.shape[0], image_tokens.shape[1], text_tokens.shape[1]
        length = 1 + n + m
        if length > self.pos.shape[1]:
            raise ValueError(f"RecNet has {self.pos.shape[1]} positions, the input needs {length}: "
                             "raise max_text_len or truncate the text")
        x = torch.cat([head[:, None].to(image_tokens.dtype), image_tokens, text_tokens], 1)
        x = x + self.pos[:, :length]
        mask = torch.cat([text_mask.new_ones(b, 1 + n), text_mask], 1)
        packing = Packing(mask, b, length)
        attn = padding_mask(mask, x.dtype)
        x = packing.pack(x)
        for layer in self.layers:
            x = layer(x, attn, packing=packing)
        return packing.pad(x)


class CMDPI(nn.Module):
    """Image encoder + text encoder + GlobalFusion + RecNet with FFN_I/FFN_T/FFN_A, momentum
    encoders for C_intra. ``model(batch)`` dispatches on :attr:`stage`."""

    def __init__(self, config: CMDPIConfig, text_config: Any, ids: SpecialIds,
                 answer_vocab: AnswerVocabulary | None = None) -> None:
        super().__init__()
        if answer_vocab is not None:
            config = config.replace(num_answers=len(answer_vocab))
        c, t = config, text_config
        self.config, self.ids, self.answer_vocab = c, ids, answer_vocab
        self.stage = "pretrain"
        d = c.dim
        vit = build_vit(c.image_size, c.patch_size, c.vision_width, c.vision_depth, c.vision_heads,
                        pretrained=c.vit_pretrained, drop_path=c.drop_path)
        self.image_encoder = ImageEncoder(vit, c.vision_width, d)
        bert = TextTransformer(t.vocab_size, t.hidden_size, c.text_depth or t.num_hidden_layers,
                               t.num_attention_heads, t.intermediate_size, None,
                               max_len=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                               dropout=t.hidden_dropout_prob if c.dropout is None else c.dropout,
                               attn_dropout=c.attn_dropout)
        self.text_encoder = TextEncoder(bert, d)
        self.fusion = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))  # GlobalFusion
        self.local_head = nn.Parameter(torch.zeros(d))  # h~ of local reconstruction
        self.image_mask_token = nn.Parameter(torch.zeros(d))
        self.recnet = RecNet(d, c.rec_depth, c.rec_heads, int(c.rec_mlp_ratio * d), c.n_patches,
                             c.max_text_len, c.rec_dropout)
        self.ffn_i = LMHead(d, c.patch_size ** 2 * 3)
        self.ffn_t = LMHead(d, t.vocab_size)
        self.ffn_a = LMHead(d, c.num_answers)
        for m in (self.image_encoder.proj, self.text_encoder.proj, self.fusion):
            m.apply(init_bert_weights)
        nn.init.normal_(self.local_head, std=0.02)
        nn.init.normal_(self.image_mask_token, std=0.02)
        self.image_encoder_m = copy.deepcopy(self.image_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.copy_momentum()
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ construction

    @property
    def n_patches(self) -> int:
        return self.recnet.n_image

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.image_encoder, self.image_encoder_m), (self.text_encoder, self.text_encoder_m)]

    def copy_momentum(self) -> None:
        """Reset the momentum encoders to the online weights (frozen)."""
        for model, model_m in self.momentum_pairs():
            copy_params(model, model_m)

    def train(self, mode: bool = True) -> CMDPI:
        """Momentum encoders always run without dropout."""
        super().train(mode)
        for _, model_m in self.momentum_pairs():
            model_m.eval()
        return self

    def set_stage(self, stage: str) -> CMDPI:
        """``"pretrain"`` or ``"finetune"``: what ``model(batch)`` runs."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        return self

    @classmethod
    def from_text_backbone(cls, config: CMDPIConfig, backbone: Any,
                           answer_vocab: AnswerVocabulary | None = None) -> CMDPI:
        """Build from a :class:`~medvqa_lib.text.TextBackbone` (its BERT weights when pretrained)."""
        model = cls(config, backbone.config, SpecialIds.from_tokenizer(backbone.tokenizer), answer_vocab)
        if backbone.pretrained:
            load_bert_weights(model.text_encoder.bert, backbone.load_encoder())
            model.copy_momentum()
        model.tokenizer = backbone.tokenizer
        return model

    # ------------------------------------------------------------------ shared pieces

    def fuse(self, h_i: Tensor, h_t: Tensor) -> Tensor:
        """GlobalFusion (Eq. 1): h_F = FFN([h_I; h_T])."""
        return self.fusion(torch.cat([h_i, h_t], -1))

    def encode(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, ...]:
        """Eq. 1: (h_I, H_I, h_T, H_T, h_F) of unmasked inputs."""
        x_i = self.image_encoder(images)
        x_t = self.text_encoder(text_ids, text_mask)
        h_i, h_t = x_i[:, 0], x_t[:, 0]
        return h_i, x_i[:, 1:], h_t, x_t[:, 1:], self.fuse(h_i, h_t)

    def answer_positions(self, text_mask: Tensor) -> Tensor:
        """Index in ``H_o`` of each row's last text token (the "-1" of Eq. 4), given the mask
        of the full text including [CLS]."""
        return self.n_patches + text_mask[:, 1:].sum(1).long()

    def encode_answers(self, answers: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
        """Answer classes of the vocabulary; -100 for answers outside it."""
        if self.answer_vocab is None:
            raise ValueError("the model has no answer vocabulary: build it with answer_vocab=... "
                             "or pass answer_labels")
        unk = self.answer_vocab.unk_index
        return torch.tensor([-100 if (i := self.answer_vocab.encode(a)) == unk else i for a in answers],
                            dtype=torch.long, device=device)

    def _text_targets(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Every valid non-special token as a target (-100 elsewhere)."""
        special = torch.isin(text_ids, torch.tensor(self.ids.specials, device=text_ids.device))
        return text_ids.masked_fill((text_mask == 0) | special, -100)

    def _rec_losses(self, h_o: Tensor, pixels: Tensor, img_scored: Tensor | None, txt_labels: Tensor,
                    ans_labels: Tensor | None, ans_pos: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """L_img, L_txt, L_ans of Eqs. 4-5 (heads run on the scored positions only)."""
        n = self.n_patches
        img_h = h_o[:, 1:1 + n]
        if img_scored is not None:
            img_h, pixels = img_h[img_scored], pixels[img_scored]
        l_img = image_rec_loss(self.ffn_i(img_h), pixels, norm_pix=self.config.norm_pix_loss)
        keep = txt_labels != -100
        l_txt = text_rec_loss(self.ffn_t(h_o[:, 1 + n:][keep]), txt_labels[keep])
        l_ans = None
        if ans_labels is not None:
            rows = (ans_labels != -100).nonzero().squeeze(1)
            l_ans = answer_loss(self.ffn_a(h_o[rows, ans_pos[rows]]), ans_labels[rows])
        return l_img, l_txt, l_ans

    # ------------------------------------------------------------------ pre-training

    def forward_pretrain(self, images: Tensor, text_ids: Tensor, text_mask: Tensor,
                         answer_labels: Tensor | None = None, is_caption: Tensor | None = None
                         ) -> dict[str, Tensor]:
        """Co-regularised pre-training (Sec. 3.2) on a batch of captions and/or questions.

        ``answer_labels`` (B,) answer classes, -100 for rows without an answer (captions);
        ``is_caption`` (B,) bool: rows that enter contrastive learning (all rows with
        ``contrastive_on_vqa``). Returns ``loss`` and ``loss_global``/``loss_local`` (L_rec of
        each reconstruction), ``loss_img``/``loss_txt``/``loss_ans`` (their sums over both),
        ``loss_inter``/``loss_intra`` (unscaled C_inter/C_intra), each only when switched on.
        """
        c, b, dev = self.config, images.shape[0], images.device
        if is_caption is None:
            is_caption = torch.ones(b, dtype=torch.bool, device=dev)
        contrast = torch.ones_like(is_caption) if c.contrastive_on_vqa else is_caption.bool()
        use_contrast = c.inter_contrastive or c.intra_contrastive
        out: dict[str, Tensor] = {}
        total = images.new_zeros(())

        h_i = h_t = None
        if c.global_rec or use_contrast:  # Eq. 1 on the unmasked input (only the heads are needed)
            h_i = self.image_encoder(images)[:, 0]
            h_t = self.text_encoder(text_ids, text_mask, first_only=True)[:, 0]

        if c.global_rec or c.local_rec:
            rec = self._pretrain_reconstruction(images, text_ids, text_mask, answer_labels, h_i, h_t)
            for name in ("global", "local"):
                if f"loss_{name}" in rec:
                    total = total + rec[f"loss_{name}"]
            out.update(rec)

        if use_contrast:
            h_i_m = h_t_m = None
            rows = contrast.nonzero().squeeze(1)
            if c.intra_contrastive:
                with torch.no_grad():
                    if self.training:
                        for model, model_m in self.momentum_pairs():
                            momentum_update(model, model_m, c.momentum)
                    if rows.numel():
                        h_i_m = self.image_encoder_m(images[rows])[:, 0]
                        h_t_m = self.text_encoder_m(text_ids[rows], text_mask[rows], first_only=True)[:, 0]
                    else:  # no caption rows: C_intra is zero
                        h_i_m, h_t_m = h_i[rows], h_t[rows]
            cl = contrastive_loss(h_i[rows], h_t[rows], h_i_m, h_t_m, c.temp, c.alpha, c.alpha_prime,
                                  inter=c.inter_contrastive, intra=c.intra_contrastive)
            total = total + cl["c_total"]
            for name in ("inter", "intra"):
                if f"c_{name}" in cl:
                    out[f"loss_{name}"] = cl[f"c_{name}"]
        return {"loss": total, **{k: v.detach() for k, v in out.items()}}

    def _pretrain_reconstruction(self, images: Tensor, text_ids: Tensor, text_mask: Tensor,
                                 answer_labels: Tensor | None, h_i: Tensor | None, h_t: Tensor | None
                                 ) -> dict[str, Tensor]:
        """Eq. 2: mask, encode, run RecNet once on [global rows; local rows] (same masked
        features, different head vector), score each half with Eqs. 4-5."""
        c, b, n = self.config, images.shape[0], self.n_patches
        keep, masked = random_patch_mask(b, n, c.image_mask_ratio, images.device)
        visible = self.image_encoder(images, keep)[:, 1:]
        d = visible.shape[-1]
        h_img = self.image_mask_token.to(visible.dtype).expand(b, n, d).scatter(
            1, keep[..., None].expand(-1, -1, d), visible)
        ids_masked, txt_labels = mask_tokens(text_ids, self.ids, c.text_mask_ratio)
        h_txt = self.text_encoder(ids_masked, text_mask)[:, 1:]
        if c.rec_masked_only:
            img_scored, txt_labels = masked, txt_labels[:, 1:]
        else:
            img_scored, txt_labels = None, self._text_targets(text_ids, text_mask)[:, 1:]

        heads = {}
        if c.global_rec:
            heads["global"] = self.fuse(h_i, h_t)
        if c.local_rec:
            heads["local"] = self.local_head.expand(b, -1)
        k = len(heads)
        h_o = self.recnet(torch.cat(list(heads.values())), h_img.repeat(k, 1, 1), h_txt.repeat(k, 1, 1),
                          text_mask[:, 1:].repeat(k, 1))
        pixels = patchify(images, c.patch_size)
        ans_pos = self.answer_positions(text_mask)
        out: dict[str, Tensor] = {}
        sums: dict[str, Tensor] = {}
        for i, name in enumerate(heads):
            l_img, l_txt, l_ans = self._rec_losses(h_o[i * b:(i + 1) * b], pixels, img_scored, txt_labels,
                                                   answer_labels, ans_pos)
            if l_ans is None:
                l_ans = l_img.new_zeros(())
            out[f"loss_{name}"] = c.w_img * l_img + c.w_txt * l_txt + c.w_ans * l_ans
            for key, value in (("img", l_img), ("txt", l_txt), ("ans", l_ans)):
                sums[key] = sums[key] + value if key in sums else value
        out.update({f"loss_{key}": value.detach() for key, value in sums.items()})
        return out

    # ------------------------------------------------------------------ fine-tuning

    def difference_reconstruct(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                               similar_images: Tensor | None = None, eps: Tensor | None = None
                               ) -> Tensor:
        """Eq. 8: ``H^d_o = RecNet(h_F, eps H_I + (1 - eps) H^_I, H_T)``; without
        ``similar_images`` (or with eps = 1) this is the plain pass ``RecNet(h_F, H_I, H_T)``.
        ``eps`` (B,) defaults to U[0, 1] per row."""
        h_i, local, h_t, h_txt, h_f = self.encode(images, question_ids, question_mask)
        if similar_images is not None:
            similar = self.image_encoder(similar_images)[:, 1:]
            if eps is None:
                eps = torch.rand(images.shape[0], device=images.device)
            local = deviate_features(local, similar, eps)
        return self.recnet(h_f, local, h_txt, question_mask[:, 1:])

    def forward_finetune(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                         answer_labels: Tensor, similar_images: Tensor | None = None,
                         mix_index: Tensor | None = None, groups: Sequence[Hashable] | None = None
                         ) -> dict[str, Tensor]:
        """Fine-tuning loss ``w_mix L_mix + w_diff L_diff`` (Eqs. 8-13).

        ``answer_labels`` (B,) classes (-100: outside the answer set, no answer loss);
        ``similar_images`` (B, 3, H, W) one similar training image per row (the row's own image
        when it has none); ``mix_index`` (B,) head-mixup partner rows, else drawn among rows of
        equal ``groups`` (e.g. (organ, question type)). Returns ``loss``, ``loss_diff``
        (+ ``loss_diff_img``/``loss_diff_txt``) when difference reconstruction is on, and
        ``loss_mix`` with head mixup or ``loss_ans`` without.
        """
        c, b = self.config, images.shape[0]
        if c.difference_reconstruction and similar_images is None:
            raise ValueError("difference reconstruction needs similar_images (see CMDPICollator), "
                             "or set difference_reconstruction=False")
        h_o = self.difference_reconstruct(images, question_ids, question_mask,
                                          similar_images if c.difference_reconstruction else None)
        out: dict[str, Tensor] = {}
        total = images.new_zeros(())
        if c.difference_reconstruction:  # Eqs. 9-10, on the current sample only
            l_img, l_txt, _ = self._rec_losses(h_o, patchify(images, c.patch_size), None,
                                               self._text_targets(question_ids, question_mask)[:, 1:],
                                               None, None)
            out.update(loss_diff=l_img + l_txt, loss_diff_img=l_img, loss_diff_txt=l_txt)
            total = total + c.w_diff * out["loss_diff"]
        h_d = h_o[torch.arange(b, device=images.device), self.answer_positions(question_mask)]
        valid = answer_labels != -100
        if c.head_mixup:  # Eqs. 11-12
            if mix_index is None:
                if groups is None:
                    raise ValueError("head mixup needs mix_index or groups (organ, question type)")
                mix_index = mixup_partners(groups, valid.tolist(), images.device)
            partner = torch.where(valid[mix_index], mix_index, torch.arange(b, device=images.device))
            lam = sample_lambda(b, c.mix_lambda, c.mix_beta, c.mix_fixed, images.device)
            rows = valid.nonzero().squeeze(1)
            labels = answer_labels.clamp(min=0)
            h_mix, target = head_mixup(h_d, labels, partner, lam, c.num_answers)
            out["loss_mix"] = soft_cross_entropy(self.ffn_a(h_mix[rows]), target[rows])
            total = total + c.w_mix * out["loss_mix"]
        else:
            out["loss_ans"] = answer_loss(self.ffn_a(h_d), answer_labels)
            total = total + c.w_mix * out["loss_ans"]
        return {"loss": total, **{k: v.detach() for k, v in out.items()}}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def answer_logits(self, images: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """FFN_A logits (B, A) on the undeviated features, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            h_o = self.difference_reconstruct(images, question_ids, question_mask)
            pos = self.answer_positions(question_mask)
            return self.ffn_a(h_o[torch.arange(images.shape[0], device=images.device), pos]).float()
        finally:
            self.train(was_training)

    def predict(self, images: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """Arg-max answer class per question (B,)."""
        return self.answer_logits(images, question_ids, question_mask).argmax(-1)

    def predict_answers(self, batch: Mapping[str, Any]) -> list[str]:
        """Answer strings (from the training answer set) for a VQA batch."""
        if self.answer_vocab is None:
            raise ValueError("the model has no answer vocabulary")
        idx = self.predict(batch["images"], batch["question_ids"], batch["question_mask"])
        return [self.answer_vocab.decode(i) for i in idx.tolist()]

    # ------------------------------------------------------------------ training-loop entry

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """``model(batch)``: :meth:`forward_pretrain` (stage "pretrain") on ``text_ids``/
        ``text_mask`` (or caption or question keys) with optional ``answer_labels``/``answers``
        and ``is_caption``; :meth:`forward_finetune` (stage "finetune") on the VQA keys plus
        ``answer_labels`` (or ``answers``), ``similar_images``, ``mix_index`` or
        ``organs``/``question_types``."""
        images = batch["images"]
        dev = images.device
        if self.stage == "pretrain":
            caption = "question_ids" not in batch
            if "text_ids" in batch:
                ids, mask = batch["text_ids"], batch["text_mask"]
            elif "caption_ids" in batch:
                ids, mask = batch["caption_ids"], batch["caption_mask"]
            elif "input_ids" in batch:
                ids, mask = batch["input_ids"], batch["attention_mask"]
            else:
                ids, mask = batch["question_ids"], batch["question_mask"]
            labels = batch.get("answer_labels")
            if labels is None and not caption and "answers" in batch:
                labels = self.encode_answers(batch["answers"], dev)
            is_caption = batch.get("is_caption")
            if is_caption is None:
                is_caption = torch.full((images.shape[0],), caption, dtype=torch.bool, device=dev)
            return self.forward_pretrain(images, ids, mask, labels, is_caption)
        labels = batch.get("answer_labels")
        if labels is None:
            labels = self.encode_answers(batch["answers"], dev)
        groups = None
        if "question_types" in batch:
            organs = batch.get("organs") or [None] * len(batch["question_types"])
            groups = list(zip(organs, batch["question_types"], strict=True))
        return self.forward_finetune(images, batch["question_ids"], batch["question_mask"], labels,
                                     batch.get("similar_images"), batch.get("mix_index"), groups)


# ----------------------------------------------------------------------------- building


def build_cmdpi(config: CMDPIConfig, backbone: Any = None,
                answer_vocab: AnswerVocabulary | None = None) -> CMDPI:
    """A :class:`CMDPI` whose text side starts from ``config.text_backbone`` (or ``backbone``)
    and whose FFN_A covers ``answer_vocab`` (built with :func:`build_answer_vocab`)."""
    if backbone is None:
        from medvqa_lib.text import select_text_backbone

        backbone = select_text_backbone(config.text_backbone)
    return CMDPI.from_text_backbone(config, backbone, answer_vocab)


def build_answer_vocab(train_samples: Sequence[Any], min_count: int = 1) -> AnswerVocabulary:
    """FFN_A's answer set: normalised answers of the *training split only* (refuses others)."""
    return AnswerVocabulary.from_samples(train_samples, min_count, splits=("train",))


def answer_coverage(vocab: AnswerVocabulary, samples: Sequence[Any]) -> dict[str, float]:
    """Share of ``samples`` (per answer type and overall) whose answer is in ``vocab``: the
    highest accuracy a classifier over the training answers can reach (the rest is wrong)."""
    out = {}
    for kind in ("closed", "open", "overall"):
        rows = [s for s in samples if kind == "overall" or s.answer_type == kind]
        out[kind] = (sum(normalize_answer(s.answer) in vocab.index for s in rows) / len(rows)
                     if rows else float("nan"))
    return out


def _head_rows(head: LMHead, old: AnswerVocabulary | None, new: AnswerVocabulary, dim: int) -> tuple[LMHead, int]:
    fresh = LMHead(dim, len(new)).to(head.decoder.weight.device)
    fresh.dense.load_state_dict(head.dense.state_dict())
    fresh.norm.load_state_dict(head.norm.state_dict())
    copied = 0
    if old is not None:
        with torch.no_grad():
            for answer, j in new.index.items():
                i = old.index.get(answer)
                if i is not None and i < head.decoder.weight.shape[0]:
                    fresh.decoder.weight[j] = head.decoder.weight[i]
                    fresh.decoder.bias[j] = head.decoder.bias[i]
                    copied += 1
    return fresh, copied


def remap_answer_head(model: CMDPI, vocab: AnswerVocabulary) -> int:
    """Give FFN_A the classes of ``vocab``: rows of answers the current vocabulary shares are
    kept, the others start fresh. Returns how many rows were carried over."""
    model.ffn_a, copied = _head_rows(model.ffn_a, model.answer_vocab, vocab, model.config.dim)
    model.answer_vocab = vocab
    model.config = model.config.replace(num_answers=len(vocab))
    return copied


@torch.no_grad()
def load_pretrained_for_finetune(model: CMDPI, state_dict: Mapping[str, Tensor],
                                 pretrained_vocab: AnswerVocabulary | None = None) -> dict[str, Any]:
    """Load pre-trained weights into ``model`` (which holds the fine-tuning answer set): all
    entries of matching shape, and FFN_A's output rows by answer string via
    ``pretrained_vocab``. Returns ``loaded``, ``skipped``, ``missing`` keys and ``answer_rows``."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    rows = 0
    if pretrained_vocab is not None and model.answer_vocab is not None and "ffn_a.decoder.weight" in sd:
        old = LMHead(model.config.dim, sd["ffn_a.decoder.weight"].shape[0])
        old.load_state_dict({k.removeprefix("ffn_a."): v for k, v in sd.items() if k.startswith("ffn_a.")})
        new, rows = _head_rows(old, pretrained_vocab, model.answer_vocab, model.config.dim)
        model.ffn_a.load_state_dict(new.state_dict())
        keep.update({k: v for k, v in sd.items() if k.startswith("ffn_a.")})
    return {"loaded": sorted(keep), "skipped": sorted(set(sd) - set(keep)),
            "missing": sorted(set(own) - set(keep)), "answer_rows": rows}


# ----------------------------------------------------------------------------- similar images


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


def build_similar_images(model: CMDPI, train_samples: Sequence[Any], cache: Any,
                         threshold: float | None = None, batch_size: int = 64,
                         max_similarity: float | None = None) -> SimilarImages:
    """Similar-image table over the distinct images of the *training* samples, from the
    (pre-trained) model's global image features. ``cache.get(sample)`` gives the image tensor
    (e.g. :class:`~medvqa_lib.experiments.generative.ImageCache`)."""
    ensure_splits(train_samples, {"train"}, "finding similar images for difference reconstruction")
    first: dict[str, Any] = {}
    for s in train_samples:
        first.setdefault(s.image_id, s)
    feats = image_global_features(model, (cache.get(s) for s in first.values()), batch_size)
    thr = model.config.sim_threshold if threshold is None else threshold
    return SimilarImages.from_features(list(first), feats, thr, max_similarity)


# ----------------------------------------------------------------------------- data plumbing


class CMDPIVQADataset(Dataset):
    """VQA samples as dicts for :class:`CMDPICollator`: the
    :class:`~medvqa_lib.data.dataset.VQACollator` fields plus ``organ``, ``image_id``,
    ``answer_label`` (-100 outside ``vocab``) and ``similar_image`` (a similar training image
    drawn from ``similar``, the image itself when there is none or ``similar`` is None).

    The similar image is drawn with the global torch RNG, which the Trainer seeds: runs repeat
    exactly with ``num_workers=0`` (with loader workers the draws depend on the worker seeds).
    ``similar_pool`` adds samples whose images may serve as similar images."""

    def __init__(self, samples: Sequence[Any], cache: Any, vocab: AnswerVocabulary | None = None,
                 similar: SimilarImages | None = None, similar_pool: Sequence[Any] | None = None) -> None:
        self.samples, self.cache, self.vocab, self.similar = list(samples), cache, vocab, similar
        self.by_image: dict[str, Any] = {}
        for s in list(similar_pool or []) + self.samples:
            self.by_image.setdefault(s.image_id, s)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image = self.cache.get(s)
        item = {"image": image, "question": s.question, "answer": s.answer, "qid": s.qid,
                "answer_type": s.answer_type, "question_type": s.question_type, "organ": s.organ,
                "image_id": s.image_id}
        if self.vocab is not None:
            j = self.vocab.encode(s.answer)
            item["answer_label"] = -100 if j == self.vocab.unk_index else j
        if self.similar is not None:
            other = self.similar.sample(s.image_id)
            item["similar_image"] = image if other == s.image_id else self.cache.get(self.by_image[other])
        else:
            item["similar_image"] = image
        return item


class CMDPICollator(VQACollator):
    """:class:`~medvqa_lib.data.dataset.VQACollator` plus ``organs``, ``image_ids``,
    ``answer_labels`` and ``similar_images`` when the items have them."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if items and isinstance(items[0], list):  # groups of items
            items = [it for group in items for it in group]
        batch = super().__call__(items)
        for key, plural in (("organ", "organs"), ("image_id", "image_ids")):
            if all(key in it for it in items):
                batch[plural] = [it[key] for it in items]
        if all("answer_label" in it for it in items):
            batch["answer_labels"] = torch.tensor([it["answer_label"] for it in items], dtype=torch.long)
        if all("similar_image" in it for it in items):
            batch["similar_images"] = stack_images([it["similar_image"] for it in items])
        return batch


class CMDPIPretrainCollator:
    """Batches caption items (``image``, ``caption``) and VQA items (``image``, ``question``,
    ``answer``) together for :meth:`CMDPI.forward_pretrain`: ``images``, ``text_ids``/
    ``text_mask`` (caption or question), ``answer_labels`` (-100 for captions and answers
    outside ``vocab``) and ``is_caption``."""

    def __init__(self, tokenizer: Any, vocab: AnswerVocabulary | None = None, max_text_len: int = 64) -> None:
        self.tokenizer, self.vocab, self.max_text_len = tokenizer, vocab, max_text_len

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        is_caption = ["caption" in it for it in items]
        texts = [it["caption"] if cap else it["question"] for it, cap in zip(items, is_caption, strict=True)]
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        labels = []
        for it, cap in zip(items, is_caption, strict=True):
            j = -100
            if not cap and self.vocab is not None:
                j = self.vocab.encode(it["answer"])
                j = -100 if j == self.vocab.unk_index else j
            labels.append(j)
        return {"images": stack_images([it["image"] for it in items]), "text_ids": tok["input_ids"],
                "text_mask": tok["attention_mask"], "answer_labels": torch.tensor(labels, dtype=torch.long),
                "is_caption": torch.tensor(is_caption)}


@torch.no_grad()
def predict_samples(model: CMDPI, samples: Sequence[Any], tokenizer: Any, cache: Any,
                    batch_size: int = 32, max_question_len: int = 32) -> dict[str, str]:
    """``{qid: predicted answer}`` for ``samples`` (answers from the training answer set)."""
    collate = VQACollator(tokenizer, max_question_len)
    dev = next(model.parameters()).device
    out: dict[str, str] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = collate([{"image": cache.get(s), "question": s.question, "answer": s.answer, "qid": s.qid,
                          "answer_type": s.answer_type, "question_type": s.question_type} for s in chunk])
        answers = model.predict_answers({k: batch[k].to(dev) for k in ("images", "question_ids",
                                                                           "question_mask")})
        out.update(zip(batch["qids"], answers, strict=True))
    return out
