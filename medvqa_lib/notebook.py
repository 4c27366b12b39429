"""What the first cell of every chapter calls: versions, device, seed, profile."""

from __future__ import annotations

import os
import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from medvqa_lib.config import Profile, get_profile

REPO_URL = "https://github.com/medvqa-book/medvqa-book"
SHOWN_PACKAGES = ("medvqa-lib", "torch", "transformers", "timm", "peft", "datasets")


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def package_versions(names: tuple[str, ...] = SHOWN_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` ("not installed" where absent)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def setup(profile: str | Profile, seed: int = 0, *, quiet_progress: bool | None = None,
          **overrides: Any) -> Profile:
    """Resolve the profile, seed everything, print versions and device; return the profile.

    ``overrides`` are profile fields from the parameters cell (``None`` keeps the default).
    A bad profile name or parameter raises here, in the first cell, with the valid choices.
    In Colab without a GPU it warns that the ``gpu`` profile will be very slow.
    """
    import torch

    from medvqa_lib.training import keep_freed_memory, pick_device, seed_everything

    prof = get_profile(profile, **overrides)
    seed_everything(seed)
    if pick_device("auto").type == "cpu":
        keep_freed_memory()  # a CPU step otherwise page-faults its big tensors in every time
    if quiet_progress is None:
        quiet_progress = os.environ.get("MEDVQA_PROGRESS", "1") == "0"
    if quiet_progress:
        os.environ["TQDM_DISABLE"] = "1"
    device = pick_device("auto")
    versions = " · ".join(f"{k} {v}" for k, v in package_versions().items())
    print(versions)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU"
    print(f"device: {device} ({gpu}) · threads: {torch.get_num_threads()} · seed: {seed}")
    print(f"profile: {prof.name} — {prof.description}")
    if in_colab() and device.type != "cuda":
        warnings.warn(
            "Colab is running without a GPU: choose Runtime → Change runtime type → GPU, "
            "or set profile='cpu' in the parameters cell.",
            stacklevel=2,
        )
    if prof.name == "gpu" and device.type != "cuda":
        warnings.warn("profile 'gpu' on a machine without CUDA will be very slow; "
                      "use profile='cpu' here.", stacklevel=2)
    return prof


def output_dir(chapter: str, root: str | os.PathLike | None = None) -> Path:
    """Folder for a chapter's result tables (CSV/JSON), created if needed.

    ``$MEDVQA_OUTPUT_DIR`` (set by ``python -m medvqa_lib reproduce``) wins over ``root``;
    the default is ``_build/results`` of the book checkout that holds the working directory
    (run from ``notebooks/`` or from the root alike), else of the working directory (Colab).
    """
    base = os.environ.get("MEDVQA_OUTPUT_DIR") or root or _results_root(Path.cwd().resolve())
    path = Path(base) / chapter
    path.mkdir(parents=True, exist_ok=True)
    return path


def _results_root(cwd: Path) -> Path:
    for folder in (cwd, *cwd.parents):
        if (folder / "_config.yml").is_file() and (folder / "notebooks").is_dir():
            return folder / "_build" / "results"
    return cwd / "_build" / "results"
