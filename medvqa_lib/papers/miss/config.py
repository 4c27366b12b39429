"""MISS's settings: the model config, the chapter's study, and PLANS, the one home of every
number that depends on the run profile (``smoke``, ``cpu``, ``gpu``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvqa_lib.config import Profile, checked, plan_of
from medvqa_lib.experiments.generative import StageSettings

__all__ = ["PLANS", "MISSConfig", "MISSStudy", "study_plan"]


@dataclass
class MISSConfig:
    """Sizes and pre-training settings of a MISS model. The defaults are the paper's
    (ViT-B/16 at 224 px, BERT-base); :meth:`from_profile` gives a profile's preset."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    #: timm weights for the ViT (loaded only when the Hub is reachable)
    vit_pretrained: str | None = None
    #: image size of VQA fine-tuning (the paper: 224 px pre-training, 480 px fine-tuning)
    finetune_image_size: int | None = None
    drop_path: float = 0.0
    #: "tiny", "minilm", "bert-base-uncased" or "auto" (see medvqa_lib.text)
    text_backbone: str = "bert-base-uncased"
    #: text layers of the JTM encoder and decoder; None = all layers of the backbone
    text_depth: int | None = None
    #: dropout of the text stacks' hidden states; None = the backbone's (0.1 for BERT)
    dropout: float | None = None
    #: dropout of the text attention probabilities. BERT uses 0.1; 0 keeps SDPA on its fused
    #: kernels (the CPU flash kernel has no dropout, and with it attention costs ~10 % of a step)
    attn_dropout: float = 0.0
    embed_dim: int = 256
    queue_size: int = 57600
    momentum: float = 0.995
    temp: float = 0.07
    alpha: float = 0.4
    mlm_probability: float = 0.15
    decoder_objective: Literal["mlm", "lm"] = "mlm"
    jtm: bool = True
    max_text_len: int = 30
    max_question_len: int = 35
    max_answer_len: int = 10

    def __post_init__(self) -> None:
        if self.decoder_objective not in ("mlm", "lm"):
            raise ValueError(f"decoder_objective must be 'mlm' or 'lm', got {self.decoder_objective!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def from_profile(cls, profile: str | Profile, **overrides: Any) -> MISSConfig:
        """The model of ``PLANS[profile]["model"]`` (a name or a :class:`Profile`, of which only
        the name is used) with ``overrides`` applied."""
        values = dict(plan_of(PLANS, profile, "MISS")["model"])
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> MISSConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class MISSStudy:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    model: MISSConfig
    pretrain: StageSettings
    finetune: StageSettings
    #: fine-tuning epochs per dataset (small datasets get more)
    finetune_epochs: dict[str, int]
    #: image-caption pairs in the pre-training corpus
    pairs: int
    #: shares of the TransCap pool added to the pairs, increasing (the last one is the full model)
    transcap_fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    #: the dataset of the ablation table (SLAKE, as in the paper, when it is there)
    ablation_dataset: str = "slake"
    #: fine-tuning epochs of each ablation run (None: the dataset's own epochs)
    ablation_epochs: int | None = None
    #: fine-tune with a separate answer decoder (the public code) instead of the shared one
    untie_decoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def epochs_for(self, dataset: str) -> int:
        return self.finetune_epochs.get(dataset, self.finetune_epochs.get("default", self.finetune.epochs))

    def finetune_settings(self, dataset: str, ablation: bool = False) -> StageSettings:
        epochs = self.ablation_epochs if ablation and self.ablation_epochs else self.epochs_for(dataset)
        return dataclasses.replace(self.finetune, epochs=epochs)


#: per profile: the model preset (``model``), the two training stages (``pretrain``,
#: ``finetune``: :class:`StageSettings` fields) and the other :class:`MISSStudy` fields
PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        model=dict(image_size=64, vision_width=128, vision_depth=2, vision_heads=4, text_backbone="tiny",
                   embed_dim=64, queue_size=128),
        pretrain=dict(epochs=1, batch_size=16, lr=1e-4),
        finetune=dict(epochs=1, batch_size=16, lr=1e-4, eval_limit=32, group_size=1),
        finetune_epochs={"default": 1}, pairs=48, transcap_fractions=(0.5, 1.0)),
    # 2 cores: the whole chapter (5 pre-trainings, ~11 fine-tunings) in ~20 minutes; a high
    # learning rate because there are few steps (at 1e-4 the decoder still answers every open
    # question alike after 2 SLAKE epochs)
    "cpu": dict(
        model=dict(image_size=96, vision_width=384, vision_depth=3, vision_heads=6, text_backbone="minilm",
                   text_depth=3, queue_size=1024),
        pretrain=dict(epochs=1, batch_size=32, lr=1e-4),
        finetune=dict(epochs=2, batch_size=64, lr=5e-4, eval_limit=256, group_size=4),
        # SLAKE's open answers still rose steeply from epoch 1 to 2 (validation 14 -> 38 %)
        finetune_epochs={"vqa-rad": 3, "slake": 4, "synthetic": 2, "default": 2},
        ablation_epochs=1, seeds=(0, 1), pairs=400, transcap_fractions=(0.5, 1.0)),
    # the paper: ViT-B/16 and BERT-base, 224 px pre-training and 480 px fine-tuning; AdamW,
    # lr 2e-5, weight decay 0.05, cosine to 0; 100 pre-training and 200 fine-tuning epochs;
    # batch sizes of the public code (pre-training 32/GPU, VQA 16/GPU)
    "gpu": dict(
        model=dict(image_size=224, finetune_image_size=480, vision_width=768, vision_depth=12,
                   vision_heads=12, vit_pretrained="vit_base_patch16_224", text_backbone="bert-base-uncased",
                   queue_size=57600),
        pretrain=dict(epochs=100, batch_size=32, lr=2e-5, warmup_ratio=0.0),
        finetune=dict(epochs=200, batch_size=16, lr=2e-5, warmup_ratio=0.0, eval_limit=None),
        finetune_epochs={"default": 200}, pairs=38_800, transcap_fractions=(0.22, 0.6, 1.0)),
}


