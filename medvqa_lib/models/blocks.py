"""Building blocks shared by every model of the book (MISS, M2I2, CMDPI, ...).

* BERT-style text transformers: :class:`TransformerLayer` (post-LN self-attention, optional
  cross-attention, GELU FFN), :class:`TextEmbeddings`, :class:`TextTransformer`,
  :func:`load_bert_weights` (from a Hugging Face ``BertModel``) and the tied :class:`LMHead`;
* the image side: :func:`build_vit` (a timm ViT) and :func:`interpolate_pos_embed`;
* contrastive pre-training helpers: :func:`momentum_update`, :func:`copy_params`,
  :class:`FeatureQueue`, :func:`itc_loss`, :func:`mask_tokens`, :func:`hard_negative_indices`.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention``. Masks follow the
SDPA convention: a boolean mask is True where attention is allowed, a float mask is added to the
scores. :meth:`TextTransformer.forward` turns 0/1 tokenizer masks into additive masks.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: score added to masked-out keys (finite, so a fully masked row cannot produce NaN; and
#: representable in bf16/fp16)
MASK_VALUE = -1e4

KVCache = dict[nn.Module, Tensor]


# ----------------------------------------------------------------------------- text transformer


def padding_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A (B, L) 0/1 key mask as an additive (B, 1, 1, L) mask; None when every key is valid."""
    if mask is None or mask.dim() == 4:  # absent, or already an SDPA mask
        return mask
    if bool(mask.all()):  # no padding: SDPA takes its mask-free path
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask == 0, MASK_VALUE)[:, None, None, :]


def causal_mask(mask: Tensor | None, length: int, dtype: torch.dtype, device: torch.device,
                queries: Tensor | None = None) -> Tensor | None:
    """Causal + key-padding additive mask (B, 1, L, L), or (B, 1, Q, L) for the query
    positions ``queries`` (B, Q); None when plain causality is enough."""
    if queries is None and (mask is None or bool(mask.all())):
        return None
    keys = torch.arange(length, device=device)
    pos = keys[:, None] if queries is None else queries[..., None]  # (L, 1) or (B, Q, 1)
    allowed = keys <= pos
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, :]
    allowed = allowed | (keys == pos)  # a token always sees itself: no empty rows
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, MASK_VALUE)[:, None]


