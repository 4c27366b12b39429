"""PaliGemma's data: prompts, the collator, item datasets and the fine-tuning datamixes.

The prompt is PaliGemma's task prefix ``"answer en <question>"``; the answer is the
processor's ``suffix``, so ``labels`` are -100 everywhere except the answer tokens and the
final ``<eos>`` (``token_type_ids`` = 1 there): the answer-only loss mask of
:func:`medvqa_lib.papers.paligemma.losses.answer_only_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from medvqa_lib.data.schema import VQASample
from medvqa_lib.errors import HubUnavailableError, unknown_name
from medvqa_lib.experiments.images import ImageCache

__all__ = ["TASK_PREFIX", "CAPTION_PREFIX", "format_prompt", "VQACollator", "ItemDataset", "DATAMIXES",
           "load_datamix"]

TASK_PREFIX = "answer en"
CAPTION_PREFIX = "caption en"


def format_prompt(question: str, prefix: str = TASK_PREFIX) -> str:
    """``"<image>answer en <question>"`` (the processor adds ``<bos>`` after the image and a
    newline at the end)."""
    return f"<image>{prefix} {' '.join(str(question).split())}"


class VQACollator:
    """Items ``{"image": PIL, "question", "answer", ...}`` → a processor batch with labels on
    answer tokens only (``prefix`` picks the task: ``"answer en"`` or ``"caption en"``)."""

    def __init__(self, processor: Any, prefix: str = TASK_PREFIX, max_length: int | None = None) -> None:
        self.processor, self.prefix, self.max_length = processor, prefix, max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompts = [format_prompt(it["question"], it.get("prefix", self.prefix)) for it in items]
        batch = self.processor(images=[it["image"] for it in items], text=prompts,
                               suffix=[str(it["answer"]) for it in items], return_tensors="pt",
                               padding="longest")
        out = dict(batch)
        out["qids"] = [str(it.get("qid", i)) for i, it in enumerate(items)]
        return out


class ItemDataset(Dataset):
    """VQA (or caption) samples as collator items, images from ``cache.pil``; ``prefix`` is
    the PaliGemma task (captions always get ``"caption en"``)."""

    def __init__(self, samples: Sequence[Any], cache: ImageCache, prefix: str | None = None) -> None:
        self.samples, self.cache, self.prefix = list(samples), cache, prefix

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        if hasattr(s, "caption"):
            return {"image": self.cache.pil(s), "question": "", "answer": s.caption,
                    "qid": s.image_id, "prefix": CAPTION_PREFIX}
        item = {"image": self.cache.pil(s), "question": s.question, "answer": s.answer, "qid": s.qid}
        if self.prefix:
            item["prefix"] = self.prefix
        return item


#: datamix name → (where it comes from, Hub dataset id or None)
DATAMIXES: dict[str, tuple[str, str | None]] = {
    "target": ("the target dataset's human-written training QA (VQA-RAD, or synthetic)", None),
    "captions-qa": ("QA generated from training captions, curated", None),
    "captions-qa+anneal": ("captions-qa, annealed with a small human-written set", None),
    "roco-qa": ("ROCO v2 synthetic QA (Hub)", "adishourya/ROCO-QA-Train"),
    "medpix-shortqa": ("MedPix 2.0 short QA (Hub)", "adishourya/MEDPIX-ShortQA"),
    "roco-qa+medpix": ("ROCO-QA annealed with MedPix short QA (Hub)", "adishourya/ROCO-QA-Train"),
    "pmc-vqa": ("PMC-VQA (Hub)", "xmcmic/PMC-VQA"),
}


def _hub_mix(repo: str, limit: int | None) -> list[VQASample]:
    """A Hub QA datamix as training samples (column names guessed; needs the Hub)."""
    from medvqa_lib.data.hub import ensure_hub, load_hub_dataset
    from medvqa_lib.data.question_types import infer_answer_type

    ensure_hub(repo)  # HubUnavailableError with the fix when offline
    ds = load_hub_dataset(repo, "train")
    cols = set(ds.column_names)
    pick = lambda *names: next((n for n in names if n in cols), None)  # noqa: E731
    qcol, acol, icol = pick("question", "Question"), pick("answer", "Answer"), pick("image", "Figure_path")
    if not (qcol and acol and icol):
        raise HubUnavailableError(f"{repo}: unexpected columns {sorted(cols)}")
    n = len(ds) if limit is None else min(limit, len(ds))
    return [VQASample(qid=f"{repo}-{i}", image_id=f"{repo}-{i}", image=ds[i][icol],
                      question=str(ds[i][qcol]), answer=str(ds[i][acol]),
                      answer_type=infer_answer_type(ds[i][acol]), question_type="other",
                      split="train", dataset=repo) for i in range(n)]


def load_datamix(name: str, parts: Mapping[str, Sequence[VQASample]], limit: int | None = None
                 ) -> tuple[list[VQASample], list[VQASample]]:
    """``(main mix, annealing set)`` for datamix ``name``. ``parts`` holds the offline pieces:
    ``target`` (human QA), ``captions-qa`` and ``anneal``. Hub mixes raise
    :class:`HubUnavailableError` offline."""
    if name not in DATAMIXES:
        raise unknown_name("datamix", name, DATAMIXES)
    if name == "target":
        return list(parts["target"]), []
    if name == "captions-qa":
        return list(parts["captions-qa"]), []
    if name == "captions-qa+anneal":
        return list(parts["captions-qa"]), list(parts["anneal"])
    repo = DATAMIXES[name][1]
    main = _hub_mix(str(repo), limit)
    anneal = _hub_mix("adishourya/MEDPIX-ShortQA", limit) if name == "roco-qa+medpix" else []
    return main, anneal
