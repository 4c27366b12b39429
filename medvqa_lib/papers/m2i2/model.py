"""M2I2: masked image + masked language modelling, ITM and ITC pre-training, then a generative
answer decoder for medical VQA (Li et al., ISBI 2023).

The parts (Fig. 1 and Fig. 2 of the paper):

* **Image encoder** — a ViT (patch 16). For masked image modelling (MIM) it runs MAE-style on
  the visible patches only: a fixed share ``mask_ratio`` (15 %) of each image's patches is
  drawn at random and dropped before the transformer (:func:`random_patch_mask`).
* **Text encoder** — the first half of the BERT layers (no cross-attention); its [CLS] feeds ITC.
* **Multimodal encoder** — the second half of the same BERT stack, with cross-attention to the
  image tokens; its [CLS] feeds ITM, its token states feed MLM and, for VQA, the answer decoder.
  (Text and multimodal encoder are one :class:`~medvqa_lib.nn.TextTransformer` whose
  upper layers have cross-attention, as in ALBEF.)
* **Image decoder** (MIM only, :class:`MAEDecoder`) — MAE's light transformer (8 blocks, 512
  wide in the ``gpu`` profile): the encoded visible patches plus a learned mask token at every
  masked position, fixed 2-D sin-cos positions, a linear head regressing each patch's pixels.
* **Answer decoder** (VQA) — as many BERT-style layers as the multimodal encoder has (6 for BERT
  base), causal self-attention plus cross-attention to the multimodal states of the question,
  with its own embeddings and LM head. It is *initialised from the multimodal layers*
  (:meth:`M2I2.init_answer_decoder`): decoder layer ``i`` <- encoder layer ``n_text + i``
  (self-attention, cross-attention, FFN), the embeddings from the encoder's, the LM head from
  the MLM head. Before pre-training these are BERT's upper layers ("with the pre-trained BERT
  weights", Sec. 2.3); :func:`load_pretrained_for_finetune` re-does it from the pre-trained ones.

Pre-training loss (Eq. 4): ``L = L_mim + L_mlm + L_itm + L_itc``.

* MIM (Eq. 1): mean squared error on the *masked* patches only (:func:`mim_loss`); each
  patch's error is the mean over its pixel values, as in MAE. ``norm_pix_loss`` regresses
  per-patch normalised pixels instead.
* MLM (Eq. 2): 15 % of the caption tokens masked BERT-style, predicted by the multimodal
  encoder from the text and the image.
* ITM (Eq. 3): [CLS] of the multimodal encoder -> 2-way head; per pair one hard-negative image
  and one hard-negative text, sampled in the batch with ITC-similarity weights.
* ITC: ALBEF's contrastive loss between the projected (256-d) [CLS] features of image and text
  encoders, against momentum encoders and feature queues (65,535 in ``gpu``), temperature 0.07
  (learnable, as in ALBEF). ``alpha > 0`` adds ALBEF's momentum distillation (off by default:
  the paper does not mention it; the public code uses 0.4).

**Which image the objectives see.** By default ITC, ITM and MLM use the *unmasked* image and
MIM runs a separate masked pass (``shared_masked_pass=False``). With
``shared_masked_pass=True`` one masked pass feeds everything: its visible-patch features serve
ITC/ITM/MLM and its reconstruction gives MIM (the reading of the paper's Fig. 1, "the unmasked
portion of the image ... [is] fed into the image encoder"). The public code also gives
ITC/ITM/MLM masked-image features, but draws a second, independent mask for the MIM loss.

**Ablations** (Table 4): ``use_mim=False`` drops MIM and the image decoder; ``use_itc=False``
drops ITC, the momentum encoders and queues (ITM negatives are then drawn uniformly from the
other images/texts of the batch: there is no trained similarity to weight them). "w/o
pre-training" is fine-tuning straight from the built model.

**VQA** (Sec. 2.3): the question goes through text + multimodal encoder (attending to the
unmasked image); the answer decoder is trained with the conditional LM loss of Eq. 5 (summed over
an answer's tokens, averaged over the batch) and answers by greedy or beam search
(:meth:`M2I2.generate`, the same decoding code as MISS). :func:`rank_answers` is the public
code's evaluation mode instead: it scores a candidate list by the decoder's log-likelihood and
returns the best; :func:`candidate_answers` builds that list from training samples only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvqa_lib.nn import (
    AnswerDecoding,
    FeatureQueue,
    LMHead,
    SpecialIds,
    TextTransformer,
    build_vit,
    copy_params,
    hard_negative_indices,
    image_id_tensor,
    interpolate_pos_embed,
    itc_loss,
    load_bert_weights,
    mask_tokens,
    masked_positions,
    momentum_update,
    normalize_patches,
    patchify,
    random_patch_mask,
    sincos_pos_embed,
    unpatchify,
    with_start,
)

__all__ = [
    "M2I2",
    "M2I2Config",
    "MAEDecoder",
    "MIMOutput",
    "build_m2i2",
    "candidate_answers",
    "load_pretrained_for_finetune",
    "mim_loss",
    "predict_ranked",
    "rank_answers",
    "with_test_answers",
]


@dataclass
class M2I2Config:
    """Sizes and pre-training settings of an :class:`M2I2` model (see :meth:`from_profile`)."""

    #: pre-training image size (the paper: 256 px) and fine-tuning size (384 px)
    image_size: int = 256
    finetune_image_size: int | None = None
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    #: timm weights for the ViT (loaded only when the Hub is reachable)
    vit_pretrained: str | None = None
    drop_path: float = 0.0
    #: MAE image decoder (MIM)
    mae_width: int = 512
    mae_depth: int = 8
    mae_heads: int = 16
    #: share of each image's patches masked for MIM
    mask_ratio: float = 0.15
    #: regress per-patch normalised pixels (MAE's ``norm_pix_loss``)
    norm_pix_loss: bool = False
    #: one masked image pass for all objectives (see the module docstring)
    shared_masked_pass: bool = False
    #: "tiny", "minilm", "bert-base-uncased" or "auto" (see medvqa_lib.text)
    text_backbone: str = "bert-base-uncased"
    #: text layers in all (None: the backbone's); the first half is the text encoder
    text_depth: int | None = None
    #: dropout of the text stacks' hidden states; None = the backbone's (0.1 for BERT)
    dropout: float | None = None
    #: dropout of text attention probabilities (0 keeps SDPA on its fused kernels)
    attn_dropout: float = 0.0
    embed_dim: int = 256
    queue_size: int = 65535
    momentum: float = 0.995
    temp: float = 0.07
    #: momentum distillation weight of ITC (0 = the paper's plain ITC)
    alpha: float = 0.0
    mlm_probability: float = 0.15
    use_mim: bool = True
    use_itc: bool = True
    max_text_len: int = 30
    max_question_len: int = 35
    max_answer_len: int = 10

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.use_mim and self.mask_ratio == 0.0:
            raise ValueError("use_mim needs mask_ratio > 0 (no patch would be reconstructed)")
        if self.mae_width % 4:
            raise ValueError(f"mae_width {self.mae_width} must be a multiple of 4 (2-D sin-cos positions)")

    @classmethod
    def from_profile(cls, profile: Any, **overrides: Any) -> M2I2Config:
        """The preset of a run profile (``"smoke"``, ``"cpu"``, ``"gpu"`` or a
        :class:`~medvqa_lib.config.Profile`, whose text backbone is used, and whose image size
        is used when it was overridden from the profile's default)."""
        name = getattr(profile, "name", profile)
        presets = {
            "smoke": dict(image_size=64, vision_width=128, vision_depth=2, vision_heads=4,
                          mae_width=64, mae_depth=1, mae_heads=4, text_backbone="tiny",
                          embed_dim=64, queue_size=128),
            "cpu": dict(image_size=128, vision_width=384, vision_depth=6, vision_heads=6,
                        mae_width=128, mae_depth=2, mae_heads=4, text_backbone="minilm",
                        queue_size=1024),
            "gpu": dict(image_size=256, finetune_image_size=384, vision_width=768, vision_depth=12,
                        vision_heads=12, vit_pretrained="vit_base_patch16_224.mae", mae_width=512,
                        mae_depth=8, mae_heads=16, text_backbone="bert-base-uncased",
                        queue_size=65535),
        }
        if name not in presets:
            raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(presets)}")
        values: dict[str, Any] = dict(presets[name])
        if not isinstance(profile, str):
            from medvqa_lib.config import PROFILES

            values["text_backbone"] = profile.text_backbone
            if profile.image_size != PROFILES[name].image_size:
                values["image_size"] = profile.image_size
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> M2I2Config:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- MIM loss