class Packing:
    """The valid tokens of a padded (B, L) batch, flattened to (N, ...).

    Per-token work (projections, FFN, LayerNorm, dropout) runs on the N valid tokens only;
    attention pads them back to (B, L) around SDPA. Without padding ``index`` is None and
    packing/padding are reshapes.
    """

    def __init__(self, mask: Tensor | None, batch: int, length: int) -> None:
        self.mask, self.batch, self.length = mask, batch, length
        valid = mask is None or bool(mask.all())
        self.index = None if valid else mask.flatten().nonzero().squeeze(1)

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, C) -> (N, C)."""
        x = x.reshape(-1, x.shape[-1])
        return x if self.index is None else x.index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(N, C) -> (B, L, C), zeros at the padding."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return x.view(self.batch, self.length, -1)

    def tokens(self, positions: Tensor) -> Tensor:
        """Packed indices (B, Q) of the (valid) positions (B, Q) of each sequence."""
        flat = positions + torch.arange(self.batch, device=positions.device)[:, None] * self.length
        return flat if self.index is None else self._lookup()[flat]

    def select(self, rows: Tensor) -> tuple[Tensor, Packing]:
        """Packed token indices and packing of the sequences ``rows`` (repeats allowed)."""
        mask = None if self.mask is None else self.mask.index_select(0, rows)
        new = Packing(mask, rows.shape[0], self.length)
        flat = (rows[:, None] * self.length + torch.arange(self.length, device=rows.device)).flatten()
        if new.index is not None:
            flat = flat[new.index]
        return (flat if self.index is None else self._lookup()[flat]), new

    def _lookup(self) -> Tensor:  # flat position -> packed index (-1 at padding)
        table = torch.full((self.batch * self.length,), -1, dtype=torch.long, device=self.index.device)
        return table.index_copy_(0, self.index, torch.arange(self.index.shape[0], device=self.index.device))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False,
              dropout_p: float = 0.0) -> Tensor:
    """``scaled_dot_product_attention``; on the CPU, bf16 inputs are attended in fp32.

    (The CPU's bf16 flash-attention backward is several times slower than its fp32 one, while
    the projections around it are where bf16 pays; the result is cast back to bf16.)
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            m = mask.float() if mask is not None and mask.is_floating_point() else mask
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                               is_causal=is_causal, dropout_p=dropout_p)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head attention. Self-attention uses one fused qkv projection; cross-attention
    projects queries from the tokens and keys/values from the encoder states (width ``kv_dim``)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, kv_dim: int | None = None) -> None:
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by {heads} heads"
        self.heads, self.dropout, self.cross = heads, dropout, kv_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None, packing: Packing, *, is_causal: bool = False,
                enc: Tensor | None = None, enc_index: Tensor | None = None,
                kv_cache: KVCache | None = None, q_index: Tensor | None = None) -> Tensor:
        """Attend from the packed tokens ``x`` (N, D) to themselves or to ``enc`` (B', Lk, D').

        ``enc_index`` picks, for each sequence, its row of ``enc`` (keys/values are projected
        once per distinct encoder row, then gathered). ``kv_cache`` keeps projected encoder
        keys/values per module, so stacks sharing the module project the same states once.
        ``q_index`` (B, Q) computes the outputs of these tokens only; returns (N or B*Q, D).
        """
        dim = x.shape[-1]
        x_q = x if q_index is None else x.index_select(0, q_index.flatten())
        if self.cross:
            if kv_cache is not None and self in kv_cache:
                kv = kv_cache[self]
            else:
                kv = self.kv(enc)
                if kv_cache is not None:
                    kv_cache[self] = kv
            if enc_index is not None:
                kv = kv.index_select(0, enc_index)
            q = self.q(x_q)
            q = packing.pad(q) if q_index is None else q.view(*q_index.shape, dim)
        elif q_index is None:
            q, kv = packing.pad(self.qkv(x)).split((dim, 2 * dim), dim=-1)
        else:
            assert mask is not None or not is_causal, "causal attention from chosen queries needs a mask"
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x_q, w[:dim], b[:dim]).view(*q_index.shape, dim)
            kv = packing.pad(F.linear(x, w[dim:], b[dim:]))
        k, v = kv.chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        y = attention(q, k, v, mask, is_causal and mask is None, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).flatten(2)
        return self.proj(packing.pack(y) if q_index is None else y.flatten(0, 1))


class Dropout(nn.Module):
    """Inverted dropout. On the CPU the mask comes from 16-bit random integers, four per 64-bit
    draw (the CPU generator is serial and ``nn.Dropout`` draws one float per element); the drop
    probability is then rounded to a multiple of 1/65536. Other devices use ``F.dropout``."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * (keep * (1.0 / (1.0 - self.p))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AttentionBlock(nn.Module):
    """Attention, dropout, residual and post-LayerNorm (BERT's ``attention`` + ``output``)."""

    def __init__(self, dim: int, heads: int, dropout: float, eps: float, kv_dim: int | None = None,
                 attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, attn_dropout, kv_dim)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None, packing: Packing, *,
                q_index: Tensor | None = None, **kw: Any) -> Tensor:
        res = x if q_index is None else x.index_select(0, q_index.flatten())
        return self.norm(res + self.drop(self.attn(x, mask, packing, q_index=q_index, **kw)))


