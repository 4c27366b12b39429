"""Pre-training corpora shared by the chapters: image-caption pairs and nested shares of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvqa_lib.config import Profile
from medvqa_lib.data.schema import CaptionSample


def caption_pairs(profile: Profile, n: int, seed: int = 0, root: Path | None = None, *,
                  hub: bool = False, verbose: bool = True) -> tuple[list[CaptionSample], str]:
    """Up to ``n`` image-caption pairs and where they came from: a local ROCO folder under the
    data folder ``root`` (``roco/``), the Hub's ROCO when ``hub`` is allowed, else the synthetic
    generator's training captions."""
    from medvqa_lib.data.captions import load_roco_captions

    if root is not None and (root / "roco").is_dir():
        pairs, source = load_roco_captions("train", root), f"ROCO ({root / 'roco'})"
    elif hub:
        pairs, source = load_roco_captions("train", limit=n), "ROCO (Hugging Face Hub)"
    else:
        from medvqa_lib.data.synthetic import load_synthetic_captions

        pairs = load_synthetic_captions(n_images=profile.synthetic_images, image_size=profile.synthetic_image_size,
                                        seed=seed)
        source = "synthetic captions (stand-in for ROCO)"
    rng = np.random.default_rng(seed)
    pairs = [pairs[i] for i in sorted(rng.permutation(len(pairs))[:n])]
    if verbose:
        print(f"image-caption pairs: {len(pairs)} from {source}")
    return pairs, source


def subset(items: Sequence[Any], fraction: float, seed: int = 0) -> list[Any]:
    """A seeded random share of ``items`` (nested: a smaller share is inside a larger one)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in sorted(order[: round(fraction * len(items))])]
