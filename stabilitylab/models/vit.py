"""The ViT backbone: timm's VisionTransformer with MoCo v3's initialisation.

- Fixed 2D sin-cos position embedding (temperature 10,000; the class token gets a zero
  position vector), stored as a parameter with ``requires_grad=False``. The study's
  ablations also use a learned table or none, and global average pooling instead of the
  class token (:func:`build_backbone`).
- Linear layers Xavier-uniform with Q, K and V initialised as separate matrices (timm's
  ``weight_init="moco"``).
- Patch projection uniform in +-sqrt(6 / (in_chans * patch_size**2 + embed_dim)), that is
  Xavier-uniform over the flattened patch, bias zero.

Freezing the patch projection only flips ``requires_grad`` of its weight and bias, so both
arms start from bit-identical weights for the same seed.
"""

from __future__ import annotations

import math

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from stabilitylab.config import ModelSpec

# Parameters that never train, by construction, and so are not a monitored layer.
FIXED_PARAMETERS = ("pos_embed",)


def sincos_2d_position_embedding(
    grid_size: int, dim: int, temperature: float = 10_000.0
) -> torch.Tensor:
    """Return a (grid_size**2, dim) table: [sin(x w), cos(x w), sin(y w), cos(y w)] per token."""
    if dim % 4 != 0:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for a 2D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angle_x = grid_x.flatten()[:, None] * omega[None, :]  # (N, dim / 4)
    angle_y = grid_y.flatten()[:, None] * omega[None, :]
    table = torch.cat([angle_x.sin(), angle_x.cos(), angle_y.sin(), angle_y.cos()], dim=1)
    return table.float()


def _init_patch_projection(proj: nn.Conv2d) -> None:
    fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    bound = math.sqrt(6.0 / float(fan_in + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)


def build_backbone(
    spec: ModelSpec,
    img_size: int,
    patch_size: int,
    in_chans: int,
    *,
    pos_embed: str = "sincos",
    pool: str = "cls",
    qk_norm: bool = False,
    dynamic_img_size: bool = False,
    drop_path: float = 0.0,
) -> VisionTransformer:
    """Build the backbone without a classifier; ``forward_head(x, pre_logits=True)`` pools.

    ``pos_embed`` is ``sincos`` (fixed), ``learned`` (timm's trainable table, truncated
    normal with std 0.02) or ``none``. ``pool`` ``cls`` pools the class token after the final
    norm; ``gap`` drops the class token and averages the patch tokens, followed by timm's
    ``fc_norm``. ``qk_norm`` adds timm's LayerNorm of queries and keys. With
    ``dynamic_img_size`` the model also takes smaller inputs, such as multi-crop's local
    crops, and timm resamples the position table to their grid. ``drop_path`` is timm's
    stochastic depth rate of the last block, which rises linearly from 0 at the first. It
    adds no parameter and draws no random number at build time, so the initial weights are
    the same for every rate.
    """
    class_token = pool == "cls"
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="token" if class_token else "avg",
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        qk_norm=qk_norm,
        class_token=class_token,
        pos_embed="none" if pos_embed == "none" else "learn",
        dynamic_img_size=dynamic_img_size,
        drop_path_rate=drop_path,
        weight_init="moco",
    )
    if pos_embed == "sincos":
        grid = img_size // patch_size
        table = sincos_2d_position_embedding(grid, spec.embed_dim)
        if class_token:
            table = torch.cat([torch.zeros(1, spec.embed_dim), table])
        model.pos_embed = nn.Parameter(table[None], requires_grad=False)
    _init_patch_projection(model.patch_embed.proj)
    return model


def disable_drop_path(backbone: nn.Module) -> None:
    """Turn off stochastic depth in ``backbone``, as in a target or teacher copy.

    The copies run in train mode, where timm's DropPath would drop blocks, but DINO builds
    its teacher without stochastic depth, and a momentum encoder should follow the online
    network's weights, not a random subnetwork of them.
    """
    for module in backbone.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0


def fixed_parameters(pos_embed: str) -> tuple[str, ...]:
    """Return the backbone parameters that never train with this position embedding."""
    return FIXED_PARAMETERS if pos_embed == "sincos" else ()


def patch_embed_parameters(backbone: VisionTransformer) -> list[tuple[str, nn.Parameter]]:
    """Return the patch projection's weight and bias, with names relative to the backbone."""
    return [(f"patch_embed.{name}", p) for name, p in backbone.patch_embed.named_parameters()]


def freeze_patch_embed(backbone: VisionTransformer) -> None:
    """Stop the patch projection from training; call before the optimiser is built."""
    for _, parameter in patch_embed_parameters(backbone):
        parameter.requires_grad_(False)
