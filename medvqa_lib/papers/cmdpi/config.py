"""CMDPI's settings: the model config, the chapter's study, and :data:`PLANS`, the one home of
every number that depends on the run profile (model sizes, schedules, corpus sizes, the points
of the appendix sweeps), plus the measured CPU speed the chapter's time estimate uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa_lib.config import Profile, checked, plan_of
from medvqa_lib.errors import ConfigError
from medvqa_lib.experiments.generative import StageSettings

__all__ = [
    "CPU_SECONDS_PER_1000", "FINETUNE_VARIANTS", "LAMBDA_MODES", "PAPER_TRAINING", "PLANS", "PRETRAIN_VARIANTS",
    "PRETRAIN_VQA", "SWEEPS", "CMDPIConfig", "CMDPIStudy", "estimate_seconds", "study_plan",
]

#: the training settings the paper states (Sec. 4.2); what it leaves out is absent
PAPER_TRAINING: dict[str, Any] = {
    "optimizer": "AdamW", "pretrain_epochs": 100, "finetune_epochs": 300, "finetune_lr": 7.5e-6,
    "batch_size": 32, "rec_depth": 4, "rec_width": 512, "sim_threshold": 0.75,
    "alpha": 0.5, "alpha_prime": 1.0, "pretrain_data": "ROCO train 65k + PMC-VQA 49k",
}

LAMBDA_MODES = ("uniform", "beta", "fixed")


@dataclass
class CMDPIConfig:
    """Sizes, loss weights and ablation switches of a :class:`~medvqa_lib.papers.cmdpi.model.CMDPI`.

    The defaults are the paper's; :meth:`from_profile` gives the preset of a run profile
    (``PLANS[profile]["model"]``).
    """

    # image encoder
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    #: timm weights for the ViT, loaded only when the Hub is reachable
    vit_pretrained: str | None = None
    drop_path: float = 0.0
    # text encoder
    #: "tiny", "minilm", "bert-base-uncased" or "auto" (see medvqa_lib.text)
    text_backbone: str = "auto"
    #: text layers; None = all layers of the backbone
    text_depth: int | None = None
    #: dropout of the text stack; None = the backbone's
    dropout: float | None = None
    attn_dropout: float = 0.0
    #: longest text (with [CLS]/[SEP]) RecNet has positions for
    max_text_len: int = 64
    # shared width d and the reconstruction network (Eq. 3)
    dim: int = 512
    rec_depth: int = 4
    rec_heads: int = 8
    rec_mlp_ratio: float = 4.0
    rec_dropout: float = 0.1
    #: outputs of FFN_A; build_cmdpi(answer_vocab=...) sets it to the vocabulary size
    num_answers: int = 2
    # pre-training (Sec. 3.2)
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.15
    #: score masked patches/tokens only (False: every patch and non-special token, Eq. 5 literally)
    rec_masked_only: bool = True
    norm_pix_loss: bool = False
    #: Eq. 5 / appendix Table 3 weights of L_img, L_txt, L_ans
    w_img: float = 1.0
    w_txt: float = 1.0
    w_ans: float = 1.0
    #: Eq. 6 scaling of C_inter (alpha) and C_intra (alpha')
    alpha: float = 0.5
    alpha_prime: float = 1.0
    temp: float = 0.07
    momentum: float = 0.995
    # pre-training ablations (Figures 6-7)
    global_rec: bool = True
    local_rec: bool = True
    inter_contrastive: bool = True
    intra_contrastive: bool = True
    contrastive_on_vqa: bool = False
    # fine-tuning (Sec. 3.3) and its ablations (Figure 8, Table 4, Figure 14, Table 5, Figure 15)
    difference_reconstruction: bool = True
    head_mixup: bool = True
    w_mix: float = 1.0
    w_diff: float = 1.0
    sim_threshold: float = 0.75
    mix_lambda: str = "uniform"
    mix_beta: tuple[float, float] = (1.0, 1.0)
    mix_fixed: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.mix_lambda not in LAMBDA_MODES:
            raise ValueError(f"mix_lambda must be one of {LAMBDA_MODES}, got {self.mix_lambda!r}")
        for name in ("image_mask_ratio", "text_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.mix_fixed <= 1.0:
            raise ValueError(f"mix_fixed must be in [0, 1], got {self.mix_fixed}")
        if self.num_answers < 1:
            raise ValueError("num_answers must be >= 1")
        self.mix_beta = tuple(self.mix_beta)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_profile(cls, profile: str | Profile, **overrides: Any) -> CMDPIConfig:
        """The model of ``PLANS[profile]["model"]`` (a name or a :class:`Profile`, of which only
        the name is used) with ``overrides`` applied."""
        return cls(**{**plan_of(PLANS, profile, "CMDPI")["model"], **overrides})

    def replace(self, **changes: Any) -> CMDPIConfig:
        return dataclasses.replace(self, **changes)


#: Figures 6-7: pre-training variants as CMDPIConfig switches (the full model first)
PRETRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "CMDPI": {},
    "w/o global rec.": {"global_rec": False},
    "w/o local rec.": {"local_rec": False},
    "w/o inter-contrast": {"inter_contrastive": False},
    "w/o intra-contrast": {"intra_contrastive": False},
    "Contra.QA": {"contrastive_on_vqa": True},
}
#: Figure 8: fine-tuning variants (from the full model's pre-trained weights)
FINETUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "CMDPI": {},
    "w/o diff. rec.": {"difference_reconstruction": False},
    "w/o head mixup": {"head_mixup": False},
}
PRETRAIN_VQA = ("train", "synthetic", "none")
#: the appendix sweeps: alpha (alpha, alpha'), rec_weights (w_img, w_txt, w_ans), ft_weights
#: (w_mix, w_diff), threshold, beta (a, b), fixed (lambda)
SWEEPS = ("alpha", "rec_weights", "ft_weights", "threshold", "beta", "fixed")


@dataclass
class CMDPIStudy:
    """Everything the chapter sizes from its profile (each field a chapter parameter)."""

    model: CMDPIConfig
    pretrain: StageSettings
    finetune: StageSettings
    #: fine-tuning epochs per dataset ("default" for the others)
    finetune_epochs: dict[str, int]
    #: image-caption pairs in the pre-training corpus
    captions: int
    #: where the pre-training VQA rows come from: "train", "synthetic" or "none"
    pretrain_vqa: str
    #: at most this many pre-training VQA questions per dataset (None: all training questions)
    pretrain_vqa_limit: int | None
    #: at most this many fine-tuning training questions per dataset (None: all)
    max_train: int | None
    seeds: tuple[int, ...]
    #: the dataset of the ablations and sweeps (VQA-RAD, as the paper's appendix; the first
    #: dataset loaded when it is not there)
    ablation_dataset: str = "vqa-rad"
    #: seeds of each ablation and sweep run
    ablation_seeds: tuple[int, ...] = (0,)
    #: fine-tuning epochs of the ablation and sweep runs (None: as the main runs); when it
    #: differs from the main runs, the full model is fine-tuned again with it for the comparison
    ablation_epochs: int | None = None
    #: training questions of each ablation and sweep run (None: as the main runs, ``max_train``)
    ablation_max_train: int | None = None
    #: the Figure 6-7 pre-training variants run as ablations (labels of
    #: :data:`PRETRAIN_VARIANTS`; None or "all": all of them)
    pretrain_ablations: tuple[str, ...] | None = None
    #: points of the appendix sweeps (keys: :data:`SWEEPS`)
    sweeps: dict[str, list] = field(default_factory=dict)
    #: parameter-name prefixes kept frozen in both stages (``cpu``: the text encoder's word
    #: embeddings, which saves a third of the optimizer's work; the paper trains everything)
    frozen: tuple[str, ...] = ()
    #: keep the ``best/`` checkpoint folders of every run (off: deleted once loaded)
    keep_checkpoints: bool = False
    #: run the ablations of Figures 6-8
    run_ablations: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pretrain_vqa not in PRETRAIN_VQA:
            raise ValueError(f"pretrain_vqa must be one of {PRETRAIN_VQA}, got {self.pretrain_vqa!r}")
        self.seeds = tuple(self.seeds)
        self.ablation_seeds = tuple(self.ablation_seeds)
        self.frozen = tuple(self.frozen)
        if self.pretrain_ablations == "all":
            self.pretrain_ablations = None
        if self.pretrain_ablations is not None:
            self.pretrain_ablations = tuple(self.pretrain_ablations)
            unknown = [x for x in self.pretrain_ablations if x not in PRETRAIN_VARIANTS]
            if unknown:
                raise ValueError(f"unknown pre-training ablations {unknown}; choose from "
                                 f"{', '.join(k for k in PRETRAIN_VARIANTS if k != 'CMDPI')}")

    def epochs_for(self, dataset: str) -> int:
        return self.finetune_epochs.get(dataset, self.finetune_epochs.get("default", self.finetune.epochs))

    def finetune_settings(self, dataset: str) -> StageSettings:
        return dataclasses.replace(self.finetune, epochs=self.epochs_for(dataset))

    def ablation_settings(self, dataset: str) -> StageSettings:
        """Fine-tuning settings of the ablation and sweep runs on ``dataset``."""
        return dataclasses.replace(self.finetune, epochs=self.ablation_epochs or self.epochs_for(dataset))

    def ablation_matches_main(self, dataset: str) -> bool:
        """Whether the ablation runs on ``dataset`` train exactly like the main runs (then the
        full model's main runs serve as the ablations' reference; else it is run again)."""
        return (self.ablation_settings(dataset).epochs == self.finetune_settings(dataset).epochs
                and (self.ablation_max_train or self.max_train) == self.max_train)

    def pretrain_ablation_plan(self) -> dict[str, dict[str, Any]]:
        """The pre-training variants of the ablations (without the full model)."""
        wanted = self.pretrain_ablations
        return {k: v for k, v in PRETRAIN_VARIANTS.items()
                if k != "CMDPI" and (wanted is None or k in wanted)}

    def ablation_options(self) -> dict[str, Any]:
        """:meth:`finetune_options` of the ablation and sweep runs."""
        return dict(self.finetune_options(), max_train=self.ablation_max_train or self.max_train)

    def pretrain_options(self) -> dict[str, Any]:
        """Keyword arguments of ``pretrain_variant`` that every run of the study shares."""
        return {"keep_checkpoints": self.keep_checkpoints, "frozen": self.frozen}

    def finetune_options(self) -> dict[str, Any]:
        """Keyword arguments of ``finetune_cmdpi`` that every run of the study shares."""
        return {"max_train": self.max_train, "keep_checkpoints": self.keep_checkpoints, "frozen": self.frozen}


_SWEEPS_FULL = {  # the paper's appendix grids (Figure 13's points are not listed: a 3 x 2 grid)
    "alpha": [(a, b) for a in (0.25, 0.5, 1.0) for b in (0.5, 1.0)],
    "rec_weights": [(i, t, a) for i in (0.5, 1.0) for t in (0.5, 1.0) for a in (0.5, 1.0)],
    "ft_weights": [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)],
    "threshold": [0.70, 0.75, 0.80, 0.85, 0.90, 0.95],
    "beta": [(0.2, 0.2), (0.4, 0.4), (2.0, 2.0), (0.2, 1.0), (1.0, 0.2)],
    "fixed": [0.1, 0.3, 0.5, 0.7, 0.9],
}
_SWEEPS_FEW = {  # fewer points (each figure says so)
    "alpha": [(0.5, 1.0), (1.0, 1.0), (0.5, 0.5)],
    "rec_weights": [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 1.0, 0.5)],
    "ft_weights": [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)],
    "threshold": [0.70, 0.75, 0.85, 0.95],
    "beta": [(0.2, 0.2), (2.0, 2.0), (0.2, 1.0)],
    "fixed": [0.3, 0.5, 0.7],
}
_SWEEPS_SMOKE = {"alpha": [(1.0, 1.0)], "rec_weights": [(0.5, 0.5, 0.5)], "ft_weights": [(0.5, 1.0)],
                 "threshold": [0.9], "beta": [(0.2, 0.2)], "fixed": [0.5]}

#: the text encoder's word embeddings (frozen on the small profiles)
_WORD_EMBEDDINGS = ("text_encoder.bert.embeddings.word.",)

#: per profile: the model preset (``model``: CMDPIConfig fields), the two training stages
#: (``pretrain``, ``finetune``: StageSettings fields) and the other CMDPIStudy fields
PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(model=dict(image_size=64, vision_width=128, vision_depth=2, vision_heads=4, text_backbone="tiny",
                             dim=128, rec_depth=2, rec_heads=4, max_text_len=40),
                  pretrain=dict(epochs=1, batch_size=32, lr=1e-4, warmup_ratio=0.0, max_text_len=40),
                  finetune=dict(epochs=1, batch_size=16, lr=1e-4, eval_limit=32),
                  finetune_epochs={"default": 1}, captions=16, pretrain_vqa="train", pretrain_vqa_limit=16,
                  max_train=48, frozen=_WORD_EMBEDDINGS, sweeps=_SWEEPS_SMOKE),
    # 2 cores, bf16 autocast, VQA-RAD + SLAKE. The model keeps RecNet's 4 layers at width 192
    # with a 4-layer 192-d ViT on 96 px images and the full MiniLM. The main results (Tables
    # 1-2, Figures 5, 9-12, the prior and the image control) and the main ablations: the two
    # contrastive terms of Figure 7, no pre-training, and Figure 8, each fine-tuned one epoch on
    # 1,500 SLAKE questions. They run on SLAKE: at this scale VQA-RAD's answers do not depend on
    # the image, so the variants could not be told apart there. The reconstruction removals and
    # Contra.QA (pretrain_ablations="all") add about 3 min
    "cpu": dict(model=dict(image_size=96, vision_width=192, vision_depth=4, vision_heads=3, text_backbone="minilm",
                           dim=192, rec_depth=4, rec_heads=4, max_text_len=48),
                pretrain=dict(epochs=1, batch_size=32, lr=2e-4, warmup_ratio=0.05, max_text_len=48),
                finetune=dict(epochs=3, batch_size=32, lr=1e-4, warmup_ratio=0.05, eval_limit=None),
                finetune_epochs={"vqa-rad": 2, "slake": 2, "synthetic": 2, "default": 3},
                captions=300, pretrain_vqa="train", pretrain_vqa_limit=300, max_train=None,
                seeds=(0, 1), ablation_dataset="slake", ablation_epochs=1, ablation_max_train=1500,
                pretrain_ablations=("w/o inter-contrast", "w/o intra-contrast"), frozen=_WORD_EMBEDDINGS,
                sweeps=_SWEEPS_FEW, run_ablations=True),
    # the paper (Sec. 4.2): CLIP's ViT-B/16 (when reachable), RecNet 4 x 512, AdamW, pre-training
    # up to 100 epochs, fine-tuning lr 7.5e-6 up to 300 epochs, batch 32; pre-training lr and
    # weight decay are not given (1e-4 / 0.05 here)
    "gpu": dict(model=dict(image_size=224, vision_width=768, vision_depth=12, vision_heads=12,
                           vit_pretrained="vit_base_patch16_clip_224.openai", text_backbone="auto",
                           dim=512, rec_depth=4, rec_heads=8),
                pretrain=dict(epochs=100, batch_size=32, lr=1e-4, warmup_ratio=0.02, max_text_len=64),
                finetune=dict(epochs=300, batch_size=32, lr=7.5e-6, warmup_ratio=0.0, eval_limit=None),
                finetune_epochs={"default": 300}, captions=65_000, pretrain_vqa="train",
                pretrain_vqa_limit=None, max_train=None, sweeps=_SWEEPS_FULL),
}

#: seconds per 1,000 training samples on the 2-core reference machine (bf16 autocast), measured
#: with the cpu plan at 96 px: pre-training (captions + questions, both reconstructions and
#: both contrasts), fine-tuning (difference reconstruction + head mixup), and answering
CPU_SECONDS_PER_1000 = {"pretrain": 62.0, "finetune": 27.0, "predict": 3.0}





def study_plan(profile: Profile, out_dir: str | Path, **overrides: Any) -> CMDPIStudy:
    """The study of ``profile`` (``PLANS[profile.name]``) with ``overrides`` applied.

    ``overrides`` are :class:`CMDPIStudy` fields; ``model`` is a dict of :class:`CMDPIConfig`
    fields and ``pretrain`` / ``finetune`` dicts of :class:`StageSettings` fields;
    ``finetune_epochs`` and ``sweeps`` are merged into the plan's. A value of None (at either
    level) keeps the plan's (to clear a field the plan sets, ``dataclasses.replace`` the
    result); an unknown key raises a :class:`~medvqa_lib.errors.ConfigError` that names the
    valid ones. ``seeds`` default to the profile's; ``ablation_seeds`` to the first seed.
    """
    plan = plan_of(PLANS, profile, "CMDPI")
    overrides = checked("CMDPI study parameter(s)", overrides, CMDPIStudy)
    model = checked("CMDPI model parameter(s)", overrides.pop("model", None), CMDPIConfig)
    stages = {}
    for stage in ("pretrain", "finetune"):
        given = checked(f"{stage} setting(s)", overrides.pop(stage, None), StageSettings)
        stages[stage] = StageSettings(**{**plan.pop(stage), "out_dir": Path(out_dir) / stage, "progress": None,
                                         **given})
    sweeps = {**plan.pop("sweeps"), **checked("sweep(s)", overrides.pop("sweeps", None), SWEEPS)}
    sweeps = {k: [tuple(p) if isinstance(p, (list, tuple)) else p for p in v] for k, v in sweeps.items()}
    plan["finetune_epochs"] = {**plan["finetune_epochs"], **(overrides.pop("finetune_epochs", None) or {})}
    plan.update(overrides)
    plan.setdefault("seeds", tuple(profile.seeds))
    plan.setdefault("ablation_seeds", tuple(plan["seeds"])[:1])
    config = CMDPIConfig(**{**plan.pop("model"), **model})
    if max(stages["pretrain"].max_text_len, stages["finetune"].max_text_len) > config.max_text_len:
        raise ConfigError(f"stage max_text_len must be <= the model's max_text_len ({config.max_text_len})")
    return CMDPIStudy(model=config, **stages, sweeps=sweeps, **plan)


def estimate_seconds(study: CMDPIStudy, datasets: Mapping[str, Mapping[str, int]], corpus: int, *,
                     run_ablations: bool = True, run_sweeps: bool = False,
                     speed: Mapping[str, float] | None = None) -> dict[str, float]:
    """Expected training time of the chapter's runs (seconds, by part) from throughput per
    1,000 samples (default :data:`CPU_SECONDS_PER_1000`). ``datasets``: ``{name: {"train": n,
    "val": n, "test": n}}``; ``corpus``: pre-training rows."""
    sp = dict(CPU_SECONDS_PER_1000, **(speed or {}))

    def pre(n_runs: int) -> float:
        return n_runs * study.pretrain.epochs * corpus * sp["pretrain"] / 1000

    def fine(name: str, n_runs: int, ablation: bool = False) -> float:
        d = datasets[name]
        limit = (study.ablation_max_train or study.max_train) if ablation else study.max_train
        n_train = min(d["train"], limit or d["train"])
        val = min(d["val"], study.finetune.eval_limit or d["val"])
        epochs = (study.ablation_settings if ablation else study.finetune_settings)(name).epochs
        per_run = epochs * (n_train * sp["finetune"] + val * sp["predict"]) + d["test"] * sp["predict"]
        return n_runs * per_run / 1000

    out = {"pre-training": pre(1), "fine-tuning": sum(fine(n, len(study.seeds)) for n in datasets)}
    abl = study.ablation_dataset if study.ablation_dataset in datasets else next(iter(datasets))
    n_abl = len(study.ablation_seeds)
    if run_ablations:
        n_pre = len(study.pretrain_ablation_plan())
        runs = n_pre + len(FINETUNE_VARIANTS) - 1 + 1  # + w/o pre-training
        if not study.ablation_matches_main(abl):
            runs += 1  # the full model again, at the ablation schedule
        out["ablations"] = pre(n_pre) + fine(abl, n_abl * runs, ablation=True)
    if run_sweeps:
        s = study.sweeps
        n_pre = len(s.get("alpha", [])) + len(s.get("rec_weights", []))
        n_fine = n_pre + sum(len(s.get(k, [])) for k in ("ft_weights", "threshold", "beta", "fixed"))
        out["sweeps"] = pre(n_pre) + fine(abl, n_abl * n_fine, ablation=True)
    out["total"] = sum(out.values())
    return out