class FeedForward(nn.Module):
    """GELU MLP with dropout, residual and post-LayerNorm (BERT's ``intermediate`` + ``output``)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """BERT-style post-LN layer: self-attention (bidirectional or causal) -> optional
    cross-attention to encoder states -> GELU FFN, each followed by residual + LayerNorm.

    The three sub-blocks ``self_attn``, ``cross_attn`` and ``ffn`` are separate modules so that
    two stacks can share some of them by reusing the module objects. ``dropout`` acts on the
    sub-block outputs, ``attn_dropout`` on the attention probabilities (SDPA runs its fused
    kernels only without it on the CPU).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, cross_attention: bool, causal: bool,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-12, enc_dim: int | None = None,
                 attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.causal = causal
        self.self_attn = AttentionBlock(dim, heads, dropout, layer_norm_eps, attn_dropout=attn_dropout)
        self.cross_attn = (AttentionBlock(dim, heads, dropout, layer_norm_eps, kv_dim=enc_dim or dim,
                                          attn_dropout=attn_dropout)
                           if cross_attention else None)
        self.ffn = FeedForward(dim, mlp_dim, dropout, layer_norm_eps)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, enc: Tensor | None = None,
                enc_mask: Tensor | None = None, use_cross: bool = True, *,
                packing: Packing | None = None, enc_index: Tensor | None = None,
                kv_cache: KVCache | None = None, q_index: Tensor | None = None,
                expand: tuple[Tensor, Packing] | None = None) -> Tensor:
        """``x`` (B, L, D), or the packed tokens (N, D) of ``packing``. ``use_cross=False`` or
        ``enc=None`` skips cross-attention (text-only mode). SDPA masks: ``attn_mask``,
        ``enc_mask``.

        ``q_index`` (B, Q): packed indices of the only tokens to compute (output (B*Q, D)).
        ``expand`` = (token index, packing): after self-attention, which does not see ``enc``
        and so runs once per distinct sequence, continue with the gathered tokens.
        """
        padded = packing is None
        if padded:
            packing, x = Packing(None, *x.shape[:2]), x.flatten(0, 1)
        x = self.self_attn(x, attn_mask, packing, is_causal=self.causal,
                           q_index=q_index if expand is None else None)
        if expand is not None:
            idx, packing = expand
            x = x.index_select(0, idx if q_index is None else idx[q_index.flatten()])
        if q_index is not None:
            packing = Packing(None, *q_index.shape)
        if self.cross_attn is not None and use_cross and enc is not None:
            x = self.cross_attn(x, enc_mask, packing, enc=enc, enc_index=enc_index, kv_cache=kv_cache)
        x = self.ffn(x)
        return packing.pad(x) if padded else x


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm and dropout (no token types)."""

    def __init__(self, vocab: int, dim: int, max_len: int = 512, dropout: float = 0.1,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = Dropout(dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = self.position.weight[: input_ids.shape[1]]
        return self.drop(self.norm(self.word(input_ids) + pos))


class TextTransformer(nn.Module):
    """Embeddings + a stack of :class:`TransformerLayer` (a BERT encoder or, with
    ``causal=True``, a BERT-style decoder). ``cross_attention_layers`` names the layers that
    get cross-attention: a set of indices, ``"all"`` or None. Padding tokens are skipped:
    the layers run on the packed valid tokens (see :class:`Packing`)."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, mlp_dim: int,
                 cross_attention_layers: set[int] | Literal["all"] | None = None,
                 causal: bool = False, *, max_len: int = 512, dropout: float = 0.1,
                 attn_dropout: float = 0.0, layer_norm_eps: float = 1e-12,
                 enc_dim: int | None = None) -> None:
        super().__init__()
        cross = set(range(depth)) if cross_attention_layers == "all" else set(cross_attention_layers or ())
        self.dim, self.depth, self.causal = dim, depth, causal
        self.embeddings = TextEmbeddings(vocab, dim, max_len, dropout, layer_norm_eps)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, mlp_dim, cross_attention=i in cross, causal=causal,
                             dropout=dropout, layer_norm_eps=layer_norm_eps, enc_dim=enc_dim,
                             attn_dropout=attn_dropout)
            for i in range(depth))
        self.apply(init_bert_weights)

    def _mask(self, mask: Tensor | None, length: int, x: Tensor, queries: Tensor | None = None) -> Tensor | None:
        if self.causal:
            return causal_mask(mask, length, x.dtype, x.device, queries)
        return padding_mask(mask, x.dtype)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                enc: Tensor | None = None, enc_mask: Tensor | None = None, use_cross: bool = True,
                *, hidden: Tensor | None = None, start: int = 0, end: int | None = None,
                enc_index: Tensor | None = None, kv_cache: KVCache | None = None,
                first_only: bool = False, queries: Tensor | None = None,
                rows: Tensor | None = None) -> Tensor:
        """Hidden states (B, L, D) after layers ``start..end-1`` (zeros at padding).

        ``hidden`` replaces the embeddings of ``input_ids`` as the input (to resume after an
        earlier ``end``). Work that the caller does not need is skipped:

        * ``queries`` (B, Q) / ``first_only``: the last layer computes only these (valid)
          positions / only the first token, and the output is (B, Q, D) / (B, 1, D);
        * ``rows``: the input holds distinct sequences (with their ``attention_mask``) and output
          row i continues sequence ``rows[i]``; the first layer's self-attention runs once per
          distinct sequence before the rows are expanded.

        ``enc_index``/``kv_cache``: see :meth:`Attention.forward`.
        """
        x = self.embeddings(input_ids) if hidden is None else hidden
        length = x.shape[1]
        packing = first_packing = Packing(attention_mask, x.shape[0], length)
        x = packing.pack(x)
        first_mask = mask = self._mask(attention_mask, length, x)
        expand = None
        if rows is not None:
            expand = packing.select(rows)
            packing = expand[1]
            mask = self._mask(packing.mask, length, x)
        if first_only:
            queries = torch.zeros(packing.batch, 1, dtype=torch.long, device=x.device)
        q_index = None if queries is None else packing.tokens(queries)
        last_mask = None if queries is None else self._mask(packing.mask, length, x, queries)
        enc_mask = padding_mask(enc_mask, x.dtype)
        layers = self.layers[start:end]
        for i, layer in enumerate(layers):
            last, grow = i == len(layers) - 1, i == 0 and expand is not None
            m = first_mask if grow else last_mask if last and queries is not None else mask
            x = layer(x, m, enc, enc_mask, use_cross, packing=first_packing if grow else packing,
                      enc_index=enc_index, kv_cache=kv_cache, q_index=q_index if last else None,
                      expand=expand if grow else None)
        return x.view(*queries.shape, -1) if queries is not None else packing.pad(x)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class LMHead(nn.Module):
    """BERT prediction head: dense -> GELU -> LayerNorm -> decoder (tied to the word
    embeddings via :meth:`tie`) + bias."""

    def __init__(self, dim: int, vocab: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab)
        self.apply(init_bert_weights)

    def tie(self, embedding: nn.Embedding) -> LMHead:
        """Share the output matrix with ``embedding``."""
        self.decoder.weight = embedding.weight
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