def mim_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """Eq. 1: ``1/n * sum_i (P_i - P^_i)^2`` over the n masked patches, where a patch's squared
    error is the mean over its pixel values. ``pred``/``target`` are (B, N, p*p*C) (target:
    :func:`patchify` of the image), ``mask`` (B, N) is True at the masked patches; unmasked
    patches do not enter the loss."""
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


class MAEDecoder(nn.Module):
    """MAE's image decoder: project the encoded visible patches (and [CLS]) to ``width``, put a
    learned mask token at every masked position, add fixed sin-cos positions, run pre-LN ViT
    blocks and regress each patch's ``patch_size**2 * 3`` pixel values."""

    def __init__(self, enc_dim: int, width: int, depth: int, heads: int, patch_size: int,
                 channels: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(enc_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                    for _ in range(depth))
        for blk in self.blocks:  # fused SDPA regardless of TIMM_FUSED_ATTN
            blk.attn.fused_attn = True
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_size * patch_size * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, keep: Tensor, num_patches: int) -> Tensor:
        """``latent`` (B, 1+K, D): encoder output of [CLS] + the visible patches ``keep``
        (B, K). Returns the predicted pixels of all ``num_patches`` patches (B, N, p*p*C)."""
        x = self.embed(latent)
        b, _, width = x.shape
        full = self.mask_token.to(x.dtype).expand(b, num_patches, width).scatter(
            1, keep[..., None].expand(-1, -1, width), x[:, 1:])
        pos = sincos_pos_embed(width, math.isqrt(num_patches)).to(x)
        x = torch.cat([x[:, :1], full + pos], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]


