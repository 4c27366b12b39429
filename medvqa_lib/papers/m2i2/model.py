"""M2I2: masked image + masked language modelling, ITM and ITC pre-training, then a generative
answer decoder for medical VQA (Li et al., ISBI 2023).

The parts (Fig. 1 and Fig. 2 of the paper):

* **Image encoder** — a ViT (patch 16). For masked image modelling (MIM) it runs MAE-style on
  the visible patches only: a fixed share ``mask_ratio`` (15 %) of each image's patches is
  drawn at random and dropped before the transformer (:func:`~medvqa_lib.nn.random_patch_mask`).
* **Text encoder** — the first half of the BERT layers (no cross-attention); its [CLS] feeds ITC.
* **Multimodal encoder** — the second half of the same BERT stack, with cross-attention to the
  image tokens; its [CLS] feeds ITM, its token states feed MLM and, for VQA, the answer decoder
  (one :class:`~medvqa_lib.nn.TextTransformer` whose upper layers cross-attend, as in ALBEF).
* **Image decoder** (MIM only, :class:`MAEDecoder`) — MAE's light transformer: the encoded
  visible patches plus a learned mask token at every masked position, fixed 2-D sin-cos
  positions, a linear head regressing each patch's pixels.
* **Answer decoder** (VQA) — as many BERT-style layers as the multimodal encoder has, causal
  self-attention plus cross-attention to the multimodal states of the question, initialised from
  the multimodal layers (:meth:`M2I2.init_answer_decoder`; "with the pre-trained BERT weights",
  Sec. 2.3); :func:`load_pretrained_for_finetune` re-does it from the pre-trained ones.

The losses are in :mod:`medvqa_lib.papers.m2i2.losses`, numbered as in the paper: MIM (Eq. 1)
on the masked patches only, MLM (Eq. 2) on 15 % of the caption tokens, ITM (Eq. 3) with one
hard-negative image and text per pair, ALBEF's ITC (momentum encoders, feature queues, learnable
temperature; ``alpha > 0`` adds momentum distillation, off by default), their sum (Eq. 4), and
the answer decoder's conditional LM loss (Eq. 5).

**Which image the objectives see.** By default ITC, ITM and MLM use the *unmasked* image and
MIM runs a separate masked pass (``shared_masked_pass=False``). With
``shared_masked_pass=True`` one masked pass feeds everything (the reading of the paper's Fig. 1,
"the unmasked portion of the image ... [is] fed into the image encoder"). The public code also
gives ITC/ITM/MLM masked-image features, but draws a second, independent mask for MIM.

**Ablations** (Table 4): ``use_mim=False`` drops MIM and the image decoder; ``use_itc=False``
drops ITC, the momentum encoders and queues (ITM negatives are then drawn uniformly from the
batch). Rank mode (the public code's evaluation) is in :mod:`medvqa_lib.papers.m2i2.rank`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

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
    load_bert_weights,
    load_matching_weights,
    mask_tokens,
    masked_positions,
    momentum_update,
    patchify,
    random_patch_mask,
    unpatchify,
    with_start,
)
from medvqa_lib.papers.m2i2.config import M2I2Config
from medvqa_lib.papers.m2i2.losses import (
    answer_loss,
    itc_loss,
    itm_loss,
    mim_loss,
    mlm_loss,
    pretraining_loss,
)
from medvqa_lib.papers.m2i2.mae import MAEDecoder, MIMOutput

__all__ = ["M2I2", "build_m2i2", "load_pretrained_for_finetune"]


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
        losses["loss_itm"] = itm_loss(self.itm_head(itm_out[:, 0]), itm_labels)  # Eq. 3

        # MLM: the multimodal layers compute the masked positions only
        queries, labels = masked_positions(mlm_labels)
        mlm_out = self.text_encoder(None, attention_mask, image_embeds, hidden=masked_embeds,
                                    start=self.n_text_layers, kv_cache=kv_cache, queries=queries)
        keep_tok = labels != -100
        if bool(keep_tok.any()):
            losses["loss_mlm"] = mlm_loss(self.mlm_head(mlm_out[keep_tok]), labels[keep_tok])  # Eq. 2
        else:
            losses["loss_mlm"] = mlm_out.sum() * 0.0

        if self.training and c.use_itc:
            self.image_queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
            self.idx_queue.enqueue(ids if ids is not None else torch.full_like(ar, -1))
        loss = pretraining_loss(losses)  # Eq. 4
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
        return {"loss": answer_loss(self.lm_head(hidden[valid]), targets[valid], answer_ids.shape[0])}


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
    report = load_matching_weights(model, state_dict, size, model.config.patch_size)
    model.config = model.config.replace(image_size=size)
    if init_decoder:
        model.init_answer_decoder()
    return report
