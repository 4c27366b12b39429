"""Grad-CAM on M2I2's cross-attention (the paper's Fig. 3), with the ``grad-cam`` package.

The multimodal encoder's cross-attention runs through fused SDPA, which returns no attention
probabilities. For one chosen layer, :func:`cross_attention_gradcam` swaps in an explicit
softmax attention (same weights, same output) whose probabilities (B, heads, question tokens,
1 + patches) pass through an identity module, :class:`AttentionProbe`. ``pytorch_grad_cam``'s
``GradCAM`` hooks that module: each (head, question token) attention map over the patch grid is
one "channel", weighted by the spatial mean of its gradient; the target is the log-likelihood of
an answer (by default the model's own greedy answer). The [CLS] key is dropped and the map is
upsampled to the image size and scaled to [0, 1].

``grad-cam`` is an optional dependency (``pip install grad-cam``; it brings OpenCV).
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medvqa_lib.papers.m2i2.model import M2I2

__all__ = ["AttentionProbe", "cross_attention_gradcam", "default_layer", "overlay"]


def _require_gradcam() -> Any:
    try:
        import pytorch_grad_cam
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Grad-CAM needs the 'grad-cam' package: pip install grad-cam") from err
    return pytorch_grad_cam


class AttentionProbe(nn.Identity):
    """Identity on the attention probabilities, so that hooks can see them and their gradient."""


def default_layer(model: M2I2) -> int:
    """The third multimodal layer (ALBEF's choice for its Grad-CAM, text layer 8 of 12), or the
    last one when there are fewer."""
    return model.n_text_layers + min(2, model.depth - model.n_text_layers - 1)


@contextmanager
def _explicit_cross_attention(model: M2I2, layer: int, probe: AttentionProbe) -> Iterator[None]:
    """Within the block, text layer ``layer``'s cross-attention computes softmax(QK^T/sqrt(d))
    explicitly and passes it through ``probe`` (same result as the SDPA path)."""
    block = model.text_encoder.layers[layer].cross_attn
    if block is None:
        raise ValueError(f"text layer {layer} has no cross-attention (the multimodal layers are "
                         f"{model.n_text_layers}..{model.depth - 1})")
    attn = block.attn

    def forward(self: nn.Module, x: Tensor, mask: Tensor | None, packing: Any, *, is_causal: bool = False,
                enc: Tensor | None = None, enc_index: Tensor | None = None, kv_cache: Any = None,
                q_index: Tensor | None = None) -> Tensor:
        if q_index is not None or enc is None:
            raise NotImplementedError("the Grad-CAM attention covers full cross-attention passes only")
        kv = self.kv(enc)
        if enc_index is not None:
            kv = kv.index_select(0, enc_index)
        k, v = kv.chunk(2, dim=-1)
        q = packing.pad(self.q(x))
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        y = probe(scores.softmax(-1)) @ v
        return self.proj(packing.pack(y.transpose(1, 2).flatten(2)))

    attn.forward = types.MethodType(forward, attn)
    try:
        yield
    finally:
        del attn.forward


class _AnswerLogLikelihood(nn.Module):
    """images -> (B, 1) log-likelihood of fixed answers to fixed questions."""

    def __init__(self, model: M2I2, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
                 answer_mask: Tensor) -> None:
        super().__init__()
        self.model = model
        self.q = (question_ids, question_mask)
        self.a = (answer_ids, answer_mask)

    def forward(self, images: Tensor) -> Tensor:
        m = self.model
        states, mask = m.encode_question(images, *self.q)
        ids, amask = self.a
        out = m.text_decoder(ids, amask, states, mask)
        logp = torch.log_softmax(m.lm_head(out[:, :-1]).float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        return (logp * amask[:, 1:]).sum(1, keepdim=True)


def _answer_tensors(model: M2I2, answers: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Generated answers (no [CLS]) as padded ``[CLS] answer [SEP]`` ids and mask."""
    rows = [[model.ids.dec] + a for a in answers]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), model.ids.pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
        mask[i, : len(r)] = 1
    return ids, mask


def cross_attention_gradcam(model: M2I2, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                            answer_ids: Tensor | None = None, answer_mask: Tensor | None = None,
                            layer: int | None = None) -> np.ndarray:
    """Grad-CAM maps (B, H, W) in [0, 1] of the cross-attention of text layer ``layer`` (default
    :func:`default_layer`) for the log-likelihood of ``answer_ids`` (``[CLS] answer [SEP]``),
    or of the model's own greedy answer when none is given. The model's gradients are cleared
    and its training mode restored afterwards."""
    cam_pkg = _require_gradcam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = default_layer(model) if layer is None else layer
    grid = images.shape[-1] // model.config.patch_size
    was_training = model.training
    if answer_ids is None:
        answers = model.generate(images, question_ids, question_mask, num_beams=1)
        answer_ids, answer_mask = _answer_tensors(model, answers, images.device)
    probe = AttentionProbe()

    def to_grid(t: Tensor) -> Tensor:  # (B, heads, Lq, 1+N) -> (B, heads*Lq, g, g)
        return t[..., 1:].flatten(1, 2).unflatten(-1, (grid, grid))

    wrapper = _AnswerLogLikelihood(model, question_ids, question_mask, answer_ids, answer_mask)
    try:
        with _explicit_cross_attention(model, layer, probe):
            cam = cam_pkg.GradCAM(model=wrapper, target_layers=[probe], reshape_transform=to_grid)
            maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(0)] * images.shape[0])
            cam.activations_and_grads.release()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return maps


def overlay(image: Tensor, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """An RGB uint8 overlay of a Grad-CAM map on one image (3, H, W) normalised to mean/std 0.5."""
    _require_gradcam()
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = ((image.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 0).numpy()
    return show_cam_on_image(rgb.astype(np.float32), cam, use_rgb=True, image_weight=1.0 - weight)
