"""BERT-style transformer layers shared by every model of the book.

:class:`TransformerLayer` (post-LN self-attention, optional cross-attention, GELU FFN),
:class:`TextEmbeddings`, :class:`TextTransformer`, :func:`load_bert_weights` (from a Hugging
Face ``BertModel``) and the tied :class:`LMHead`.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention``. Masks follow the
SDPA convention: a boolean mask is True where attention is allowed, a float mask is added to the
scores. :meth:`TextTransformer.forward` turns 0/1 tokenizer masks into additive masks.
"""

from __future__ import annotations

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
