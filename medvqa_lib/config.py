"""Run profiles and the run context.

A :class:`Profile` holds only the knobs every chapter shares: the synthetic data's sizes, the
text backbone, evaluation caps, seeds, bootstrap resamples and precision. Every number that is
specific to a paper (model sizes, epochs, learning rates) lives in that paper's own
``medvqa_lib/papers/<paper>/config.py`` (its ``PLANS``), keyed by the profile's name.

A chapter's first cell calls :func:`medvqa_lib.notebook.setup`, which resolves the profile,
the data folder and the results folder once into a :class:`RunContext`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvqa_lib.errors import ConfigError, unknown_name

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEXT_BACKBONES = ("auto", "tiny", "minilm", "bert-base-uncased")


@dataclass(frozen=True)
class Profile:
    """The scale of a run. Every field can be overridden from a notebook's parameters cell."""

    name: str
    description: str
    #: synthetic generator sizes (the embedded default data)
    synthetic_images: int
    synthetic_labelled: int
    #: side of the synthetic images in pixels (a model's own input size lives in its paper's PLANS)
    synthetic_image_size: int
    #: "tiny" (random, 2 layers), "minilm" (offline pretrained), "bert-base-uncased" (hub)
    text_backbone: str
    #: hard cap on training questions per dataset (None = all)
    max_train_samples: int | None
    #: cap on evaluated questions per split (None = all)
    max_eval_samples: int | None
    batch_size: int
    seeds: tuple[int, ...]
    bootstrap_resamples: int
    precision: str = "auto"
    #: real datasets to use when a data folder is given (or the hub is reachable on ``gpu``)
    real_datasets: tuple[str, ...] = ("vqa-rad", "slake")

    def replace(self, **overrides: Any) -> Profile:
        """A copy with ``overrides`` applied and validated."""
        return _validated(dataclasses.replace(self, **_check_keys(overrides)))


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="tiny models, a few steps, synthetic data: seconds per notebook (CI)",
        synthetic_images=120,
        synthetic_labelled=40,
        synthetic_image_size=64,
        text_backbone="tiny",
        max_train_samples=256,
        max_eval_samples=128,
        batch_size=16,
        seeds=(0,),
        bootstrap_resamples=200,
    ),
    "cpu": Profile(
        name="cpu",
        description="a 2-core laptop: small models, MiniLM text side, minutes per chapter",
        synthetic_images=2000,
        synthetic_labelled=500,
        synthetic_image_size=128,
        text_backbone="minilm",
        max_train_samples=None,
        max_eval_samples=None,
        batch_size=32,
        seeds=(0, 1, 2),
        bootstrap_resamples=1000,
    ),
    "gpu": Profile(
        name="gpu",
        description="the papers' own model sizes and schedules (Colab GPU and up)",
        synthetic_images=20000,
        synthetic_labelled=5000,
        synthetic_image_size=224,
        text_backbone="auto",
        max_train_samples=None,
        max_eval_samples=None,
        batch_size=32,
        seeds=(0, 1, 2),
        bootstrap_resamples=2000,
        precision="auto",
    ),
}


def get_profile(name: str, **overrides: Any) -> Profile:
    """The profile called ``name`` with ``overrides`` applied.

    Raises :class:`~medvqa_lib.errors.UnknownNameError` for an unknown name and
    :class:`~medvqa_lib.errors.ConfigError` for an unknown or out-of-range override.
    Overrides whose value is ``None`` are ignored (a parameters cell's "keep the default").
    """
    if isinstance(name, Profile):
        return name.replace(**{k: v for k, v in overrides.items() if v is not None})
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise unknown_name("profile", name, PROFILES)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return PROFILES[key].replace(**overrides)


def _check_keys(overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Profile)} - {"name", "description"}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ConfigError(
            f"unknown profile parameter(s) {', '.join(bad)}; valid ones are: {', '.join(sorted(names))}"
        )
    if "seeds" in overrides:
        seeds = overrides["seeds"]
        overrides["seeds"] = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if "real_datasets" in overrides:
        overrides["real_datasets"] = tuple(overrides["real_datasets"])
    return overrides


