"""Find the timm VisionTransformer inside a wrapper model, such as a MoCo, BYOL or DINO module.

Self-supervised methods keep the ViT as a child (``base_encoder``, ``backbone``,
``student``) beside their heads and often beside a second copy of it, a momentum or EMA
encoder that no optimiser trains. :func:`find_vit` picks the ViT whose parameters become the
``patch_embed``, ``cls_token``, ``blocks.NN`` and ``norm`` groups: the model itself, the only
ViT inside it, or, among several, the one whose parameters the optimiser owns.
:func:`outer_group_name` names every other parameter by the child of the wrapper that contains
it, such as ``projector`` or ``predictor``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

# Values of derived.vit.chosen_by in config.json: the rule by which find_vit chose the ViT.
CHOSEN_MODEL = "model"  # the monitored model is the ViT
CHOSEN_ONLY = "only"  # the only ViT inside the model
CHOSEN_OPTIMIZER = "optimizer"  # the optimiser owns more of its parameters than of any other
CHOSEN_FIRST = "first"  # several ViTs and no way to tell them apart: the first registered
_REASONS = {
    CHOSEN_MODEL: "the model is the ViT",
    CHOSEN_ONLY: "the only ViT in the model",
    CHOSEN_OPTIMIZER: "the ViT whose parameters the optimiser owns",
    CHOSEN_FIRST: "the first of several ViTs, none of which the optimiser prefers",
}


@dataclass(frozen=True)
class VitChoice:
    """The ViT whose parameters get the ViT layer groups, and how it was chosen.

    ``path`` is its module path inside the monitored model, ``""`` for the model itself.
    ``candidates`` are the paths of every ViT found, in registration order, and
    ``owned`` the number of each one's parameters that the optimiser owns (None when no
    optimiser was given).
    """

    path: str
    chosen_by: str
    candidates: tuple[str, ...]
    owned: tuple[int, ...] | None = None

    @property
    def reason(self) -> str:
        """How the ViT was chosen, in words, for log lines."""
        return _REASONS[self.chosen_by]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "chosen_by": self.chosen_by,
            "candidates": list(self.candidates),
            "optimizer_parameters": list(self.owned) if self.owned is not None else None,
        }


def is_vit(module: nn.Module) -> bool:
    """Tell whether ``module`` is a timm ``VisionTransformer``."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)


def find_vit(model: nn.Module, owned: set[int] | None = None) -> VitChoice | None:
    """Return the ViT to group inside ``model``, or None when it contains none.

    ``owned`` contains the ``id`` of every parameter that the optimiser owns. Among several
    ViTs the one with the most such parameters wins; without ``owned`` the count is of
    trainable parameters. A tie, such as no parameter owned at all, picks the first ViT
    registered and logs a warning.
    """
    candidates = _outermost_vits(model)
    if not candidates:
        return None
    paths = tuple(path for path, _ in candidates)
    if paths[0] == "":
        return VitChoice("", CHOSEN_MODEL, paths)
    counts = tuple(_owned_count(module, owned) for _, module in candidates)
    if len(candidates) == 1:
        return VitChoice(paths[0], CHOSEN_ONLY, paths, counts if owned is not None else None)
    best = max(counts)
    winners = [path for path, count in zip(paths, counts, strict=True) if count == best]
    recorded = counts if owned is not None else None
    if best > 0 and len(winners) == 1:
        return VitChoice(winners[0], CHOSEN_OPTIMIZER, paths, recorded)
    log.warning(
        "the model contains %d ViTs (%s) and the optimiser owns as many parameters of %s; "
        "using %r; pass groups= and first_block= to use another",
        len(paths),
        ", ".join(paths),
        " and ".join(winners),
        paths[0],
    )
    return VitChoice(paths[0], CHOSEN_FIRST, paths, recorded)


def outer_group_name(name: str, vit_path: str) -> str:
    """Return the group of a parameter outside the ViT at ``vit_path``.

    The group is the module path of the parameter up to the first part that leaves the
    ViT's ancestors, so ``projector.0.weight`` goes to ``projector`` and, with the ViT at
    ``encoder.backbone``, ``encoder.proj.weight`` goes to ``encoder.proj``.
    """
    parts = name.split(".")
    ancestors = vit_path.split(".")
    for index, part in enumerate(parts[:-1]):
        if index >= len(ancestors) or part != ancestors[index]:
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or parts[-1]


def _outermost_vits(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the ViTs of ``model`` in registration order, leaving out ViTs inside a ViT."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not is_vit(module):
            continue
        if any(_is_below(path, outer) for outer, _ in found):
            continue
        found.append((path, module))
    return found


def _is_below(path: str, outer: str) -> bool:
    return outer == "" or path.startswith(f"{outer}.")


def _owned_count(module: nn.Module, owned: set[int] | None) -> int:
    parameters: Iterable[nn.Parameter] = module.parameters()
    if owned is None:
        return sum(1 for parameter in parameters if parameter.requires_grad)
    return sum(1 for parameter in parameters if id(parameter) in owned)
