"""A hand-written formula, compiled into fused kernels where that is measured to pay.

Written as torch ops, an element-wise formula such as GELU's slope P(z) + z p(z) makes
one full pass over memory per op, where torch's own backward is one fused kernel: on
the CPU that is most of the difference between them (GELU at GPT sizes: 3-5x torch's
time eager, 1.2x compiled; docs/performance.md). Compiling the very same formula with
inductor fuses its ops into one loop. The formula stays the one written here; only its
execution changes.

Whether it pays depends on the machine and the size, so it is chosen at run time
(``MODE``, or the environment variable ``MANUAL_GRAD_FUSE``):

- ``"auto"`` (default): the first call for a device, dtype, thread count and shape
  compiles the formula for that shape (about a second; seconds for the first) and times
  it against the eager formula on the call's own inputs; the faster is kept for that
  key. A failed compile (no C++ compiler, say) keeps the eager formula, with one warning.

- ``"always"``: compiled wherever it applies; ``"never"``: always eager.

Each formula is compiled for its first ``STATIC_SHAPES`` shapes one by one, as static
code: inductor's code for symbolic sizes ran 1.1-1.4x slower on this project's CPU
(BatchNorm's backward at resnet sizes 804 us against 576, GroupNorm's 1,961 against
348). On the CPU inductor compiles the formula's traced graph itself and it is called
directly (:class:`_PerSignature`), without torch.compile's guards and frame hooks.
Past those shapes (inputs whose lengths keep changing, say) one torch.compile with
symbolic sizes serves the rest, chosen per size to a power of two, so that no
sequence of shapes recompiles without end.

The same switch governs the other forms chosen by measurement (:func:`faster`), such as
the memory layout of convolution's weight gradient: ``"never"`` keeps the plain form.

It applies only to tensors of at least ``MIN_ELEMENTS`` elements, and never where the
eager formula is required: while torch.compile or a torch.func transform traces (they
see the formula itself), when a graph of the backward is wanted (double backward), or
for tensor subclasses and the meta device. Under
``torch.use_deterministic_algorithms(True)``, ``"auto"`` keeps the plain forms: which
form a measurement keeps depends on timing, and the forms round differently in the last
bits, so a choice would make two runs differ (``"always"`` is no choice, and holds).
"""

import os
import statistics
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter
from torch.utils import _pytree as pytree

from manual_grad import _compat
from manual_grad.functions._fast_apply import traced

MODE = os.environ.get("MANUAL_GRAD_FUSE", "auto")
# Below ~16K elements a compiled call's fixed cost (~10 us: inductor's wrapper, the
# signature's lookup) outweighs what fusing saves. Through torch.compile, whose guards
# and frame hooks cost 15-20 us more, the line was 128K: from 4K, a (64, 256)
# BatchNorm1d ran 20% slower inside a step than its first call had measured. Called
# directly (_PerSignature), from 16K: resnet18's step (batch 8, 64 x 64) went from
# 1.32x torch.nn's to 1.25x, BatchNorm1d (64, 256) from 2.1-2.6x to 1.8-1.9x.
MIN_ELEMENTS = 1 << 14
STATIC_SHAPES = 8  # per formula: then one compile with symbolic sizes (module doc)
_DEVICES = ("cpu", "cuda")
_deterministic = torch.are_deterministic_algorithms_enabled


