"""M2I2's configuration: the model config, the study, and every profile-dependent number.

:data:`PLANS` is the one home of the sizes and schedules of the ``smoke``, ``cpu`` and ``gpu``
profiles: the model preset (:meth:`M2I2Config.from_profile`), both training stages, the corpus
size, the Table 4 and rank-mode settings. :func:`study_plan` turns a profile's plan (plus
overrides) into an :class:`M2I2Study`; :func:`estimated_seconds` sizes it with the measured
2-core speeds :data:`CPU_SPEEDS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa_lib.config import Profile, checked, plan_of
from medvqa_lib.data.schema import VQASample
from medvqa_lib.experiments.generative import StageSettings

__all__ = ["CPU_SPEEDS", "FULL", "PLANS", "LoggedStage", "M2I2Config", "M2I2Study", "ablation_configs",
           "estimated_seconds", "finetune_config", "schedule_note", "study_plan"]

#: the label of the full model in every table
FULL = "M2I2"


@dataclass
class M2I2Config:
    """Sizes and pre-training settings of an :class:`~medvqa_lib.papers.m2i2.model.M2I2`
    model (a profile's preset: :meth:`from_profile`)."""

    #: pre-training image size (the paper: 256 px) and fine-tuning size (384 px)
    image_size: int = 256
    finetune_image_size: int | None = None
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    #: timm weights for the ViT (loaded only when the Hub is reachable)
    vit_pretrained: str | None = None
    drop_path: float = 0.0
    #: MAE image decoder (MIM)
    mae_width: int = 512
    mae_depth: int = 8
    mae_heads: int = 16
    #: share of each image's patches masked for MIM
    mask_ratio: float = 0.15
    #: regress per-patch normalised pixels (MAE's ``norm_pix_loss``)
    norm_pix_loss: bool = False
    #: one masked image pass for all objectives (see the model's docstring)
    shared_masked_pass: bool = False
    #: "tiny", "minilm", "bert-base-uncased" or "auto" (see medvqa_lib.text)
    text_backbone: str = "bert-base-uncased"
    #: text layers in all (None: the backbone's); the first half is the text encoder
    text_depth: int | None = None
    #: dropout of the text stacks' hidden states; None = the backbone's (0.1 for BERT)
    dropout: float | None = None
    #: dropout of text attention probabilities (0 keeps SDPA on its fused kernels)
    attn_dropout: float = 0.0
    embed_dim: int = 256
    queue_size: int = 65535
    momentum: float = 0.995
    temp: float = 0.07
    #: momentum distillation weight of ITC (0 = the paper's plain ITC)
    alpha: float = 0.0
    mlm_probability: float = 0.15
    use_mim: bool = True
    use_itc: bool = True
    max_text_len: int = 30
    max_question_len: int = 35
    max_answer_len: int = 10

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.use_mim and self.mask_ratio == 0.0:
            raise ValueError("use_mim needs mask_ratio > 0 (no patch would be reconstructed)")
        if self.mae_width % 4:
            raise ValueError(f"mae_width {self.mae_width} must be a multiple of 4 (2-D sin-cos positions)")

    @classmethod
    def from_profile(cls, profile: str | Profile, **overrides: Any) -> M2I2Config:
        """The model of ``PLANS[profile]["model"]`` with ``overrides``. A
        :class:`~medvqa_lib.config.Profile` also brings its text backbone (a shared knob)."""
        values: dict[str, Any] = dict(plan_of(PLANS, profile, "M2I2")["model"])
        if isinstance(profile, Profile):
            values["text_backbone"] = profile.text_backbone
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> M2I2Config:
        return dataclasses.replace(self, **changes)


def ablation_configs(config: M2I2Config) -> dict[str, M2I2Config]:
    """The pre-training variants of Table 4: the full model, w/o MIM, w/o ITC."""
    return {FULL: config, "w/o MIM": config.replace(use_mim=False),
            "w/o ITC": config.replace(use_itc=False)}


def finetune_config(config: M2I2Config) -> M2I2Config:
    """The fine-tuning model: no image decoder, momentum encoders or queues (VQA uses neither;
    every Table 4 variant is fine-tuned with the same architecture)."""
    return config.replace(use_mim=False, use_itc=False)


@dataclass
class LoggedStage(StageSettings):
    """:class:`StageSettings` whose runs log their losses every ``log_every`` optimizer steps
    (a one-epoch pre-training of a few hundred pairs has only ~13 steps)."""

    log_every: int = 20

    def train_config(self, select_metric: str) -> Any:
        config = super().train_config(select_metric)
        config.log_every = self.log_every
        return config


@dataclass
class M2I2Study:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    model: M2I2Config
    pretrain: StageSettings
    finetune: StageSettings
    #: fine-tuning epochs per dataset (small datasets get more); "default" for the others
    finetune_epochs: dict[str, int]
    #: image-caption pairs in the pre-training corpus
    pairs: int
    seeds: tuple[int, ...]
    #: real datasets to load (PathVQA only where the profile can afford it)
    datasets: tuple[str, ...] = ("vqa-rad", "slake")
    #: datasets of Table 4 (None: every loaded dataset); one seed each
    ablation_datasets: tuple[str, ...] | None = None
    #: fine-tuning epochs and training questions of the Table 4 runs (None: as the main
    #: runs); when either differs, the full model is fine-tuned again on the same schedule
    ablation_epochs: int | None = None
    ablation_train_limit: int | None = None
    #: rank mode: the public code's pre-selection of the k candidates with the likeliest first
    #: token (None: score every candidate) and the datasets it runs on (None: all)
    rank_k: int | None = None
    rank_datasets: tuple[str, ...] | None = None
    #: training questions per dataset (None: the profile's ``max_train_samples``)
    train_limit: int | None = None
    #: the paper's final learning rates of its cosine schedules (see ``schedule_note``)
    final_lr: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def epochs_for(self, dataset: str) -> int:
        return self.finetune_epochs.get(dataset, self.finetune_epochs.get("default", self.finetune.epochs))

    def finetune_settings(self, dataset: str) -> StageSettings:
        return dataclasses.replace(self.finetune, epochs=self.epochs_for(dataset))

    def split_limits(self, profile: Profile) -> dict[str, int | None]:
        """Questions kept per split (None: all): the study's training limit, else the
        profile's caps."""
        return {"train": self.train_limit or profile.max_train_samples, "val": profile.max_eval_samples,
                "test": profile.max_eval_samples}

    @property
    def finetune_image_size(self) -> int:
        return self.model.finetune_image_size or self.model.image_size

    def ablation_settings(self, dataset: str) -> StageSettings:
        """Fine-tuning settings of the Table 4 runs on ``dataset``."""
        return dataclasses.replace(self.finetune, epochs=self.ablation_epochs or self.epochs_for(dataset))

    def ablation_matches_main(self, dataset: str) -> bool:
        """Whether the Table 4 runs on ``dataset`` train like the main runs (then the full
        model's first-seed main run is their reference)."""
        return (self.ablation_settings(dataset).epochs == self.epochs_for(dataset)
                and self.ablation_train_limit is None)

    def ablation_splits(self, splits: Mapping[str, Sequence[VQASample]], seed: int = 0
                        ) -> dict[str, Sequence[VQASample]]:
        """``splits`` with the training questions capped at ``ablation_train_limit`` (a seeded
        random subset; validation and test untouched)."""
        from medvqa_lib.data.suite import cap

        return {**splits, "train": cap(list(splits["train"]), self.ablation_train_limit, seed)}

    def ablation_sets(self, available: Sequence[str]) -> list[str]:
        """The datasets of Table 4 among ``available`` (in their order)."""
        wanted = self.ablation_datasets
        return [d for d in available if wanted is None or d in wanted]

    def rank_sets(self, available: Sequence[str]) -> list[str]:
        wanted = self.rank_datasets
        return [d for d in available if wanted is None or d in wanted]


# ----------------------------------------------------------------------------- the plans

#: the paper (Sec. 3.2): pre-training 40 epochs, batch 32, AdamW (weight decay 0.002), lr 1e-4
#: -> 1e-5 cosine, 256 px; fine-tuning 40 epochs, batch 8, lr 2e-5 -> 1e-6, 384 px
_PAPER_PRETRAIN = dict(epochs=40, batch_size=32, lr=1e-4, weight_decay=0.002, warmup_ratio=0.0,
                       schedule="cosine", log_every=50)
_PAPER_FINETUNE = dict(epochs=40, batch_size=8, lr=2e-5, weight_decay=0.002, warmup_ratio=0.0,
                       schedule="cosine", log_every=50)

PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(model=dict(image_size=64, vision_width=128, vision_depth=2, vision_heads=4,
                             mae_width=64, mae_depth=1, mae_heads=4, text_backbone="tiny",
                             embed_dim=64, queue_size=128),
                  pretrain=dict(epochs=1, batch_size=16, lr=1e-4, weight_decay=0.002, log_every=1),
                  finetune=dict(epochs=1, batch_size=16, lr=1e-4, weight_decay=0.002, eval_limit=32,
                                group_size=1, num_beams=1, max_new_tokens=6, log_every=2),
                  finetune_epochs={"default": 1}, pairs=48, rank_k=8, train_limit=128),
    # 2 cores, VQA-RAD + SLAKE: 3 pre-trainings (400 pairs, 1 epoch, ~25 s each), 2 seeds x
    # (VQA-RAD 2 epochs, ~2 min + SLAKE 2 epochs, ~3.5 min), and Table 4 on SLAKE with one seed:
    # the 3 variants and the full model, each 1 epoch on 1,000 training questions (~30 s).
    # VQA-RAD ablations and rank mode are left out: at this scale its answers do not use the
    # image (see the image control). A randomly initialised 4-layer ViT at 96 px, MiniLM text.
    "cpu": dict(model=dict(image_size=96, vision_width=384, vision_depth=4, vision_heads=6,
                           mae_width=128, mae_depth=2, mae_heads=4, text_backbone="minilm",
                           queue_size=1024),
                pretrain=dict(epochs=1, batch_size=32, lr=1e-4, weight_decay=0.002, log_every=1),
                finetune=dict(epochs=2, batch_size=64, lr=5e-4, weight_decay=0.002, eval_limit=256,
                              group_size=4, num_beams=1, max_new_tokens=10, log_every=5),
                finetune_epochs={"vqa-rad": 2, "slake": 2, "synthetic": 1, "default": 2},
                pairs=400, seeds=(0, 1), rank_k=16, ablation_datasets=("slake",), ablation_epochs=1,
                ablation_train_limit=1000, rank_datasets=("slake",)),
    # the paper's sizes: ViT-B/16 (timm's MAE weights when the Hub is reachable), BERT-base
    # split 6 + 6, an 8-block 512-wide MAE decoder, queues of 65,535; its schedules
    "gpu": dict(model=dict(image_size=256, finetune_image_size=384, vision_width=768, vision_depth=12,
                           vision_heads=12, vit_pretrained="vit_base_patch16_224.mae", mae_width=512,
                           mae_depth=8, mae_heads=16, text_backbone="bert-base-uncased",
                           queue_size=65535),
                pretrain=dict(_PAPER_PRETRAIN),
                finetune=dict(_PAPER_FINETUNE, eval_limit=None, num_beams=3, max_new_tokens=10),
                finetune_epochs={"default": 40}, pairs=83_275,
                datasets=("vqa-rad", "slake", "pathvqa"), rank_k=128,
                final_lr={"pretrain": 1e-5, "finetune": 1e-6}),
}