@dataclass
class LoadReport:
    """What :func:`load_bert_weights` copied (``loaded``) and left as initialised (``missing``)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"loaded {len(self.loaded)} tensors, left {len(self.missing)} freshly initialised"


def _bert_state(source: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    sd = source.state_dict() if isinstance(source, nn.Module) else source
    out = {}
    for k, v in sd.items():  # strip prefixes such as "bert." so keys start at embeddings/encoder
        for root in ("embeddings.", "encoder."):
            if root in k:
                out[k[k.index(root):]] = v
                break
    return out


@torch.no_grad()
def load_bert_weights(model: TextTransformer, bert: nn.Module | dict[str, Tensor],
                      layer_offset: int = 0) -> LoadReport:
    """Copy embeddings, self-attention, FFN and LayerNorms of a Hugging Face ``BertModel`` (or
    its state dict) into ``model``: BERT layers ``layer_offset .. layer_offset+depth-1`` go to
    layers ``0 .. depth-1``. Cross-attention stays freshly initialised. The token-type-0
    embedding is folded into the position embeddings (so outputs match BERT with
    ``token_type_ids=0``).
    """
    sd = _bert_state(bert)
    pairs: dict[str, Tensor] = {}
    e = "embeddings."
    n = model.embeddings.position.num_embeddings
    pos = sd[e + "position_embeddings.weight"][:n]
    if e + "token_type_embeddings.weight" in sd:
        pos = pos + sd[e + "token_type_embeddings.weight"][0]
    pairs["embeddings.word.weight"] = sd[e + "word_embeddings.weight"]
    pairs["embeddings.position.weight"] = pos
    for p in ("weight", "bias"):
        pairs[f"embeddings.norm.{p}"] = sd[e + f"LayerNorm.{p}"]
    for i in range(model.depth):
        src, dst = f"encoder.layer.{i + layer_offset}.", f"layers.{i}."
        if src + "attention.self.query.weight" not in sd:
            raise KeyError(f"the BERT weights have no layer {i + layer_offset} (model depth {model.depth}, "
                           f"offset {layer_offset})")
        for p in ("weight", "bias"):
            a = src + "attention."
            pairs[dst + f"self_attn.attn.qkv.{p}"] = torch.cat(
                [sd[a + f"self.{name}.{p}"] for name in ("query", "key", "value")])
            pairs[dst + f"self_attn.attn.proj.{p}"] = sd[a + f"output.dense.{p}"]
            pairs[dst + f"self_attn.norm.{p}"] = sd[a + f"output.LayerNorm.{p}"]
            pairs[dst + f"ffn.fc1.{p}"] = sd[src + f"intermediate.dense.{p}"]
            pairs[dst + f"ffn.fc2.{p}"] = sd[src + f"output.dense.{p}"]
            pairs[dst + f"ffn.norm.{p}"] = sd[src + f"output.LayerNorm.{p}"]
    own = dict(model.named_parameters())
    report = LoadReport()
    for name, value in pairs.items():
        if own[name].shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} in the BERT weights, "
                             f"{tuple(own[name].shape)} in the model")
        own[name].copy_(value)
        report.loaded.append(name)
    report.missing = [k for k in own if k not in pairs]
    return report


# ----------------------------------------------------------------------------- vision


def _hub_reachable() -> bool:
    try:
        from medvqa_lib.data.hub import hub_reachable
    except ImportError:
        return False
    return hub_reachable()


def build_vit(image_size: int, patch_size: int = 16, dim: int = 768, depth: int = 12,
              heads: int = 12, mlp_ratio: float = 4.0, pretrained: str | None = None,
              drop_path: float = 0.0) -> nn.Module:
    """A timm ``VisionTransformer`` without head; ``forward_features`` gives (B, 1+N, dim).

    With ``pretrained`` (a timm name such as ``"vit_base_patch16_224"``) the weights are
    downloaded when the Hub is reachable, with their position embeddings resized to
    ``image_size``; offline the model stays randomly initialised (with a warning).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = None
    if pretrained:
        if _hub_reachable():
            model = timm.create_model(pretrained, pretrained=True, img_size=image_size, num_classes=0,
                                      global_pool="", drop_path_rate=drop_path)
        else:
            warnings.warn(f"the Hub is unreachable: {pretrained} weights not loaded, the ViT is "
                          "randomly initialised", stacklevel=2)
    if model is None:
        model = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=dim,
                                  depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, num_classes=0,
                                  global_pool="", drop_path_rate=drop_path)
    for m in model.modules():  # fused SDPA regardless of TIMM_FUSED_ATTN
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return model


