"""Data: one sample schema, loaders for every dataset, and PyTorch datasets.

``load_vqa(name, split)`` is the one entry point for VQA data; the dataset modules
(:mod:`~medvqa_lib.data.vqa_rad`, :mod:`~medvqa_lib.data.slake`,
:mod:`~medvqa_lib.data.pathvqa`, :mod:`~medvqa_lib.data.captions`) hold the details. The
PyTorch pieces (``VQADataset``, ``VQACollator``, ...) and the synthetic generator are
imported on first use, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from medvqa_lib.data.captions import load_caption_folder, load_roco_captions
from medvqa_lib.data.hub import hub_reachable, load_hub_dataset, offline_mode
from medvqa_lib.data.pathvqa import load_pathvqa
from medvqa_lib.data.question_types import infer_answer_type
from medvqa_lib.data.registry import (
    DATA_ENV,
    DATASETS,
    available_datasets,
    check_images,
    data_root,
    load_vqa,
)
from medvqa_lib.data.schema import (
    ANSWER_TYPES,
    QUESTION_TYPES,
    SPLITS,
    CaptionSample,
    LabelledImage,
    VQASample,
    filter_samples,
    samples_frame,
)
from medvqa_lib.data.slake import load_slake, load_slake_detection, load_slake_hub, slake_report
from medvqa_lib.data.vqa_rad import load_vqa_rad, load_vqa_rad_hub, vqa_rad_report, vqa_rad_subset

_LAZY = {
    "VQADataset": "medvqa_lib.data.dataset",
    "CaptionDataset": "medvqa_lib.data.dataset",
    "VQACollator": "medvqa_lib.data.dataset",
    "group_by_image": "medvqa_lib.data.dataset",
    "CaptionCollator": "medvqa_lib.data.dataset",
    "default_image_transform": "medvqa_lib.data.dataset",
    "load_synthetic_vqa": "medvqa_lib.data.synthetic",
}

__all__ = [
    "ANSWER_TYPES",
    "DATASETS",
    "DATA_ENV",
    "QUESTION_TYPES",
    "SPLITS",
    "CaptionSample",
    "LabelledImage",
    "VQASample",
    "available_datasets",
    "check_images",
    "data_root",
    "filter_samples",
    "hub_reachable",
    "infer_answer_type",
    "load_caption_folder",
    "load_hub_dataset",
    "load_pathvqa",
    "load_roco_captions",
    "load_slake",
    "load_slake_detection",
    "load_slake_hub",
    "load_vqa",
    "load_vqa_rad",
    "load_vqa_rad_hub",
    "offline_mode",
    "samples_frame",
    "slake_report",
    "vqa_rad_report",
    "vqa_rad_subset",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