#: the study fields that are dicts of settings (merged key by key with ``overrides``)
_NESTED = ("model", "pretrain", "finetune")






def study_plan(profile: Profile, out_dir: str | Path, overrides: Mapping[str, Any] | None = None,
               **fields: Any) -> MISSStudy:
    """The study of ``profile`` (``PLANS[profile.name]``) with ``fields``, then ``overrides``, applied.

    Both hold :class:`MISSStudy` fields; ``model`` is a dict of :class:`MISSConfig` fields and
    ``pretrain`` / ``finetune`` dicts of :class:`StageSettings` fields (``overrides`` is merged
    into these dicts, key by key). A value of None, at either level, keeps the plan's; an
    unknown key raises a :class:`ConfigError` that names the valid ones. Seeds default to the
    profile's.
    """
    plan = plan_of(PLANS, profile, "MISS")
    given = checked("MISS study parameter(s)", fields, MISSStudy)
    for key, value in checked("MISS study parameter(s)", overrides, MISSStudy).items():
        if key in _NESTED and isinstance(value, Mapping):  # merged key by key; None keeps what is there
            merged = {k: v for k, v in (given.get(key) or {}).items() if v is not None}
            merged.update({k: v for k, v in value.items() if v is not None or k not in merged})
            value = merged
        given[key] = value
    model = checked("MISS model parameter(s)", given.pop("model", None), MISSConfig)
    stages = {}
    for stage in ("pretrain", "finetune"):
        changes = checked(f"{stage} setting(s)", given.pop(stage, None), StageSettings)
        stages[stage] = StageSettings(**{"out_dir": Path(out_dir) / stage, "progress": None,
                                         **plan.pop(stage), **changes})
    for key in ("seeds", "transcap_fractions"):
        if key in given:
            given[key] = tuple(given[key])
    plan.update(given)
    plan.setdefault("seeds", tuple(profile.seeds))
    return MISSStudy(model=MISSConfig(**{**plan.pop("model"), **model}), **stages, **plan)