def _validated(p: Profile) -> Profile:
    positive = ("synthetic_images", "synthetic_image_size", "batch_size", "bootstrap_resamples")
    for name in positive:
        value = getattr(p, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"profile parameter {name} must be a positive integer, got {value!r}")
    for name in ("synthetic_labelled",):
        value = getattr(p, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"profile parameter {name} must be an integer >= 0, got {value!r}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(p, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"profile parameter {name} must be None or a positive integer, got {value!r}")
    if p.synthetic_image_size % 16:
        raise ConfigError("profile parameter synthetic_image_size must be a multiple of 16 (patch size), "
                          f"got {p.synthetic_image_size}")
    if p.precision not in PRECISIONS:
        raise ConfigError(f"profile parameter precision must be one of {PRECISIONS}, got {p.precision!r}")
    if p.text_backbone not in TEXT_BACKBONES:
        raise ConfigError(
            f"profile parameter text_backbone must be one of {TEXT_BACKBONES}, got {p.text_backbone!r}"
        )
    if not p.seeds or not all(isinstance(s, int) for s in p.seeds):
        raise ConfigError(f"profile parameter seeds must be a non-empty list of integers, got {p.seeds!r}")
    return p


#: the one environment variable naming the real-data folder; read by :func:`resolve_data_dir` only
DATA_ENV = "MEDVQA_DATA_DIR"
#: values of a ``data_dir`` parameter that mean "the embedded synthetic data"
SYNTHETIC = ("synthetic", "none", "None", "")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The real-data folder: ``data_dir`` if given, else ``$MEDVQA_DATA_DIR``, else None.

    The strings ``"synthetic"`` and ``""`` mean "no real data" (the embedded default), whatever
    the environment says. A given folder that does not exist is an error, not a silent fallback.
    This is the only place of the library that reads ``$MEDVQA_DATA_DIR``.
    """
    value = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if value is None or str(value).strip() in SYNTHETIC:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"data folder {path} does not exist; pass the folder that holds vqa_rad/ and slake/ "
            "(or data_dir='synthetic' for the embedded synthetic data)"
        )
    return path.resolve()


@dataclass(frozen=True)
class RunContext:
    """Everything a chapter resolves once, in its first cell (:func:`medvqa_lib.notebook.setup`).

    After setup nothing reads the environment: the data folder, whether real data is used,
    where results go and the seed all come from here.
    """

    profile: Profile
    #: the real-data folder (holding ``vqa_rad/``, ``slake/``, ...), None for synthetic data
    data_root: Path | None
    #: True when the chapter runs on real VQA data (a folder, or the Hub on the ``gpu`` profile)
    real: bool
    #: True when the Hugging Face Hub may be used for data and weights (``gpu`` profile, online)
    hub: bool
    #: the chapter's results folder (CSV / JSON tables)
    out_dir: Path
    seed: int
    #: "cuda" or "cpu"
    device: str
    #: the book checkout the chapter runs in (holding ``notebooks/``), None elsewhere (e.g. Colab)
    book_root: Path | None = None

    @property
    def data_source(self) -> str:
        """Where the VQA data comes from, in words."""
        if self.data_root is not None:
            return f"folder {self.data_root}"
        return "the Hugging Face Hub" if self.real else "the built-in synthetic data"


# ----------------------------------------------------------------------------- paper plans


def plan_of(plans: Mapping[str, Mapping[str, Any]], profile: str | Profile, paper: str) -> dict[str, Any]:
    """A copy of ``plans[profile's name]`` (a paper's ``PLANS``), its dict values copied too, so
    that a study never edits the plan it came from; an unknown profile lists the known ones."""
    name = getattr(profile, "name", profile)
    if name not in plans:
        raise ConfigError(f"unknown profile {name!r}: there is no {paper} plan for it; choose one of "
                          f"{', '.join(plans)}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in plans[name].items()}


def checked(what: str, values: Mapping[str, Any] | None, valid: type | Iterable[str]) -> dict[str, Any]:
    """``values`` without its None entries (None keeps the plan's value); a key that is not in
    ``valid`` (names, or a dataclass's fields) raises a :class:`ConfigError` naming the valid ones."""
    names = {f.name for f in dataclasses.fields(valid)} if isinstance(valid, type) else set(valid)
    values = dict(values or {})
    bad = sorted(set(values) - names)
    if bad:
        raise ConfigError(f"unknown {what} {', '.join(map(repr, bad))}; valid ones are: {', '.join(sorted(names))}")
    return {k: v for k, v in values.items() if v is not None}
