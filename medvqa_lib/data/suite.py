"""The datasets a chapter runs on, chosen from its :class:`~medvqa_lib.config.RunContext`."""

from __future__ import annotations

import random
from pathlib import Path

from medvqa_lib.config import Profile, RunContext
from medvqa_lib.data.schema import SPLITS, VQASample

Suite = dict[str, dict[str, list[VQASample]]]

#: the folder name each real dataset lives in under the data root
LOCAL_FOLDERS = {"vqa-rad": "vqa_rad", "slake": "slake", "pathvqa": "pathvqa"}
#: the hub copies used on the ``gpu`` profile when no folder is given
HUB_NAMES = {"vqa-rad": "vqa-rad-hub", "slake": "slake-hub", "pathvqa": "pathvqa"}


def load_suite(profile: Profile, root: Path | None, *, synthetic: bool = True, hub: bool = False,
               seed: int = 0, verbose: bool = True) -> Suite:
    """``{dataset: {split: samples}}``: the synthetic data (if ``synthetic``) and the real datasets.

    Real data comes from the folder ``root`` when it is given; otherwise from the Hugging Face
    Hub when ``hub`` is True. A dataset whose folder is absent under ``root`` is skipped with a
    message, never silently replaced. Nothing here reads the environment.
    """
    from medvqa_lib.data.registry import load_vqa

    suite: Suite = {}
    if synthetic:
        suite["synthetic"] = {
            split: load_vqa("synthetic", split, n_images=profile.synthetic_images,
                            image_size=profile.synthetic_image_size, seed=seed)
            for split in SPLITS
        }
    for name in profile.real_datasets:
        if root is not None:
            folder = root / LOCAL_FOLDERS.get(name, name)
            if not folder.is_dir():
                _say(verbose, f"{name}: no folder {folder} — skipped")
                continue
            suite[name] = {split: load_vqa(name, split, root=root) for split in SPLITS}
            _say(verbose, f"{name}: loaded from {root}")
        elif hub:
            suite[name] = {split: load_vqa(HUB_NAMES[name], split) for split in SPLITS}
            _say(verbose, f"{name}: loaded from the Hugging Face Hub")
    if root is None and not hub:
        _say(verbose, "real data: none given (data_dir / MEDVQA_DATA_DIR) — synthetic data only")
    return suite


def chapter_suite(ctx: RunContext, datasets: tuple[str, ...] | None = None,
                  verbose: bool = False) -> Suite:
    """The VQA datasets a paper chapter trains on: the real ones when ``ctx.real`` (``datasets``
    overrides the profile's list), else the built-in synthetic radiology data."""
    if ctx.real:
        profile = ctx.profile if datasets is None else ctx.profile.replace(real_datasets=datasets)
        return load_suite(profile, ctx.data_root, synthetic=False, hub=ctx.hub, seed=ctx.seed,
                          verbose=verbose)
    return load_suite(ctx.profile, None, synthetic=True, seed=ctx.seed, verbose=verbose)


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message)


def cap(samples: list[VQASample], limit: int | None, seed: int = 0) -> list[VQASample]:
    """At most ``limit`` samples, a seeded random subset keeping the original order."""
    if limit is None or len(samples) <= limit:
        return samples
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]
