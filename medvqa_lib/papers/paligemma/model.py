"""PaliGemma for radiology VQA: the model, its processor, LoRA adapters and generation.

Two ways to get a model, one code path after that:

* ``gpu`` — ``google/paligemma-3b-mix-448`` (or ``-224``) from the Hugging Face Hub. The
  model is gated: accept its licence on the Hub and pass a token (``HF_TOKEN`` or
  ``huggingface_hub.login()``). ``load_in_4bit`` uses bitsandbytes when it is installed.
* ``smoke`` / ``cpu`` — a tiny PaliGemma built from :class:`transformers.PaliGemmaConfig`
  (a small SigLIP tower + a small Gemma, random init) and a WordPiece tokenizer trained here
  on the training text (the Gemma tokenizer is not available offline), wrapped as a
  ``PreTrainedTokenizerFast`` with the tokens PaliGemma's processor needs. The real
  :class:`transformers.PaliGemmaProcessor` builds every batch in both cases.

LoRA (the paper's appendix): r = 12, alpha = 32, causal LM, on the q/k/v/o/up/down projections
of the Gemma language model. SigLIP names its projections differently (``q_proj``,
``k_proj``, ``v_proj``, ``out_proj`` in attention; ``fc1``/``fc2`` in the MLP), so the
paper's name list, given to peft literally, adapts only q/k/v of the vision tower.
``vision_lora="equivalent"`` (default) maps o → ``out_proj``, up → ``fc1``, down → ``fc2``;
``vision_lora="literal"`` reproduces what the paper's list does. Gemma's ``gate_proj`` is
not in the paper's list and stays frozen in both.

The batches come from :class:`~medvqa_lib.papers.paligemma.data.VQACollator`; the loss is
:func:`~medvqa_lib.papers.paligemma.losses.answer_only_loss` on the answer tokens. Sizes and
LoRA settings are a :class:`~medvqa_lib.papers.paligemma.config.PaliGemmaSpec`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from medvqa_lib.errors import ConfigError, HubUnavailableError, unknown_name
from medvqa_lib.papers.paligemma.config import (
    LM_TARGETS,
    VISION_TARGETS,
    PaliGemmaSpec,
    PaliGemmaStudy,
)
from medvqa_lib.papers.paligemma.data import TASK_PREFIX, format_prompt
from medvqa_lib.papers.paligemma.losses import answer_only_loss

__all__ = [
    "PaliGemmaVQA", "train_tokenizer", "build_processor", "build_tiny", "load_hub_model", "build_paligemma",
    "patch_grid", "lora_target_names", "apply_lora", "trainable_share", "build_model", "add_adapters",
    "reset_adapters", "save_adapters", "load_adapters",
]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")


# ----------------------------------------------------------------------------- tokenizer / processor


def train_tokenizer(texts: Iterable[str], vocab_size: int = 600) -> Any:
    """A lower-casing WordPiece tokenizer built from ``texts``, as a ``PreTrainedTokenizerFast``
    with ``<pad> <eos> <bos> <unk> <image>``; pairs get ``token_type_ids`` 0 then 1 (the
    processor turns the second part, the answer, into labels).

    The vocabulary is built deterministically (the same texts give the same ids in every
    process): the special tokens, every character (word-initial and as a ``##`` continuation), then
    the most frequent words, ties broken alphabetically, up to ``vocab_size``. (The ``tokenizers``
    trainer breaks frequency ties in hash order, which changes from one process to the next.)
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Whitespace()
    words = Counter(w for text in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({c for w in words for c in w})
    chars = alphabet + [f"##{c}" for c in alphabet]
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *chars]))
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in vocab:
            vocab.append(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])
    fast.padding_side = "left"  # generation continues after the last prompt token
    return fast