def _capturing() -> bool:
    """Whether a CUDA graph is being captured: no timing then (a synchronize is illegal
    inside a capture); the plain form runs, and nothing is decided."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Fusable:
    """``fn``, a pure formula of tensors (and constants), run compiled or eagerly.

    ``eager``, if given, computes the same values with the same arguments, written for
    eager speed (in place, fewer temporaries); it runs wherever the compiled formula
    does not. Without it the formula itself runs eagerly.

    ``choices`` maps (device type, dtype, threads, shape), or past ``STATIC_SHAPES``
    shapes (device type, dtype, threads, size's power of two), to what runs there: a
    compiled form of ``fn``, or ``eager``."""

    def __init__(self, fn: Callable[..., Any], eager: Callable[..., Any] | None = None
                 ) -> None:
        self.fn = fn
        self.eager = eager or fn
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__
        self.compiled: Callable[..., Any] | None = None  # for symbolic sizes
        self.static: dict[tuple, Callable[..., Any]] = {}  # (device, dtype, shape) -> code
        self.choices: dict[tuple, Callable[..., Any]] = {}
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        t = args[0] if isinstance(args[0], Tensor) else next(
            a for a in args if isinstance(a, Tensor))
        if t.numel() < MIN_ELEMENTS or not self.applies(t):
            return self.eager(*args)
        # Parameters as plain tensors: Dynamo takes a parameter's shape as fixed, so each
        # new layer width (a BatchNorm of 64 channels, then of 128, ...) would compile
        # anew, seconds each, until its recompile limit refuses (an error under
        # fullgraph): efficientnet_b0 has 16 widths
        # (type(a) is, not isinstance: Parameter's isinstance runs Python, ~1 us a call)
        args = tuple(a.detach() if type(a) is Parameter else a for a in args)
        key = (t.device.type, t.dtype, torch.get_num_threads(), t.shape)
        run = self.choices.get(key)
        if run is None:
            if len(self.static) >= STATIC_SHAPES:  # shapes that keep changing: by size
                key = key[:3] + (t.numel().bit_length(),)
                run = self.choices.get(key)
            if run is None:
                if _capturing():
                    return self.eager(*args)
                run = self.choices[key] = self._choose(t.device, args, key)
        if run is self.eager:  # (outside the try: an error of the eager form is the call's)
            return run(*args)
        try:
            return run(*args)
        except Exception as err:  # a later call that will not compile: eager from now on
            self._give_up(err)
            return self.eager(*args)

    def applies(self, t: Tensor) -> bool:
        return (MODE != "never" and not self.failed
                and t.numel() >= MIN_ELEMENTS
                and type(t) is Tensor and t.device.type in _DEVICES
                and not torch.is_grad_enabled() and not traced()
                and not (MODE == "auto" and _deterministic()))

    def _compiled_for(self, key: tuple) -> Callable[..., Any]:
        """The formula compiled for key's shape as static code, or (a key by size) for
        symbolic sizes. On the CPU, for real dtypes, inductor compiles the formula's
        traced graph directly (_PerSignature); elsewhere torch.compile does, and each
        shape's compile gets its own copy of the formula's code object: Dynamo counts
        recompiles per code object, and refuses past 8."""
        if isinstance(key[3], int):
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            return self.compiled
        shape_key = (key[0], key[1], key[3])
        if shape_key in self.static:
            return self.static[shape_key]
        if key[0] == "cpu" and not key[1].is_complex and _compat.inductor_compile():
            self.static[shape_key] = _PerSignature(self.fn, self.eager)
        else:
            fn = self.fn
            copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                      fn.__defaults__, fn.__closure__)
            self.static[shape_key] = torch.compile(copy, dynamic=False, fullgraph=True)
        return self.static[shape_key]

    def _give_up(self, err: Exception) -> None:
        self.failed = True
        warnings.warn(f"manual_grad: compiling {self.__name__} failed ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[0][:200]}); it runs eagerly from now "
                      "on (set MANUAL_GRAD_FUSE=never to skip the attempt)", stacklevel=4)

    def _choose(self, device: torch.device, args: tuple, key: tuple) -> Callable[..., Any]:
        try:
            compiled = self._compiled_for(key)
            compiled(*args)  # compiles now
        except Exception as err:  # no compiler, an unsupported op: the eager formula
            self._give_up(err)
            return self.eager
        if MODE == "always":
            return compiled
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for is_compiled in (False, True):
                run = compiled if is_compiled else self.eager
                _sync(device)
                start = time.perf_counter()
                run(*args)
                _sync(device)
                times[is_compiled].append(time.perf_counter() - start)
        return compiled if statistics.median(times[True]) < statistics.median(times[False]) \
            else self.eager


class _PerSignature:
    """``fn`` compiled by inductor from its traced graph, without Dynamo, once for each
    signature of its arguments: every tensor's shape, strides, dtype and device, the
    other arguments' values and the thread count, what Dynamo's guards would check
    (these calls checked by a dictionary lookup). Dynamo's frame hook, guards and
    wrappers cost 15-20 us a call on a 2-core CPU, a quarter of a LayerNorm backward's
    at GPT sizes (75 us this way, 93 us through torch.compile; torch's kernel: 73 us).
    Past ``RECOMPILES`` signatures, new ones run ``eager``."""

    RECOMPILES = 8

    def __init__(self, fn: Callable[..., Any], eager: Callable[..., Any]) -> None:
        self.fn, self.eager = fn, eager
        self.runs: dict[tuple, Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        signature = (torch.get_num_threads(), *(
            (a.shape, a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else a
            for a in args))
        run = self.runs.get(signature)
        if run is None:
            run = self.runs[signature] = self.eager if len(self.runs) >= self.RECOMPILES \
                else _inductor_compile(self.fn, args)
        return run(*args)


def _inductor_compile(fn: Callable[..., Any], args: tuple) -> Callable[..., Any]:
    """fn(*args) traced into a graph of aten ops (make_fx), its non-tensor arguments
    fixed as constants, and compiled by inductor for exactly these inputs. The returned
    function takes the same arguments and returns fn's structure of outputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    where = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    structure: list[pytree.TreeSpec] = []

    def flat(*tensors: Tensor) -> list[Any]:
        full = list(args)
        for i, t in zip(where, tensors, strict=True):
            full[i] = t
        leaves, spec = pytree.tree_flatten(fn(*full))
        structure.append(spec)
        return leaves

    tensors = [args[i] for i in where]
    # (fake tensors: a formula that reads values, which fullgraph compiles refuse,
    # fails here too rather than keeping the values it saw)
    compiled = _compat.inductor_compile()(make_fx(flat, tracing_mode="fake")(*tensors),
                                          tensors)
    spec = structure[0]

    def run(*call_args: Any) -> Any:
        return pytree.tree_unflatten(compiled(*[call_args[i] for i in where]), spec)
    return run


def faster(choices: dict[tuple, int], key: tuple, forms: tuple[Callable[..., Any], ...],
           args: tuple) -> Callable[..., Any]:
    """One of ``forms``, ways to the same values, the first the plain one, by ``MODE``:
    the second under ``"always"``, the plain one under ``"never"`` and wherever code is
    traced, and under ``"auto"`` the plain one with deterministic algorithms on (module
    doc), else whichever ran fastest on ``args`` (the call's own inputs, best of three in turn
    after a warm-up) the first time ``key`` was seen, its index kept in ``choices``."""
    if MODE == "never" or traced():
        return forms[0]
    if MODE == "always":
        return forms[1]
    if _deterministic():
        return forms[0]
    choice = choices.get(key)
    if choice is None:
        if _capturing():
            return forms[0]
        device = next(a for a in args if isinstance(a, Tensor)).device
        choice = choices[key] = fastest([lambda f=f: f(*args) for f in forms], device)
    return forms[choice]


def fastest(runs: list[Callable[[], Any]], device: torch.device) -> int:
    """The index of the run that took least time: each in turn (the order reversed every
    other turn), one turn to warm up, then the best of three; a tie goes to the earlier.
    Shared by the measured choices here and functional's single pass."""
    best = [float("inf")] * len(runs)
    for turn in range(4):
        for i in range(len(runs)) if turn % 2 else reversed(range(len(runs))):
            _sync(device)
            start = time.perf_counter()
            runs[i]()
            _sync(device)
            if turn:  # (the first turn warms up)
                best[i] = min(best[i], time.perf_counter() - start)
    return best.index(min(best))


def fusable(eager: Callable[..., Any] | None = None
            ) -> Callable[[Callable[..., Any]], Fusable]:
    """Decorator of a formula: see the module's docstring and :class:`Fusable`."""
    return lambda fn: Fusable(fn, eager)
