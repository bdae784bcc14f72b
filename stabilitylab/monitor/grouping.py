"""Layer groups and the first block of any PyTorch model, for :class:`stabilitylab.Monitor`.

Automatic grouping recognises these kinds of model:

- a timm ``VisionTransformer``: the names of ``stabilitylab run`` (``patch_embed``,
  ``cls_token``, ``pos_embed``, ``blocks.00`` ..., ``norm``), with any other top-level child,
  such as the classifier ``head``, as a group of its own;
- a model that contains a timm ViT at any depth, such as a MoCo, BYOL or DINO module: the ViT's
  parameters get the same unprefixed names, and every other parameter goes to the group of
  the wrapper's child that contains it (``projector``, ``predictor``). A child with no trainable
  parameter and none in the optimiser, such as a momentum encoder, is left out. Among several
  ViTs, :func:`~stabilitylab.monitor.wrapped.find_vit` picks the one the optimiser trains;
- a torchvision or timm ``ResNet``: ``stem`` (``conv1`` and ``bn1``), ``layer1`` ...
  ``layer4`` and ``fc``;
- any other model: one group per top-level child, except that the shallowest ``blocks``,
  ``layers`` or ``encoder.layer`` sequence is split into ``blocks.00``, ``blocks.01`` ...
  so that the report finds the last block.

A mapping ``{group: [parameter-name prefixes]}`` or a callable ``name -> group`` replaces
the automatic grouping. Every trainable parameter must land in exactly one group. A frozen
parameter that a mapping or callable leaves out is not recorded.

The first block is the module whose input gradient becomes ``token_grad_norm``: ``blocks[0]``
of the ViT or of the split sequence, ``layer1`` of a ResNet, and None when there is none.
``DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers are removed
first (:func:`unwrap_model`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from stabilitylab.errors import ConfigError
from stabilitylab.models.layers import FIRST_LAYER, group_of_backbone_parameter
from stabilitylab.monitor.wrapped import VitChoice, find_vit, outer_group_name

ParameterGroups = list[tuple[str, list[tuple[str, nn.Parameter]]]]
GroupSpec = Mapping[str, Sequence[str]] | Callable[[str], "str | None"] | None

# The names of a sequence of blocks, as they end a module path: timm ViTs and Swin use
# ``blocks``, many models ``layers``, and Hugging Face encoders ``encoder.layer``.
_SEQUENCE_NAMES = (("blocks",), ("layers",), ("encoder", "layer"))
_RESNET_STEM = ("conv1", "bn1")
_VIT_FRONT = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")
_BLOCK_GROUP = re.compile(r"^blocks\.(\d+)$")


@dataclass
class LayerGrouping:
    """Named parameter groups in flow order, and the first block for the token gradient.

    ``kind`` is how the groups were made: ``vit`` (the model is a ViT or contains one),
    ``resnet``, ``generic``, ``mapping`` or ``callable``. ``first_block_name`` is the first
    block's module path, or None. ``vit`` is the ViT found in the model, also for a mapping
    or callable, and None without one. ``left_out`` lists the wrapper's children that the
    automatic grouping leaves out because nothing trains them.
    """

    groups: ParameterGroups
    kind: str
    first_block: nn.Module | None
    first_block_name: str | None
    vit: VitChoice | None = None
    left_out: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.groups]

    def parameters_of(self, group: str) -> list[tuple[str, nn.Parameter]]:
        """Return the (name, parameter) pairs of ``group``, empty for an unknown group."""
        return next((members for name, members in self.groups if name == group), [])

    @property
    def last_block(self) -> str | None:
        """The highest-numbered ``blocks.NN`` group, or None when there is none."""
        blocks = [name for name in self.names if _BLOCK_GROUP.match(name)]
        if not blocks:
            return None
        return max(blocks, key=lambda name: int(_BLOCK_GROUP.match(name).group(1)))

    @property
    def first_layer(self) -> str:
        """``patch_embed`` when the model has that group, otherwise the first group."""
        return FIRST_LAYER if FIRST_LAYER in self.names else self.names[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside ``DataParallel``, ``DistributedDataParallel`` and
    ``torch.compile`` wrappers, however they are nested.

    ``torch.compile`` returns an ``OptimizedModule`` that keeps the model as ``_orig_mod``
    and shares its parameters, so the optimiser's parameters are the inner model's.
    """
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    # Compared by name, because importing torch._dynamo to check the class takes seconds.
    inner = getattr(model, "_orig_mod", None)
    return type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module)


