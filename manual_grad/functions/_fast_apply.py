"""Cheaper ``apply`` for Functions written in the forward / setup_context style.

That style is the one torch.func (vmap, grad, jacrev) and torch.compile need, but in
eager mode it costs more per call than the older combined ``forward(ctx, *args)``
style: before every call torch binds the arguments to ``forward``'s signature in Python
(``inspect.Signature.bind``) to fill in defaults. Measured on a 2-core CPU with torch
2.14: ~10 us per apply against ~2.5 us, about a quarter of a 64-row Linear's whole
forward.

``fast_apply`` keeps the class exactly as written (its forward, setup_context and
backward are the only math there is) and adds a twin in the combined style whose
``forward(ctx, *args)`` just calls the two: the same code, differently wired. The
class's ``apply`` then takes the twin in plain eager mode and torch's own path whenever
a torch.func transform is active or torch.compile is tracing. Keyword arguments are
bound to ``forward``'s signature first, whichever path follows.
"""

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad import _compat

_torch_apply = Function.__dict__["apply"]  # torch's classmethod: binds, then runs the graph


# held here: reaching them through torch's modules on every call made traced() ~40% dearer
_is_compiling = torch.compiler.is_compiling
_transforms_active = _compat.transforms_active
_is_legacy_batched = _compat.is_legacy_batched


def traced() -> bool:
    """Whether code is being traced rather than just run: inside a torch.func transform
    (vmap, grad) or while torch.compile traces. There torch's own paths and out-of-place
    ops are needed; elsewhere the eager shortcuts here and in the Functions may be taken."""
    return _is_compiling() or _transforms_active()


def plain_backward(g: Tensor) -> bool:
    """Whether a backward may take its plain path (ops in place or into ``out=``, kept
    constants, g read on the host): no graph of the backward is wanted, nothing traces
    it, and g is not batched by ``autograd.grad(..., is_grads_batched=True)`` (as
    ``torch.autograd.functional.jacobian(..., vectorize=True)`` does): that is torch's
    older vmap, which traced() does not see and which refuses in-place and out= ops."""
    return not (torch.is_grad_enabled() or traced() or _is_legacy_batched(g))


def legacy_batched(g: Tensor) -> bool:
    """Whether g is batched by torch's older vmap, as autograd.grad(...,
    is_grads_batched=True) batches the incoming gradients (never while tracing: there
    torch.compile and torch.func handle batching themselves)."""
    if not _LEGACY_CHECK:  # (no way to tell: the path that works for every g)
        return True
    return not traced() and _is_legacy_batched(g)


_LEGACY_CHECK = _compat.FOUND["torch._C._functorch.is_legacy_batchedtensor"]


def tangent_sum(*terms: Tensor | None, shape: tuple[int, ...] | None = None) -> Tensor | None:
    """The sum of a jvp's terms, each there only for an input that has a tangent (None
    when no term is: an input without a tangent costs nothing); broadcast to ``shape``,
    the output's, when a term such as a bias's tangent is smaller."""
    total = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    if total is not None and shape is not None and total.shape != shape:
        total = total.expand(shape)
    return total


_dynamo_tracing = _compat.dynamo_tracing  # (None unless torch.compile traces)


class _JvpOutsideDynamo:
    """A Function's ``jvp``, hidden from torch.compile's tracer.

    Dynamo (torch 2.14) stops at any Function that defines jvp, forward mode or not
    ("Unsupported custom jvp": pytorch#180284), so a model of manual_grad layers would no
    longer compile. While Dynamo traces, this attribute reads as torch's default jvp, and
    Dynamo traces forward and backward as before; everywhere else it is the Function's
    own. (Forward mode inside a compiled region then differentiates the forward's ops by
    torch's rules, which Dynamo does even with a jvp in sight: pytorch#192985.)"""

    def __init__(self, jvp: Any) -> None:
        self.jvp = jvp
        self.__doc__ = jvp.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if _dynamo_tracing() is None or _forward_mode_active():
            return self.jvp
        return Function.jvp


def _forward_mode_active() -> bool:
    """Whether a tangent may meet a Function: a torch.func transform or a forward-mode
    level is open (then a traced Function shows its jvp, and torch.compile stops there,
    as it must: a graph break, or an error under fullgraph=True)."""
    return _compat.forward_mode_active()


def fast_apply(cls: type[Function]) -> type[Function]:
    """Give ``cls`` an eager-mode ``apply`` that skips argument binding (see module doc)."""
    signature = inspect.signature(cls.forward)
    cls.forward.__signature__ = signature  # torch's own path: no re-inspection per call
    params = list(signature.parameters.values())
    defaults = tuple(p.default for p in params)
    n_params = len(params)
    # the fewest positional arguments a call may give: the rest must have defaults
    n_required = max((i + 1 for i, p in enumerate(params) if p.default is p.empty), default=0)
    forward, setup_context = cls.forward, cls.setup_context

    def combined_forward(ctx: Any, *args: Any) -> Any:
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    twin = type(cls.__name__, (Function,), {
        "__doc__": f"``{cls.__name__}`` wired in the combined forward(ctx, ...) style.",
        "__module__": cls.__module__,
        "forward": staticmethod(combined_forward),
        "backward": staticmethod(cls.backward),
        "jvp": staticmethod(cls.jvp),  # forward mode (torch.autograd.forward_ad)
    })

    def apply(klass: type[Function], *args: Any, **kwargs: Any) -> Any:
        if klass is not cls:  # a subclass, perhaps with another forward: torch's path
            return _torch_apply.__get__(None, klass)(*args, **kwargs)
        if kwargs:  # bound here: torch 2.11's own apply passes keywords on and fails
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if not n_required <= len(args) <= n_params or traced():
            return _torch_apply.__get__(None, klass)(*args)
        if len(args) < n_params:  # fill in forward's defaults, as torch's binding does
            args = args + defaults[len(args):]
        return twin.apply(*args)

    # The graph node calls its class's ``apply``, which in torch looks up the user's
    # backward in Python on every call; the twin's node calls backward directly.
    _compat.set_backward_fast_path(twin, cls.backward)
    cls.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    cls._eager_twin = twin  # type: ignore[attr-defined]
    cls.jvp = _JvpOutsideDynamo(vars(cls)["jvp"].__func__)  # type: ignore[method-assign]
    # For callers that have checked their arguments and give them all positionally, and
    # have asked traced() themselves (manual_grad.functional): the twin's apply with none
    # of the above, ~1 us less per call on a 2-core CPU.
    cls._eager_apply = twin.apply  # type: ignore[attr-defined]
    return cls
