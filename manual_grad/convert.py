"""convert(model): swap every supported torch.nn layer for its manual_grad counterpart,
and report truthfully what still runs on torch's own gradients."""

import copy
import sys
from collections.abc import Callable
from typing import NamedTuple

from torch import nn
from torch.nn import functional as torch_functional
from torch.nn.utils import parametrize

from manual_grad import functional, modules

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



def counterparts() -> dict[type[nn.Module], type[nn.Module]]:
    """COUNTERPARTS, and torchvision's own layers' (manual_grad.vision) once torchvision
    is imported: a model of its layers has imported it, and manual_grad alone does not."""
    if "torchvision" not in sys.modules:
        return COUNTERPARTS
    from manual_grad import vision
    return {**COUNTERPARTS, **vision.COUNTERPARTS}

# torch's activation functions as torch.nn layers hold them in an attribute
# (TransformerEncoderLayer's and TransformerDecoderLayer's activation="relu" / "gelu"),
# and manual_grad.functional's: the layer's forward calls whichever it holds
ACTIVATIONS: dict[Callable[..., object], Callable[..., object]] = {
    torch_functional.relu: functional.relu, torch_functional.gelu: functional.gelu}

# options the manual layer refuses: such a layer is kept, and the report says why
UNSUPPORTED: dict[type[nn.Module], Callable[[nn.Module], str | None]] = {
    nn.Embedding: lambda m: "sparse=True" if m.sparse else None,
    nn.LeakyReLU: lambda m: "inplace with a negative slope"
    if m.inplace and m.negative_slope < 0 else None,
}

# torch.nn layers that read their children's parameters rather than calling them (their
# manual_grad subclasses too)
CALLS_CHILDREN = (nn.MultiheadAttention,)

# modules that are not layers: containers, and nn.Identity (it hands its input on)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, parametrize.ParametrizationList,
              nn.Identity)


def _is_manual(module: nn.Module) -> bool:
    """Whether module's forward runs hand-derived Functions."""
    return isinstance(module, (*counterparts().values(), *FUSABLE.values()))


def _parametrized_counterpart(module: nn.Module) -> type[nn.Module] | None:
    """For a layer under torch.nn.utils.parametrize (weight_norm, spectral_norm,
    orthogonal...), whose class torch made a subclass of the layer's (ParametrizedLinear
    of Linear): a class with manual_grad's forward and the parametrized class's
    properties, which compute the weight. None when the layer has no counterpart."""
    if not parametrize.is_parametrized(module):
        return None
    parametrized = type(module)
    counterpart = counterparts().get(parametrized.__bases__[0])
    if counterpart is None:
        return None
    # torch gives each parametrized layer a class of its own, holding a property per
    # parametrized tensor: the same, on the manual_grad layer (remove_parametrizations
    # deletes them there and turns the layer into its first base, the manual_grad one)
    own = {k: v for k, v in vars(parametrized).items()
           if k not in ("__dict__", "__weakref__", "__module__", "__doc__")}
    return type(parametrized.__name__, (counterpart,), own)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of model by name: modules with no children, and torch.nn modules with
    children and parameters of their own (MultiheadAttention, whose in_proj_weight is
    its own); not a parametrization's own modules, nor anything inside a fused block. A
    model's own composite modules are not layers, though they may hold parameters (a
    ViT's class_token): ``Conversion.outside`` lists those."""
    layers: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        # a layer whose forward uses its children's parameters itself (a fused block,
        # MultiheadAttention's out_proj): the children are part of it, not layers
        owns_children = isinstance(module, (*FUSABLE.values(), *CALLS_CHILDREN))
        if parametrize.is_parametrized(module) or owns_children:
            skip.append(f"{name}." if name else "")
            layers[name] = module
            continue
        has_children = any(True for _ in module.children())
        own = any(True for _ in module.parameters(recurse=False))
        torch_layer = type(module).__module__.startswith("torch.nn.")
        if (not has_children or (own and torch_layer)) and not isinstance(module, CONTAINERS):
            layers[name] = module
    return layers