def build_processor(tokenizer: Any, image_size: int, patch_size: int) -> Any:
    """PaliGemma's own processor around a SigLIP image processor of ``image_size`` pixels
    (mean/std 0.5, as PaliGemma) with one ``<image>`` token per patch."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    images = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  image_seq_length=(image_size // patch_size) ** 2)
    return PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)


def build_tiny(spec: PaliGemmaSpec, texts: Iterable[str]) -> tuple[nn.Module, Any]:
    """A randomly initialised small PaliGemma and its processor (tokenizer trained on ``texts``)."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    tokenizer = train_tokenizer(texts, spec.tokenizer_vocab)
    processor = build_processor(tokenizer, spec.image_size, spec.patch_size)
    vocab = len(processor.tokenizer)  # includes the processor's <image>/<loc>/<seg> tokens
    vision = SiglipVisionConfig(hidden_size=spec.vision_width, intermediate_size=4 * spec.vision_width,
                                num_hidden_layers=spec.vision_depth, num_attention_heads=spec.vision_heads,
                                image_size=spec.image_size, patch_size=spec.patch_size,
                                vision_use_head=False)  # as PaliGemma: no pooling head
    text = GemmaConfig(hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                       num_hidden_layers=spec.text_depth, num_attention_heads=spec.text_heads,
                       num_key_value_heads=1, head_dim=spec.text_head_dim, vocab_size=vocab,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, vocab_size=vocab,
                             image_token_index=processor.image_token_id, projection_dim=spec.text_width,
                             hidden_size=spec.text_width, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"  # attention weights for saliency
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def _hub_problem(model_id: str) -> str | None:
    from medvqa_lib.data.hub import hub_reachable, offline_mode

    if os.path.isdir(os.path.expanduser(model_id)):
        return None
    if offline_mode():
        return "offline mode is set (HF_HUB_OFFLINE)"
    if not hub_reachable():
        return "the Hugging Face Hub cannot be reached"
    return None


def load_hub_model(spec: PaliGemmaSpec, token: str | None = None) -> tuple[nn.Module, Any]:
    """``spec.source`` (a gated PaliGemma) and its processor from the Hub or a local folder.

    Raises :class:`HubUnavailableError` naming the fix when the Hub cannot be reached.
    The token comes from ``token``, else ``$HF_TOKEN`` / a stored ``huggingface_hub.login()``.
    """
    why = _hub_problem(spec.source)
    if why is not None:
        from medvqa_lib.transcap.backends import _cached_snapshot

        cached = _cached_snapshot(spec.source)
        if cached is None:
            raise HubUnavailableError(
                f"PaliGemma {spec.source!r} is not a local folder and {why}. Fix: run where the "
                "Hub is reachable with a token that accepted the model's licence (HF_TOKEN or "
                "huggingface_hub.login()), download it and pass model_source=<folder>, or use "
                "profile='cpu' / 'smoke' (a tiny PaliGemma built offline)"
            )
        source = cached
    else:
        source = spec.source
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    token = token or os.environ.get("HF_TOKEN")
    kwargs: dict[str, Any] = {"token": token, "attn_implementation": "eager"}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(spec.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    kwargs["dtype"] = dtype
    if spec.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise ConfigError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = PaliGemmaForConditionalGeneration.from_pretrained(source, **kwargs)
    processor = PaliGemmaProcessor.from_pretrained(source, token=token)
    processor.tokenizer.padding_side = "left"
    return model, processor


def build_paligemma(spec: PaliGemmaSpec, texts: Iterable[str] = (), token: str | None = None
                    ) -> tuple[nn.Module, Any]:
    """The base model (not yet LoRA-adapted) and its processor for ``spec``."""
    return build_tiny(spec, texts) if spec.is_tiny else load_hub_model(spec, token)


def patch_grid(config: Any) -> int:
    """Patches per side of the vision tower (16 at 224 px, 32 at 448 px for PaliGemma)."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size


# ----------------------------------------------------------------------------- LoRA


def lora_target_names(model: nn.Module, vision_lora: str = "equivalent") -> list[str]:
    """Full names of the linear modules LoRA adapts: Gemma's q/k/v/o/up/down projections and
    the vision tower's modules for ``vision_lora`` (see the module docstring)."""
    if vision_lora not in VISION_TARGETS:
        raise unknown_name("vision_lora mapping", vision_lora, VISION_TARGETS)
    out = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) and "Linear" not in type(module).__name__:
            continue
        if ".vision_tower." in f".{name}" and leaf in VISION_TARGETS[vision_lora]:
            out.append(name)
        elif ".language_model." in f".{name}" and leaf in LM_TARGETS:
            out.append(name)
    return out


def apply_lora(model: nn.Module, spec: PaliGemmaSpec) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters (r, alpha, dropout of ``spec``) on exactly
    :func:`lora_target_names`; task type causal LM. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    names = lora_target_names(model, spec.vision_lora)
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                        target_modules=pattern, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def trainable_share(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters and the trainable share in percent."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "share_pct": 100.0 * trainable / max(total, 1)}


# ----------------------------------------------------------------------------- the model


class PaliGemmaVQA(nn.Module):
    """The (LoRA-adapted) PaliGemma behind the library's training loop: ``model(batch)``
    returns ``{"loss"}``; :meth:`answer` generates answers."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model, self.processor = model, processor

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def base(self) -> nn.Module:
        """The ``PaliGemmaForConditionalGeneration`` inside (below any peft wrapper)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def grid(self) -> int:
        return patch_grid(self.config)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss"}``: the answer-only loss of the batch (labels -100 off the answer)."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                           "token_type_ids")}
        logits = self.model(**inputs).logits
        return {"loss": answer_only_loss(logits, batch["labels"])}

    def encode(self, images: Sequence[Image.Image], questions: Sequence[str],
               prefix: str = TASK_PREFIX) -> dict[str, torch.Tensor]:
        """Prompt inputs (no answer) on the model's device."""
        batch = self.processor(images=list(images), text=[format_prompt(q, prefix) for q in questions],
                               return_tensors="pt", padding="longest")
        device = next(self.parameters()).device
        dtype = next(p for p in self.parameters() if p.is_floating_point()).dtype
        return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in batch.items()}

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 10,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               prefix: str = TASK_PREFIX) -> list[str]:
        """Generated answers (greedy, or sampled with ``do_sample``), special tokens dropped."""
        self.eval()
        inputs = self.encode(images, questions, prefix)
        kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        ids = self.model.generate(**inputs, **kwargs)
        new = ids[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable tensors (the LoRA adapters)."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- the chapter's model steps


def build_model(study: PaliGemmaStudy, texts: Sequence[str], token: str | None = None) -> PaliGemmaVQA:
    """The base PaliGemma (tiny: tokenizer trained on ``texts``) without adapters yet."""
    model, processor = build_paligemma(study.spec, texts, token)
    return PaliGemmaVQA(model, processor)


def add_adapters(vqa: PaliGemmaVQA, study: PaliGemmaStudy) -> dict[str, float]:
    """Freeze the base and add the LoRA adapters; returns the trainable share."""
    vqa.model = apply_lora(vqa.model, study.spec)
    return trainable_share(vqa)


def reset_adapters(vqa: PaliGemmaVQA, seed: int) -> None:
    """Fresh LoRA weights (A random, B zero: the adapted model equals the base)."""
    torch.manual_seed(seed)
    for module in vqa.modules():
        if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
            module.reset_lora_parameters("default", True)


def save_adapters(vqa: PaliGemmaVQA, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """The trainable (adapter) tensors as one safetensors file, written atomically."""
    from medvqa_lib.io import atomic_save_safetensors

    path = Path(path)
    atomic_save_safetensors(vqa.trainable_state(), path,
                            metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
    return path


def load_adapters(vqa: PaliGemmaVQA, path: str | Path) -> None:
    """Load adapter tensors saved by :func:`save_adapters` (every trainable tensor must match)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = {n for n, p in vqa.named_parameters() if p.requires_grad}
    if set(state) != own:
        raise ValueError(f"{path} does not hold this model's adapters "
                         f"({len(set(state) ^ own)} names differ)")
    vqa.load_state_dict(state, strict=False)
