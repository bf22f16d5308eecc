"""Training steps captured once as a CUDA graph and replayed (opt-in: ``model.cuda_graph``).

On a GPU a batch-64 step of the seed's MLP is a few dozen tiny kernels, and launching
them from Python costs far more than running them (issue #6 measured ~1 ms a step of
host time on an H200 against ~60 us for the whole step replayed as a graph). A CUDA
graph records the launches of one whole step -- forward, hand-derived backward and
optimiser step -- and replays them with a single call. A replay reads and writes fixed
addresses, so each batch is copied into static input buffers first and the loss is read
from a static output.

This follows PyTorch's "whole-network capture" recipe: a few real steps run first on a
side stream (lazy initialisation, the optimiser's state), then one step is captured and
every later step with the same batch shapes replays it. A batch of other shapes (an
epoch's smaller last batch) runs as an ordinary step. The learning rate and every other
optimiser setting are frozen into the graph: no LR scheduler.
"""

from collections.abc import Callable

import torch
from torch import Tensor


class GraphedSteps:
    """Optimiser steps ``zero_grad; loss = step_loss(x, y); loss.backward(); step``, the
    first ``warmup`` run as usual, then one captured as a CUDA graph and replayed.

    ``emulate=True`` is for machines without a GPU (the tests): instead of capturing, the
    "graph" runs the same step eagerly on the static buffers, which exercises everything
    here but the capture itself.
    """

    def __init__(self, step_loss: Callable[[Tensor, Tensor], Tensor],
                 optimizer: torch.optim.Optimizer, warmup: int = 3,
                 emulate: bool = False) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (CUDA graphs need a warmed-up step), "
                             f"got {warmup}")
        self.step_loss, self.optimizer = step_loss, optimizer
        self.warmup, self.emulate = warmup, emulate
        self.steps = 0  # steps taken so far, warm-up and eager ones included
        self.shape: torch.Size | None = None  # the usual batch's: the first one's
        self.replays = 0
        self.static: tuple[Tensor, Tensor] | None = None  # the captured step's inputs
        self.static_loss: Tensor | None = None
        self._replay: Callable[[], None] | None = None

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimiser step on (x, y); returns its loss, a new tensor on the device
        (nothing waits for the GPU)."""
        self.steps += 1
        if self.shape is None:
            self.shape = x.shape
        if self._replay is None and self.steps > self.warmup and x.shape == self.shape:
            self._capture(x, y)
        if self.static is not None and x.shape == self.static[0].shape \
                and y.shape == self.static[1].shape:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self._replay()  # type: ignore[misc]
            self.replays += 1
            return self.static_loss.detach().clone()  # type: ignore[union-attr]
        return self._eager(x, y)

    def _once(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step_loss(x, y)
        loss.backward()
        self.optimizer.step()
        return loss

    def _eager(self, x: Tensor, y: Tensor) -> Tensor:
        if self.emulate or not x.is_cuda or self._replay is not None:
            return self._once(x, y).detach()
        # before the capture: on a side stream, as the capture recipe asks of warm-ups
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            loss = self._once(x, y).detach()
        torch.cuda.current_stream(x.device).wait_stream(side)
        return loss

    def _capture(self, x: Tensor, y: Tensor) -> None:
        static_x, static_y = x.clone(), y.clone()
        if self.emulate:
            def replay() -> None:
                self.static_loss = self._once(static_x, static_y)
        else:
            if not x.is_cuda:
                raise RuntimeError("GraphedSteps: CUDA graphs need the batches on a CUDA "
                                   f"device, got {x.device}; train on a GPU or pass "
                                   "emulate=True")
            # gradients are allocated inside the graph's own memory; every replay
            # writes them there and the captured optimiser step reads them there
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self.step_loss(static_x, static_y)
                loss.backward()
                self.optimizer.step()
            self.static_loss = loss
            replay = graph.replay
        self.static, self._replay = (static_x, static_y), replay