#: throughput of the ``cpu`` plan's model measured on a 2-core CPU with bf16 autocast in the
#: chapter's own run (pre-training pairs/s at batch 32, fine-tuning questions/s in image groups
#: of 4, greedy answers/s); :func:`estimated_seconds` sizes the plan with them
CPU_SPEEDS = {"pretrain": 17.0, "finetune": 47.0, "answer": 150.0}

_NESTED = {"model": M2I2Config, "pretrain": LoggedStage, "finetune": LoggedStage}




def study_plan(profile: Profile, out_dir: str | Path, **overrides: Any) -> M2I2Study:
    """The study of ``profile`` (``smoke``/``cpu``/``gpu``) from :data:`PLANS`.

    ``overrides``: any :class:`M2I2Study` field; ``model``, ``pretrain`` and ``finetune`` as
    dicts of :class:`M2I2Config` / :class:`LoggedStage` fields on top of the plan's;
    ``finetune_epochs`` updates the plan's per-dataset epochs. A value of None (also inside the
    dicts) keeps the plan's. An unknown key raises :class:`~medvqa_lib.errors.ConfigError`
    naming the valid ones. The model's text backbone is the profile's."""
    plan = plan_of(PLANS, profile, "M2I2")
    overrides = checked("M2I2 study key(s)", overrides, M2I2Study)
    nested = {key: checked(f"M2I2 {key} key(s)", overrides.pop(key, None), kind) for key, kind in _NESTED.items()}
    del plan["model"]
    out = Path(out_dir)
    stages = {name: LoggedStage(**{"out_dir": out / name, "progress": None, **plan.pop(name), **nested[name]})
              for name in ("pretrain", "finetune")}
    if "finetune_epochs" in overrides:  # per dataset, on top of the plan's
        plan["finetune_epochs"] = {**plan["finetune_epochs"], **overrides.pop("finetune_epochs")}
    plan.update(overrides)
    plan.setdefault("seeds", tuple(profile.seeds))
    for key in ("seeds", "datasets", "ablation_datasets", "rank_datasets"):
        if isinstance(plan.get(key), (list, int, str)):
            value = plan[key]
            plan[key] = (value,) if isinstance(value, (int, str)) else tuple(value)
    return M2I2Study(model=M2I2Config.from_profile(profile, **nested["model"]), **stages, **plan)


