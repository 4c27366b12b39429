"""PaliGemma's settings: the model spec, the study, and every profile-dependent number (PLANS).

:data:`PLANS` is the only home of the numbers that change with the run profile (model sizes
of the tiny stand-in, epochs, learning rates, caps, seeds); :func:`study_plan` turns one
profile's plan plus a chapter's overrides into a :class:`PaliGemmaStudy`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa_lib.config import checked, plan_of
from medvqa_lib.errors import ConfigError, unknown_name

__all__ = ["HUB_MODELS", "LM_TARGETS", "VISION_TARGETS", "OFFLINE_MIXES", "PaliGemmaSpec",
           "PaliGemmaStudy", "PLANS", "study_plan"]

HUB_MODELS = {448: "google/paligemma-3b-mix-448", 224: "google/paligemma-3b-mix-224"}
#: the paper's LoRA target names, as they exist in Gemma
LM_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
#: SigLIP's modules for the same roles: literal name matches, and the role mapping
VISION_TARGETS: dict[str, tuple[str, ...]] = {
    "literal": ("q_proj", "k_proj", "v_proj"),
    "equivalent": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
#: the datamixes that need no Hub (see :data:`medvqa_lib.papers.paligemma.data.DATAMIXES`)
OFFLINE_MIXES = ("target", "captions-qa", "captions-qa+anneal")


@dataclass(frozen=True)
class PaliGemmaSpec:
    """Model sizes and adaptation settings (the sizes of each profile are in :data:`PLANS`)."""

    #: "tiny" (built here) or a Hub id / local folder of a PaliGemma checkpoint
    source: str = "tiny"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 2
    text_head_dim: int = 32
    tokenizer_vocab: int = 600
    lora_r: int = 12
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # peft default; the paper gives none
    vision_lora: str = "equivalent"
    load_in_4bit: bool = False
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.vision_lora not in VISION_TARGETS:
            raise unknown_name("vision_lora mapping", self.vision_lora, VISION_TARGETS)
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"


@dataclass
class PaliGemmaStudy:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    spec: PaliGemmaSpec
    base_epochs: int
    stage1_epochs: int
    stage2_epochs: int
    anneal_epochs: int
    base_lr: float
    lr: float
    batch_size: int
    grad_accum: int
    schedule: str
    weight_decay: float
    max_train: int | None
    max_eval: int | None
    val_limit: int
    seeds: tuple[int, ...]
    datamixes: tuple[str, ...]
    anneal_size: int
    scaling_fractions: tuple[float, ...]
    #: epochs of each scaling-law run (points = fractions x epochs; Eq. 1 needs >= 5)
    scaling_epochs: int = 3
    consistency_runs: int = 5
    sample_temperature: float = 1.0
    max_new_tokens: int = 10
    precision: str = "auto"
    #: synthetic QA from captions: "rule" (offline), "hf:<model>", "openai:<model>@<url>"
    qa_backend: str = "rule"
    qa_prompt: str = "paligemma_qa_caption"
    #: saliency (Section 6): the penultimate layer as the paper, one head, rollout settings
    saliency_layer: int = -2
    saliency_head: int = 0
    head_fusion: str = "mean"
    discard_ratio: float = 0.9
    #: the chapter's results folder; runs go under ``out_dir / "runs"``
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def run_dir(self, name: str) -> Path:
        """The folder of run ``name``: ``out_dir / "runs" / name``."""
        if self.out_dir is None:
            raise ConfigError("this study has no out_dir: pass study_plan(profile, out_dir=...)")
        return self.out_dir / "runs" / name


# The tiny stand-in's sizes (smoke/cpu) and the paper's model and appendix arguments (gpu).
PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        model=dict(source="tiny", image_size=32, patch_size=8, vision_width=64, vision_depth=2,
                   vision_heads=2, text_width=64, text_depth=2, text_heads=2, text_head_dim=32,
                   tokenizer_vocab=600),
        base_epochs=1, stage1_epochs=1, stage2_epochs=1, anneal_epochs=1, base_lr=2e-3, lr=2e-3,
        batch_size=16, grad_accum=1, schedule="constant", weight_decay=0.0, max_train=48, max_eval=16,
        val_limit=16, seeds=(0,), datamixes=OFFLINE_MIXES, anneal_size=8, scaling_fractions=(0.5, 1.0),
        scaling_epochs=3),
    # ~20 min on 2 cores (see the chapter's closing note for the measured time)
    "cpu": dict(
        model=dict(source="tiny", image_size=64, patch_size=8, vision_width=96, vision_depth=3,
                   vision_heads=3, text_width=128, text_depth=3, text_heads=4, text_head_dim=32,
                   tokenizer_vocab=1500),
        base_epochs=3, stage1_epochs=3, stage2_epochs=4, anneal_epochs=1, base_lr=1e-3, lr=1e-3,
        batch_size=32, grad_accum=1, schedule="constant", weight_decay=0.0, max_train=1500, max_eval=300,
        val_limit=128, seeds=(0, 1), datamixes=OFFLINE_MIXES, anneal_size=100,
        scaling_fractions=(0.25, 0.5, 1.0), scaling_epochs=3),
    # the paper's appendix: lr 1e-5 constant, no weight decay, batch 6 x accumulation 16;
    # stage 1 is five SLAKE epochs
    "gpu": dict(
        model=dict(source=HUB_MODELS[448], image_size=448, patch_size=14, dtype="bf16"),
        base_epochs=0, stage1_epochs=5, stage2_epochs=3, anneal_epochs=1, base_lr=1e-5, lr=1e-5,
        batch_size=6, grad_accum=16, schedule="constant", weight_decay=0.0, max_train=None, max_eval=200,
        val_limit=256, seeds=(0, 1, 2), datamixes=("roco-qa", "medpix-shortqa", "roco-qa+medpix", "pmc-vqa"),
        anneal_size=500, scaling_fractions=(0.25, 0.5, 1.0), scaling_epochs=3, precision="bf16"),
}



def study_plan(profile: Any, out_dir: str | Path | None = None, **overrides: Any) -> PaliGemmaStudy:
    """The study of ``profile`` (a :class:`~medvqa_lib.config.Profile` or its name).

    ``overrides`` are :class:`PaliGemmaStudy` fields and ``model``, a dict of
    :class:`PaliGemmaSpec` fields; a value of ``None`` keeps the plan's. An unknown key raises
    :class:`~medvqa_lib.errors.ConfigError` naming the valid ones. Lists become tuples.
    """
    plan = plan_of(PLANS, profile, "PaliGemma")
    model = dict(plan.pop("model"))
    study_keys = {f.name for f in dataclasses.fields(PaliGemmaStudy)} - {"spec", "out_dir"}
    overrides = checked("PaliGemma study key(s)", overrides, study_keys | {"model"})
    model_over = checked("PaliGemma model key(s)", overrides.pop("model", None), PaliGemmaSpec)
    spec = PaliGemmaSpec(**{**model, **model_over})
    plan.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()})
    return PaliGemmaStudy(spec=spec, out_dir=None if out_dir is None else Path(out_dir), **plan)