def interpolate_pos_embed(state_dict_or_model: dict[str, Tensor] | nn.Module, new_image_size: int,
                          patch_size: int = 16) -> dict[str, Tensor] | nn.Module:
    """Resize ViT position embeddings (bicubic, class token kept) to ``new_image_size``.

    A module: every timm ``VisionTransformer`` inside is resized in place and the module is
    returned. A state dict: a new dict in which every ``*pos_embed`` entry is resized (square
    grids; ``patch_size`` gives the new grid).
    """
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(state_dict_or_model, nn.Module):
        for m in state_dict_or_model.modules():
            if isinstance(m, VisionTransformer):
                m.set_input_size(img_size=(new_image_size, new_image_size))
        return state_dict_or_model
    grid = new_image_size // patch_size
    out = dict(state_dict_or_model)
    for k, v in out.items():
        if k.endswith("pos_embed") and v.dim() == 3:
            out[k] = resample_abs_pos_embed(v, new_size=[grid, grid], num_prefix_tokens=1)
    return out


# ----------------------------------------------------------------------------- contrastive helpers


def _param_pairs(model: nn.Module, momentum_model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    src = dict(model.named_parameters())
    names = [n for n, _ in momentum_model.named_parameters()]
    missing = [n for n in names if n not in src]
    if missing:
        raise KeyError(f"momentum parameters without a counterpart in the model: {missing[:5]}")
    return [src[n] for n in names], [p for _, p in momentum_model.named_parameters()]


@torch.no_grad()
def copy_params(model: nn.Module, momentum_model: nn.Module) -> None:
    """Copy ``model``'s parameters into ``momentum_model`` (matched by name) and freeze them."""
    for p, p_m in zip(*_param_pairs(model, momentum_model), strict=True):
        p_m.copy_(p)
        p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(model: nn.Module, momentum_model: nn.Module, m: float) -> None:
    """EMA: ``p_m <- m * p_m + (1 - m) * p`` for every parameter of ``momentum_model``."""
    params, params_m = _param_pairs(model, momentum_model)
    torch._foreach_lerp_(params_m, params, 1.0 - m)


class FeatureQueue(nn.Module):
    """A ring buffer of the ``size`` most recent rows (features, or ids with ``dim=None``).

    ``enqueue`` writes at ``ptr`` and wraps around; ``get`` returns the filled rows.
    """

    def __init__(self, dim: int | None, size: int, dtype: torch.dtype = torch.float32,
                 fill: float = 0.0) -> None:
        super().__init__()
        shape = (size,) if dim is None else (size, dim)
        self.size = size
        self.register_buffer("data", torch.full(shape, fill, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, feats: Tensor) -> None:
        """Add ``feats`` (oldest entries are overwritten)."""
        feats = feats.detach()[-self.size:].to(self.data.dtype)
        n = feats.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.data.device)) % self.size
        self.data.index_copy_(0, idx, feats)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.clamp_(max=self.size - n).add_(n)

    def get(self) -> Tensor:
        """The filled rows (all ``size`` once the queue has wrapped)."""
        return self.data[: int(self.count)]


