"""MISS: generative medical VQA with a Joint Text-Multimodal (JTM) encoder (Chen et al.).

Three parts (Fig. 1): a ViT image encoder, the JTM encoder and a text decoder.

* **JTM encoder** — one BERT stack with cross-attention to the image in every layer. In *text
  mode* cross-attention is skipped (unimodal text features for ITC); in *multimodal mode* it is
  used (ITM and the VQA question encoding, Eq. 1). Multimodal inputs start with an [ENC]
  token instead of [CLS], so the shared stack knows which mode it is in.
* **Text decoder** — the same stack with causal self-attention, cross-attending to the image
  (pre-training) or to the JTM output of the question (VQA). As in BLIP it shares everything
  with the encoder except self-attention: the embeddings (word, position, LayerNorm) and, per
  layer, the cross-attention block (q, kv, output projection, LayerNorm) and the FFN block
  (fc1, fc2, LayerNorm) are the *same module objects*; each decoder layer has its own
  self-attention block (qkv, output projection, LayerNorm). The LM head belongs to the decoder
  and its output matrix is the shared word embedding.
* **Decoder start** — the decoder input starts with a dedicated [DEC] token: the tokenizer's
  [CLS] at position 0 is replaced by ``[unused0]`` (``[unused1]`` is [ENC]). Both are existing
  entries of the BERT WordPiece vocabulary, so no embedding row is added and the tied LM head
  keeps the vocabulary size.

Pre-training (Sec. 3.3) sums three losses (their equations are the functions of
:mod:`medvqa_lib.papers.miss.losses`; sizes and presets are in :mod:`~medvqa_lib.papers.miss.config`):

* ITC (Eqs. 2-3) between the [CLS] features of the image encoder and the JTM text mode, with
  momentum encoders and feature queues (MoCo/ALBEF), optionally with momentum distillation
  (``alpha``);
* ITM (Eq. 4) on the [ENC] output of the multimodal mode, with one hard negative image per
  text and one hard negative text per image mined in the batch from the ITC similarities;
* the decoder loss, chosen by :attr:`MISSConfig.decoder_objective`:

  - ``"mlm"`` (default, the paper's reading of Eq. 5): the decoder reads the caption with 15 %
    of its tokens masked BERT-style (80 % [MASK], 10 % random, 10 % kept) and is trained with
    cross-entropy on the masked tokens only, each predicted at its own position;
  - ``"lm"``: plain causal language modelling of the unmasked caption (next-token
    cross-entropy on every token), as in BLIP and the authors' public code.

VQA fine-tuning (Sec. 3.5): question -> JTM encoder (multimodal mode) -> decoder, teacher-forced
with LM loss on the answer tokens; inference generates the answer (greedy or beam search).

The "w/o JTM" ablation (``jtm=False``) is the ALBEF-style baseline of Sec. 4.1: the first half
of the text layers is a text encoder without cross-attention, the second half a multimodal
encoder with cross-attention; ITC uses the first half, ITM and VQA run the second half on top
of it.
"""

from __future__ import annotations

import copy
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
    itc_loss,
    load_bert_weights,
    load_matching_weights,
    mask_tokens,
    masked_positions,
    momentum_update,
    with_start,
)
from medvqa_lib.papers.miss import losses
from medvqa_lib.papers.miss.config import MISSConfig

__all__ = ["MISS", "MISSConfig", "build_miss", "load_pretrained_for_finetune"]


