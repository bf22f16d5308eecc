"""Every private torch and Lightning API manual_grad uses, in one place, each with a public
fallback.

A private API can change in any release without notice. Each one here was chosen for speed
or for a question no public API answers, and each has a fallback that keeps the package
importable and its results correct where the internal is missing or renamed: the fallback
is slower, or takes the general path where the internal let a shortcut be taken. The
fallbacks are said next to each. ``tests/test_compat.py`` names each internal, checks it
still exists on the installed torch and Lightning, and runs the suite's core with every
fallback forced (``MANUAL_GRAD_COMPAT_FALLBACKS=1``).

Used by ``functional``, ``modules``, ``functions/_fast_apply``, ``functions/_fuse``,
``functions/losses``, ``functions/single_pass`` and ``training``; nowhere else reaches
past a public API.
"""

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# Set to 1 to use every fallback, as on a release where the internals are gone (tests).
FORCED = os.environ.get("MANUAL_GRAD_COMPAT_FALLBACKS") == "1"

# name -> whether the internal was found (False: its fallback is in use)
FOUND: dict[str, bool] = {}


def _private(name: str, get: Callable[[], Any], fallback: Any) -> Any:
    """``get()``, the internal, or ``fallback`` where it is missing (or FORCED)."""
    if not FORCED:
        try:
            value = get()
        except (AttributeError, ImportError):
            pass
        else:
            FOUND[name] = True
            return value
    FOUND[name] = False
    return fallback


# -- torch ------------------------------------------------------------------------------

def _any_autocast_public() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda", "xpu", "mps"))


# Whether autocast is on for any device: one C call (~0.1 us on a 2-core CPU), against
# ~0.6 us for a torch.is_autocast_enabled(device) per device.
any_autocast: Callable[[], bool] = _private(
    "torch._C._is_any_autocast_enabled", lambda: torch._C._is_any_autocast_enabled,
    _any_autocast_public)

# Whether a torch.func transform (vmap, grad, jvp) is active. Fallback: assume one is,
# so the eager shortcuts are never taken (slower, the same results).
transforms_active: Callable[[], bool] = _private(
    "torch._C._are_functorch_transforms_active",
    lambda: torch._C._are_functorch_transforms_active, lambda: True)

# Whether a tensor is wrapped by a torch.func transform (its values cannot be read for a
# check). Fallback: assume it is, and skip the value checks (torch's own errors remain).
is_functorch_wrapped: Callable[[Tensor], bool] = _private(
    "torch._C._functorch.is_functorch_wrapped_tensor",
    lambda: torch._C._functorch.is_functorch_wrapped_tensor, lambda t: True)

# Whether a tensor is batched by autograd.grad(..., is_grads_batched=True), torch's older
# vmap, which refuses in-place ops. Fallback: assume it is, and take the out-of-place
# backward (more memory, the same results).
is_legacy_batched: Callable[[Tensor], bool] = _private(
    "torch._C._functorch.is_legacy_batchedtensor",
    lambda: torch._C._functorch.is_legacy_batchedtensor, lambda t: True)


def _dynamo_tracing_public() -> object | None:
    return True if torch.compiler.is_compiling() else None


# Non-None while torch.compile's Dynamo traces. Fallback: torch.compiler.is_compiling().
dynamo_tracing: Callable[[], object | None] = _private(
    "torch._guards.TracingContext.try_get", lambda: torch._guards.TracingContext.try_get,
    _dynamo_tracing_public)

_peek = _private("torch._C._functorch.peek_interpreter_stack",
                 lambda: torch._C._functorch.peek_interpreter_stack, None)
_has_level = _private("torch.autograd.forward_ad._current_level",
                      lambda: (torch.autograd.forward_ad._current_level, True)[1], False)


def forward_mode_active() -> bool:
    """Whether a tangent may meet a Function: a torch.func transform or a forward-mode
    level is open. Asked only while torch.compile traces. Fallback: False, and inside a
    compiled region forward mode differentiates the forward's ops by torch's rules (the
    same values; outside one the hand-derived jvp is used either way)."""
    if _peek is not None and _peek() is not None:
        return True
    return _has_level and torch.autograd.forward_ad._current_level >= 0


def set_backward_fast_path(function: type, backward: Callable[..., Any]) -> bool:
    """Make a Function's graph nodes call ``backward`` directly: torch's node looks the
    user's backward up in Python on every call (``Function._backward_cls.apply``).
    Fallback: leave torch's lookup (a few microseconds a node slower)."""
    node = getattr(function, "_backward_cls", None) if not FORCED else None
    FOUND["torch.autograd.Function._backward_cls"] = node is not None
    if node is None:
        return False
    node.apply = backward
    return True


def _mse_loss_public(u: Tensor, y: Tensor, reduction: int) -> Tensor:
    return torch.nn.functional.mse_loss(u, y, reduction=REDUCTIONS_BY_ENUM[reduction])


REDUCTIONS_BY_ENUM = {0: "none", 1: "mean", 2: "sum"}
REDUCTION_ENUM = {name: code for code, name in REDUCTIONS_BY_ENUM.items()}