def group_model(
    model: nn.Module,
    groups: GroupSpec = None,
    first_block: nn.Module | str | None = "auto",
    owned: set[int] | None = None,
) -> LayerGrouping:
    """Group the parameters of ``model`` and find its first block.

    ``groups`` is None for the automatic grouping, a mapping or a callable. ``first_block``
    is ``"auto"`` to find the first block from the model's structure, a module of the model,
    or None for no token gradient. ``owned`` contains the ``id`` of each parameter that the
    optimiser owns: it picks the ViT among several and keeps a child that the optimiser
    trains in the groups. Raises ConfigError naming an unmatched parameter.
    """
    # The ViT sets the automatic groups and the automatic first block, so it is not looked
    # for when the caller gives both.
    vit = find_vit(model, owned) if groups is None or first_block == "auto" else None
    left_out: list[str] = []
    if groups is None:
        kind, grouped, left_out = _automatic_groups(model, vit, owned)
    elif isinstance(groups, Mapping):
        kind, grouped = "mapping", _mapping_groups(model, groups)
    elif callable(groups):
        kind, grouped = "callable", _callable_groups(model, groups)
    else:
        raise ConfigError(
            f"groups={groups!r} is neither a mapping nor a callable; pass None for the "
            "automatic grouping, {group: [parameter-name prefixes]} or a function name -> group"
        )
    if not grouped:
        raise ConfigError(
            f"{type(model).__name__} has no parameters, so there is nothing to monitor; pass "
            "the model that the optimizer trains"
        )
    block, block_name = _resolve_first_block(model, first_block, vit)
    return LayerGrouping(grouped, kind, block, block_name, vit, left_out)


# -- automatic grouping -------------------------------------------------------------------


def _automatic_groups(
    model: nn.Module, vit: VitChoice | None, owned: set[int] | None
) -> tuple[str, ParameterGroups, list[str]]:
    if vit is not None and vit.path == "":
        return "vit", _collect(model, _vit_group), []
    if vit is not None:
        grouped, left_out = _wrapped_vit_groups(model, vit.path, owned)
        return "vit", grouped, left_out
    if _is_resnet(model):
        return "resnet", _collect(model, _resnet_group), []
    sequence = find_block_sequence(model)
    return "generic", _collect(model, lambda name: _generic_group(name, sequence)), []


def _wrapped_vit_groups(
    model: nn.Module, vit_path: str, owned: set[int] | None
) -> tuple[ParameterGroups, list[str]]:
    """Group a wrapper's parameters: the ViT's as a ViT, the others by the child containing them.

    Returns the groups in flow order (the ViT's, then the others in registration order) and
    the groups left out because none of their parameters is trainable or in the optimiser.
    """
    prefix = f"{vit_path}."
    inner: dict[str, list[tuple[str, nn.Parameter]]] = {}
    outer: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in model.named_parameters():
        if name.startswith(prefix):
            inner.setdefault(_vit_group(name[len(prefix) :]), []).append((name, parameter))
        else:
            outer.setdefault(outer_group_name(name, vit_path), []).append((name, parameter))
    left_out = [
        group
        for group, members in outer.items()
        if not any(_is_trained(parameter, owned) for _, parameter in members)
    ]
    outer = {group: members for group, members in outer.items() if group not in left_out}
    inner = _rename_clashing_extras(inner, set(outer), vit_path)
    ordered = [(group, inner[group]) for group in _flow_order(list(inner))]
    return ordered + list(outer.items()), left_out


def _is_trained(parameter: nn.Parameter, owned: set[int] | None) -> bool:
    return parameter.requires_grad or (owned is not None and id(parameter) in owned)