class MISS(AnswerDecoding, nn.Module):
    """Image encoder + JTM encoder + text decoder, with ITC/ITM/decoder pre-training and
    generative VQA. ``model(batch)`` dispatches on the batch keys (see :meth:`forward`)."""

    #: VQA batches may hold each image once (``image_index``; see :meth:`encode_question`)
    supports_image_index = True

    def __init__(self, config: MISSConfig, text_config: Any, ids: SpecialIds) -> None:
        super().__init__()
        c, t = config, text_config
        depth = c.text_depth or t.num_hidden_layers
        dim = t.hidden_size
        if c.vision_width != dim:
            raise ValueError(f"vision_width {c.vision_width} must equal the text width {dim}: the "
                             "decoder's cross-attention is shared between image and question states")
        self.config, self.ids, self.depth = c, ids, depth
        self.n_text_layers = depth if c.jtm else depth // 2  # layers used in text mode (ITC)
        text_kw = dict(max_len=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                       dropout=t.hidden_dropout_prob if c.dropout is None else c.dropout,
                       attn_dropout=c.attn_dropout)
        stack = (t.vocab_size, dim, depth, t.num_attention_heads, t.intermediate_size)

        self.visual_encoder = build_vit(c.image_size, c.patch_size, c.vision_width, c.vision_depth,
                                        c.vision_heads, pretrained=c.vit_pretrained, drop_path=c.drop_path)
        cross = "all" if c.jtm else set(range(self.n_text_layers, depth))
        self.text_encoder = TextTransformer(*stack, cross, **text_kw)
        self.text_decoder = TextTransformer(*stack, "all", causal=True, **text_kw)
        self._tie_decoder()
        self.lm_head = LMHead(dim, t.vocab_size, t.layer_norm_eps).tie(self.text_encoder.embeddings.word)
        self.itm_head = nn.Linear(dim, 2)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(dim, c.embed_dim)
        self.temp = nn.Parameter(torch.tensor(c.temp))

        # momentum copies of what ITC needs: image encoder, text mode, projections
        self.visual_encoder_m = build_vit(c.image_size, c.patch_size, c.vision_width, c.vision_depth,
                                          c.vision_heads)
        self.text_encoder_m = TextTransformer(t.vocab_size, dim, self.n_text_layers,
                                              t.num_attention_heads, t.intermediate_size, None, **text_kw)
        self.vision_proj_m = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj_m = nn.Linear(dim, c.embed_dim)
        self.copy_momentum()
        self.image_queue = FeatureQueue(c.embed_dim, c.queue_size)
        self.text_queue = FeatureQueue(c.embed_dim, c.queue_size)
        self.idx_queue = FeatureQueue(None, c.queue_size, dtype=torch.long, fill=-1)
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ construction

    def _tie_decoder(self) -> None:
        """Share embeddings, cross-attention and FFN blocks of the encoder with the decoder."""
        enc, dec = self.text_encoder, self.text_decoder
        dec.embeddings = enc.embeddings
        for layer_e, layer_d in zip(enc.layers, dec.layers, strict=True):
            layer_d.ffn = layer_e.ffn
            if layer_e.cross_attn is not None:
                layer_d.cross_attn = layer_e.cross_attn

    def untie_decoder(self) -> None:
        """Give the decoder its own copies of the shared modules (embeddings, cross-attention,
        FFN) and tie the LM head to its own word embeddings.

        Pre-training shares them (BLIP/MISS); for VQA the public code builds a separate answer
        decoder initialised from the pre-trained one. (On SLAKE validation at the ``cpu`` scale,
        2 epochs, the shared decoder reached 49.8 % open accuracy, the untied one 26.9 %: the
        book keeps it shared by default.)
        """
        enc, dec = self.text_encoder, self.text_decoder
        if dec.embeddings is not enc.embeddings:
            return
        dec.embeddings = copy.deepcopy(enc.embeddings)
        for layer_e, layer_d in zip(enc.layers, dec.layers, strict=True):
            layer_d.ffn = copy.deepcopy(layer_e.ffn)
            if layer_d.cross_attn is layer_e.cross_attn:
                layer_d.cross_attn = copy.deepcopy(layer_e.cross_attn)
        self.lm_head.tie(dec.embeddings.word)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs; momentum parameters are matched by name."""
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def copy_momentum(self) -> None:
        """Reset the momentum models to the online weights (frozen)."""
        for model, model_m in self.momentum_pairs():
            copy_params(model, model_m)

    def train(self, mode: bool = True) -> MISS:
        """Momentum models always run without dropout."""
        super().train(mode)
        for _, model_m in self.momentum_pairs():
            model_m.eval()
        return self

    @classmethod
    def from_text_backbone(cls, config: MISSConfig, backbone: Any) -> MISS:
        """Build from a :class:`~medvqa_lib.text.TextBackbone`: the JTM encoder and decoder
        start from its BERT weights (cross-attention fresh), the momentum models are copies."""
        model = cls(config, backbone.config, SpecialIds.from_tokenizer(backbone.tokenizer))
        if backbone.pretrained:
            bert = backbone.load_encoder()
            load_bert_weights(model.text_encoder, bert)
            load_bert_weights(model.text_decoder, bert)
            model.copy_momentum()
        model.tokenizer = backbone.tokenizer
        return model

    # ------------------------------------------------------------------ pre-training

    def forward_pretrain(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         image_ids: Any = None, alpha: float = 0.4) -> dict[str, Tensor]:
        """ITC + ITM + decoder loss on a batch of image-caption pairs.

        ``image_ids`` (ints or strings) mark captions of the same image: they are positives of
        each other in ITC and never hard negatives in ITM. The momentum update and the queue
        update run only in training mode.
        """
        c, b = self.config, images.shape[0]
        ids = image_id_tensor(image_ids, images.device)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        # the caption's three views (text mode, [ENC] multimodal mode, masked [DEC] decoder
        # input) are embedded in one call: one pass over the shared embedding table
        enc_ids = input_ids.clone()
        enc_ids[:, 0] = self.ids.enc
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.ids.dec
        if c.decoder_objective == "mlm":
            dec_in, labels = mask_tokens(dec_ids, self.ids, c.mlm_probability)
        else:
            dec_in, labels = dec_ids, dec_ids.masked_fill(attention_mask == 0, -100)
        views = (input_ids, enc_ids, dec_in) if c.jtm else (input_ids, dec_in)
        embeds = self.text_encoder.embeddings(torch.cat(views)).split(b)

        image_embeds = self.visual_encoder.forward_features(images)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        # (with JTM only [CLS] is used: the last layer computes it alone; without JTM the whole
        # output of the text half feeds the multimodal half)
        text_embeds = self.text_encoder(None, attention_mask, use_cross=False, hidden=embeds[0],
                                        end=self.n_text_layers, first_only=c.jtm)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        # ITC (Eqs. 2-3) against momentum features of the batch and the queues
        with torch.no_grad():
            if self.training:
                for model, model_m in self.momentum_pairs():
                    momentum_update(model, model_m, c.momentum)
            image_cls_m = self.visual_encoder_m.forward_features(images)[:, 0]
            text_cls_m = self.text_encoder_m(input_ids, attention_mask, first_only=True)[:, 0]
            image_feat_m = F.normalize(self.vision_proj_m(image_cls_m), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(text_cls_m), dim=-1)
            image_feat_all = torch.cat([image_feat_m, self.image_queue.get()])
            text_feat_all = torch.cat([text_feat_m, self.text_queue.get()])
            targets = losses.itc_targets(ids, self.idx_queue.get())
        loss_itc, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_feat_all, text_feat_all,
                                              self.temp, targets, alpha, image_feat_m, text_feat_m)

        # ITM (Eq. 4): positives, (text, hard-negative image), (hard-negative text, image) in one pass
        neg_image, neg_text = hard_negative_indices(sim_i2t, sim_t2i, image_ids=ids)
        ar = torch.arange(b, device=images.device)
        text_rows, image_rows = torch.cat([ar, ar, neg_text]), torch.cat([ar, neg_image, ar])
        kv_cache: dict = {}  # image keys/values of the shared cross-attention, reused by the decoder
        if c.jtm:  # multimodal mode from the [ENC] embeddings
            hidden, start = embeds[1], 0
        else:  # the text half's output is the multimodal half's input
            hidden, start = text_embeds, self.n_text_layers
        itm_out = self.text_encoder(None, attention_mask, image_embeds, hidden=hidden, start=start,
                                    rows=text_rows, enc_index=image_rows, kv_cache=kv_cache,
                                    first_only=True)
        loss_itm = losses.itm_loss(self.itm_head(itm_out[:, 0]), n_matched=b)

        # decoder: masked (Eq. 5) or plain causal language modelling, cross-attending to the image
        queries = None
        if c.decoder_objective == "mlm":  # the last layer computes the masked positions only
            queries, labels = masked_positions(labels)
        dec_out = self.text_decoder(None, attention_mask, image_embeds, hidden=embeds[-1],
                                    kv_cache=kv_cache, queries=queries)
        decoder_loss = losses.mlm_loss if c.decoder_objective == "mlm" else losses.lm_loss
        loss_dec = decoder_loss(dec_out, labels, self.lm_head)

        if self.training:
            self.image_queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
            self.idx_queue.enqueue(ids if ids is not None else torch.full_like(ar, -1))
        loss = loss_itc + loss_itm + loss_dec
        return {"loss": loss, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
                f"loss_{c.decoder_objective}": loss_dec.detach()}

    @torch.no_grad()
    def itc_features(self, images: Tensor | None = None, input_ids: Tensor | None = None,
                     attention_mask: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The normalised ITC embeddings (Eqs. 2-3) of images and/or texts (text mode)."""
        image_feat = text_feat = None
        if images is not None:
            image_feat = F.normalize(self.vision_proj(self.visual_encoder.forward_features(images)[:, 0]), dim=-1)
        if input_ids is not None:
            cls = self.text_encoder(input_ids, attention_mask, use_cross=False, end=self.n_text_layers,
                                    first_only=True)[:, 0]
            text_feat = F.normalize(self.text_proj(cls), dim=-1)
        return image_feat, text_feat

    # ------------------------------------------------------------------ VQA

    def encode_question(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                        image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """JTM output of the question attending to the image, and its mask.

        With ``image_index`` (B,), ``images`` holds distinct images (U, ...) and question i
        attends to image ``image_index[i]``: each image is encoded once.
        """
        image_embeds = self.visual_encoder.forward_features(images)
        if self.config.jtm:
            question_ids, question_mask = with_start(question_ids, question_mask, self.ids.enc, self.ids.cls)
        if image_index is not None:
            image_index = image_index.to(images.device)
        return self.text_encoder(question_ids, question_mask, image_embeds, enc_index=image_index), question_mask

    def forward_vqa(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                    answer_ids: Tensor, answer_mask: Tensor, image_index: Tensor | None = None
                    ) -> dict[str, Tensor]:
        """Teacher-forced LM loss on the answer tokens (answers tokenised as
        ``[CLS] answer [SEP] [PAD]...``; [CLS] becomes [DEC], padding is ignored)."""
        q, q_mask = self.encode_question(images, question_ids, question_mask, image_index)
        dec_ids, dec_mask = with_start(answer_ids, answer_mask, self.ids.dec, self.ids.cls)
        out = self.text_decoder(dec_ids, dec_mask, q, q_mask)
        loss = losses.lm_loss(out, dec_ids.masked_fill(dec_mask == 0, -100), self.lm_head)
        return {"loss": loss}

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
        return self.forward_pretrain(batch["images"], ids, mask, batch.get("image_ids"),
                                     batch.get("alpha", self.config.alpha))


def build_miss(config: MISSConfig, backbone: Any = None) -> MISS:
    """A :class:`MISS` whose text side starts from ``config.text_backbone`` (or ``backbone``)."""
    if backbone is None:
        from medvqa_lib.text import select_text_backbone

        backbone = select_text_backbone(config.text_backbone)
    return MISS.from_text_backbone(config, backbone)


@torch.no_grad()
def load_pretrained_for_finetune(model: MISS, state_dict: Mapping[str, Tensor],
                                 new_image_size: int | None = None, untie: bool = False
                                 ) -> dict[str, Sequence[str]]:
    """Load pre-trained weights for fine-tuning at ``new_image_size`` (default: the config's
    ``finetune_image_size`` or ``image_size``): ViT position embeddings of the model and of the
    state dict are interpolated; entries with another shape (e.g. queues of another size) are
    skipped. ``untie=True`` then gives the decoder its own copy of the shared modules
    (:meth:`MISS.untie_decoder`, the public code's VQA layout). Returns the ``loaded``, ``skipped`` and ``missing`` keys."""
    size = new_image_size or model.config.finetune_image_size or model.config.image_size
    report = load_matching_weights(model, state_dict, size, model.config.patch_size)
    model.config = model.config.replace(image_size=size)
    if untie:
        model.untie_decoder()
    return report
