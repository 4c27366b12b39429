"""The datasets a chapter runs on, chosen from the profile and the data folder."""

from __future__ import annotations

import os

from medvqa_lib.config import Profile, resolve_data_dir
from medvqa_lib.data.schema import SPLITS, VQASample

Suite = dict[str, dict[str, list[VQASample]]]

#: the folder name each real dataset lives in under the data root
LOCAL_FOLDERS = {"vqa-rad": "vqa_rad", "slake": "slake", "pathvqa": "pathvqa"}
#: the hub copies used on the ``gpu`` profile when no folder is given
HUB_NAMES = {"vqa-rad": "vqa-rad-hub", "slake": "slake-hub", "pathvqa": "pathvqa"}


def load_suite(profile: Profile, data_dir: str | os.PathLike | None = None, *,
               synthetic: bool = True, seed: int = 0, verbose: bool = True) -> Suite:
    """``{dataset: {split: samples}}``: synthetic always, real datasets when available.

    Real data comes from ``data_dir`` (or ``$MEDVQA_DATA_DIR``) when given; otherwise, on the
    ``gpu`` profile only, from the Hugging Face Hub if it is reachable. A dataset whose folder
    is absent under the data root is skipped with a message, never silently replaced.
    """
    from medvqa_lib.data.registry import load_vqa

    suite: Suite = {}
    if synthetic:
        suite["synthetic"] = {
            split: load_vqa("synthetic", split, n_images=profile.synthetic_images,
                            image_size=profile.image_size, seed=seed)
            for split in SPLITS
        }
    root = resolve_data_dir(data_dir)
    for name in profile.real_datasets:
        if root is not None:
            if not (root / LOCAL_FOLDERS.get(name, name)).is_dir():
                _say(verbose, f"{name}: no folder {root / LOCAL_FOLDERS.get(name, name)} — skipped")
                continue
            suite[name] = {split: load_vqa(name, split, root=root) for split in SPLITS}
            _say(verbose, f"{name}: loaded from {root}")
        elif profile.name == "gpu" and _hub_reachable():
            suite[name] = {split: load_vqa(HUB_NAMES[name], split) for split in SPLITS}
            _say(verbose, f"{name}: loaded from the Hugging Face Hub")
    if root is None and profile.name != "gpu":
        _say(verbose, "real data: none given (data_dir / MEDVQA_DATA_DIR) — synthetic data only")
    return suite


def _hub_reachable() -> bool:
    from medvqa_lib.data.hub import hub_reachable

    return hub_reachable()


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message)


def cap(samples: list[VQASample], limit: int | None, seed: int = 0) -> list[VQASample]:
    """At most ``limit`` samples, a seeded random subset keeping the original order."""
    if limit is None or len(samples) <= limit:
        return samples
    import random

    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]
