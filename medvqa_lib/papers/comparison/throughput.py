"""Training samples/s and inference answers/s of each method's fine-tuning model at a profile.

:func:`method_throughput` builds the model a chapter fine-tunes (from its study plan, without
pre-trained weights: speed does not depend on them), takes synthetic VQA questions, and times

* a few optimizer steps (forward + backward + AdamW, autocast as the Trainer does it) on one
  batch of ``batch_size`` questions, after one untimed warm-up step;
* answering ``answers`` questions the way the chapter answers its test split.

It reports parameters (total / trainable), peak memory (GPU) and, on CUDA, the model FLOPs
utilisation: FLOPs of one training step counted with ``torch.utils.flop_counter`` divided by
the step time and by the GPU's peak dense bf16 rate (:data:`PEAK_TFLOPS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pandas as pd
import torch

from medvqa_lib.config import Profile, get_profile
from medvqa_lib.errors import DataError, unknown_name
from medvqa_lib.training import (
    autocast_context,
    move_to_device,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    resolve_precision,
    seed_everything,
)

__all__ = ["PEAK_TFLOPS", "Throughput", "method_throughput", "throughput_table", "peak_tflops", "benchmark_records"]

#: peak dense bf16 tensor-core TFLOP/s by GPU name (the vendors' data sheets, no sparsity)
PEAK_TFLOPS: dict[str, float] = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                                 "A10G": 125.0, "A10": 125.0, "V100": 125.0, "T4": 65.0, "RTX 4090": 165.0}


@dataclass
class Throughput:
    """One method's measured speed at one profile."""

    method: str
    profile: str
    device: str
    precision: str
    batch_size: int
    steps: int
    train_samples_per_s: float
    answers_per_s: float
    n_params: int
    n_trainable: int
    peak_memory_mb: float | None
    train_tflops: float | None = None
    mfu: float | None = None


