"""convert(model): swap every supported torch.nn layer for its manual_grad counterpart."""

import copy
from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from manual_grad import modules

# exact torch.nn type -> its manual_grad subclass; a user's own subclass is left alone,
# since its forward may do something else
COUNTERPARTS: dict[type[nn.Module], type[nn.Module]] = {
    cls.__bases__[-1]: cls
    for cls in vars(modules).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == modules.__name__
    and not cls.__name__.startswith(("_", "Fused"))
}

# a Sequential of exactly these layers (torch.nn's or manual_grad's) becomes a fused block
FUSABLE: dict[tuple[type[nn.Module], ...], type[nn.Module]] = {
    (nn.Linear, nn.ReLU, nn.Linear): modules.FusedMLP,
    (nn.Linear, nn.ReLU): modules.FusedLinearReLU,
}

# options the manual layer refuses: such a layer is kept, and the report says why
UNSUPPORTED: dict[type[nn.Module], Callable[[nn.Module], str | None]] = {
    nn.Embedding: lambda m: "sparse=True" if m.sparse else None,
    nn.LeakyReLU: lambda m: "inplace with a negative slope"
    if m.inplace and m.negative_slope < 0 else None,
}

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Conversion(NamedTuple):
    """What :func:`convert` returns: the model, and where each layer stands."""

    model: nn.Module
    replaced: dict[str, str]  # qualified name -> the torch.nn type it was
    kept: dict[str, str]  # qualified name -> its type, and why it was kept

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} layers with manual_grad ones"]
        lines += [f"  kept {name or '<root>'}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def _fused_class(module: nn.Module) -> type[nn.Module] | None:
    if type(module) is not nn.Sequential:
        return None
    # a child counts as its torch.nn type, whether it is torch's or manual_grad's
    as_torch = {manual: torch_type for torch_type, manual in COUNTERPARTS.items()}
    return FUSABLE.get(tuple(as_torch.get(type(m), type(m)) for m in module))


def convert(model: nn.Module, inplace: bool = False, fuse: bool = False) -> Conversion:
    """Replace every supported torch.nn layer in ``model`` (nested ones too).

    Each replaced layer keeps its very parameters and buffers (and hooks): only its
    class changes, to the manual_grad subclass whose forward calls a hand-derived
    Function, so outputs and gradients stay the same. ``inplace=False`` (default)
    converts a deep copy and leaves ``model`` untouched. Returns the model with a
    report of what was replaced and of every leaf layer kept as it was, and why.
    """
    if not inplace:
        model = copy.deepcopy(model)
    replaced, kept = {}, {}
    fused: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{f}.") or f == "" for f in fused):
            continue  # inside a fused block: its children are no longer called
        kind = type(module)
        block = _fused_class(module) if fuse else None
        if block is not None:
            replaced[name] = f"Sequential({', '.join(type(m).__name__ for m in module)})"
            module.__class__ = block
            fused.append(name)
            continue
        if kind in COUNTERPARTS:
            reason = UNSUPPORTED.get(kind, lambda m: None)(module)
            if reason is None:
                module.__class__ = COUNTERPARTS[kind]
                replaced[name] = kind.__name__
                continue
            kept[name] = f"{kind.__name__} ({reason} is not supported by manual_grad)"
        elif kind not in COUNTERPARTS.values() and not isinstance(module, CONTAINERS) \
                and not any(True for _ in module.children()):
            kept[name] = f"{kind.__name__} (no manual_grad counterpart)"
    return Conversion(model, replaced, kept)
