"""CMDPI: Cross-Modality Discriminative Pattern Identification (He et al., "Rethinking Medical
VQA Models: Towards Data-Efficient Learning").

Three modules (Sec. 3.1, Fig. 2), all Transformers (:mod:`~medvqa_lib.papers.cmdpi.modules`):

* **image encoder** — a ViT plus a linear map to the shared width ``d``: the head token gives
  the global vector ``h_I``, the patch tokens the local features ``H_I`` (N x d);
* **text encoder** — a BERT-family stack plus a linear map to ``d``: [CLS] gives ``h_T``, the
  other tokens ``H_T`` (M x d); ``GlobalFusion`` (an FFN over ``[h_I; h_T]``) gives ``h_F``
  (Eq. 1);
* **reconstruction network** (``RecNet``) — post-LN GELU Transformer over
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
answer that never occurs in training is always counted wrong
(:func:`~medvqa_lib.papers.cmdpi.answers.answer_coverage` gives that ceiling per answer type).

The loss terms are the functions of :mod:`~medvqa_lib.papers.cmdpi.losses`, one per equation;
where the paper's text leaves a choice, :mod:`~medvqa_lib.papers.cmdpi.readings` lists the
reading taken here.

``model(batch)`` runs :meth:`CMDPI.forward_pretrain` or :meth:`CMDPI.forward_finetune`
depending on ``model.stage`` (``"pretrain"`` or ``"finetune"``) and returns ``{"loss": ...,
"loss_*": ...}``, so :class:`~medvqa_lib.training.Trainer` drives both stages.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medvqa_lib.evaluation.answers import AnswerVocabulary
from medvqa_lib.nn import (
    LMHead,
    SpecialIds,
    TextTransformer,
    build_vit,
    copy_params,
    init_bert_weights,
    load_bert_weights,
    mask_tokens,
    momentum_update,
    patchify,
    random_patch_mask,
)
from medvqa_lib.papers.cmdpi import losses
from medvqa_lib.papers.cmdpi.answers import answer_class
from medvqa_lib.papers.cmdpi.config import CMDPIConfig
from medvqa_lib.papers.cmdpi.modules import ImageEncoder, RecNet, TextEncoder

__all__ = ["CMDPI", "STAGES", "build_cmdpi"]

STAGES = ("pretrain", "finetune")


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

    def downstream_heads(self, h_o: Tensor, question_mask: Tensor) -> Tensor:
        """The downstream heads ``h_D = H_o[:, -1]`` (Eq. 11), one per row (B, d)."""
        return h_o[torch.arange(h_o.shape[0], device=h_o.device), self.answer_positions(question_mask)]

    def encode_answers(self, answers: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
        """Answer classes of the vocabulary; -100 for answers outside it."""
        if self.answer_vocab is None:
            raise ValueError("the model has no answer vocabulary: build it with answer_vocab=... "
                             "or pass answer_labels")
        return torch.tensor([answer_class(self.answer_vocab, a) for a in answers], dtype=torch.long, device=device)

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
        l_img = losses.image_rec_loss(self.ffn_i(img_h), pixels, norm_pix=self.config.norm_pix_loss)
        keep = txt_labels != -100
        l_txt = losses.text_rec_loss(self.ffn_t(h_o[:, 1 + n:][keep]), txt_labels[keep])
        l_ans = None
        if ans_labels is not None:
            rows = (ans_labels != -100).nonzero().squeeze(1)
            l_ans = losses.answer_loss(self.ffn_a(h_o[rows, ans_pos[rows]]), ans_labels[rows])
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
            cl = losses.contrastive_loss(h_i[rows], h_t[rows], h_i_m, h_t_m, c.temp, c.alpha, c.alpha_prime,
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
            out[f"loss_{name}"] = losses.reconstruction_loss(l_img, l_txt, l_ans, c.w_img, c.w_txt, c.w_ans)
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
            local = losses.deviate_features(local, similar, eps)
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
        if c.difference_reconstruction:  # Eqs. 9-10, on the current sample only
            l_img, l_txt, _ = self._rec_losses(h_o, patchify(images, c.patch_size), None,
                                               self._text_targets(question_ids, question_mask)[:, 1:],
                                               None, None)
            out.update(loss_diff=losses.difference_reconstruction_loss(l_img, l_txt), loss_diff_img=l_img,
                       loss_diff_txt=l_txt)
        h_d = self.downstream_heads(h_o, question_mask)
        valid = answer_labels != -100
        if c.head_mixup:  # Eqs. 11-12
            if mix_index is None:
                if groups is None:
                    raise ValueError("head mixup needs mix_index or groups (organ, question type)")
                mix_index = losses.mixup_partners(groups, valid.tolist(), images.device)
            partner = torch.where(valid[mix_index], mix_index, torch.arange(b, device=images.device))
            lam = losses.sample_lambda(b, c.mix_lambda, c.mix_beta, c.mix_fixed, images.device)
            rows = valid.nonzero().squeeze(1)
            labels = answer_labels.clamp(min=0)
            h_mix, target = losses.head_mixup(h_d, labels, partner, lam, c.num_answers)
            out["loss_mix"] = losses.soft_cross_entropy(self.ffn_a(h_mix[rows]), target[rows])
        else:
            out["loss_ans"] = losses.answer_loss(self.ffn_a(h_d), answer_labels)
        total = losses.finetune_loss(out.get("loss_mix", out.get("loss_ans")), out.get("loss_diff"), c.w_mix, c.w_diff)
        return {"loss": total, **{k: v.detach() for k, v in out.items()}}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def answer_logits(self, images: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """FFN_A logits (B, A) on the undeviated features, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            h_o = self.difference_reconstruct(images, question_ids, question_mask)
            return self.ffn_a(self.downstream_heads(h_o, question_mask)).float()
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
    and whose FFN_A covers ``answer_vocab`` (built with
    :func:`~medvqa_lib.papers.cmdpi.answers.build_answer_vocab`)."""
    if backbone is None:
        from medvqa_lib.text import select_text_backbone

        backbone = select_text_backbone(config.text_backbone)
    return CMDPI.from_text_backbone(config, backbone, answer_vocab)
