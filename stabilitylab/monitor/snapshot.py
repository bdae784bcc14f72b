"""The frozen patch projection of a monitored model: detected, and checked at the end.

``stabilitylab run`` freezes the patch projection by setting ``requires_grad=False`` on its
weight and bias. The monitor reads the same flag: ``freeze_patch_embed`` is True when every
parameter of the ``patch_embed`` group is frozen, False when any trains, and unknown (None)
for a model without that group. :class:`FrozenSnapshot` keeps copies of the frozen weights
and compares them with the final ones, written as ``frozen_check.json``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from stabilitylab.models.layers import FIRST_LAYER
from stabilitylab.monitor.grouping import LayerGrouping

log = logging.getLogger(__name__)


def patch_embed_frozen(grouping: LayerGrouping) -> bool | None:
    """Tell whether the ``patch_embed`` group is frozen; None when the model has no such group."""
    members = grouping.parameters_of(FIRST_LAYER)
    if not members:
        return None
    frozen = [name for name, parameter in members if not parameter.requires_grad]
    if frozen and len(frozen) < len(members):
        log.warning(
            "patch_embed is only partly frozen (%s), so the run counts as learned",
            ", ".join(frozen),
        )
    return len(frozen) == len(members)


class FrozenSnapshot:
    """Initial copies of frozen parameters, compared with their values at the end of a run."""

    def __init__(self, parameters: list[tuple[str, nn.Parameter]]) -> None:
        self.parameters = parameters
        self.initial = {name: parameter.detach().clone() for name, parameter in parameters}

    @property
    def applies(self) -> bool:
        return bool(self.parameters)

    def check(self, steps: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Return the content of ``frozen_check.json``, with the keys of ``stabilitylab run``."""
        entries = []
        for name, parameter in self.parameters:
            initial = self.initial[name]
            current = parameter.detach()
            difference = (current.float() - initial.float()).abs().max().item()
            entries.append(
                {
                    "name": name,
                    "identical": torch.equal(current, initial),
                    "max_abs_diff": difference,
                }
            )
        return {
            "applies": self.applies,
            "passed": all(entry["identical"] for entry in entries) if entries else None,
            "steps": steps,
            "optimizer": type(optimizer).__name__.lower(),
            "weight_decay": optimizer.param_groups[0].get("weight_decay"),
            "max_abs_diff": max((entry["max_abs_diff"] for entry in entries), default=0.0),
            "parameters": entries,
        }
