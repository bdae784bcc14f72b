"""Self-supervised methods: each turns the views of a batch into a loss.

:func:`build_method` builds the method a configuration names around its backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from stabilitylab.config import RunConfig
    from stabilitylab.methods.base import Method, StepSchedule


def build_method(config: RunConfig, backbone: nn.Module, schedule: StepSchedule) -> Method:
    """Build ``config.method`` around ``backbone``; the modules import torch only when called."""
    if config.method == "mocov3":
        from stabilitylab.methods.mocov3 import MoCoV3 as method_class
    elif config.method == "simclr":
        from stabilitylab.methods.simclr import SimCLR as method_class
    elif config.method == "byol":
        from stabilitylab.methods.byol import BYOL as method_class
    elif config.method == "swav":
        from stabilitylab.methods.swav import SwAV as method_class
    elif config.method == "dino":
        from stabilitylab.methods.dino import DINO as method_class
    else:
        raise ValueError(f"unknown method {config.method!r}")
    return method_class.from_config(config, backbone, schedule)
