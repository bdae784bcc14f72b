"""Stable dotted names for the monitored layer groups of a model.

Names: ``patch_embed``, ``cls_token``, ``blocks.00`` ... ``blocks.NN``, ``norm``,
``projector``, ``predictor``. The first layer is ``patch_embed``; the last block and the heads
are the last layers. Metrics, plots and reports use these names everywhere.
"""

from __future__ import annotations

import re

from torch import nn

FIRST_LAYER = "patch_embed"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def group_of_backbone_parameter(name: str) -> str:
    """Map a parameter name of a timm VisionTransformer to its layer group."""
    match = _BLOCK.match(name)
    if match:
        return f"blocks.{int(match.group(1)):02d}"
    head = name.split(".", 1)[0]
    if head in ("patch_embed", "cls_token", "reg_token", "pos_embed"):
        return head
    if head in ("norm", "fc_norm"):
        return "norm"
    raise ValueError(f"no layer group for backbone parameter {name!r}")


# The heads after the backbone's final norm, in flow order. ``prototypes`` is SwAV's
# prototype layer and DINO's weight-normalised last layer.
HEAD_GROUPS = ("projector", "predictor", "prototypes")


def group_order_key(group: str) -> tuple[int, int]:
    """Sort key that puts groups in the order data flows through the model."""
    order = ["patch_embed", "cls_token", "reg_token", "pos_embed"]
    if group in order:
        return (0, order.index(group))
    if group.startswith("blocks."):
        return (1, int(group.split(".")[1]))
    return (2, ["norm", *HEAD_GROUPS].index(group))


def head_groups(method: str, predictor: bool = True) -> tuple[str, ...]:
    """Return the head groups of ``method``: a projector, then a predictor or prototypes."""
    if method in ("swav", "dino"):
        return ("projector", "prototypes")
    if method in ("mocov3", "byol") and predictor:
        return ("projector", "predictor")
    return ("projector",)


def vit_layer_groups(
    depth: int,
    *,
    class_token: bool = True,
    learned_pos_embed: bool = False,
    heads: tuple[str, ...] = ("projector", "predictor"),
) -> list[str]:
    """Return the layer-group names of a ViT with ``depth`` blocks and ``heads``, in flow order.

    The defaults describe MoCo v3's model: a class token, a fixed position embedding (not a
    layer) and a projector and predictor.
    """
    blocks = [f"blocks.{index:02d}" for index in range(depth)]
    stem = ["patch_embed"]
    if class_token:
        stem.append("cls_token")
    if learned_pos_embed:
        stem.append("pos_embed")
    return [*stem, *blocks, "norm", *heads]


def last_block(groups: list[str]) -> str:
    return max((g for g in groups if g.startswith("blocks.")), key=group_order_key)


def named_groups(
    modules: dict[str, nn.Module], skip: tuple[str, ...] = ()
) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Group the parameters of the online network into ordered, named layer groups.

    ``modules`` maps a prefix to a module: ``backbone`` is split into its layers, any other
    module (``projector``, ``predictor``) is one group under its prefix. Parameters whose
    backbone name starts with an entry of ``skip`` are left out.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for prefix, module in modules.items():
        for name, parameter in module.named_parameters():
            if prefix == "backbone":
                if name.startswith(skip):
                    continue
                group = group_of_backbone_parameter(name)
            else:
                group = prefix
            groups.setdefault(group, []).append((f"{prefix}.{name}", parameter))
    ordered = sorted(groups, key=group_order_key)
    return [(group, groups[group]) for group in ordered]