class Conversion(NamedTuple):
    """What :func:`convert` returns: the model, and where each layer stands.

    replaced: qualified name -> the torch.nn type it was; kept: every layer that still
    runs torch's own forward and backward, and why. ``native`` and ``coverage`` say
    which parameters get their gradients from torch rather than a hand-derived formula.
    """

    model: nn.Module
    replaced: dict[str, str]  # qualified name -> the torch.nn type it was
    kept: dict[str, str]  # qualified name -> its type, and why it was kept

    @property
    def native(self) -> dict[str, str]:
        """Every parameter of a layer whose gradient stays torch's: its qualified name ->
        the layer that owns it (a parameter held directly by a torch.nn module with
        children, such as MultiheadAttention's in_proj_weight, included)."""
        out = {}
        for name, layer in _layers(self.model).items():
            if _is_manual(layer):
                continue
            for pname, p in layer.named_parameters():
                if p.requires_grad:
                    out[f"{name}.{pname}" if name else pname] = \
                        f"{type(layer).__name__} at {name or '<root>'}"
        return out

    @property
    def outside(self) -> dict[str, str]:
        """Parameters that belong to no layer, used by the model's own code (a ViT's
        class_token and pos_embedding, ConvNeXt's layer_scale): qualified name -> the
        module holding it. Their gradients are torch's, of whatever ops that code runs
        (a concatenation, an addition): no layer to derive."""
        covered = {id(p) for layer in _layers(self.model).values() for p in layer.parameters()}
        out = {}
        for pname, p in self.model.named_parameters():
            if id(p) not in covered and p.requires_grad:
                owner = pname.rpartition(".")[0]
                out[pname] = f"{type(self.model.get_submodule(owner)).__name__} at " \
                             f"{owner or '<root>'}"
        return out

    def _counts(self) -> tuple[int, int, int, int]:
        """(hand-derived trainable parameter elements of the layers, all of them,
        hand-derived layers, all layers)."""
        layers = _layers(self.model)
        sizes = [(_is_manual(m), p.numel()) for m in layers.values() for p in m.parameters()
                 if p.requires_grad]
        return (sum(n for manual, n in sizes if manual), sum(n for _, n in sizes),
                sum(1 for m in layers.values() if _is_manual(m)), len(layers))

    def coverage(self) -> tuple[float, float]:
        """(share of the layers' trainable parameter elements, share of layers) with
        hand-derived gradients."""
        ours, total, manual, layers = self._counts()
        return (ours / total if total else 1.0), (manual / layers if layers else 1.0)

    def __str__(self) -> str:
        functions = sum(1 for what in self.replaced.values() if "activation function" in what)
        lines = [f"replaced {len(self.replaced) - functions} layers"
                 + (f" and {functions} activation functions" if functions else "")
                 + " with manual_grad ones"]
        lines += [f"  kept {name or '<root>'}: {why}" for name, why in self.kept.items()]
        native, outside = self.native, self.outside
        if native:
            lines.append(f"  {len(native)} parameters of kept layers keep torch's gradients:")
            lines += [f"    {name} ({owner})" for name, owner in native.items()]
        if outside:
            lines.append(f"  {len(outside)} parameters belong to no layer; the model's own "
                         "ops (torch's) give their gradients:")
            lines += [f"    {name} ({owner})" for name, owner in outside.items()]
        ours, total, manual, layers = self._counts()
        lines.append(
            f"hand-derived gradients: {_percent(ours, total)} of layer parameters "
            f"({ours:,} of {total:,}), {manual} of {layers} layers "
            f"({_percent(manual, layers)})")
        return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    """part of whole as a percentage with one decimal; 100.0% only when it is all (a share
    that would round up to it reads 99.9%)."""
    if part == whole:
        return "100.0%"
    return f"{min(100 * part / whole, 99.9):.1f}%"


def _fused_class(module: nn.Module) -> type[nn.Module] | None:
    if type(module) is not nn.Sequential:
        return None
    # a child counts as its torch.nn type, whether it is torch's or manual_grad's
    as_torch = {manual: torch_type for torch_type, manual in counterparts().items()}
    return FUSABLE.get(tuple(as_torch.get(type(m), type(m)) for m in module))


def _why_kept(module: nn.Module) -> str:
    kind = type(module)
    if parametrize.is_parametrized(module):
        base = kind.__bases__[0]
        names = ", ".join(module.parametrizations.keys())
        return (f"{base.__name__} under a parametrization of {names} (no manual_grad "
                "counterpart)")
    for torch_type in counterparts():
        if issubclass(kind, torch_type):
            return (f"{kind.__name__}, a subclass of torch.nn.{torch_type.__name__}: its "
                    "forward may differ, so it is not converted")
    return f"{kind.__name__} (no manual_grad counterpart)"


def convert(model: nn.Module, inplace: bool = False, fuse: bool = False) -> Conversion:
    """Replace every supported torch.nn layer in ``model`` (nested ones too).

    Each replaced layer keeps its very parameters and buffers (and hooks): only its
    class changes, to the manual_grad subclass whose forward calls a hand-derived
    Function, so outputs and gradients stay the same. A layer under a parametrization
    (weight_norm, spectral_norm, ...) is replaced too; the parametrization itself stays
    torch's. ``inplace=False`` (default) converts a deep copy and leaves ``model``
    untouched. Returns the model with a report of what was replaced and of every layer
    kept as it was, and why; ``str()`` of it also lists the parameters whose gradients
    stay torch's and ends with the share of parameters and layers that are hand-derived.
    """
    if not inplace:
        model = copy.deepcopy(model)
    table = counterparts()
    replaced, kept = {}, {}
    for name, module in _layers(model).items():
        kind = type(module)
        parametrized = _parametrized_counterpart(module)
        if _is_manual(module):
            continue
        if parametrized is not None:
            base = kind.__bases__[0]
            reason = UNSUPPORTED.get(base, lambda m: None)(module)
            if reason is None:
                module.__class__ = parametrized
                names = ", ".join(module.parametrizations.keys())
                replaced[name] = f"{base.__name__} (parametrized {names})"
                continue
            kept[name] = f"{base.__name__} ({reason} is not supported by manual_grad)"
        elif kind in table:
            reason = UNSUPPORTED.get(kind, lambda m: None)(module)
            if reason is None:
                module.__class__ = table[kind]
                replaced[name] = kind.__name__
                continue
            kept[name] = f"{kind.__name__} ({reason} is not supported by manual_grad)"
        else:
            kept[name] = _why_kept(module)
    for name, module in model.named_modules():
        held = vars(module).get("activation")
        if type(module).__module__.startswith("torch.nn.") and held in ACTIVATIONS:
            module.activation = ACTIVATIONS[held]
            replaced[f"{name}.activation" if name else "activation"] = \
                f"{held.__name__} (the activation function of {type(module).__name__})"
    if fuse:
        for name, module in list(model.named_modules()):
            block = _fused_class(module)
            if block is not None:
                inside = f"{name}." if name else ""  # (the root holds every name)
                replaced = {k: v for k, v in replaced.items()
                            if not k.startswith(inside) and k != name}
                replaced[name] = f"Sequential({', '.join(type(m).__name__ for m in module)})"
                module.__class__ = block
    return Conversion(model, replaced, kept)