class MIMOutput(NamedTuple):
    """One masked-image pass: the MIM loss, the predicted patches (B, N, p*p*C), the mask
    (B, N, True = masked and reconstructed), the visible indices (B, K) and the encoder output
    of [CLS] + visible patches (B, 1+K, D)."""

    loss: Tensor
    pred: Tensor
    mask: Tensor
    keep: Tensor
    latent: Tensor


class M2I2(AnswerDecoding, nn.Module):
    """Image encoder (+ MAE decoder), text/multimodal encoder, answer decoder; MIM/MLM/ITM/ITC
    pre-training and generative VQA. ``model(batch)`` dispatches on the batch keys (see
    :meth:`forward`)."""

    #: VQA batches may hold each image once (``image_index``; see :meth:`encode_question`)
    supports_image_index = True

    def __init__(self, config: M2I2Config, text_config: Any, ids: SpecialIds) -> None:
        super().__init__()
        c, t = config, text_config
        depth = c.text_depth or t.num_hidden_layers
        if depth < 2:
            raise ValueError(f"M2I2 needs at least 2 text layers (text + multimodal), got {depth}")
        dim = t.hidden_size
        # the answer decoder starts from [CLS] (as the ALBEF-style decoder initialised from BERT)
        self.config, self.ids = c, dataclasses.replace(ids, dec=ids.cls)
        self.depth, self.n_text_layers = depth, depth // 2
        text_kw = dict(max_len=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                       dropout=t.hidden_dropout_prob if c.dropout is None else c.dropout,
                       attn_dropout=c.attn_dropout)
        vocab, heads, mlp = t.vocab_size, t.num_attention_heads, t.intermediate_size

        self.visual_encoder = build_vit(c.image_size, c.patch_size, c.vision_width, c.vision_depth,
                                        c.vision_heads, pretrained=c.vit_pretrained, drop_path=c.drop_path)
        self.text_encoder = TextTransformer(vocab, dim, depth, heads, mlp, set(range(self.n_text_layers, depth)),
                                            enc_dim=c.vision_width, **text_kw)
        self.mlm_head = LMHead(dim, vocab, t.layer_norm_eps).tie(self.text_encoder.embeddings.word)
        self.itm_head = nn.Linear(dim, 2)
        self.mae_decoder = (MAEDecoder(c.vision_width, c.mae_width, c.mae_depth, c.mae_heads, c.patch_size)
                            if c.use_mim else None)
        self.text_decoder = TextTransformer(vocab, dim, depth - self.n_text_layers, heads, mlp, "all",
                                            causal=True, **text_kw)
        self.lm_head = LMHead(dim, vocab, t.layer_norm_eps).tie(self.text_decoder.embeddings.word)

        if c.use_itc:
            self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
            self.text_proj = nn.Linear(dim, c.embed_dim)
            self.temp = nn.Parameter(torch.tensor(c.temp))
            self.visual_encoder_m = build_vit(c.image_size, c.patch_size, c.vision_width, c.vision_depth,
                                              c.vision_heads)
            self.text_encoder_m = TextTransformer(vocab, dim, self.n_text_layers, heads, mlp, None, **text_kw)
            self.vision_proj_m = nn.Linear(c.vision_width, c.embed_dim)
            self.text_proj_m = nn.Linear(dim, c.embed_dim)
            self.image_queue = FeatureQueue(c.embed_dim, c.queue_size)
            self.text_queue = FeatureQueue(c.embed_dim, c.queue_size)
            self.idx_queue = FeatureQueue(None, c.queue_size, dtype=torch.long, fill=-1)
            self.copy_momentum()
        self.init_answer_decoder()
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ construction

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs (none without ITC)."""
        if not self.config.use_itc:
            return []
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def copy_momentum(self) -> None:
        """Reset the momentum models to the online weights (frozen)."""
        for model, model_m in self.momentum_pairs():
            copy_params(model, model_m)

    def train(self, mode: bool = True) -> M2I2:
        """Momentum models always run without dropout."""
        super().train(mode)
        for _, model_m in self.momentum_pairs():
            model_m.eval()
        return self

    @torch.no_grad()
    def init_answer_decoder(self) -> list[str]:
        """Copy the multimodal layers into the answer decoder: decoder layer ``i`` <- text-encoder
        layer ``n_text_layers + i`` (self-attention, cross-attention, FFN), embeddings <- the
        encoder's, LM head (dense, LayerNorm, bias) <- the MLM head. Returns the decoder tensors
        left as they were because their shapes differ (cross-attention keys/values when the
        image and text widths differ); empty otherwise."""
        enc, dec = self.text_encoder, self.text_decoder
        pairs = [(enc.embeddings, dec.embeddings, "embeddings")]
        pairs += [(enc.layers[self.n_text_layers + i], layer, f"layers.{i}") for i, layer in enumerate(dec.layers)]
        left: list[str] = []
        for src, dst, prefix in pairs:
            own = dst.state_dict()
            for k, v in src.state_dict().items():
                if k in own and own[k].shape == v.shape:
                    own[k].copy_(v)
                elif k in own:
                    left.append(f"text_decoder.{prefix}.{k}")
        for name in ("dense.weight", "dense.bias", "norm.weight", "norm.bias", "decoder.bias"):
            self.lm_head.get_parameter(name).copy_(self.mlm_head.get_parameter(name))
        return left

    @classmethod
    def from_text_backbone(cls, config: M2I2Config, backbone: Any) -> M2I2:
        """Build from a :class:`~medvqa_lib.text.TextBackbone`: the text stack starts from its
        BERT weights (cross-attention fresh), the answer decoder from its upper layers, the
        momentum models are copies."""
        model = cls(config, backbone.config, SpecialIds.from_tokenizer(backbone.tokenizer))
        if backbone.pretrained:
            load_bert_weights(model.text_encoder, backbone.load_encoder())
            model.init_answer_decoder()
            model.copy_momentum()
        model.tokenizer = backbone.tokenizer
        return model

    # ------------------------------------------------------------------ image side

    @property
    def num_patches(self) -> int:
        return int(self.visual_encoder.patch_embed.num_patches)

    def encode_image(self, images: Tensor, keep: Tensor | None = None, momentum: bool = False) -> Tensor:
        """ViT output (B, 1+K, D) of [CLS] and the patches ``keep`` (B, K); all patches when
        ``keep`` is None. ``momentum`` uses the momentum encoder."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        if keep is None:
            return vit.forward_features(images)
        if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class:
            raise ValueError("masked encoding expects a ViT with a class token and no register tokens")
        x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = vit.norm_pre(vit.pos_drop(torch.cat([cls, x], 1)))
        return vit.norm(vit.blocks(x))

    def forward_mim(self, images: Tensor, keep: Tensor | None = None, mask: Tensor | None = None
                    ) -> MIMOutput:
        """Mask ``mask_ratio`` of the patches (or use ``keep``/``mask``), encode the visible
        ones, reconstruct all with the MAE decoder, and score the masked ones (Eq. 1)."""
        if self.mae_decoder is None:
            raise RuntimeError("this model was built with use_mim=False: it has no image decoder")
        n = self.num_patches
        if keep is None:
            keep, mask = random_patch_mask(images.shape[0], n, self.config.mask_ratio, images.device)
        elif mask is None:
            mask = torch.ones(images.shape[0], n, dtype=torch.bool, device=images.device).scatter(1, keep, False)
        latent = self.encode_image(images, keep)
        pred = self.mae_decoder(latent, keep, n)
        loss = mim_loss(pred, patchify(images, self.config.patch_size), mask, self.config.norm_pix_loss)
        return MIMOutput(loss, pred, mask, keep, latent)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> dict[str, Tensor]:
        """For figures: the ``masked`` input (masked patches zeroed), the decoder's
        ``reconstruction`` of every patch, the visible patches with the reconstruction
        ``pasted`` into the masked ones, and the patch ``mask`` (one random draw). With ``norm_pix_loss`` the predictions are mapped back
        with each true patch's mean and standard deviation."""
        out = self.forward_mim(images)
        p = self.config.patch_size
        target = patchify(images, p)
        pred = out.pred.float()
        if self.config.norm_pix_loss:
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        m = out.mask[..., None]
        return {"masked": unpatchify(target.masked_fill(m, 0.0), p), "reconstruction": unpatchify(pred, p),
                "pasted": unpatchify(torch.where(m, pred, target), p), "mask": out.mask}

    # ------------------------------------------------------------------ pre-training

    def forward_pretrain(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         image_ids: Any = None, alpha: float | None = None) -> dict[str, Tensor]:
        """MIM + MLM + ITM + ITC (Eq. 4) on a batch of image-caption pairs.

        ``image_ids`` mark captions of the same image: positives of each other in ITC, never
        hard negatives in ITM. Momentum and queue updates run only in training mode.
        """
        c, b, dev = self.config, images.shape[0], images.device
        alpha = c.alpha if alpha is None else alpha
        ids = image_id_tensor(image_ids, dev)
        losses: dict[str, Tensor] = {}

        # image: a masked pass for MIM and (by default) an unmasked pass for the rest
        mim = self.forward_mim(images) if c.use_mim else None
        keep = mim.keep if mim is not None and c.shared_masked_pass else None
        image_embeds = mim.latent if keep is not None else self.encode_image(images)
        if mim is not None:
            losses["loss_mim"] = mim.loss

        # text half on the caption and on its MLM-masked copy, in one pass
        masked_ids, mlm_labels = mask_tokens(input_ids, self.ids, c.mlm_probability)
        halves = self.text_encoder(torch.cat([input_ids, masked_ids]), attention_mask.repeat(2, 1),
                                   end=self.n_text_layers)
        text_embeds, masked_embeds = halves.split(b)

        # ITC against momentum features of the batch and the queues
        if c.use_itc:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
            text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
            with torch.no_grad():
                if self.training:
                    for model, model_m in self.momentum_pairs():
                        momentum_update(model, model_m, c.momentum)
                image_cls_m = self.encode_image(images, keep, momentum=True)[:, 0]
                text_cls_m = self.text_encoder_m(input_ids, attention_mask, first_only=True)[:, 0]
                image_feat_m = F.normalize(self.vision_proj_m(image_cls_m), dim=-1)
                text_feat_m = F.normalize(self.text_proj_m(text_cls_m), dim=-1)
                image_feat_all = torch.cat([image_feat_m, self.image_queue.get()])
                text_feat_all = torch.cat([text_feat_m, self.text_queue.get()])
                targets = None
                if ids is not None:
                    pos = (ids[:, None] == torch.cat([ids, self.idx_queue.get()])[None]).float()
                    targets = pos / pos.sum(1, keepdim=True)
            losses["loss_itc"], sim_i2t, sim_t2i = itc_loss(
                image_feat, text_feat, image_feat_all, text_feat_all, self.temp, targets, alpha,
                image_feat_m, text_feat_m)
        else:  # no trained similarity: uniform in-batch negatives
            sim_i2t = sim_t2i = torch.zeros(b, b, device=dev)

        # ITM: positives, (text, hard-negative image), (hard-negative text, image) in one pass
        neg_image, neg_text = hard_negative_indices(sim_i2t, sim_t2i, image_ids=ids)
        ar = torch.arange(b, device=dev)
        text_rows, image_rows = torch.cat([ar, ar, neg_text]), torch.cat([ar, neg_image, ar])
        kv_cache: dict = {}  # image keys/values of the cross-attention, shared by ITM and MLM
        itm_out = self.text_encoder(None, attention_mask, image_embeds, hidden=text_embeds,
                                    start=self.n_text_layers, rows=text_rows, enc_index=image_rows,
                                    kv_cache=kv_cache, first_only=True)
        itm_labels = (torch.arange(3 * b, device=dev) < b).long()  # 1 = matched
        losses["loss_itm"] = F.cross_entropy(self.itm_head(itm_out[:, 0]).float(), itm_labels)

        # MLM: the multimodal layers compute the masked positions only
        queries, labels = masked_positions(mlm_labels)
        mlm_out = self.text_encoder(None, attention_mask, image_embeds, hidden=masked_embeds,
                                    start=self.n_text_layers, kv_cache=kv_cache, queries=queries)
        keep_tok = labels != -100
        if bool(keep_tok.any()):
            losses["loss_mlm"] = F.cross_entropy(self.mlm_head(mlm_out[keep_tok]).float(), labels[keep_tok])
        else:
            losses["loss_mlm"] = mlm_out.sum() * 0.0

        if self.training and c.use_itc:
            self.image_queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
            self.idx_queue.enqueue(ids if ids is not None else torch.full_like(ar, -1))
        loss = sum(losses.values())
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}

    # ------------------------------------------------------------------ VQA

    def encode_question(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                        image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Multimodal-encoder states of the question attending to the (unmasked) image, and the
        question mask. With ``image_index`` (B,), ``images`` holds distinct images (U, ...) and
        question i attends to image ``image_index[i]``: each image is encoded once."""
        image_embeds = self.encode_image(images)
        if image_index is not None:
            image_index = image_index.to(images.device)
        return self.text_encoder(question_ids, question_mask, image_embeds, enc_index=image_index), question_mask

    def forward_vqa(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                    answer_ids: Tensor, answer_mask: Tensor, image_index: Tensor | None = None
                    ) -> dict[str, Tensor]:
        """Eq. 5: teacher-forced answer log-likelihood (answers tokenised as
        ``[CLS] answer [SEP] [PAD]...``), summed over each answer's tokens, averaged over the
        batch."""
        q, q_mask = self.encode_question(images, question_ids, question_mask, image_index)
        dec_ids, dec_mask = with_start(answer_ids, answer_mask, self.ids.dec, self.ids.cls)
        out = self.text_decoder(dec_ids, dec_mask, q, q_mask)
        hidden, targets = out[:, :-1], dec_ids[:, 1:]
        valid = dec_mask[:, 1:].bool()
        nll = F.cross_entropy(self.lm_head(hidden[valid]).float(), targets[valid], reduction="sum")
        return {"loss": nll / answer_ids.shape[0]}

    @torch.no_grad()
    def score_answers(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                      candidate_ids: Tensor, candidate_mask: Tensor, k: int | None = None,
                      chunk_tokens: int = 2048, image_index: Tensor | None = None) -> Tensor:
        """Log-likelihood (B, C) of each candidate answer (tokenised ``[CLS] a [SEP]``) given
        each question: the sum of the decoder's log-probabilities of the answer tokens and
        [SEP]. With ``k`` only each question's ``k`` candidates with the most likely first token
        are scored in full (the public code's pre-selection), the others get ``-inf``.
        ``chunk_tokens`` bounds the answer tokens whose vocabulary logits exist at once;
        ``image_index``: see :meth:`encode_question`."""
        q, q_mask = self.encode_question(images, question_ids, question_mask, image_index)
        b, n_cand, dev = q.shape[0], candidate_ids.shape[0], q.device
        candidate_ids, candidate_mask = with_start(candidate_ids, candidate_mask, self.ids.dec, self.ids.cls)
        kv: dict = {}
        if k is None or k >= n_cand:
            q_idx = torch.arange(b, device=dev).repeat_interleave(n_cand)
            c_idx = torch.arange(n_cand, device=dev).repeat(b)
        else:
            start = torch.full((b, 1), self.ids.dec, dtype=torch.long, device=dev)
            first = F.log_softmax(self._next_logits(start, q, q_mask, kv), -1)[:, candidate_ids[:, 1]]
            c_idx = first.topk(k, dim=1).indices.flatten()
            q_idx = torch.arange(b, device=dev).repeat_interleave(k)
        scores = torch.full((b, n_cand), float("-inf"), device=dev)
        length = candidate_ids.shape[1]
        step = max(1, chunk_tokens // max(length - 1, 1))
        for s in range(0, q_idx.shape[0], step):
            qi, ci = q_idx[s:s + step], c_idx[s:s + step]
            out = self.text_decoder(candidate_ids, candidate_mask, q, q_mask.index_select(0, qi),
                                    rows=ci, enc_index=qi, kv_cache=kv)
            targets, valid = candidate_ids[ci, 1:], candidate_mask[ci, 1:].bool()
            logp = F.log_softmax(self.lm_head(out[:, :-1][valid]).float(), -1)
            tok = logp.gather(1, targets[valid][:, None]).squeeze(1)
            row = torch.arange(ci.shape[0], device=dev)[:, None].expand_as(valid)[valid]
            scores[qi, ci] = torch.zeros(ci.shape[0], device=dev).index_add_(0, row, tok)
        return scores

    # ------------------------------------------------------------------ training-loop entry

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """``model(batch)``: :meth:`forward_vqa` when the batch has ``answer_ids`` (and optional
        ``image_index``, see :meth:`encode_question`), else
        :meth:`forward_pretrain` on ``images`` and ``input_ids``/``attention_mask`` (or
        ``caption_ids``/``caption_mask``), optional ``image_ids`` and ``alpha``."""
        if "answer_ids" in batch:
            return self.forward_vqa(batch["images"], batch["question_ids"], batch["question_mask"],
                                    batch["answer_ids"], batch["answer_mask"], batch.get("image_index"))
        ids = batch["input_ids"] if "input_ids" in batch else batch["caption_ids"]
        mask = batch["attention_mask"] if "attention_mask" in batch else batch["caption_mask"]
        return self.forward_pretrain(batch["images"], ids, mask, batch.get("image_ids"), batch.get("alpha"))


def build_m2i2(config: M2I2Config, backbone: Any = None) -> M2I2:
    """An :class:`M2I2` whose text side starts from ``config.text_backbone`` (or ``backbone``)."""
    if backbone is None:
        from medvqa_lib.text import select_text_backbone

        backbone = select_text_backbone(config.text_backbone)
    return M2I2.from_text_backbone(config, backbone)


@torch.no_grad()
def load_pretrained_for_finetune(model: M2I2, state_dict: Mapping[str, Tensor],
                                 new_image_size: int | None = None, init_decoder: bool = True
                                 ) -> dict[str, Sequence[str]]:
    """Load pre-trained weights for fine-tuning at ``new_image_size`` (default: the config's
    ``finetune_image_size`` or ``image_size``): ViT position embeddings of the model and of the
    state dict are interpolated (bicubic); entries with another shape (e.g. queues of another
    size) are skipped. With ``init_decoder`` the answer decoder is then initialised from the
    loaded multimodal layers (:meth:`M2I2.init_answer_decoder`); pass False to load a
    fine-tuned checkpoint as it is. Returns the ``loaded``, ``skipped`` and ``missing`` keys."""
    size = new_image_size or model.config.finetune_image_size or model.config.image_size
    if model.visual_encoder.patch_embed.img_size[0] != size:
        interpolate_pos_embed(model, size)
        model.config = model.config.replace(image_size=size)
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    sd = interpolate_pos_embed(sd, size, model.config.patch_size)
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    if init_decoder:
        model.init_answer_decoder()
    return {"loaded": sorted(keep), "skipped": sorted(set(sd) - set(keep)),
            "missing": sorted(set(own) - set(keep))}


# ----------------------------------------------------------------------------- rank mode


def candidate_answers(samples: Iterable[Any], splits: Iterable[str] = ("train",),
                      min_count: int = 1) -> list[str]:
    """The candidate list of rank mode: normalised answers of ``samples``, most frequent first.

    Built with :meth:`~medvqa_lib.evaluation.AnswerVocabulary.from_samples`, so it raises if
    ``splits`` names ``"test"`` (:class:`~medvqa_lib.errors.ConfigError`) or if any sample is
    from a split outside ``splits`` (:class:`~medvqa_lib.errors.DataError`). The default is the
    training split only; pass ``splits=("train", "val")`` for train+validation.
    """
    from medvqa_lib.evaluation import AnswerVocabulary

    return list(AnswerVocabulary.from_samples(list(samples), min_count, splits=splits).answers)


def with_test_answers(candidates: Sequence[str], test_samples: Iterable[Any]) -> list[str]:
    """``candidates`` plus the normalised answers of ``test_samples`` that are not yet in it.

    Only for *measuring* the leak of pitfall 1 (a rank-mode list that contains test answers);
    never use such a list for a reported score.
    """
    from medvqa_lib.evaluation import normalize_answer

    out, seen = list(candidates), set(candidates)
    for s in test_samples:
        a = normalize_answer(s.answer)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


@torch.no_grad()
def rank_answers(model: M2I2, batch: Mapping[str, Any], candidate_answers: Sequence[str],
                 tokenizer: Any, *, k: int | None = None, return_scores: bool = False
                 ) -> list[str] | tuple[list[str], Tensor]:
    """Rank mode: the candidate with the highest answer log-likelihood for each question of
    ``batch`` (``images``, ``question_ids``, ``question_mask``, optional ``image_index``); ties
    go to the earlier
    candidate. ``k``: see :meth:`M2I2.score_answers`. With ``return_scores`` also the (B, C)
    log-likelihoods."""
    if not candidate_answers:
        raise ValueError("rank mode needs a non-empty candidate list")
    dev = next(model.parameters()).device
    cand = tokenizer(list(candidate_answers), padding="longest", return_tensors="pt")
    index = batch.get("image_index")
    was_training = model.training
    model.eval()
    try:
        scores = model.score_answers(batch["images"].to(dev), batch["question_ids"].to(dev),
                                     batch["question_mask"].to(dev), cand["input_ids"].to(dev),
                                     cand["attention_mask"].to(dev), k=k,
                                     image_index=None if index is None else index.to(dev))
    finally:
        model.train(was_training)
    best = [candidate_answers[i] for i in scores.argmax(1).tolist()]
    return (best, scores) if return_scores else best


@torch.no_grad()
def predict_ranked(model: M2I2, samples: Sequence[Any], candidates: Sequence[str], tokenizer: Any,
                   cache: Any, *, batch_size: int = 32, max_question_len: int = 32,
                   k: int | None = None) -> dict[str, str]:
    """Rank-mode answers keyed by question id (the counterpart of
    :func:`medvqa_lib.experiments.generative.predict`)."""
    from medvqa_lib.data.dataset import VQACollator
    from medvqa_lib.experiments.generative import CachedVQADataset

    collate = VQACollator(tokenizer, max_question_len=max_question_len)
    dataset = CachedVQADataset(samples, cache)
    answers: dict[str, str] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        best = rank_answers(model, batch, candidates, tokenizer, k=k)
        answers.update(zip(batch["qids"], best, strict=True))
    return answers