# torch's MSE forward kernel without F.mse_loss's Python checks (ours are done already).
# Fallback: F.mse_loss (the same kernel, behind its checks).
mse_loss_kernel: Callable[[Tensor, Tensor, int], Tensor] = _private(
    "torch._C._nn.mse_loss", lambda: torch._C._nn.mse_loss, _mse_loss_public)


def _legacy_reduction_public(size_average: bool | None, reduce: bool | None) -> str:
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


# The reduction the deprecated size_average= / reduce= pair stands for.
legacy_reduction: Callable[[bool | None, bool | None], str] = _private(
    "torch.nn._reduction.legacy_get_string",
    lambda: __import__("torch.nn._reduction", fromlist=["x"]).legacy_get_string,
    _legacy_reduction_public)


def _foreach_mul_public(tensors: list[Tensor], scalar: Tensor) -> None:
    for t in tensors:
        t.mul_(scalar)


# Multiply tensors in place by one value in one call (one kernel launch on a GPU).
# Fallback: one mul_ each.
foreach_mul_: Callable[[list[Tensor], Tensor], Any] = _private(
    "torch._foreach_mul_", lambda: torch._foreach_mul_, _foreach_mul_public)


def _module_parameters(layer: torch.nn.Module) -> dict[str, Any] | None:
    return layer._parameters


# A module's registered parameters, read without nn.Module.__getattr__ (~3 us a read).
# (A Python function, not operator.attrgetter: torch.compile cannot trace the latter.)
# Fallback: None, and the caller reads the attributes the usual way.
module_parameters: Callable[[torch.nn.Module], dict[str, Any] | None] = _private(
    "torch.nn.Module._parameters",
    lambda: (torch.nn.Linear(1, 1)._parameters, _module_parameters)[1], lambda layer: None)


# -- Lightning --------------------------------------------------------------------------

def _is_overridden_public(name: str, instance: object, parent: type | None = None) -> bool:
    import lightning as L

    if parent is None:
        parent = L.LightningModule if isinstance(instance, L.LightningModule) else L.Callback
    mine, base = getattr(type(instance), name, None), getattr(parent, name, None)
    return mine is not None and base is not None and mine is not base


def _lightning_is_overridden() -> Callable[..., bool]:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden


@functools.cache
def inductor_compile() -> Callable[..., Any] | None:
    """Inductor's compile of an FX graph for given inputs, looked up on first use
    (importing it takes seconds; only a compile needs it). functions/_fuse.py calls what
    it returns directly, 15-20 us a call less than through torch.compile's guards and
    frame hooks on a 2-core CPU. Fallback: None, and the formulas are compiled by
    torch.compile (static shapes, a copy of the formula's code each)."""
    def get() -> Callable[..., Any]:
        import torch._inductor
        return torch._inductor.compile
    return _private("torch._inductor.compile", get, None)


@functools.cache
def _lightning(name: str) -> Any:
    """The Lightning internals, looked up on first use (importing manual_grad's layers
    does not import Lightning)."""
    if name == "is_overridden":
        return _private("lightning.pytorch.utilities.model_helpers.is_overridden",
                        _lightning_is_overridden, _is_overridden_public)
    return _private("lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler",
                    _lightning_unrepeated, _UnrepeatedSampler)


def is_overridden(name: str, instance: object, parent: type | None = None) -> bool:
    """Whether a module or callback overrides the hook ``name``. Fallback: compare the
    method with the base class's."""
    return _lightning("is_overridden")(name, instance, parent)


class _UnrepeatedSampler(torch.utils.data.Sampler[int]):
    """Every index on exactly one rank, in rank-strided order; no padding."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, shuffle: bool = False):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):  # type: ignore[override]
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _lightning_unrepeated() -> type:
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler


def unrepeated_sampler(dataset: Any, num_replicas: int, rank: int) -> Any:
    """A DistributedSampler that pads no rank's share with repeated samples (evaluation).
    Fallback: the same rule, written here."""
    return _lightning("sampler")(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def step_count_hooks(optimizer: Any) -> tuple[Callable[[], None], Callable[[], None]] | None:
    """The hooks a LightningOptimizer runs around a manual step to count global_step
    (``_on_before_step`` / ``_on_after_step``), or None where they are missing: then the
    caller takes Lightning's full ``optimizer.step()`` (~80 us a step slower on a CPU)."""
    before = getattr(optimizer, "_on_before_step", None) if not FORCED else None
    after = getattr(optimizer, "_on_after_step", None) if not FORCED else None
    FOUND["lightning LightningOptimizer._on_before_step/_on_after_step"] = \
        before is not None and after is not None
    if before is None or after is None:
        return None
    return before, after


def batches_done(trainer: Any) -> int | None:
    """How many batches of the current epoch the trainer completed (read from its fit
    loop's progress), or None where that is not found: then a run resumed mid-epoch
    starts the epoch's batches again rather than skipping the right ones."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
    except AttributeError:
        return None


def private_names() -> Iterable[str]:
    """The internals this module reaches for (after import, with whether each was found)."""
    return sorted(FOUND)
