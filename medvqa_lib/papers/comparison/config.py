"""The comparison chapter's plan: the methods it compares and every size that depends on the
profile (:data:`PLANS`, resolved by :func:`study_plan`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medvqa_lib.config import checked, plan_of
from medvqa_lib.errors import ConfigError, unknown_name

#: the methods of the book, in chapter order (their ``method`` column in the stored runs)
METHODS: tuple[str, ...] = ("MISS", "M2I2", "CMDPI", "PaliGemma-LoRA")
#: the label of the question-only baseline
PRIOR = "question-type prior"
#: method → (results folder of its chapter, notebook stem)
CHAPTERS: dict[str, tuple[str, str]] = {
    "MISS": ("miss", "01_miss"), "M2I2": ("m2i2", "02_m2i2"), "CMDPI": ("cmdpi", "03_cmdpi"),
    "PaliGemma-LoRA": ("paligemma", "04_paligemma"),
}


# ----------------------------------------------------------------------------- plan


@dataclass
class ComparisonPlan:
    """Every size knob of the chapter (each one a chapter parameter)."""

    methods: tuple[str, ...]
    bootstrap_resamples: int
    #: questions in the error-analysis list
    hardest_k: int = 20
    #: smallest group (question type / organ) shown in the heat map
    min_group: int = 5
    #: data efficiency: shares of each method's pre-training corpus (0: no pre-training)
    efficiency_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)
    #: caption pairs (and pre-training questions for CMDPI) in the full corpus
    efficiency_pairs: int = 300
    efficiency_pretrain_epochs: int = 1
    efficiency_finetune_epochs: int = 2
    #: training / validation / test questions of each data-efficiency run
    efficiency_train: int = 300
    efficiency_val: int = 64
    efficiency_test: int = 200
    #: throughput: optimizer steps timed, questions per step, questions answered
    throughput_steps: int = 3
    throughput_batch: int = 16
    throughput_answers: int = 32
    #: execute a paper chapter whose stored runs are missing (else: an error that says which)
    run_missing: bool = True


#: the only home of the chapter's profile-dependent sizes
PLANS: dict[str, dict[str, Any]] = {
    "smoke": dict(hardest_k=20, min_group=1, efficiency_fractions=(0.0, 0.5, 1.0), efficiency_pairs=8,
                  efficiency_pretrain_epochs=1, efficiency_finetune_epochs=1, efficiency_train=16,
                  efficiency_val=4, efficiency_test=8, throughput_steps=1, throughput_batch=4,
                  throughput_answers=4),
    # sized from the chapters' measured 2-core speeds (see efficiency.estimate_seconds):
    # about 12 minutes for the four methods x three amounts. Fewer fine-tuning steps (300
    # questions x 2 epochs) left the generative models answering one answer per answer type.
    "cpu": dict(hardest_k=20, min_group=5, efficiency_fractions=(0.0, 0.5, 1.0), efficiency_pairs=300,
                efficiency_pretrain_epochs=1, efficiency_finetune_epochs=3, efficiency_train=800,
                efficiency_val=128, efficiency_test=300, throughput_steps=3, throughput_batch=16,
                throughput_answers=32),
    "gpu": dict(hardest_k=20, min_group=10, efficiency_fractions=(0.0, 0.25, 0.5, 1.0),
                efficiency_pairs=20_000, efficiency_pretrain_epochs=5, efficiency_finetune_epochs=10,
                efficiency_train=5_000, efficiency_val=256, efficiency_test=1_000, throughput_steps=10,
                throughput_batch=32, throughput_answers=128),
}


def study_plan(profile: Any, out_dir: Any = None, **overrides: Any) -> ComparisonPlan:
    """The plan of ``profile`` (``smoke``/``cpu``/``gpu``); ``overrides`` are
    :class:`ComparisonPlan` fields (``None`` keeps the plan's value). ``out_dir`` is unused:
    the signature is every paper's ``study_plan``."""
    plan = dict(plan_of(PLANS, profile, "comparison"), methods=METHODS,
                bootstrap_resamples=getattr(profile, "bootstrap_resamples", 1000))
    given = checked("comparison parameter(s)", overrides, ComparisonPlan)
    plan.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()})
    for m in plan["methods"]:
        if m not in METHODS:
            raise unknown_name("method", m, METHODS)
    fractions = plan["efficiency_fractions"]
    if len(fractions) < 3 or list(fractions) != sorted(set(fractions)) or not all(0 <= f <= 1 for f in fractions):
        raise ConfigError(f"efficiency_fractions must be >= 3 increasing shares in [0, 1], got {fractions}")
    return ComparisonPlan(**plan)
