"""Synthetic question–answer pairs from captions, and their curation (filter, de-dup, anneal).

Generation goes through one interface, :class:`QAGenerator`, over the caption backends of
:mod:`medvqa_lib.transcap.backends`: a rule backend (offline, deterministic, the default),
a local Hugging Face text-generation model and an OpenAI-compatible chat endpoint (ollama
with llama3.1, as the paper). Prompts are files in ``medvqa_lib/prompts/`` (``paligemma_qa_*``);
every completion is cached on disk by a hash of backend, prompt and settings; answers are
parsed as ``Q:``/``A:`` lines and malformed pairs are rejected and counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa_lib.data.question_types import infer_answer_type
from medvqa_lib.data.schema import CaptionSample, VQASample
from medvqa_lib.errors import unknown_name
from medvqa_lib.transcap.backends import (
    CaptionBackendError,
    HFTextGenerationBackend,
    OpenAIChatBackend,
    load_prompt,
)

__all__ = ["PROMPTS", "PATHOLOGY_TERMS", "RuleQABackend", "HFQABackend", "OpenAIQABackend",
           "QAGenerator", "parse_qa", "make_qa_backend", "pathology_of", "answerable", "curate",
           "anneal_set", "CurationCounts"]

PROMPTS = ("paligemma_qa_caption", "paligemma_qa_conversation")
SYSTEM_PROMPT = "paligemma_qa_system"
MAX_ANSWER_WORDS = 8
#: words that make a caption or question pathology-relevant (the paper's first filter)
PATHOLOGY_TERMS = ("lesion", "nodule", "mass", "tumor", "tumour", "opacity", "opacities", "effusion",
                   "pneumonia", "cardiomegaly", "fracture", "hemorrhage", "haemorrhage", "infarct",
                   "edema", "oedema", "cyst", "abscess", "pneumothorax", "atelectasis", "stone",
                   "enlarged", "abnormal", "abnormality", "consolidation", "metastasis", "carcinoma")
_LEAKS = ("caption", "mentioned", "the text", "context")
_MODALITIES = {"ct": "ct", "mri": "mri", "x-ray": "x-ray", "xray": "x-ray", "ultrasound": "ultrasound"}
_PLANES = ("axial", "coronal", "sagittal", "frontal")
_NORMAL = ("no abnormality", "no visible lesion", "a normal appearance", "normal")


# ----------------------------------------------------------------------------- parsing


def parse_qa(text: str, max_answer_words: int = MAX_ANSWER_WORDS) -> tuple[list[tuple[str, str]], Counter]:
    """``Q:``/``A:`` pairs from a model's answer and the rejected ones by reason
    (``no_answer``, ``empty``, ``overlong``, ``not_a_question``, ``leaks_text``)."""
    pairs: list[tuple[str, str]] = []
    rejected: Counter = Counter()
    question: str | None = None
    for raw in str(text).splitlines():
        line = raw.strip().lstrip("-*0123456789.) ").strip()
        head, _, body = line.partition(":")
        tag = head.strip().lower()
        if tag in ("q", "question"):
            if question is not None:
                rejected["no_answer"] += 1
            question = body.strip()
        elif tag in ("a", "answer") and question is not None:
            answer = body.strip().rstrip(".").strip()
            problem = _pair_problem(question, answer, max_answer_words)
            if problem:
                rejected[problem] += 1
            else:
                pairs.append((question, answer))
            question = None
    if question is not None:
        rejected["no_answer"] += 1
    return pairs, rejected


def _pair_problem(question: str, answer: str, max_words: int) -> str | None:
    if not question or not answer:
        return "empty"
    if not question.endswith("?"):
        return "not_a_question"
    if len(answer.split()) > max_words:
        return "overlong"
    if any(w in question.lower() or w in answer.lower() for w in _LEAKS):
        return "leaks_text"
    return None


# ----------------------------------------------------------------------------- backends


def _caption_facts(caption: str) -> dict[str, str]:
    text = caption.lower()
    facts: dict[str, str] = {}
    for word, modality in _MODALITIES.items():
        if re.search(rf"\b{re.escape(word)}\b", text):
            facts["modality"] = modality
            break
    plane = next((p for p in _PLANES if p in text), None)
    if plane:
        facts["plane"] = plane
    part = re.search(r"\b(brain|head|chest|lungs?|abdomen|liver|kidneys?|pelvis|spine|knee|hand)\b", text)
    if part:
        facts["part"] = part.group(1)
    finding = re.split(r"\bshowing\b|\bwith\b|\):", text, maxsplit=1)
    if len(finding) == 2:
        facts["finding"] = finding[1].strip(" .")
    return facts


class RuleQABackend:
    """Offline, deterministic question–answer pairs from the facts a caption states
    (modality, plane, body part, finding and its site), written as ``Q:``/``A:`` lines."""

    name = "rule"

    def __init__(self) -> None:
        self.calls = 0

    def params(self) -> dict[str, Any]:
        return {"version": 1}

    def complete(self, prompt: str, caption: str = "") -> str:
        """Q/A lines for ``caption`` (``prompt`` is ignored: the rules are the prompt)."""
        self.calls += 1
        f = _caption_facts(caption)
        lines = []
        if "modality" in f:
            lines += ["Q: What modality is used to take this image?", f"A: {f['modality']}"]
        if "plane" in f:
            lines += ["Q: Which plane is this image taken in?", f"A: {f['plane']}"]
        if "part" in f:
            lines += ["Q: What part of the body is imaged?", f"A: {f['part']}"]
        finding = f.get("finding")
        if finding:
            normal = any(finding.startswith(n) for n in _NORMAL)
            lines += ["Q: Is there an abnormality in this image?", f"A: {'no' if normal else 'yes'}"]
            if not normal:
                what = re.sub(r"^(an?|one|two|three|the)\s+", "", finding.split(" in ")[0])
                lines += ["Q: What abnormality is seen in this image?", f"A: {what}"]
                if " in " in finding:
                    lines += ["Q: Where is the abnormality located?",
                              f"A: {finding.split(' in ', 1)[1].removeprefix('the ')}"]
        return "\n".join(lines)


class HFQABackend(HFTextGenerationBackend):
    """A local Hugging Face text-generation model with the QA system prompt."""

    def complete(self, prompt: str, caption: str = "") -> str:
        pipe = self.pipeline()
        chat = getattr(pipe.tokenizer, "chat_template", None)
        inputs: Any = [{"role": "system", "content": load_prompt(SYSTEM_PROMPT)},
                       {"role": "user", "content": prompt}] if chat else prompt
        out = pipe(inputs, max_new_tokens=self.max_new_tokens, do_sample=False, return_full_text=False)
        text = out[0]["generated_text"]
        return str(text[-1].get("content", "") if isinstance(text, list) and text else text)


class OpenAIQABackend(OpenAIChatBackend):
    """An OpenAI-compatible chat endpoint (e.g. ``ollama`` serving ``llama3.1``)."""

    def complete(self, prompt: str, caption: str = "") -> str:
        payload = {"model": self.model, "stream": False, "temperature": self.temperature,
                   "max_tokens": self.max_tokens,
                   "messages": [{"role": "system", "content": load_prompt(SYSTEM_PROMPT)},
                                {"role": "user", "content": prompt}]}
        raw = self._post(payload)
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CaptionBackendError(f"unexpected answer from {self.url}: {raw[:200]!r}") from e


def make_qa_backend(spec: str | Any = "rule") -> Any:
    """``"rule"``, ``"hf:<model or folder>"`` or ``"openai:<model>@<base_url>"`` (or a backend)."""
    if not isinstance(spec, str):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "rule":
        return RuleQABackend()
    if kind == "hf" and rest:
        return HFQABackend(rest)
    if kind == "openai" and "@" in rest:
        model, _, url = rest.partition("@")
        return OpenAIQABackend(url, model)
    raise unknown_name("QA backend", spec, ("rule", "hf:<model>", "openai:<model>@<url>"))


# ----------------------------------------------------------------------------- generator


@dataclass
class QAGenerator:
    """Question–answer pairs for captions through one backend, cached, with a rejection count."""

    backend: Any = field(default_factory=RuleQABackend)
    cache_dir: str | Path | None = None
    prompt: str = "paligemma_qa_caption"
    n: int = 4
    rejected: Counter = field(default_factory=Counter)
    hits: int = 0

    def __post_init__(self) -> None:
        self.backend = make_qa_backend(self.backend)
        if self.prompt not in PROMPTS:
            raise unknown_name("QA prompt", self.prompt, PROMPTS)

    def request(self, caption: str) -> str:
        """The filled-in prompt for ``caption``."""
        return load_prompt(self.prompt).format(caption=caption, n=self.n, max_words=MAX_ANSWER_WORDS)

    def _key(self, caption: str) -> str:
        blob = json.dumps({"backend": self.backend.name, "params": self.backend.params(),
                           "request": self.request(caption), "caption": caption}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def completion(self, caption: str) -> str:
        """The backend's raw answer for ``caption`` (from the cache when it is there)."""
        path = Path(self.cache_dir) / f"{self._key(caption)}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                self.hits += 1
                return str(json.loads(path.read_text(encoding="utf-8"))["completion"])
            except (ValueError, KeyError):
                self.hits -= 1
        text = self.backend.complete(self.request(caption), caption)
        if path is not None:
            from medvqa_lib.io import atomic_write_json

            atomic_write_json(path, {"backend": self.backend.name, "caption": caption, "completion": text})
        return text

    def pairs(self, caption: str) -> list[tuple[str, str]]:
        """Parsed, well-formed pairs for ``caption`` (rejections added to ``rejected``)."""
        pairs, rejected = parse_qa(self.completion(caption))
        self.rejected.update(rejected)
        return pairs

    def samples(self, captions: Sequence[CaptionSample], dataset: str = "captions-qa") -> list[VQASample]:
        """VQA samples from training captions (refuses captions of other splits)."""
        out = []
        for c in captions:
            if c.split != "train":
                raise ValueError(f"caption {c.image_id} is from split {c.split!r}: QA is generated "
                                 "from training captions only")
            for j, (q, a) in enumerate(self.pairs(c.caption)):
                out.append(VQASample(qid=f"{c.image_id}-gen{j}", image_id=c.image_id, image=c.image,
                                     question=q, answer=a.lower(), answer_type=infer_answer_type(a),
                                     question_type="other", split="train", dataset=dataset,
                                     extra={"caption": c.caption}))
        return out