def _rename_clashing_extras(
    inner: dict[str, list[tuple[str, nn.Parameter]]], outer: set[str], vit_path: str
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Prefix the ViT's extra groups (its ``head``) that share a name with a wrapper child.

    A wrapper child named like a ViT layer group (``norm``, ``patch_embed``) raises
    ConfigError, because the report reads those names as the ViT's.
    """
    renamed = {}
    for group, members in inner.items():
        if group not in outer:
            renamed[group] = members
        elif _is_vit_layer(group):
            raise ConfigError(
                f"the model has a child {group!r} outside its ViT ({vit_path}), and "
                f"{group!r} is also a layer group of the ViT; pass groups= to name the groups"
            )
        else:
            renamed[f"{vit_path}.{group}"] = members
    return renamed


def _is_vit_layer(group: str) -> bool:
    return group in _VIT_FRONT or group == "norm" or bool(_BLOCK_GROUP.match(group))


def _is_resnet(model: nn.Module) -> bool:
    from timm.models.resnet import ResNet as TimmResNet
    from torchvision.models import ResNet as TorchvisionResNet

    return isinstance(model, TorchvisionResNet | TimmResNet)


def _vit_group(name: str) -> str:
    try:
        return group_of_backbone_parameter(name)
    except ValueError:
        return name.split(".", 1)[0]  # the classifier head and other extras


def _resnet_group(name: str) -> str:
    head = name.split(".", 1)[0]
    return "stem" if head in _RESNET_STEM else head


def find_block_sequence(model: nn.Module) -> str | None:
    """Return the path of the shallowest ``blocks``/``layers``/``encoder.layer`` sequence.

    A sequence is an ``nn.Sequential`` or ``nn.ModuleList`` with at least one parameter.
    Among sequences at the same depth the first registered wins. Returns None without one.
    """
    best: tuple[int, str] | None = None
    for path, module in model.named_modules():
        if not path or not isinstance(module, nn.Sequential | nn.ModuleList):
            continue
        parts = tuple(path.split("."))
        if not any(parts[-len(suffix) :] == suffix for suffix in _SEQUENCE_NAMES):
            continue
        if next(module.parameters(), None) is None:
            continue
        if best is None or len(parts) < best[0]:
            best = (len(parts), path)
    return best[1] if best is not None else None


def _generic_group(name: str, sequence: str | None) -> str:
    if sequence is not None and name.startswith(f"{sequence}."):
        index = name[len(sequence) + 1 :].split(".", 1)[0]
        if index.isdigit():
            return f"blocks.{int(index):02d}"
    return name.split(".", 1)[0]


def _collect(model: nn.Module, group_of: Callable[[str], str]) -> ParameterGroups:
    """Group every parameter by ``group_of``, in the flow order of :func:`_flow_order`."""
    grouped: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in model.named_parameters():
        grouped.setdefault(group_of(name), []).append((name, parameter))
    return [(group, grouped[group]) for group in _flow_order(list(grouped))]


def _flow_order(names: list[str]) -> list[str]:
    """Order group names as data flows: ViT front groups, blocks by index, then the rest.

    Groups that are neither keep their first-appearance order, which follows the order in
    which the model registered its children.
    """
    front = [name for name in _VIT_FRONT if name in names]
    blocks = sorted(
        (name for name in names if _BLOCK_GROUP.match(name)),
        key=lambda name: int(_BLOCK_GROUP.match(name).group(1)),
    )
    if not blocks:
        return front + [name for name in names if name not in front]
    first_block = names.index(blocks[0])
    before = [n for n in names[:first_block] if n not in front and not _BLOCK_GROUP.match(n)]
    after = [n for n in names[first_block:] if n not in front and not _BLOCK_GROUP.match(n)]
    return front + before + blocks + after


# -- user grouping ------------------------------------------------------------------------


def _mapping_groups(model: nn.Module, mapping: Mapping[str, Sequence[str]]) -> ParameterGroups:
    prefixes = _validated_prefixes(mapping)
    grouped: dict[str, list[tuple[str, nn.Parameter]]] = {group: [] for group in mapping}
    unmatched = []
    for name, parameter in model.named_parameters():
        group = _longest_prefix_group(name, prefixes)
        if group is not None:
            grouped[group].append((name, parameter))
        elif parameter.requires_grad:
            unmatched.append(name)
    if unmatched:
        raise ConfigError(
            f"trainable parameter {unmatched[0]!r} matches no prefix of the groups mapping "
            f"({len(unmatched)} unmatched in all); add its prefix to a group"
        )
    empty = [group for group, members in grouped.items() if not members]
    if empty:
        raise ConfigError(
            f"group {empty[0]!r} of the groups mapping matches no parameter; check its "
            f"prefixes {list(mapping[empty[0]])!r} against model.named_parameters()"
        )
    return list(grouped.items())


def _validated_prefixes(mapping: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Return prefix -> group, rejecting a prefix that two groups list."""
    owner: dict[str, str] = {}
    for group, prefixes in mapping.items():
        if not isinstance(group, str) or not group:
            raise ConfigError(f"group name {group!r} in the groups mapping is not a non-empty str")
        if isinstance(prefixes, str):
            raise ConfigError(
                f"group {group!r} maps to the string {prefixes!r}; pass a list of prefixes, "
                f"such as [{prefixes!r}]"
            )
        for raw in prefixes:
            prefix = str(raw).rstrip(".")
            if prefix in owner and owner[prefix] != group:
                raise ConfigError(
                    f"prefix {prefix!r} is listed in groups {owner[prefix]!r} and {group!r}; "
                    "give each prefix to one group"
                )
            owner[prefix] = group
    return owner


def _longest_prefix_group(name: str, prefixes: dict[str, str]) -> str | None:
    # A prefix matches whole dotted components, so "blocks.1" does not match "blocks.10.x".
    matches = [p for p in prefixes if p == "" or name == p or name.startswith(f"{p}.")]
    if not matches:
        return None
    return prefixes[max(matches, key=len)]


def _callable_groups(model: nn.Module, group_of: Callable[[str], str | None]) -> ParameterGroups:
    grouped: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in model.named_parameters():
        try:
            group = group_of(name)
        except Exception as error:  # the user's function may raise anything
            raise ConfigError(
                f"the groups function raised {type(error).__name__}: {error} for parameter "
                f"{name!r}; make it return a group name, or None for a frozen parameter"
            ) from error
        if group is None:
            if parameter.requires_grad:
                raise ConfigError(
                    f"the groups function returned None for trainable parameter {name!r}; "
                    "return a group name for every trainable parameter"
                )
            continue
        if not isinstance(group, str) or not group:
            raise ConfigError(
                f"the groups function returned {group!r} for parameter {name!r}; return a "
                "non-empty str"
            )
        grouped.setdefault(group, []).append((name, parameter))
    return list(grouped.items())


# -- first block --------------------------------------------------------------------------


def _resolve_first_block(
    model: nn.Module, first_block: nn.Module | str | None, vit: VitChoice | None
) -> tuple[nn.Module | None, str | None]:
    if first_block is None:
        return None, None
    if isinstance(first_block, nn.Module):
        for path, module in model.named_modules():
            if module is first_block:
                return module, path
        raise ConfigError(
            f"first_block {type(first_block).__name__} is not a submodule of the model; pass "
            "a module of the monitored model, 'auto' or None"
        )
    if first_block != "auto":
        raise ConfigError(
            f"first_block={first_block!r} is not valid; pass 'auto', a submodule or None"
        )
    path = _automatic_first_block(model, vit)
    if path is None:
        return None, None
    return model.get_submodule(path), path


def _automatic_first_block(model: nn.Module, vit: VitChoice | None) -> str | None:
    if vit is not None:
        sequence = f"{vit.path}.blocks" if vit.path else "blocks"
    elif _is_resnet(model):
        return "layer1"
    else:
        sequence = find_block_sequence(model)
    if sequence is None:
        return None
    first = next(model.get_submodule(sequence).named_children(), None)
    return f"{sequence}.{first[0]}" if first is not None else None
