"""Token-level helpers of the generative models: special token ids, BERT's MLM masking, the
decoder's start token, and greedy / beam answer decoding shared by MISS and M2I2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the models need without holding a tokenizer."""

    vocab_size: int
    pad: int
    cls: int
    sep: int
    mask: int
    #: decoder-start and multimodal-encoder tokens (see the model modules)
    dec: int | None = None
    enc: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialIds:
        """Ids of a BERT WordPiece tokenizer; ``[unused0]``/``[unused1]`` serve as [DEC]/[ENC]."""
        unk = tokenizer.unk_token_id
        dec, enc = (tokenizer.convert_tokens_to_ids(t) for t in ("[unused0]", "[unused1]"))
        return cls(len(tokenizer), tokenizer.pad_token_id, tokenizer.cls_token_id,
                   tokenizer.sep_token_id, tokenizer.mask_token_id,
                   dec if dec != unk else tokenizer.cls_token_id,
                   enc if enc != unk else tokenizer.cls_token_id)

    @property
    def specials(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (self.pad, self.cls, self.sep, self.mask, self.dec, self.enc)
                             if i is not None}))


def mask_tokens(input_ids: Tensor, tokenizer_or_ids: Any, mlm_probability: float = 0.15,
                generator: torch.Generator | None = None, special_ids: tuple[int, ...] = ()
                ) -> tuple[Tensor, Tensor]:
    """BERT masking: pick ``mlm_probability`` of the non-special tokens; of those 80 % become
    [MASK], 10 % a random token, 10 % stay. Returns (masked_ids, labels) with labels -100 on
    unpicked positions. ``tokenizer_or_ids`` is a tokenizer or :class:`SpecialIds`;
    ``special_ids`` adds ids that are never picked (pad/cls/sep/mask are never picked).
    ``generator`` must live on the device of ``input_ids``.
    """
    ids = tokenizer_or_ids if isinstance(tokenizer_or_ids, SpecialIds) else SpecialIds.from_tokenizer(tokenizer_or_ids)
    shape, dev = input_ids.shape, input_ids.device
    never = torch.tensor(ids.specials + tuple(special_ids), device=dev)
    picked = (torch.rand(shape, generator=generator, device=dev) < mlm_probability) & ~torch.isin(input_ids, never)
    labels = input_ids.masked_fill(~picked, -100)
    u = torch.rand(shape, generator=generator, device=dev)
    to_mask = picked & (u < 0.8)
    to_random = picked & (u >= 0.8) & (u < 0.9)
    random_words = torch.randint(ids.vocab_size, shape, generator=generator, device=dev)
    masked = input_ids.masked_fill(to_mask, ids.mask)
    masked = torch.where(to_random, random_words, masked)
    return masked, labels


def with_start(ids: Tensor, mask: Tensor, start: int, cls: int) -> tuple[Tensor, Tensor]:
    """Put ``start`` at position 0: replaces [CLS] there, or is prepended when there is none."""
    if bool((ids[:, 0] == cls).all()):
        ids = ids.clone()
        ids[:, 0] = start
        return ids, mask
    ones = torch.ones_like(ids[:, :1])
    return torch.cat([ones * start, ids], 1), torch.cat([ones.to(mask.dtype), mask], 1)


def masked_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the positions with a label (B, Q), filled up with position 0, and their labels
    (-100 for the filler)."""
    keep = labels != -100
    q = max(int(keep.sum(1).max()), 1)
    pos = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :q]
    filler = ~keep.gather(1, pos)
    return pos.masked_fill(filler, 0), labels.gather(1, pos).masked_fill(filler, -100)


class AnswerDecoding:
    """Greedy and beam-search answer generation for an encoder-decoder VQA model with
    ``encode_question(images, question_ids, question_mask, image_index)``, a causal
    ``text_decoder`` cross-attending to the question states, an ``lm_head`` and ``ids``
    (:class:`SpecialIds`; decoding starts from ``ids.dec``). Keys/values are cached per step."""

    @torch.no_grad()
    def generate(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                 max_new_tokens: int = 10, num_beams: int = 3, length_penalty: float = 1.0,
                 image_index: Tensor | None = None) -> list[list[int]]:
        """Answer token ids per question, ending with [SEP] when the answer ended in time.

        ``num_beams=1`` is greedy decoding; otherwise beam search whose final choice divides
        each beam's log-probability by its length ** ``length_penalty``. Runs in eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            q, q_mask = self.encode_question(images, question_ids, question_mask, image_index)
            if num_beams == 1:
                seqs = self._greedy(q, q_mask, max_new_tokens)
            else:
                seqs = self._beam_search(q, q_mask, max_new_tokens, num_beams, length_penalty)
        finally:
            self.train(was_training)
        out = []
        for row in seqs[:, 1:].tolist():
            out.append(row[: row.index(self.ids.sep) + 1] if self.ids.sep in row else row)
        return out

    def _next_logits(self, seq: Tensor, enc: Tensor, enc_mask: Tensor, kv_cache: dict) -> Tensor:
        h = self.text_decoder(seq, None, enc, enc_mask, kv_cache=kv_cache)
        return self.lm_head(h[:, -1]).float()

    def _greedy(self, enc: Tensor, enc_mask: Tensor, steps: int) -> Tensor:
        seq = torch.full((enc.shape[0], 1), self.ids.dec, dtype=torch.long, device=enc.device)
        done = torch.zeros(enc.shape[0], dtype=torch.bool, device=enc.device)
        kv: dict = {}
        for _ in range(steps):
            tok = self._next_logits(seq, enc, enc_mask, kv).argmax(-1).masked_fill(done, self.ids.pad)
            seq = torch.cat([seq, tok[:, None]], 1)
            done |= tok == self.ids.sep
            if bool(done.all()):
                break
        return seq

    def _beam_search(self, enc: Tensor, enc_mask: Tensor, steps: int, k: int, length_penalty: float) -> Tensor:
        b, dev = enc.shape[0], enc.device
        enc, enc_mask = enc.repeat_interleave(k, 0), enc_mask.repeat_interleave(k, 0)
        seq = torch.full((b * k, 1), self.ids.dec, dtype=torch.long, device=dev)
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start equal: expand the first only
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        length = torch.zeros(b * k, device=dev)
        kv: dict = {}
        for _ in range(steps):
            logp = F.log_softmax(self._next_logits(seq, enc, enc_mask, kv), -1)
            logp[done] = float("-inf")
            logp[done, self.ids.pad] = 0.0  # finished beams carry over unchanged
            vocab = logp.shape[-1]
            scores, flat = (scores.view(-1, 1) + logp).view(b, -1).topk(k, dim=1)
            rows = (flat // vocab + torch.arange(b, device=dev)[:, None] * k).view(-1)
            tok = (flat % vocab).view(-1)
            seq = torch.cat([seq[rows], tok[:, None]], 1)
            length = length[rows] + (~done[rows]).float()
            done = done[rows] | (tok == self.ids.sep)
            if bool(done.all()):
                break
        final = scores / length.view(b, k).clamp(min=1) ** length_penalty
        best = final.argmax(1) + torch.arange(b, device=dev) * k
        return seq[best]