# ----------------------------------------------------------------------------- curation


def pathology_of(text: str) -> str | None:
    """The first pathology term in ``text`` (None when it names none)."""
    low = text.lower()
    return next((t for t in PATHOLOGY_TERMS if re.search(rf"\b{t}\b", low)), None)


def answerable(sample: VQASample) -> bool:
    """A question that can be answered from the image: a real question, a short answer that
    the question does not give away, and no reference to the caption text."""
    q, a = sample.question.strip(), str(sample.answer).strip().lower()
    if not q.endswith("?") or not a or len(a.split()) > MAX_ANSWER_WORDS:
        return False
    if any(w in q.lower() for w in _LEAKS):
        return False
    return a in ("yes", "no") or a not in q.lower()


@dataclass
class CurationCounts:
    """How many items each curation step kept (for the data-flow figures)."""

    steps: list[tuple[str, int]] = field(default_factory=list)

    def add(self, step: str, n: int) -> None:
        self.steps.append((step, int(n)))

    def as_dict(self) -> dict[str, int]:
        return dict(self.steps)


def curate(samples: Sequence[VQASample], counts: CurationCounts | None = None,
           require_pathology: bool = False) -> list[VQASample]:
    """Answerability check, optional pathology-relevance filter (on the question, answer and
    source caption), then de-duplication of (image, question, answer)."""
    counts = counts if counts is not None else CurationCounts()
    counts.add("generated pairs", len(samples))
    kept = [s for s in samples if answerable(s)]
    counts.add("answerable", len(kept))
    if require_pathology:
        kept = [s for s in kept if pathology_of(" ".join([s.question, str(s.answer),
                                                          str(s.extra.get("caption", ""))]))]
        counts.add("pathology-relevant", len(kept))
    seen, unique = set(), []
    for s in kept:
        key = (s.image_id, " ".join(s.question.lower().split()), str(s.answer).lower())
        if key not in seen:
            seen.add(key)
            unique.append(s)
    counts.add("after de-duplication", len(unique))
    return unique


def anneal_set(pool: Sequence[VQASample], size: int, top_pathologies: int = 3, seed: int = 0,
               counts: CurationCounts | None = None) -> tuple[list[VQASample], Counter]:
    """The small high-quality annealing set: human-written training QA whose question or answer
    names one of the ``top_pathologies`` most common pathologies (the paper enriches common,
    not rare, pathologies), de-duplicated, at most ``size`` of them (seeded)."""
    import random

    counts = counts if counts is not None else CurationCounts()
    counts.add("annealing candidates", len(pool))
    tagged = [(s, pathology_of(f"{s.question} {s.answer}")) for s in pool if s.split == "train"]
    tagged = [(s, p) for s, p in tagged if p]
    counts.add("pathology-relevant", len(tagged))
    freq = Counter(p for _, p in tagged)
    common = {p for p, _ in freq.most_common(top_pathologies)}
    chosen = curate([s for s, p in tagged if p in common], CurationCounts())
    counts.add(f"top-{top_pathologies} pathologies, de-duplicated", len(chosen))
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:size]
    counts.add("annealing set", len(chosen))
    return chosen, freq
