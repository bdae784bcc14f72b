"""The ViT backbone: timm's VisionTransformer with MoCo v3's initialisation.

- Fixed 2D sin-cos position embedding (temperature 10,000; the class token gets a zero
  position vector), stored as a parameter with ``requires_grad=False``.
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
    spec: ModelSpec, img_size: int, patch_size: int, in_chans: int
) -> VisionTransformer:
    """Build the backbone without a classifier; ``forward_head(x, pre_logits=True)`` pools."""
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="token",
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        pos_embed="learn",
        weight_init="moco",
    )
    grid = img_size // patch_size
    table = sincos_2d_position_embedding(grid, spec.embed_dim)
    cls_position = torch.zeros(1, spec.embed_dim)
    model.pos_embed = nn.Parameter(torch.cat([cls_position, table])[None], requires_grad=False)
    _init_patch_projection(model.patch_embed.proj)
    return model


def patch_embed_parameters(backbone: VisionTransformer) -> list[tuple[str, nn.Parameter]]:
    """Return the patch projection's weight and bias, with names relative to the backbone."""
    return [(f"patch_embed.{name}", p) for name, p in backbone.patch_embed.named_parameters()]


def freeze_patch_embed(backbone: VisionTransformer) -> None:
    """Stop the patch projection from training; call before the optimiser is built."""
    for _, parameter in patch_embed_parameters(backbone):
        parameter.requires_grad_(False)