def itc_loss(image_feat: Tensor, text_feat: Tensor, image_feat_all: Tensor, text_feat_all: Tensor,
             temp: Tensor | float, sim_targets: Tensor | None = None, alpha: float = 0.0,
             image_feat_m: Tensor | None = None, text_feat_m: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Image-text contrastive loss, Eqs. 2-3: softmax similarities of each image to all texts
    (batch + queue) and of each text to all images, cross-entropy against the targets,
    averaged over both directions.

    ``*_feat`` are the (B, E) online features, ``*_feat_all`` the (B+M, E) momentum features of
    the batch followed by the queue. ``sim_targets`` (B, B+M) defaults to the diagonal (pair i
    is the positive of row i). With ``alpha > 0`` the targets are mixed with the momentum
    model's own softmax similarities (momentum distillation); the momentum batch features
    default to the first B rows of ``*_feat_all``. Returns (loss, sim_i2t, sim_t2i).
    """
    b = image_feat.shape[0]
    sim_i2t = image_feat @ text_feat_all.t() / temp  # S(I, T) / tau
    sim_t2i = text_feat @ image_feat_all.t() / temp  # S(T, I) / tau
    with torch.no_grad():
        if sim_targets is None:
            sim_targets = torch.zeros_like(sim_i2t)
            sim_targets[:, :b].fill_diagonal_(1.0)
        t_i2t = t_t2i = sim_targets
        if alpha > 0:
            image_feat_m = image_feat_all[:b] if image_feat_m is None else image_feat_m
            text_feat_m = text_feat_all[:b] if text_feat_m is None else text_feat_m
            t_i2t = alpha * F.softmax(image_feat_m @ text_feat_all.t() / temp, 1) + (1 - alpha) * sim_targets
            t_t2i = alpha * F.softmax(text_feat_m @ image_feat_all.t() / temp, 1) + (1 - alpha) * sim_targets
    loss_i2t = -(F.log_softmax(sim_i2t, 1) * t_i2t).sum(1).mean()  # H(y^{i2t}, p^{i2t})
    loss_t2i = -(F.log_softmax(sim_t2i, 1) * t_t2i).sum(1).mean()  # H(y^{t2i}, p^{t2i})
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the models need without holding a tokenizer."""

    vocab_size: int
    pad: int
    cls: int
    sep: int
    mask: int
    #: decoder-start and multimodal-encoder tokens (see the model modules)
    dec: int | None = None
    enc: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialIds:
        """Ids of a BERT WordPiece tokenizer; ``[unused0]``/``[unused1]`` serve as [DEC]/[ENC]."""
        unk = tokenizer.unk_token_id
        dec, enc = (tokenizer.convert_tokens_to_ids(t) for t in ("[unused0]", "[unused1]"))
        return cls(len(tokenizer), tokenizer.pad_token_id, tokenizer.cls_token_id,
                   tokenizer.sep_token_id, tokenizer.mask_token_id,
                   dec if dec != unk else tokenizer.cls_token_id,
                   enc if enc != unk else tokenizer.cls_token_id)

    @property
    def specials(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (self.pad, self.cls, self.sep, self.mask, self.dec, self.enc)
                             if i is not None}))