def schedule_note(study: M2I2Study) -> str:
    """One sentence on the learning-rate schedules of the study against the paper's."""
    lines = []
    for name, stage in (("pretrain", study.pretrain), ("finetune", study.finetune)):
        end = study.final_lr.get(name)
        target = f" (the paper: to {end:g})" if end else ""
        lines.append(f"{name}: AdamW lr {stage.lr:g}, weight decay {stage.weight_decay:g}, "
                     f"{stage.schedule} to 0{target}")
    return "; ".join(lines)


def estimated_seconds(study: M2I2Study, sizes: Mapping[str, tuple[int, int, int]],
                      speeds: Mapping[str, float] = CPU_SPEEDS, ablations: bool = True) -> dict[str, float]:
    """Seconds the study's training runs should take at ``speeds``, for datasets of ``sizes``
    (``{name: (train, val, test)}`` questions): pre-training of every variant, fine-tuning with
    validation and test answers per seed, and the Table 4 runs (one seed, three variants, and
    the full model again when their schedule differs from the main runs')."""
    n_pre = len(ablation_configs(study.model)) if ablations else 1
    pre = n_pre * study.pairs * study.pretrain.epochs / speeds["pretrain"]

    def run(name: str, ablation: bool = False) -> float:
        train, val, test = sizes[name]
        epochs = study.ablation_settings(name).epochs if ablation else study.epochs_for(name)
        if ablation:
            train = min(train, study.ablation_train_limit or train)
        val = min(val, study.finetune.eval_limit or val)
        beams = max(study.finetune.num_beams, 1)
        return epochs * (train / speeds["finetune"] + val / speeds["answer"]) + beams * test / speeds["answer"]

    main = len(study.seeds) * sum(run(n) for n in sizes)
    abl = sum((3 + (not study.ablation_matches_main(n))) * run(n, ablation=True)
              for n in study.ablation_sets(list(sizes))) if ablations else 0.0
    return {"pre-training": pre, "fine-tuning": main, "ablations": abl, "total": pre + main + abl}
