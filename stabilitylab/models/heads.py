"""Projector and predictor MLPs as in MoCo v3: Linear without bias, BN, ReLU; a final BN."""

from __future__ import annotations

from torch import nn


def build_mlp(
    num_layers: int,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    last_bn: bool = True,
    batch_norm: bool = True,
) -> nn.Sequential:
    """Build ``num_layers`` linear layers with BN and ReLU between them.

    The last linear layer is followed by a BatchNorm without affine parameters when
    ``last_bn`` is set, as in MoCo v3's ViT projector and predictor. ``batch_norm=False``
    removes every BN (the study's heads-without-BN ablation); the linear layers then get a
    bias, which BN made redundant.
    """
    layers: list[nn.Module] = []
    for index in range(num_layers):
        layer_in = in_dim if index == 0 else hidden_dim
        last = index == num_layers - 1
        layer_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(layer_in, layer_out, bias=not batch_norm))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(layer_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn and batch_norm:
            layers.append(nn.BatchNorm1d(layer_out, affine=False))
    return nn.Sequential(*layers)