def mask_tokens(input_ids: Tensor, tokenizer_or_ids: Any, mlm_probability: float = 0.15,
                generator: torch.Generator | None = None, special_ids: tuple[int, ...] = ()
                ) -> tuple[Tensor, Tensor]:
    """BERT masking: pick ``mlm_probability`` of the non-special tokens; of those 80 % become
    [MASK], 10 % a random token, 10 % stay. Returns (masked_ids, labels) with labels -100 on
    unpicked positions. ``tokenizer_or_ids`` is a tokenizer or :class:`SpecialIds`;
    ``special_ids`` adds ids that are never picked (pad/cls/sep/mask are never picked).
    ``generator`` must live on the device of ``input_ids``.
    """
    ids = tokenizer_or_ids if isinstance(tokenizer_or_ids, SpecialIds) else SpecialIds.from_tokenizer(tokenizer_or_ids)
    shape, dev = input_ids.shape, input_ids.device
    never = torch.tensor(ids.specials + tuple(special_ids), device=dev)
    picked = (torch.rand(shape, generator=generator, device=dev) < mlm_probability) & ~torch.isin(input_ids, never)
    labels = input_ids.masked_fill(~picked, -100)
    u = torch.rand(shape, generator=generator, device=dev)
    to_mask = picked & (u < 0.8)
    to_random = picked & (u >= 0.8) & (u < 0.9)
    random_words = torch.randint(ids.vocab_size, shape, generator=generator, device=dev)
    masked = input_ids.masked_fill(to_mask, ids.mask)
    masked = torch.where(to_random, random_words, masked)
    return masked, labels


def hard_negative_indices(sim_i2t: Tensor, sim_t2i: Tensor, generator: torch.Generator | None = None,
                          image_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One in-batch hard negative per row, sampled with softmax(similarity) probabilities.

    Uses the first B columns of the (B, B+M) similarities. The positive (diagonal) and, given
    ``image_ids``, every pair of the same image get probability zero. Returns
    (negative image index for each text, negative text index for each image). A row with no
    valid negative (a batch of one image) falls back to a uniform off-diagonal choice.
    """
    b = sim_i2t.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
    same = eye if image_ids is None else eye | (image_ids[:, None] == image_ids[None, :])

    def sample(sim: Tensor) -> Tensor:
        logits = sim[:, :b].detach().float().masked_fill(same, float("-inf"))
        empty = same.all(1, keepdim=True)
        logits = torch.where(empty, torch.zeros_like(logits).masked_fill(eye, float("-inf")), logits)
        if b == 1:
            return torch.zeros(1, dtype=torch.long, device=sim.device)
        probs = F.softmax(logits, dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample(sim_t2i), sample(sim_i2t)


# ----------------------------------------------------------------------------- generative VQA helpers


def image_id_tensor(image_ids: Any, device: torch.device) -> Tensor | None:
    """Image ids as int64 (strings are hashed stably so ids match across batches)."""
    if image_ids is None:
        return None
    if torch.is_tensor(image_ids):
        return image_ids.to(device=device, dtype=torch.long)
    vals = [v if isinstance(v, int) else
            int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=7).digest(), "little")
            for v in image_ids]
    return torch.tensor(vals, dtype=torch.long, device=device)


def with_start(ids: Tensor, mask: Tensor, start: int, cls: int) -> tuple[Tensor, Tensor]:
    """Put ``start`` at position 0: replaces [CLS] there, or is prepended when there is none."""
    if bool((ids[:, 0] == cls).all()):
        ids = ids.clone()
        ids[:, 0] = start
        return ids, mask
    ones = torch.ones_like(ids[:, :1])
    return torch.cat([ones * start, ids], 1), torch.cat([ones.to(mask.dtype), mask], 1)


def masked_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the positions with a label (B, Q), filled up with position 0, and their labels
    (-100 for the filler)."""
    keep = labels != -100
    q = max(int(keep.sum(1).max()), 1)
    pos = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :q]
    filler = ~keep.gather(1, pos)
    return pos.masked_fill(filler, 0), labels.gather(1, pos).masked_fill(filler, -100)


