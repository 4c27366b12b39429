"""What the first cell of every chapter calls: versions, device, seed, profile."""

from __future__ import annotations

import os
import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from medvqa_lib.config import Profile, RunContext, get_profile, resolve_data_dir

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


def setup(profile: str | Profile, seed: int = 0, *, data_dir: str | os.PathLike | None = None,
          chapter: str = "chapter", overrides: dict[str, Any] | None = None,
          quiet_progress: bool | None = None, **profile_fields: Any) -> RunContext:
    """Resolve everything a chapter needs once and return it as a :class:`RunContext`.

    * the profile, with ``overrides`` / ``profile_fields`` applied (profile fields only;
      ``None`` keeps the default), validated here, in the first cell;
    * the data folder: ``data_dir``, else ``$MEDVQA_DATA_DIR``; ``"synthetic"`` means none,
      whatever the environment says;
    * whether real data is used, the Hub allowed, the results folder, the seed and the device.

    Seeds everything, prints versions and device. This is the last place a chapter reads the
    environment.
    """
    import torch

    from medvqa_lib.data.registry import available_datasets
    from medvqa_lib.training import keep_freed_memory, pick_device, seed_everything
    from medvqa_lib.training.device import cpu_has_native_bf16
    from medvqa_lib.training.loop import set_progress

    fields = {**(overrides or {}), **profile_fields}
    prof = get_profile(profile, **fields)
    seed_everything(seed)
    if pick_device("auto").type == "cpu":
        keep_freed_memory()  # a CPU step otherwise page-faults its big tensors in every time
    if quiet_progress is None:
        quiet_progress = os.environ.get("MEDVQA_PROGRESS", "1") == "0"
    if quiet_progress:
        os.environ["TQDM_DISABLE"] = "1"
    set_progress(not quiet_progress)
    cpu_has_native_bf16()  # reads $MEDVQA_CPU_BF16 once, here
    device = pick_device("auto")
    root = resolve_data_dir(data_dir)
    synthetic_asked = data_dir is not None and root is None
    hub = prof.name == "gpu" and not synthetic_asked and root is None and _hub_reachable()
    real = bool(available_datasets(root)) if root is not None else hub
    ctx = RunContext(profile=prof, data_root=root, real=real, hub=hub, out_dir=output_dir(chapter),
                     seed=seed, device=device.type, book_root=book_root(Path.cwd().resolve()))
    versions = " · ".join(f"{k} {v}" for k, v in package_versions().items())
    print(versions)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU"
    print(f"device: {device} ({gpu}) · threads: {torch.get_num_threads()} · seed: {seed}")
    print(f"profile: {prof.name} — {prof.description}")
    print(f"data: {ctx.data_source}")
    if in_colab() and device.type != "cuda":
        warnings.warn(
            "Colab is running without a GPU: choose Runtime → Change runtime type → GPU, "
            "or set profile='cpu' in the parameters cell.",
            stacklevel=2,
        )
    if prof.name == "gpu" and device.type != "cuda":
        warnings.warn("profile 'gpu' on a machine without CUDA will be very slow; "
                      "use profile='cpu' here.", stacklevel=2)
    return ctx


def _hub_reachable() -> bool:
    from medvqa_lib.data.hub import hub_reachable

    return hub_reachable()


def show_code(*functions: Any) -> Any:
    """Show the source of ``functions`` (the code of an equation) as a highlighted block.

    In a notebook this returns a Markdown object that renders as Python code; each function
    is shown with the module it lives in, so a reader can open the file.
    """
    import inspect

    from IPython.display import Markdown

    parts = []
    for fn in functions:
        target = inspect.unwrap(fn)
        module = inspect.getmodule(target)
        where = f"{module.__name__}.{target.__qualname__}" if module else target.__qualname__
        parts.append(f"`{where}`\n\n```python\n{inspect.getsource(target).rstrip()}\n```")
    return Markdown("\n\n".join(parts))


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


def book_root(cwd: Path) -> Path | None:
    """The book checkout holding ``cwd`` (a folder with ``_config.yml`` and ``notebooks/``)."""
    for folder in (cwd, *cwd.parents):
        if (folder / "_config.yml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return None


def _results_root(cwd: Path) -> Path:
    return (book_root(cwd) or cwd) / "_build" / "results"
