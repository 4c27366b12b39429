"""The image side shared by every model: a timm ViT and its position embeddings."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from torch import Tensor, nn


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
            if isinstance(m, VisionTransformer) and tuple(m.patch_embed.img_size) != (new_image_size,) * 2:
                m.set_input_size(img_size=(new_image_size, new_image_size))
        return state_dict_or_model
    grid = new_image_size // patch_size
    out = dict(state_dict_or_model)
    for k, v in out.items():
        if k.endswith("pos_embed") and v.dim() == 3:
            out[k] = resample_abs_pos_embed(v, new_size=[grid, grid], num_prefix_tokens=1)
    return out


def load_matching_weights(model: nn.Module, state_dict: Mapping[str, Tensor], image_size: int | None = None,
                          patch_size: int = 16) -> dict[str, list[str]]:
    """Load the entries of ``state_dict`` whose name and shape match ``model`` (a DDP
    ``module.`` prefix is dropped); the rest is reported, never silently forced.

    With ``image_size``, the ViT position embeddings of the model (in place) and of the state dict
    are first resized to it (:func:`interpolate_pos_embed`), as when fine-tuning at a larger size
    than pre-training. Returns the ``loaded``, ``skipped`` (in the state dict, not loaded) and
    ``missing`` (in the model, not in the state dict) keys.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if image_size is not None:
        interpolate_pos_embed(model, image_size)
        sd = interpolate_pos_embed(sd, image_size, patch_size)
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    return {"loaded": sorted(keep), "skipped": sorted(set(sd) - set(keep)),
            "missing": sorted(set(own) - set(keep))}
