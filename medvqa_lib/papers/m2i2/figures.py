"""The chapter's figures: Figure 3 (Grad-CAM of the cross-attention) and MAE reconstructions."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvqa_lib.data.schema import VQASample
from medvqa_lib.experiments.images import ImageCache
from medvqa_lib.papers.m2i2.model import M2I2

__all__ = ["gradcam_figure", "pick_examples", "reconstruction_figure"]


def pick_examples(test: Sequence[VQASample], n_closed: int = 2, n_open: int = 2, seed: int = 0) -> list[VQASample]:
    """Seeded random test questions for a figure (closed first, then open), on distinct images
    where possible. Chosen without looking at any model's answers."""
    rng = np.random.default_rng(seed)
    chosen: list[VQASample] = []
    for kind, n in (("closed", n_closed), ("open", n_open)):
        pool = [s for s in test if s.answer_type == kind]
        order = rng.permutation(len(pool))
        used = {s.image_id for s in chosen}
        picks = [pool[i] for i in order if pool[i].image_id not in used][:n]
        picks += [pool[i] for i in order if pool[i] not in picks][: n - len(picks)]
        chosen += picks
    return chosen


def _wrap(text: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _show(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) image normalised to mean/std 0.5 as an RGB array in [0, 1]."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def gradcam_figure(model: M2I2, samples: Sequence[VQASample], tokenizer: Any, cache: ImageCache,
                   layer: int | None = None, max_question_len: int = 32) -> tuple[Any, pd.DataFrame]:
    """Figure 3: Grad-CAM of the multimodal encoder's cross-attention for each question, for
    the log-likelihood of the model's own greedy answer, overlaid on the image. Returns the
    figure and a table of question, reference and generated answer."""
    import matplotlib.pyplot as plt

    from medvqa_lib.data.dataset import VQACollator
    from medvqa_lib.experiments.generative import CachedVQADataset, decode_answers
    from medvqa_lib.papers.m2i2.gradcam import cross_attention_gradcam, default_layer, overlay

    data = CachedVQADataset(list(samples), cache)
    batch = VQACollator(tokenizer, max_question_len=max_question_len)([data[i] for i in range(len(data))])
    device = next(model.parameters()).device
    args = [batch[k].to(device) for k in ("images", "question_ids", "question_mask")]
    model.eval()
    with torch.no_grad():
        answers = decode_answers(tokenizer, model.generate(*args, num_beams=1))
    maps = cross_attention_gradcam(model, *args, layer=layer)
    layer = default_layer(model) if layer is None else layer
    fig, axes = plt.subplots(1, len(samples), figsize=(3.4 * len(samples), 4.4), squeeze=False)
    for ax, s, image, cam, pred in zip(axes[0], samples, batch["images"], maps, answers, strict=True):
        ax.imshow(overlay(image, cam))
        ax.axis("off")
        ax.set_title(_wrap(f"Q: {s.question}") + f"\nA: {s.answer} · Pred: {pred}\n({s.answer_type})",
                     fontsize=8, loc="left")
    fig.suptitle(f"Grad-CAM of the cross-attention of text layer {layer} (the model's own answer)", y=1.0)
    fig.tight_layout()
    table = pd.DataFrame({"question": [s.question for s in samples], "answer type": [s.answer_type for s in samples],
                          "reference": [s.answer for s in samples], "generated": answers})
    return fig, table


def reconstruction_figure(models: Mapping[str, M2I2], images: torch.Tensor, seed: int = 0) -> Any:
    """MAE reconstructions (the MIM head) of ``images`` by each model, with the same random
    masks for every model: original, masked input, reconstruction of every patch, and the
    visible patches with the reconstructed masked ones pasted in."""
    import matplotlib.pyplot as plt

    cols = ("original", "masked input", "reconstruction", "visible + reconstructed")
    rows = [(label, i) for i in range(images.shape[0]) for label in models]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.6, 2.5 * len(rows)), squeeze=False)
    outs = {}
    for label, model in models.items():
        model.eval()
        torch.manual_seed(seed)
        outs[label] = model.reconstruct(images.to(next(model.parameters()).device))
    for r, (label, i) in enumerate(rows):
        out = outs[label]
        panels = (images[i], out["masked"][i], out["reconstruction"][i], out["pasted"][i])
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            ax.imshow(_show(panel))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r][0].set_ylabel(f"{label}\nimage {i + 1}", fontsize=8)
    fig.tight_layout()
    return fig