def peak_tflops(device: torch.device) -> float | None:
    """The peak dense bf16 TFLOP/s of ``device``'s GPU when known (None on the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


@dataclass
class _Bench:
    model: torch.nn.Module
    batch: dict[str, Any]
    answer: Callable[[Sequence[Any]], dict[str, str]]


def _samples(profile: Profile, n: int, seed: int) -> list[Any]:
    from medvqa_lib.data.synthetic import load_synthetic_vqa

    size = max(32, min(profile.synthetic_images, n * 2))
    items = load_synthetic_vqa("train", n_images=size, image_size=profile.synthetic_image_size, seed=seed)
    while len(items) < n:  # few images: repeat the questions
        items = items + items
    return items[:n]


def _generative(method: str, profile: Profile, samples: list[Any], batch_size: int, tmp: Path) -> _Bench:
    from medvqa_lib.data.dataset import VQACollator
    from medvqa_lib.experiments.generative import CachedVQADataset, predict
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.text import select_text_backbone

    if method == "MISS":
        from medvqa_lib.papers.miss.config import study_plan
        from medvqa_lib.papers.miss.pipeline import finetune_factory

        study = study_plan(profile, tmp)
        size = study.model.finetune_image_size or study.model.image_size
    else:
        from medvqa_lib.papers.m2i2.config import study_plan
        from medvqa_lib.papers.m2i2.pipeline import finetune_factory

        study = study_plan(profile, tmp)
        size = study.finetune_image_size
    backbone = select_text_backbone(study.model.text_backbone)
    model = finetune_factory(study.model, None, backbone)()
    cache, s = ImageCache(size), study.finetune
    collate = VQACollator(backbone.tokenizer, s.max_text_len, s.max_answer_len)
    data = CachedVQADataset(samples[:batch_size], cache)
    batch = collate([data[i] for i in range(len(data))])

    def answer(items: Sequence[Any]) -> dict[str, str]:
        return predict(model, items, backbone.tokenizer, cache, batch_size=32, num_beams=s.num_beams,
                       max_new_tokens=s.max_new_tokens, max_question_len=s.max_text_len, precision=s.precision)

    return _Bench(model, batch, answer)


def _cmdpi(profile: Profile, samples: list[Any], batch_size: int, tmp: Path) -> _Bench:
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.papers.cmdpi.answers import build_answer_vocab
    from medvqa_lib.papers.cmdpi.config import study_plan
    from medvqa_lib.papers.cmdpi.data import CMDPICollator, CMDPIVQADataset, predict_samples
    from medvqa_lib.papers.cmdpi.model import build_cmdpi
    from medvqa_lib.papers.cmdpi.pipeline import freeze
    from medvqa_lib.text import select_text_backbone

    study = study_plan(profile, tmp)
    backbone = select_text_backbone(study.model.text_backbone)
    vocab = build_answer_vocab(samples)
    model = build_cmdpi(study.model, backbone, vocab)
    model.copy_momentum()
    model.set_stage("finetune")
    freeze(model, study.frozen)
    cache, s = ImageCache(study.model.image_size), study.finetune
    data = CMDPIVQADataset(samples[:batch_size], cache, vocab, None)
    batch = CMDPICollator(backbone.tokenizer, s.max_text_len)([data[i] for i in range(len(data))])

    def answer(items: Sequence[Any]) -> dict[str, str]:
        return predict_samples(model, items, backbone.tokenizer, cache, batch_size=64,
                               max_question_len=s.max_text_len)

    return _Bench(model, batch, answer)


def _paligemma(profile: Profile, samples: list[Any], batch_size: int) -> _Bench:
    from medvqa_lib.experiments.images import ImageCache
    from medvqa_lib.papers.paligemma import pipeline as pg
    from medvqa_lib.papers.paligemma.config import study_plan
    from medvqa_lib.papers.paligemma.data import ItemDataset, VQACollator
    from medvqa_lib.papers.paligemma.model import add_adapters, build_model

    study = study_plan(profile)
    texts = [f"answer en {s.question}" for s in samples] + [str(s.answer) for s in samples]
    vqa = build_model(study, texts)
    add_adapters(vqa, study)
    cache = ImageCache(study.spec.image_size)
    data = ItemDataset(samples[:batch_size], cache)
    batch = VQACollator(vqa.processor)([data[i] for i in range(len(data))])

    def answer(items: Sequence[Any]) -> dict[str, str]:
        return pg.predict(vqa, items, cache, batch_size=study.batch_size, max_new_tokens=study.max_new_tokens)

    return _Bench(vqa, batch, answer)


def _build(method: str, profile: Profile, samples: list[Any], batch_size: int, tmp: Path) -> _Bench:
    if method in ("MISS", "M2I2"):
        return _generative(method, profile, samples, batch_size, tmp)
    if method == "CMDPI":
        return _cmdpi(profile, samples, batch_size, tmp)
    if method == "PaliGemma-LoRA":
        return _paligemma(profile, samples, batch_size)
    raise unknown_name("method", method, ("MISS", "M2I2", "CMDPI", "PaliGemma-LoRA"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
          device: torch.device, precision: str) -> None:
    with autocast_context(device, precision):
        out = model(batch)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step_flops(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                device: torch.device, precision: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(model, batch, optimizer, device, precision)
    return float(counter.get_total_flops())


def method_throughput(method: str, profile: str | Profile, *, steps: int = 3, batch_size: int | None = None,
                      answers: int = 32, device: str = "auto", precision: str | None = None,
                      count_flops: bool | None = None, seed: int = 0) -> Throughput:
    """Measure ``method``'s fine-tuning model at ``profile`` (see the module docstring).
    ``batch_size`` defaults to the profile's; ``precision`` to ``"bf16"`` on CUDA and the
    Trainer's ``"auto"`` elsewhere; ``count_flops`` (default: on CUDA) adds TFLOP/s and MFU."""
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    if steps < 1 or answers < 1:
        raise ValueError("steps and answers must be at least 1")
    dev = pick_device(device)
    precision = precision or ("bf16" if dev.type == "cuda" else "auto")
    count_flops = dev.type == "cuda" if count_flops is None else count_flops
    bs = batch_size or prof.batch_size
    seed_everything(seed)
    samples = _samples(prof, max(bs, answers), seed)
    with TemporaryDirectory() as tmp:
        bench = _build(method, prof, samples, bs, Path(tmp))
    model = bench.model.to(dev)
    model.train()
    batch = move_to_device(bench.batch, dev)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)
    reset_peak_memory(dev)
    _step(model, batch, optimizer, dev, precision)  # warm-up: allocations, optimizer state
    flops = _step_flops(model, batch, optimizer, dev, precision) if count_flops else None
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, batch, optimizer, dev, precision)
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps
    model.eval()
    questions = samples[:answers]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = bench.answer(questions)
    _sync(dev)
    answer_s = time.perf_counter() - t0
    if len(out) != len(questions):
        raise RuntimeError(f"{method} answered {len(out)} of {len(questions)} questions")
    tflops = flops / step_s / 1e12 if flops else None
    peak = peak_tflops(dev)
    return Throughput(method=method, profile=prof.name, device=dev.type, precision=str(
        resolve_precision(dev, precision)).removeprefix("torch."), batch_size=bs, steps=steps,
        train_samples_per_s=bs / step_s, answers_per_s=len(questions) / answer_s,
        n_params=sum(p.numel() for p in params), n_trainable=sum(p.numel() for p in params if p.requires_grad),
        peak_memory_mb=peak_memory_mb(dev), train_tflops=tflops,
        mfu=tflops / peak if tflops and peak else None)


def throughput_table(methods: Sequence[str], profile: str | Profile, *, on_error: str = "raise",
                     **kwargs: Any) -> pd.DataFrame:
    """:func:`method_throughput` for each of ``methods``, one row each. ``on_error="note"``
    keeps going past a method that cannot be built here (e.g. a gated Hub model), with the
    error in its ``note`` column."""
    rows = []
    for m in methods:
        try:
            rows.append(asdict(method_throughput(m, profile, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - reported in the table when asked
            if on_error == "raise":
                raise
            rows.append({"method": m, "profile": getattr(profile, "name", profile),
                         "note": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def benchmark_records(profile: str, root: str | Path | None) -> pd.DataFrame | None:
    """The latest row per (method, device) of ``<root>/method_throughput_<profile>.csv`` (written
    by ``benchmarks/method_throughput.py`` into ``benchmarks/results``), or ``None`` where the
    file is absent or ``root`` is None (outside a checkout of the book)."""
    if root is None:
        return None
    path = Path(root) / f"method_throughput_{profile}.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    missing = {"date", "method", "device"} - set(frame.columns)
    if missing:
        raise DataError(f"{path} lacks the columns {sorted(missing)}: it is not a method_throughput CSV; "
                        "delete it and run benchmarks/method_throughput.py again")
    return frame.sort_values("date").groupby(["method", "device"], sort=False).tail(1).reset_index(drop=True)