class AnswerDecoding:
    """Greedy and beam-search answer generation for an encoder-decoder VQA model with
    ``encode_question(images, question_ids, question_mask, image_index)``, a causal
    ``text_decoder`` cross-attending to the question states, an ``lm_head`` and ``ids``
    (:class:`SpecialIds`; decoding starts from ``ids.dec``). Keys/values are cached per step."""

    @torch.no_grad()
    def generate(self, images: Tensor, question_ids: Tensor, question_mask: Tensor,
                 max_new_tokens: int = 10, num_beams: int = 3, length_penalty: float = 1.0,
                 image_index: Tensor | None = None) -> list[list[int]]:
        """Answer token ids per question, ending with [SEP] when the answer ended in time.

        ``num_beams=1`` is greedy decoding; otherwise beam search whose final choice divides
        each beam's log-probability by its length ** ``length_penalty``. Runs in eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            q, q_mask = self.encode_question(images, question_ids, question_mask, image_index)
            if num_beams == 1:
                seqs = self._greedy(q, q_mask, max_new_tokens)
            else:
                seqs = self._beam_search(q, q_mask, max_new_tokens, num_beams, length_penalty)
        finally:
            self.train(was_training)
        out = []
        for row in seqs[:, 1:].tolist():
            out.append(row[: row.index(self.ids.sep) + 1] if self.ids.sep in row else row)
        return out

    def _next_logits(self, seq: Tensor, enc: Tensor, enc_mask: Tensor, kv_cache: dict) -> Tensor:
        h = self.text_decoder(seq, None, enc, enc_mask, kv_cache=kv_cache)
        return self.lm_head(h[:, -1]).float()

    def _greedy(self, enc: Tensor, enc_mask: Tensor, steps: int) -> Tensor:
        seq = torch.full((enc.shape[0], 1), self.ids.dec, dtype=torch.long, device=enc.device)
        done = torch.zeros(enc.shape[0], dtype=torch.bool, device=enc.device)
        kv: dict = {}
        for _ in range(steps):
            tok = self._next_logits(seq, enc, enc_mask, kv).argmax(-1).masked_fill(done, self.ids.pad)
            seq = torch.cat([seq, tok[:, None]], 1)
            done |= tok == self.ids.sep
            if bool(done.all()):
                break
        return seq

    def _beam_search(self, enc: Tensor, enc_mask: Tensor, steps: int, k: int, length_penalty: float) -> Tensor:
        b, dev = enc.shape[0], enc.device
        enc, enc_mask = enc.repeat_interleave(k, 0), enc_mask.repeat_interleave(k, 0)
        seq = torch.full((b * k, 1), self.ids.dec, dtype=torch.long, device=dev)
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start equal: expand the first only
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        length = torch.zeros(b * k, device=dev)
        kv: dict = {}
        for _ in range(steps):
            logp = F.log_softmax(self._next_logits(seq, enc, enc_mask, kv), -1)
            logp[done] = float("-inf")
            logp[done, self.ids.pad] = 0.0  # finished beams carry over unchanged
            vocab = logp.shape[-1]
            scores, flat = (scores.view(-1, 1) + logp).view(b, -1).topk(k, dim=1)
            rows = (flat // vocab + torch.arange(b, device=dev)[:, None] * k).view(-1)
            tok = (flat % vocab).view(-1)
            seq = torch.cat([seq[rows], tok[:, None]], 1)
            length = length[rows] + (~done[rows]).float()
            done = done[rows] | (tok == self.ids.sep)
            if bool(done.all()):
                break
        final = scores / length.view(b, k).clamp(min=1) ** length_penalty
        best = final.argmax(1) + torch.arange(b, device=dev) * k
        return seq[best]
