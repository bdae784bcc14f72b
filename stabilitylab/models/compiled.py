"""``torch.compile`` of a ViT's transformer blocks, with the monitor's hooks kept eager.

Each block's ``forward`` is replaced by its compiled version, so ``nn.Module.__call__``,
and with it every forward hook the monitor registers on a block, still runs eagerly around
the compiled code. The patch projection and the heads stay eager too. Hooks on modules
inside a block (the attention probes' hooks on ``attn``) would not run in compiled code, so
:func:`eager_blocks` restores the eager forwards while such a probe runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_EAGER = "_stabilitylab_eager_forward"


def compile_blocks(backbone: nn.Module, **options: object) -> None:
    """Compile the forward of each module in ``backbone.blocks`` in place (idempotent)."""
    for block in backbone.blocks:
        if hasattr(block, _EAGER):
            continue
        eager = block.forward
        setattr(block, _EAGER, eager)
        block.forward = torch.compile(eager, **options)


def is_compiled(backbone: nn.Module) -> bool:
    return any(hasattr(block, _EAGER) for block in backbone.blocks)


@contextlib.contextmanager
def eager_blocks(backbone: nn.Module) -> Iterator[None]:
    """Run the blocks of ``backbone`` eagerly inside the block, compiled again after it."""
    swapped = []
    for block in backbone.blocks:
        eager = getattr(block, _EAGER, None)
        if eager is not None:
            swapped.append((block, block.forward))
            block.forward = eager
    try:
        yield
    finally:
        for block, compiled in swapped:
            block.forward = compiled
